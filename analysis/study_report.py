"""The statistics and the report of a study (analysis.compare): each arm against the baseline, paired by
seed (mean difference, Student-t interval, exact sign test), the plots and report.md."""

from __future__ import annotations

import io
import math
import shlex
from pathlib import Path

import numpy as np

BASELINE = "grpo"  # every arm is compared with it
METRICS = ("primary", "final", "peak")  # the primary metric first: it was declared before the numbers
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def t_interval(values: list[float]) -> list[float] | None:
    """95% Student-t interval of the mean, n-1 degrees of freedom (None for fewer than 2 values; the normal 1.96
    beyond 30 degrees of freedom)."""
    if len(values) < 2:
        return None
    mean, sd = float(np.mean(values)), float(np.std(values, ddof=1))
    half = (T975[len(values) - 2] if len(values) - 1 <= len(T975) else 1.96) * sd / math.sqrt(len(values))
    return [mean - half, mean + half]


def sign_test_p(differences: list[float]) -> float:
    """Two-sided exact sign test of 'no difference': p = min(1, 2 P[Binomial(n, 1/2) <= min(#positive, #negative)])
    over the n non-zero differences. Ties (differences of 0, within 1e-12: equal means may round apart) are
    dropped; 1.0 when none is left. Its smallest value is 2^(1-n): 0.25 with 3 seeds, 0.0625 with 5."""
    positive = [d > 0 for d in differences if abs(d) > 1e-12]
    n, fewer = len(positive), min(sum(positive), len(positive) - sum(positive))
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(fewer + 1)) / 2 ** n)


def paired_difference(values: dict[int, float], baseline: dict[int, float]) -> dict:
    """value - baseline seed by seed over the seeds both have (seed -> metric), their mean, 95% t-interval (n-1 df)
    and sign-test p."""
    per_seed = [{"seed": seed, "value": v - baseline[seed]} for seed, v in values.items() if seed in baseline]
    diffs = [d["value"] for d in per_seed]
    return {"per_seed": per_seed, "mean": float(np.mean(diffs)) if diffs else None, "ci95": t_interval(diffs),
            "sign_test_p": sign_test_p(diffs) if diffs else None}


# =====================================================================================
# Report: plots and markdown
# =====================================================================================
def smooth(values: list, window: int) -> np.ndarray:
    """Trailing mean over `window` steps (fewer at the start); None counts as NaN."""
    x = np.array([np.nan if v is None else float(v) for v in values])
    return np.array([np.nanmean(x[max(0, i - window + 1):i + 1]) if np.isfinite(x[max(0, i - window + 1):i + 1]).any()
                     else np.nan for i in range(len(x))])


def band(ax, steps, curves: list[np.ndarray], label: str, color: str) -> None:
    """mean +- sd over seeds of curves cut to the shortest."""
    n = min(len(c) for c in curves)
    if n == 0:
        return
    stack = np.stack([c[:n] for c in curves])
    mean, sd = np.nanmean(stack, 0), np.nanstd(stack, 0)
    ax.plot(steps[:n], mean, label=f"{label} ({len(curves)} seeds)", color=color)
    ax.fill_between(steps[:n], mean - sd, mean + sd, color=color, alpha=0.2)


def save_png(fig, path: Path) -> None:
    """A 64-colour palette PNG: the line plots look the same at a quarter of the bytes, so a study's figures fit
    in results/ (the octree keeps each line's colour where median cut let wide bands of one colour take its
    entries)."""
    from PIL import Image

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    Image.open(buffer).convert("RGB").quantize(colors=64, method=Image.Quantize.FASTOCTREE).save(path, optimize=True)


def plot_study(summary: dict, out: Path, window: int) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    by_arm = {}
    for entry in summary["runs"].values():
        by_arm.setdefault(entry["arm"], []).append(entry)
    colors = {arm: f"C{i % 10}" for i, arm in enumerate(by_arm)}  # an arm keeps its colour in every figure
    files = []

    def train_figure(name: str, panels: list[tuple[str, str, bool]]) -> None:
        fig, axes = plt.subplots(len(panels), 1, figsize=(7, 3 * len(panels)), sharex=True, squeeze=False)
        for ax, (key, ylabel, log) in zip(axes[:, 0], panels):
            for arm, entries in by_arm.items():
                curves = [smooth(e["train"][key], window) for e in entries if e["train"]["step"]]
                if curves and any(np.isfinite(c).any() for c in curves):
                    longest = max(entries, key=lambda e: len(e["train"]["step"]))["train"]["step"]
                    band(ax, np.array(longest), curves, arm, colors[arm])
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            if log:
                ax.set_yscale("log")
            if ax.lines:
                ax.legend(fontsize=8)
        axes[-1, 0].set_xlabel(f"training step (trailing mean of {window} steps; band: +- sd over seeds)")
        fig.tight_layout()
        save_png(fig, out / name)
        plt.close(fig)
        files.append(name)

    train_figure("reward.png", [("reward/mean", "training reward", False)])
    train_figure("teacher_gate.png", [("teacher/entropy_median", "teacher entropy (median, nats)", True),
                                      ("gate/open", "gate open (share of steps)", False)])
    train_figure("length.png", [("length/mean", "response tokens", False), ("length/truncated_frac", "truncated", False)])

    keys = list(summary["grpo_peak"])
    fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 3.8), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for arm, entries in by_arm.items():
            curves = [e["eval"][key] for e in entries if e["eval"][key]["avg"]]
            if curves:
                longest = max(curves, key=lambda c: len(c["step"]))["step"]
                band(ax, np.array(longest), [np.array(c["avg"]) for c in curves], arm, colors[arm])
        if summary["grpo_peak"][key] is not None:
            ax.axhline(summary["grpo_peak"][key], color="grey", linestyle=":", label="GRPO peak (mean over seeds)")
        ax.set_title(f"held-out avg@n at {key}")
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, out / "heldout.png")
    plt.close(fig)
    return files[:1] + ["heldout.png"] + files[1:]


def fmt_ci(stat: dict) -> str:
    if stat["mean"] is None:
        return "-"
    ci = stat.get("ci95")
    return f"{stat['mean']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def reading(difference: dict) -> str:
    """What a paired difference shows: a direction only when its 95% interval excludes 0."""
    if difference["mean"] is None:
        return "no paired seeds"
    if difference["ci95"] is None:
        return "no difference shown (one paired seed: no interval)"
    lo, hi = difference["ci95"]
    return "higher" if lo > 0 else "lower" if hi < 0 else "no difference shown"


def report_markdown(summary: dict, settings: dict, pngs: list[str]) -> str:
    s, metrics = settings, summary["metrics"]
    named = [f"`{name}` = `--method {arm['method']} {shlex.join(arm['flags'])}`"
             for name, arm in s["arms"].items() if arm["flags"]]
    lines = ["# Study: " + ", ".join(s["methods"]), "",
             f"`{s['command']}`", "",
             f"{len(s['seeds'])} seeds ({', '.join(map(str, s['seeds']))}), {s['max_steps']} steps, checkpoints evaluated every "
             f"{s['eval_every']} steps on `{s['eval_bench']}` ({s['eval_problems']} held-out problems, avg@{s['eval_n']}, "
             f"{s['eval_max_new_tokens']} new tokens). Training flags of every run: "
             f"`{' '.join(s['training_flags']) or '(defaults)'}`."
             + (f" Arms with their own flags: {'; '.join(named)}." if named else ""),
             "", "## Metrics, declared before the numbers", "",
             f"Of each run's held-out avg@{s['eval_n']}, at each evaluation temperature; a run counts where every checkpoint "
             "(step 0 included) is evaluated.", "",
             f"1. **primary**: the {metrics['primary']['definition']}.",
             f"2. final (secondary): {metrics['final']['definition']}.",
             f"3. peak (secondary): {metrics['peak']['definition']}.", "",
             f"Each arm is compared with {BASELINE} seed by seed (a seed gives both runs the same prompts; only seeds both "
             "have are paired): the per-seed differences arm - grpo, their mean with a paired t 95% interval (Student t, "
             "n-1 degrees of freedom, n paired seeds) and a two-sided exact sign test (binomial; zero differences dropped; "
             "its p cannot go below 2^(1-n), 0.25 for 3 seeds). A difference reads higher or lower only when its interval "
             "excludes 0, else \"no difference shown\".", ""]
    for i, (key, target) in enumerate(summary["grpo_peak"].items()):
        lines += [f"## Held-out avg@{s['eval_n']} at {key}" + (" (the training temperature)" if i == 0 else ""), "",
                  f"Mean +- 95% t-interval over seeds. GRPO's peak (mean of its per-seed peaks): "
                  f"{'-' if target is None else f'{target:.3f}'}.", "",
                  "| arm | seeds | primary | final | peak | step reaching GRPO's peak (per seed) |", "|---|---|---|---|---|---|"]
        for arm, per_t in summary["methods"].items():
            m = per_t[key]
            reach = ", ".join(str(x) for x in m["steps_to_grpo_peak"])
            cells = [fmt_ci(m[metric]) for metric in METRICS]
            lines.append(f"| {arm} | {len(m['seeds'])} | " + " | ".join(cells) + f" | {reach} |")
        differences = summary["differences_by_temperature"][key]
        if differences:
            lines += ["", f"Paired with {BASELINE}, seed by seed:", "",
                      "| difference | metric | paired seeds | per seed (seed: value) | mean [95% t-interval] | sign-test p | reading |",
                      "|---|---|---|---|---|---|---|"]
            for arm, by_metric in differences.items():
                for metric, d in by_metric.items():
                    per_seed = ", ".join(f"{x['seed']}: {x['value']:+.3f}" for x in d["per_seed"])
                    p = "-" if d["sign_test_p"] is None else f"{d['sign_test_p']:.3g}"
                    lines.append(f"| {arm} - {BASELINE} | {'**primary**' if metric == 'primary' else metric} | "
                                 f"{len(d['per_seed'])} | {per_seed or '-'} | {fmt_ci(d)} | {p} | {reading(d)} |")
        lines.append("")
    train = summary.get("training_reward")
    if train and train["grpo_peak"] is not None:
        lines += ["## Steps to GRPO's peak, by the training reward", "",
                  f"Per run, the {train['definition']}: {train['grpo_peak']:.3f}. Every step counts here, where the "
                  "held-out score is read only at the checkpoints.", "", "| arm | runs | per seed (seed: step) |", "|---|---|---|"]
        for arm, by_seed in train["steps_to_grpo_peak"].items():
            lines.append(f"| {arm} | {len(by_seed)} | " + ", ".join(f"{seed}: {step}" for seed, step in by_seed.items()) + " |")
        lines.append("")
    keys = list(summary["grpo_peak"])
    lines += ["## Per run", "", "| run | reward first 10 -> last 10 steps | gate open (share of steps) | "
              "teacher entropy (median of steps) | truncated (mean) | " + " | ".join(
                  f"{k} primary / peak (step) / final" for k in keys) + " |", "|---|---|---|---|---|" + "---|" * len(keys)]
    for name, e in summary["runs"].items():
        t = e["train"]
        reward = [v for v in t["reward/mean"] if v is not None]
        gate = [v for v in t["gate/open"] if v is not None]
        entropy = [v for v in t["teacher/entropy_median"] if v is not None]
        trunc = [v for v in t["length/truncated_frac"] if v is not None]
        cells = [f"{np.mean(reward[:10]):.3f} -> {np.mean(reward[-10:]):.3f}" if reward else "-",
                 f"{np.mean(gate):.2f}" if gate else "-", f"{np.median(entropy):.4f}" if entropy else "-",
                 f"{np.mean(trunc):.3f}" if trunc else "-"]
        cells += [f"{c['primary']:.3f} / {c['peak']:.3f} ({c['peak_step']}) / {c['final']:.3f}" if "final" in c
                  else f"incomplete ({len(c['step'])} evaluations)" for c in e["eval"].values()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", *[f"![{p}]({p})" for p in pngs], ""]
    return "\n".join(lines)
