"""Math verifier throughput and worst-case latency.

    python bench/verifier_throughput.py --num_workers 2 --n 2000

1) throughput (checks/s) of MathVerifier.score over n synthetic but realistic completions
   (correct / equivalent-form / wrong / unboxed answers, short and long reasoning text);
2) per-case latency and score on a pathological set (each bounded by --timeout_s from outside).
Targets: >= 200 checks/s with 2 workers, no check over 5 s.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from verifiers.math import MathVerifier, graded_answer  # noqa: E402

FILLER = (
    "Let us consider the constraint again. Substituting $x = 2y + 1$ into the second equation "
    "gives $4y^2 + 4y + 1 - 3y = 7$, so $4y^2 + y - 6 = 0$ and $y = \\frac{-1 \\pm \\sqrt{97}}{8}$. "
)

# (gold, equivalent prediction forms, wrong predictions)
PROBLEMS = [
    ("204", ["204", "204.0", "\\text{204}"], ["203", "240"]),
    ("0.5", ["\\frac{1}{2}", "\\dfrac{1}{2}", "1/2", "0.5"], ["\\frac{1}{3}", "2"]),
    ("\\frac{3}{4}", ["0.75", "3/4", "\\dfrac{3}{4}"], ["\\frac{4}{3}", "0.7"]),
    ("8\\sqrt{10}", ["8\\sqrt{10}", "\\sqrt{640}", "8 \\sqrt{10}"], ["8", "\\sqrt{80}"]),
    ("1-\\frac{2}{\\pi}", ["1-\\frac{2}{\\pi}", "\\frac{\\pi-2}{\\pi}"], ["1-\\frac{1}{\\pi}"]),
    ("2^{25} \\cdot 26!", ["2^{25} \\cdot 26!", "2^{25}26!"], ["2^{24} \\cdot 26!"]),
    ("\\frac{-1+\\sqrt{17}}{2}, \\frac{-1-\\sqrt{17}}{2}",
     ["\\frac{-1-\\sqrt{17}}{2}, \\frac{-1+\\sqrt{17}}{2}"], ["\\frac{-1+\\sqrt{17}}{2}"]),
    ("70", ["70", "x = 70", "70^\\circ"], ["71", "-70"]),
    ("14+4\\sqrt{37}", ["4\\sqrt{37}+14", "2(7+2\\sqrt{37})"], ["14+2\\sqrt{37}"]),
    ("(1,2)", ["(1,2)", "(1, 2)"], ["(2,1)"]),
]

PATHOLOGICAL = {
    "tower 9^9^9^9^9": "\\boxed{9^{9^{9^{9^{9}}}}}",
    "tower 2^..^2^100": "\\boxed{2^{2^{2^{2^{2^{2^{100}}}}}}}",
    "(10^100)!": "\\boxed{(10^{100})!}",
    "99999999!": "\\boxed{99999999!}",
    "binom(1e9, 5e8)": "\\boxed{\\binom{10^{9}}{5\\cdot 10^{8}}}",
    "2 MB text + box": "x" * 2_000_000 + " \\boxed{5}",
    "2 MB text, no box": "1 + 2 = 3. " * 200_000,
    "unbalanced braces": "\\boxed{\\frac{1}{2}",
    "deep nesting 5000 (unclosed)": "\\boxed{" + "{" * 5000 + "5",
    "deep nesting 900 (closed)": "\\boxed{" + "{" * 900 + "5" + "}" * 900 + "}",
    "\\frac nesting 300": "\\boxed{" + "\\frac{1}{" * 300 + "2" + "}" * 300 + "}",
    "power chain 9^9^...(300)": "\\boxed{" + "^".join(["9"] * 300) + "}",
    "empty box": "\\boxed{}",
    "non-UTF / NUL chars": "\\boxed{\ud800\x00\uffff\U0001f600 5}\udcff",
    "_debug sleep 60 s (hard kill)": None,
}


def make_completions(n: int, seed: int = 0, group: int = 8):
    """RL-like batch: prompts with `group` samples each. 70% of prompts have AIME-style integer
    golds (random 0..999, so answers are diverse), 30% LaTeX golds with equivalent forms. Per prompt
    a random solve rate; wrong answers come from 1-3 per-prompt distractors or are random; 15% of
    samples have no boxed answer. Reasoning length 0..~11k chars, half with a <think> block."""
    rng = random.Random(seed)
    comps, golds, expect = [], [], []
    while len(comps) < n:
        if rng.random() < 0.7:
            k = rng.randrange(1000)
            gold = str(k)
            good = [str(k), f"x = {k}", f"{k}.0", f"\\text{{{k}}}", f"{k}^\\circ"]
            bad = [str(rng.randrange(1000)) for _ in range(rng.randint(1, 3))]
            bad = [b for b in bad if b != gold] or [str(k + 1)]
        else:
            gold, good, bad = rng.choice(PROBLEMS)
        solve_rate = rng.random()
        for _ in range(min(group, n - len(comps))):
            r = rng.random()
            if r < 0.15:
                ans, ok = None, False
            elif rng.random() < solve_rate:
                ans, ok = rng.choice(good), True
            elif rng.random() < 0.7:
                ans, ok = rng.choice(bad), False
            else:
                ans, ok = str(rng.randrange(10_000, 100_000)), False  # one-off wrong answer
            body = FILLER * rng.choice([0, 1, 5, 20, 60])  # up to ~11k chars of reasoning
            if ans is None:
                tail = "I am not sure about the final answer, maybe 42."
            else:
                tail = f"Therefore the answer is $\\boxed{{{ans}}}$."
            if rng.random() < 0.5:
                text = f"<think>\n{body}\nSo maybe \\boxed{{0}}?\n</think>\n{FILLER[:200]}\n{tail}"
            else:
                text = f"{body}\n{tail}"
            comps.append(text)
            golds.append(gold)
            expect.append(1.0 if ok else 0.0)
    return comps, golds, expect


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num_workers", type=int, default=2)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--timeout_s", type=float, default=4.0)
    args = ap.parse_args()

    comps, golds, expect = make_completions(args.n)
    avg_len = sum(map(len, comps)) / len(comps)
    with MathVerifier(num_workers=args.num_workers, timeout_s=args.timeout_s) as v:
        t0 = time.perf_counter()
        v.score_one("\\boxed{1}", "1")
        print(f"pool startup (first check): {time.perf_counter() - t0:.2f} s")

        t0 = time.perf_counter()
        scores = v.score(comps, golds)
        dt = time.perf_counter() - t0
        agree = sum(s == e for s, e in zip(scores, expect))
        distinct = len({(graded_answer(c), g) for c, g in zip(comps, golds)})
        print(f"throughput: {args.n} checks in {dt:.2f} s = {args.n / dt:.0f} checks/s "
              f"({args.num_workers} workers, avg {avg_len:.0f} chars/completion, {distinct} distinct "
              f"(boxed answer, gold) pairs, "
              f"{sum(scores):.0f} scored 1.0, {agree}/{args.n} match expected labels, "
              f"timeouts={v.timeouts} errors={v.errors})")
        mism = [(c[-80:], g, s) for c, g, s, e in zip(comps, golds, scores, expect) if s != e]
        for c, g, s in mism[:5]:
            print(f"  label mismatch: gold={g!r} score={s} tail={c!r}")

        print(f"\npathological set (timeout_s={args.timeout_s}, gold '5'):")
        worst = 0.0
        for name, text in PATHOLOGICAL.items():
            t0 = time.perf_counter()
            if text is None:
                r = v._debug_run("sleep", 60)
            else:
                r = v.score_one(text, "5")
            lat = time.perf_counter() - t0
            worst = max(worst, lat)
            print(f"  {name:32s} {lat:6.2f} s  score={r}  (timeouts={v.timeouts} errors={v.errors})")
        print(f"worst-case latency: {worst:.2f} s (limit {args.timeout_s} s)")


if __name__ == "__main__":
    main()
