"""Which tokens does the self-teacher reward? u = log pi_T - log pi_S, token by token.

    python -m analysis.pmi --model tiny --dataset arith --num_problems 16 --output_dir outputs/pmi/tiny
    python -m analysis.pmi --model runs/antisd-arith --dataset arith --num_problems 16 --output_dir outputs/pmi/trained

For the first `--num_problems` rows of the dataset, samples `--group_size` rollouts each and scores
them as one training step does, with train_antisd.py's own functions: the rows and prompts
(`load_rows`, `render_prompts`), the reward (`rewards_and_advantages`), the privileged context
(`teacher_prompts`: a correct sibling or the dataset's solution + feedback), the teacher's and the
student's sampled-token log-probs (`scoring.teacher_scores`, `scoring.token_logprobs`) and
`pmi_signal`. Every training flag applies (`--group_size`, `--max_new_tokens`, `--temperature`,
`--dataset_split`, `--system_prompt`, ...). `--model` is a model id or folder, a training run's
directory (its final model) or a checkpoint folder.

Writes to --output_dir:
- `pmi.jsonl`: one record per rollout: id, problem_id, reward, truncated, prompt_ids,
  teacher_prompt_ids, completion_ids, and per completion token: tokens (decoded one by one),
  classes, student_logp, teacher_logp, u;
- `pmi.html`: every token coloured by u (blue: u < 0, deliberation; red: u > 0, shortcut), values
  on hover, one card per rollout;
- `stats.json`, `stats.md`: by token class (deliberation markers, numbers/arithmetic, answer and
  box, rest): count, mean u, fraction u < 0, and the bonus / penalty mass under AntiSD's -phi(u);
  on `arith_checks`, also how the rollouts' checks went: `checks` (`check_stats`: the number of check
  lines, how many follow a wrong step and catch it, how many turn a right step wrong, and whether a
  check pays within a problem) and `check_details` (the rest of the audit, and u on the checks' tokens);
- `u_hist.png` (u by class) and `density.png` (pi_S against pi_T of every token, the paper's Fig. 2).
"""

from __future__ import annotations

import argparse
import html
import json
import re
import sys
from pathlib import Path

import torch

import train_antisd
from antisd.checkpoints import model_dir
from antisd.model_loading import load_policy
from antisd.rollouts import SamplingSettings, TransformersRollouts, rollout_seed
from antisd.scoring import length_sorted_batches, logit_chunk_rows, pack_sequences, teacher_scores, token_logprobs
from data.arith import AUDIT_KEYS, CHECK_OPENER, audit_checks
from verifiers.math import MathVerifier
from verifiers.reward_funcs import MATH_VERIFY, load_reward_funcs

CLASSES = ("deliberation", "number/arithmetic", "answer/box", "rest")
# The embedded generators' phrases (data/arith.py make_solution; make_checked_solution: "Wait, let me check:
# 47 + 8: units 7 + 8 = 15, tens 4 + 1 = 5, so 55, not 54.") and the paper's markers; longest first. A
# check's numbers stay number/arithmetic; check_details reports u on whole check lines.
DELIBERATION = re.compile(r"let me verify|let me check|let me recompute|that's not right|alternatively|"
                          r"\bwait\b|\blet\b|\bmaybe\b|\bcheck\b|\bnot\b|\bunits\b|\btens\b", re.IGNORECASE)
ANSWER = re.compile(r"so the answer is|\\boxed\{[^{}]*\}|\\boxed", re.IGNORECASE)
ARITHMETIC = re.compile(r"\d+|[-+*/=×÷^]")


def token_classes(tokens: list[str]) -> list[str]:
    """Each token's class: the first of answer/box, deliberation, number/arithmetic whose span
    (found in the tokens' concatenated text) it overlaps, else rest."""
    text = "".join(tokens)
    marks = {}
    for name, pattern in (("number/arithmetic", ARITHMETIC), ("deliberation", DELIBERATION), ("answer/box", ANSWER)):
        for m in pattern.finditer(text):  # later classes overwrite earlier ones: answer/box wins
            for i in range(m.start(), m.end()):
                marks[i] = name
    classes, start = [], 0
    for token in tokens:
        covered = [marks[i] for i in range(start, start + len(token)) if i in marks]
        classes.append(next((c for c in CLASSES if c in covered), "rest"))
        start += len(token)
    return classes


def score_rollouts(cfg: train_antisd.Config, num_problems: int, work_dir: Path) -> list[dict]:
    """Sample, reward and score `num_problems` groups exactly as a training step does; one record per rollout."""
    rows = train_antisd.load_rows(cfg)[:num_problems]
    model, tokenizer = load_policy(model_dir(cfg.model, work_dir / "model"), gradient_checkpointing=False)
    prompts, prompt_ids = train_antisd.render_prompts(cfg, tokenizer, rows)
    batch_rows = list(range(len(rows)))
    per_rollout = [i for i in batch_rows for _ in range(cfg.group_size)]
    rollouts = TransformersRollouts(model, tokenizer, batch_size=cfg.generation_batch_size,
                                    max_batch_tokens=cfg.generation_kv_tokens, decoding=cfg.transformers_decoding)
    rollout = rollouts.generate([prompt_ids[i] for i in per_rollout],
                                SamplingSettings(cfg.max_new_tokens, cfg.temperature, cfg.top_p), rollout_seed(cfg.seed, 0, 0))
    with MathVerifier(num_workers=cfg.verifier_workers, timeout_s=cfg.verifier_timeout_s) as verifier:
        reward_funcs = load_reward_funcs(cfg.reward_funcs or [MATH_VERIFY], verifier)
        rewards, _, _ = train_antisd.rewards_and_advantages(cfg, reward_funcs, rollout, [prompts[i] for i in per_rollout],
                                                            [rows[i] for i in per_rollout])
    pad_id, device = tokenizer.pad_token_id, next(model.parameters()).device
    chunk_rows = logit_chunk_rows(model.config.get_text_config(decoder=True).vocab_size, cfg.logit_chunk_mb)
    teacher_ids = train_antisd.teacher_prompts(cfg, tokenizer, 0, 0, rows, prompts, batch_rows, rollout, rewards)
    teacher_logp, _ = teacher_scores(model, teacher_ids, rollout.completion_ids, pad_id, device, cfg.score_batch_size,
                                     chunk_rows, temperature=cfg.temperature)  # scored at the sampling temperature
    # the student's log pi_S: the first (behaviour-policy) pass of update_policy, without the gradient
    student_logp, u_values = [None] * len(per_rollout), [None] * len(per_rollout)
    model.eval()
    with torch.no_grad():
        for idx in length_sorted_batches([len(p) + len(c) for p, c in zip(rollout.prompt_ids, rollout.completion_ids)],
                                         cfg.micro_batch_size):
            ids, attn, targets, pos, mask = pack_sequences([rollout.prompt_ids[i] for i in idx],
                                                           [rollout.completion_ids[i] for i in idx], pad_id, device)
            logp, _ = token_logprobs(model, ids, attn, targets, pos, mask, chunk_rows, temperature=cfg.temperature)
            t_logp = torch.nn.utils.rnn.pad_sequence([teacher_logp[i] for i in idx], batch_first=True)
            u, _ = train_antisd.pmi_signal(t_logp, logp, mask, "antisd", train_antisd.ConstantLambda(1.0))
            for j, i in enumerate(idx):
                n = len(rollout.completion_ids[i])
                student_logp[i], u_values[i] = logp[j, :n].tolist(), u[j, :n].tolist()
    records = []
    for i, row_index in enumerate(per_rollout):
        tokens = [tokenizer.decode([t]) for t in rollout.completion_ids[i]]
        records.append({
            "id": f"{rows[row_index]['id']}#{i % cfg.group_size}", "problem_id": rows[row_index]["id"],
            "reward": rewards[i], "truncated": rollout.truncated[i], "prompt_ids": rollout.prompt_ids[i],
            "teacher_prompt_ids": teacher_ids[i], "completion_ids": rollout.completion_ids[i], "tokens": tokens,
            "classes": token_classes(tokens), "student_logp": student_logp[i],
            "teacher_logp": teacher_logp[i].tolist(), "u": u_values[i],
            "teacher_prompt": tokenizer.decode(teacher_ids[i]), "prompt": tokenizer.decode(rollout.prompt_ids[i])})
    return records


def class_stats(records: list[dict]) -> dict:
    """Per token class (and over all tokens): count, mean u, fraction u < 0, and the bonus (> 0) and
    penalty (< 0) mass of delta = -phi(u), as sums and as shares of all tokens' bonus / penalty."""
    u = torch.tensor([x for r in records for x in r["u"]], dtype=torch.float64)
    classes = [c for r in records for c in r["classes"]]
    delta = train_antisd.token_signal(u, "antisd")
    total_bonus, total_penalty = delta.clamp(min=0).sum().item(), delta.clamp(max=0).sum().item()
    stats = {}
    for name in (*CLASSES, "all"):
        keep = torch.tensor([name in ("all", c) for c in classes], dtype=torch.bool)
        uc, dc = u[keep], delta[keep]
        bonus, penalty = dc.clamp(min=0).sum().item(), dc.clamp(max=0).sum().item()
        stats[name] = {"count": int(keep.sum()), "mean_u": uc.mean().item() if uc.numel() else None,
                       "frac_u_negative": (uc < 0).double().mean().item() if uc.numel() else None,
                       "bonus_mass": bonus, "penalty_mass": penalty,
                       "bonus_share": bonus / total_bonus if total_bonus else None,
                       "penalty_share": penalty / total_penalty if total_penalty else None}
    return stats


def marker_stats(records: list[dict]) -> dict:
    """Mean u of the tokens of each deliberation marker, by the marker's text (lower case)."""
    by_marker: dict[str, list[float]] = {}
    for r in records:
        text, start, bounds = "".join(r["tokens"]), 0, []
        for token in r["tokens"]:
            bounds.append((start, start + len(token)))
            start += len(token)
        for m in DELIBERATION.finditer(text):
            values = [u for (a, b), u in zip(bounds, r["u"]) if a < m.end() and b > m.start()]
            by_marker.setdefault(m.group(0).lower(), []).extend(values)
    return {k: {"tokens": len(v), "mean_u": sum(v) / len(v), "frac_u_negative": sum(x < 0 for x in v) / len(v)}
            for k, v in sorted(by_marker.items(), key=lambda kv: -len(kv[1]))}


def _mean(xs: list) -> float | None:
    return sum(xs) / len(xs) if xs else None


def check_stats(records: list[dict]) -> dict:
    """`arith_checks`: does a check catch slips and does it pay, on these rollouts (the five numbers of
    the premise of a fair check, before any training). `checks`: check lines ("Wait, let me check:");
    `after_wrong_step`: of those, the ones right below a wrong step; `caught`: of those, the ones that
    give the step's right value; `turned_right_wrong`: checks right below a right step that give a
    wrong value (data.arith.audit_checks reads each rollout); `payoff_with_minus_without`: over the
    problems that have rollouts both with and without a check, the mean of each problem's (mean reward
    of its rollouts with at least one check - mean reward of those without); every such problem
    weighs the same, however its rollouts split (problems with more steps get more checks and are
    harder, so pooling rollouts would confound the two); None when no problem has both kinds."""
    audits = [audit_checks("".join(r["tokens"])) for r in records]
    by_problem: dict = {}
    for r, a in zip(records, audits):
        by_problem.setdefault(r["problem_id"], {True: [], False: []})[a["checks"] > 0].append(r["reward"])
    both = [p for p in by_problem.values() if p[True] and p[False]]
    return {"checks": sum(a["checks"] for a in audits), "after_wrong_step": sum(a["after_wrong_step"] for a in audits),
            "caught": sum(a["caught"] for a in audits), "turned_right_wrong": sum(a["turned_right_wrong"] for a in audits),
            "payoff_with_minus_without": _mean([_mean(p[True]) - _mean(p[False]) for p in both])}


def _u_summary(values: list[float]) -> dict:
    """Count, mean u, share u < 0, and the same share among the tokens with |u| > 0.1 (a check's route is
    near-certain to student and teacher alike: most of its tokens have u ~ 0 of either sign)."""
    clear = [v for v in values if abs(v) > 0.1]
    return {"tokens": len(values), "mean_u": _mean(values), "frac_u_negative": _mean([float(v < 0) for v in values]),
            "tokens_abs_u_gt_0.1": len(clear), "frac_u_negative_abs_u_gt_0.1": _mean([float(v < 0) for v in clear])}


def check_details(records: list[dict]) -> dict:
    """`arith_checks`: the rest of what the audit reads (audit_checks summed: steps, steps_right,
    checks_right, after_right_step, ...), how many rollouts and problems have checks, the two means
    behind `payoff_with_minus_without` (means of the problems' means), and u on the checks' tokens:
    `u_check_lines` (every token of a check line), `u_check_opener` (a check line's first token, where
    the policy decides to check) and `u_check_route` (the check line's tokens after "Wait, let me check:")."""
    audits = [audit_checks("".join(r["tokens"])) for r in records]
    totals = {k: sum(a[k] for a in audits) for k in AUDIT_KEYS}
    by_problem: dict = {}
    for r, a in zip(records, audits):
        by_problem.setdefault(r["problem_id"], {True: [], False: []})[a["checks"] > 0].append(r["reward"])
    both = [p for p in by_problem.values() if p[True] and p[False]]
    lines, openers, routes = [], [], []
    for r in records:
        text, start, bounds = "".join(r["tokens"]), 0, []
        for token in r["tokens"]:
            bounds.append((start, start + len(token)))
            start += len(token)
        for m in re.finditer(rf"^{re.escape(CHECK_OPENER)}[^\n]*", text, re.MULTILINE):
            inside = [j for j, (a, b) in enumerate(bounds) if a < m.end() and b > m.start()]
            route_start = m.start() + len(CHECK_OPENER)
            lines += [r["u"][j] for j in inside]
            openers += [r["u"][j] for j in inside[:1]]
            routes += [r["u"][j] for j in inside if bounds[j][0] >= route_start]
    return {**totals, "rollouts": len(records), "rollouts_with_check": sum(a["checks"] > 0 for a in audits),
            "problems_with_and_without_check": len(both),
            "reward_with_check": _mean([_mean(p[True]) for p in both]),
            "reward_without_check": _mean([_mean(p[False]) for p in both]),
            "u_check_lines": _u_summary(lines), "u_check_opener": _u_summary(openers), "u_check_route": _u_summary(routes)}


def stats_markdown(meta: dict, stats: dict, markers: dict, checks: dict | None = None,
                   details: dict | None = None) -> str:
    fmt = lambda v, spec=".3f": "-" if v is None else format(v, spec)  # noqa: E731
    lines = [f"# PMI of `{meta['model']}` on `{meta['dataset']}`", "",
             f"{meta['rollouts']} rollouts of {meta['problems']} problems, mean reward {meta['mean_reward']:.3f}. "
             "u = log pi_T - log pi_S of each sampled token; AntiSD's token signal is -phi(u): bonus where u < 0.", "",
             "| class | tokens | mean u | frac u < 0 | bonus mass (share) | penalty mass (share) |", "|---|---|---|---|---|---|"]
    for name, s in stats.items():
        lines.append(f"| {name} | {s['count']} | {fmt(s['mean_u'])} | {fmt(s['frac_u_negative'])} | "
                     f"{fmt(s['bonus_mass'], '.2f')} ({fmt(s['bonus_share'], '.0%')}) | "
                     f"{fmt(s['penalty_mass'], '.2f')} ({fmt(s['penalty_share'], '.0%')}) |")
    if markers:
        lines += ["", "Deliberation markers:", "", "| marker | tokens | mean u | frac u < 0 |", "|---|---|---|---|"]
        lines += [f"| {k} | {m['tokens']} | {m['mean_u']:.3f} | {m['frac_u_negative']:.3f} |" for k, m in markers.items()]
    if checks:
        c, d = checks, details or {}
        rate = lambda n, m: "-" if not m else f"{n / m:.2f}"  # noqa: E731
        lines += ["", "Checks (`Wait, let me check:` lines, data.arith.audit_checks; `checks` in stats.json):", "",
                  f"- {c['checks']} checks; {c['after_wrong_step']} right below a wrong step, {c['caught']} of them catch it "
                  f"(right value; {rate(c['caught'], c['after_wrong_step'])}); {c['turned_right_wrong']} of the "
                  f"{d.get('after_right_step', '-')} checks below a right step turn it wrong "
                  f"({rate(c['turned_right_wrong'], d.get('after_right_step'))});",
                  f"- payoff (within a problem, mean reward with a check - without, each problem weighs the same): "
                  f"{fmt(c['payoff_with_minus_without'])}"]
        if d:
            lines += [f"  over {d['problems_with_and_without_check']} problems with both kinds ({fmt(d['reward_with_check'])} "
                      f"with, {fmt(d['reward_without_check'])} without);",
                      f"- {d['steps']} equation steps, {d['steps_right']} right; checks in {d['rollouts_with_check']} of "
                      f"{d['rollouts']} rollouts, {d['checks_right']} right;"]
            lines += [f"- u on {name}: {s['tokens']} tokens, mean {fmt(s['mean_u'])}, share u < 0 {fmt(s['frac_u_negative'])}; "
                      f"{s['tokens_abs_u_gt_0.1']} with |u| > 0.1, share u < 0 {fmt(s['frac_u_negative_abs_u_gt_0.1'])}"
                      for name, s in (("check lines", d["u_check_lines"]), ("their first token", d["u_check_opener"]),
                                      ("their route (after the opener phrase)", d["u_check_route"]))]
    return "\n".join(lines) + "\n"


def token_colour(u: float, scale: float = 2.0) -> str:
    """Blue for u < 0 (deliberation: bonus), red for u > 0 (shortcut: penalty), opacity |u| / scale."""
    alpha = min(abs(u) / scale, 1.0)
    return f"rgba(30,90,220,{alpha:.2f})" if u < 0 else f"rgba(220,40,30,{alpha:.2f})"


def write_html(records: list[dict], meta: dict, path: Path) -> None:
    cards = []
    for r in records:
        spans = "".join(
            f'<span style="background:{token_colour(u)}" title="u={u:.3f}  log pi_S={s:.3f}  log pi_T={t:.3f}  ({c})">'
            f"{html.escape(tok)}</span>"
            for tok, u, s, t, c in zip(r["tokens"], r["u"], r["student_logp"], r["teacher_logp"], r["classes"]))
        mean_u = sum(r["u"]) / max(len(r["u"]), 1)
        cards.append(
            f'<div class="card"><div class="head">{html.escape(r["id"])} &middot; reward {r["reward"]:.2f}'
            f'{" &middot; truncated" if r["truncated"] else ""} &middot; mean u {mean_u:.3f}</div>'
            f"<details><summary>student prompt</summary><pre>{html.escape(r['prompt'])}</pre></details>"
            f"<details><summary>teacher prompt (privileged context)</summary><pre>{html.escape(r['teacher_prompt'])}</pre>"
            f'</details><div class="tokens">{spans}</div></div>')
    path.write_text(f"""<!doctype html><html><head><meta charset="utf-8"><title>PMI: {html.escape(meta['model'])}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:60em}} .card{{border:1px solid #ccc;border-radius:6px;
padding:.8em;margin:1em 0}} .head{{font-weight:bold;margin-bottom:.4em}} .tokens{{font-family:monospace;
white-space:pre-wrap;line-height:1.6}} pre{{white-space:pre-wrap;font-size:85%;background:#f6f6f6}}</style></head><body>
<h1>u = log &pi;<sub>T</sub> &minus; log &pi;<sub>S</sub> of {html.escape(meta['model'])} on {html.escape(meta['dataset'])}</h1>
<p><span style="background:{token_colour(-2)}">blue: u &lt; 0</span> (the teacher needs the token less than the
student: deliberation, AntiSD's bonus) &middot; <span style="background:{token_colour(2)}">red: u &gt; 0</span>
(shortcut, penalized); full colour at |u| = 2 nats. Hover a token for its values.</p>
{''.join(cards)}</body></html>
""")


def plot(records: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    u_by_class = {c: [u for r in records for u, k in zip(r["u"], r["classes"]) if k == c] for c in CLASSES}
    everything = [u for r in records for u in r["u"]]
    bins = torch.linspace(min(everything), max(everything), 61).tolist() if everything else 10
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, values in u_by_class.items():
        if values:
            ax.hist(values, bins=bins, density=True, histtype="step", linewidth=1.5, label=f"{name} ({len(values)})")
    ax.axvline(0, color="k", linewidth=0.8)
    ax.set_xlabel("u = log pi_T - log pi_S")
    ax.set_ylabel("density")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "u_hist.png", dpi=100)
    plt.close(fig)

    student = torch.tensor([x for r in records for x in r["student_logp"]]).exp()
    teacher = torch.tensor([x for r in records for x in r["teacher_logp"]]).exp()
    fig, ax = plt.subplots(figsize=(5, 4.5))
    _, _, _, image = ax.hist2d(student.tolist(), teacher.tolist(), bins=40, range=[[0, 1], [0, 1]], norm=LogNorm(), cmap="viridis")
    fig.colorbar(image, ax=ax, label="tokens")
    ax.plot([0, 1], [0, 1], color="w", linewidth=0.8)
    ax.set_xlabel("pi_S (student) of the sampled token")
    ax.set_ylabel("pi_T (teacher)")
    ax.set_title("above the diagonal: u > 0 (shortcut)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "density.png", dpi=100)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, train_antisd.Config]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Every other flag is a training flag (python train_antisd.py --help), read as training reads it.")
    parser.add_argument("--output_dir", "--output-dir", required=True, help="Where pmi.jsonl, pmi.html, stats and plots go.")
    parser.add_argument("--num_problems", "--num-problems", type=int, default=16,
                        help="The first K rows of the dataset, --group_size rollouts each.")
    args, training_flags = parser.parse_known_args(argv)
    if args.num_problems < 1:
        parser.error("--num_problems must be >= 1")
    cfg = train_antisd.parse_config(training_flags + ["--output_dir", args.output_dir, "--report_to", "none"])
    cfg.validate(num_processes=1)
    return args, cfg


def main(argv: list[str] | None = None) -> int:
    args, cfg = parse_args(argv)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.cpu_threads:
        torch.set_num_threads(cfg.cpu_threads)
    records = score_rollouts(cfg, args.num_problems, out)
    with (out / "pmi.jsonl").open("w") as f:
        f.writelines(json.dumps({k: v for k, v in r.items() if k not in ("prompt", "teacher_prompt")}) + "\n" for r in records)
    meta = {"model": cfg.model, "dataset": cfg.dataset, "split": cfg.dataset_split, "problems": len(records) // cfg.group_size,
            "rollouts": len(records), "mean_reward": sum(r["reward"] for r in records) / len(records),
            "temperature": cfg.temperature, "seed": cfg.seed}
    stats, markers = class_stats(records), marker_stats(records)
    checks = check_stats(records) if cfg.dataset == "arith_checks" else None
    details = check_details(records) if cfg.dataset == "arith_checks" else None
    (out / "stats.json").write_text(json.dumps({**meta, "classes": stats, "markers": markers, "checks": checks,
                                                "check_details": details}, indent=2) + "\n")
    (out / "stats.md").write_text(stats_markdown(meta, stats, markers, checks, details))
    write_html(records, meta, out / "pmi.html")
    plot(records, out)
    print((out / "stats.md").read_text())
    print(f"pmi.jsonl, pmi.html, stats.json, stats.md, u_hist.png, density.png in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
