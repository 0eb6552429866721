"""Per-phase seconds of a training step, GRPO vs AntiSD, on the embedded default (CPU is fine).

    python bench/step_time.py                 # 8 steps of each on the default settings
    python bench/step_time.py --steps 12 --repeats 3   # three GRPO/AntiSD pairs: the ratio's spread
    python bench/step_time.py --steps 12 -- --max_new_tokens 96   # extra flags go to train_antisd.py
    python bench/step_time.py -- --cpu_threads 1                  # one torch thread (default: all cores)
    python bench/step_time.py --decodings generate shrink static compiled --repeats 3   # rollout decodings, AntiSD

With --decodings, AntiSD runs once per transformers decoding (train_antisd.py --transformers_decoding),
the decodings interleaved within each repeat so that load drifts hit them alike, and it prints per
decoding: generate-phase seconds per generated token, its ratio to the first decoding's, and the
generate / teacher / update shares of the step. Every decoding samples the same rollouts from the
same seed (`shrink`, the default, up to float noise), so the step's other phases do the same work.

Prints the mean seconds per phase over the steps after the first (which warms caches), and the
AntiSD / GRPO step-time ratio (the target is <= 1.15). Step times move by a few percent from run to
run on a shared CPU, so repeat before reading much into the third digit. The same-run figure,
AntiSD's step over its step less the teacher phase, has no run-to-run drift in it: with the same
seed both methods sample the same rollouts until the gate first opens, so the rest of the step is
GRPO's work.
"""

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from antisd.generation import DECODINGS  # noqa: E402
from train_antisd import main, parse_config  # noqa: E402

PHASES = ("generate", "reward", "teacher", "update", "step")


def measure(method: str, steps: int, extra: list[str]) -> dict[str, float]:
    """Mean per-step figures over steps 2..N of one run."""
    with tempfile.TemporaryDirectory() as out:
        main(parse_config(["--method", method, "--max_steps", str(steps), "--save_steps", "0",
                           "--report_to", "none", "--output_dir", out, *extra]))
        rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()][1:]
    result = {phase: statistics.fmean(r[f"time/{phase}_s"] for r in rows) for phase in PHASES}
    result["without_teacher"] = statistics.fmean(r["time/step_s"] - r["time/teacher_s"] for r in rows)
    result["tokens_per_s"] = statistics.fmean(r["tokens_per_s"] for r in rows)
    result["length"] = statistics.fmean(r["length/mean"] for r in rows)
    # every step generates prompts_per_step x group_size rollouts (all processes); length/mean is over them
    config = parse_config(extra)
    rollouts = config.prompts_per_step * config.group_size
    result["generate_s_per_token"] = statistics.fmean(r["time/generate_s"] / (r["length/mean"] * rollouts) for r in rows)
    return result


def compare_decodings(decodings: list[str], steps: int, repeats: int, extra: list[str]) -> None:
    runs = {d: [] for d in decodings}
    for _ in range(repeats):
        for decoding in decodings:  # interleaved: a drift in machine load hits every decoding alike
            runs[decoding].append(measure("antisd", steps, ["--transformers_decoding", decoding, *extra]))
    base = statistics.fmean(r["generate_s_per_token"] for r in runs[decodings[0]])
    print(f"\nAntiSD, mean over steps 2..{steps} and {repeats} run(s) per decoding (interleaved)")
    print("| decoding | generate ms/token | vs " + decodings[0] + " | generate share | teacher share | update share "
          "| step s | mean length |")
    print("|---" * 8 + "|")
    for decoding, results in runs.items():
        mean = lambda key: statistics.fmean(r[key] for r in results)  # noqa: E731
        per_token = mean("generate_s_per_token")
        print(f"| {decoding} | {1000 * per_token:.3f} | {per_token / base:.3f} | " + " | ".join(
            f"{mean(p) / mean('step'):.2f}" for p in ("generate", "teacher", "update")) +
              f" | {mean('step'):.2f} | {mean('length'):.1f} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1, help="GRPO/AntiSD pairs to run; each pair gives one ratio")
    parser.add_argument("--decodings", nargs="+", choices=DECODINGS,
                        help="compare these transformers decodings (AntiSD) instead of GRPO against AntiSD; the first is the baseline")
    parser.add_argument("extra", nargs="*", help="flags passed on to train_antisd.py (after --)")
    args = parser.parse_args()
    if args.decodings:
        compare_decodings(args.decodings, args.steps, args.repeats, args.extra)
        sys.exit(0)
    ratios, same_run = [], []
    for _ in range(args.repeats):
        results = {method: measure(method, args.steps, args.extra) for method in ("grpo", "antisd")}
        print(f"\nmean seconds per step over steps 2..{args.steps}")
        print(f"| method | {' | '.join(PHASES)} | tokens/s | mean length |")
        print("|---" * (len(PHASES) + 3) + "|")
        for method, r in results.items():
            print(f"| {method} | " + " | ".join(f"{r[p]:.2f}" for p in PHASES) + f" | {r['tokens_per_s']:.0f} | {r['length']:.1f} |")
        ratios.append(results["antisd"]["step"] / results["grpo"]["step"])
        same_run.append(results["antisd"]["step"] / results["antisd"]["without_teacher"])
        print(f"\nAntiSD / GRPO step time: {ratios[-1]:.3f} (target <= 1.15)")
        print(f"AntiSD step / AntiSD step less its teacher phase (same run): {same_run[-1]:.3f}")
    if len(ratios) > 1:
        for name, values in (("AntiSD / GRPO", ratios), ("same-run", same_run)):
            print(f"{name} over {len(values)} pairs: mean {statistics.fmean(values):.3f}, "
                  f"min {min(values):.3f}, max {max(values):.3f}")
