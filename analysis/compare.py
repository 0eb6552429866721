"""A GRPO / SD / AntiSD study in one command: train every method over seeds, evaluate the checkpoints on
the held-out split, and report.

    python -m analysis.compare --output_dir studies/embedded --methods grpo sd antisd --seeds 0 1 2
    python -m analysis.compare --output_dir studies/quick --quick          # a test-sized study
    python -m analysis.compare --output_dir studies/lr3e-4 --learning_rate 3e-4   # any training flag passes through

Layout of --output_dir (every step resumes: finished runs and evaluations are never redone):
- `runs/<method>-seed<seed>/`: one `train_antisd.py` run each, checkpoints every --eval_every steps,
  all of them kept; its output in `logs/<method>-seed<seed>.log`. A run counts as finished when its
  final `model.safetensors` exists and `metrics.jsonl` has --max_steps rows; any other run folder is
  continued with `--resume`. --parallel runs (and evaluations) go at once, the CPU cores split
  between them.
- `eval/<method>-seed<seed>/step<k>-T<t>/` and `eval/init-seed<seed>/T<t>/` (the untrained model, shared by
  the methods of a seed): evaluate.py's own `run` on the held-out split, at the training temperature
  (and top-p) and at 0.6 (top-p 0.95, evaluate.py's defaults), seeded by the run's seed; its
  `results.json` is the cache.
- `summary.json` (every number of the report, per seed and aggregated), `report.md`, and plots:
  `reward.png` (training reward, smoothed, mean +- sd over seeds), `heldout.png` (avg@n over steps),
  `teacher_gate.png` (teacher entropy, share of seeds with the gate open), `length.png` (response
  length, truncation).

Statistics: peak (best checkpoint, step 0 included) and final held-out avg@n per seed, their mean with
a 95% Student-t interval over seeds; GRPO's peak = the mean of GRPO's per-seed peaks, and for each
seed the first evaluated step whose avg@n reaches it ('never' if none); each method minus GRPO with a
bootstrap 95% interval that resamples the seeds of each method and the held-out problems (one draw
of problems shared by both methods: they answer the same problems).
Do not run a study on a folder that another process is training in.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # evaluation workers import evaluate.py and the training config
    sys.path.insert(0, str(REPO))

import train_antisd  # noqa: E402
from data.loading import EMBEDDED_TASKS  # noqa: E402
from models import EMBEDDED_MODELS  # noqa: E402
from models.build_tiny_model import ensure_embedded_model  # noqa: E402

QUICK = {"methods": ["grpo", "antisd"], "seeds": [0, 1], "eval_every": 2, "eval_n": 1, "eval_limit": 8}
QUICK_TRAINING = ["--max_steps", "4", "--prompts_per_step", "2", "--group_size", "4", "--max_new_tokens", "40",
                  "--gate_warmup_steps", "1", "--micro_batch_size", "4", "--verifier_workers", "1"]
STUDY_OWNED = ("method", "seed", "output_dir", "save_steps", "save_total_limit", "resume")  # set per run by the study
EVAL_TEMPERATURE, EVAL_TOP_P = 0.6, 0.95  # evaluate.py's defaults
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]
TRAIN_CURVES = ("reward/mean", "teacher/entropy_median", "gate/open", "length/mean", "length/truncated_frac")


@dataclass(frozen=True)
class Run:
    method: str
    seed: int
    out: Path  # the study's output_dir

    @property
    def name(self) -> str:
        return f"{self.method}-seed{self.seed}"

    @property
    def dir(self) -> Path:
        return self.out / "runs" / self.name

    @property
    def log(self) -> Path:
        return self.out / "logs" / f"{self.name}.log"


# =====================================================================================
# Training runs
# =====================================================================================
def metrics_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def run_state(run_dir: Path, max_steps: int) -> str:
    """'finished' (final model saved, max_steps metrics rows), 'resume' (the folder exists) or 'new'."""
    if (run_dir / "model.safetensors").exists() and len(metrics_rows(run_dir)) == max_steps:
        return "finished"
    return "resume" if run_dir.exists() else "new"


def training_command(run: Run, state: str, eval_every: int, max_steps: int, threads: int, training_flags: list[str]) -> list[str]:
    """The run's train_antisd.py command: every eval_every steps a checkpoint, all of them kept."""
    return [sys.executable, str(REPO / "train_antisd.py"), "--method", run.method, "--seed", str(run.seed),
            "--output_dir", str(run.dir), "--cpu_threads", str(threads), "--save_steps", str(eval_every),
            "--save_total_limit", str(max_steps // eval_every + 1), "--report_to", "none",
            *(["--resume"] if state == "resume" else []), *training_flags]


def train(run: Run, command: list[str]) -> None:
    run.log.parent.mkdir(parents=True, exist_ok=True)
    with run.log.open("w") as log:
        rc = subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT).returncode
    if rc:
        tail = "\n".join(run.log.read_text().splitlines()[-15:])
        raise RuntimeError(f"{run.name}: train_antisd.py exited with {rc} (log {run.log}):\n{tail}")


# =====================================================================================
# Held-out evaluation (evaluate.py's own functions, in long-lived worker processes)
# =====================================================================================
def temperature_key(temperature: float) -> str:
    return f"T{temperature:g}"


def eval_dir(out: Path, run: Run | None, seed: int, step: int, temperature: float) -> Path:
    """Where a checkpoint's evaluation lives; the untrained model's (step 0) is shared by the seed's runs."""
    if step == 0:
        return out / "eval" / f"init-seed{seed}" / temperature_key(temperature)
    return out / "eval" / run.name / f"step{step}-{temperature_key(temperature)}"


def evaluate_model(model: str, out_dir: str, flags: list[str], threads: int) -> None:
    """evaluate.run on one model, its output in <out_dir>/eval.log (runs in a worker process)."""
    import evaluate

    Path(out_dir).mkdir(parents=True, exist_ok=True)
    args = evaluate.parse_config(["--model", model, "--output_dir", out_dir, "--num_threads", str(threads), *flags])
    with open(Path(out_dir) / "eval.log", "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        evaluate.run(args)


def eval_flags(opts, cfg, seed: int, temperature: float) -> list[str]:
    top_p = cfg.top_p if temperature == cfg.temperature else EVAL_TOP_P
    flags = ["--bench", opts.eval_bench, "--n", str(opts.eval_n), "--temperature", str(temperature), "--top_p", str(top_p),
             "--max_new_tokens", str(opts.eval_max_new_tokens or cfg.max_new_tokens), "--seed", str(seed),
             "--num_workers", "1"]
    flags += ["--limit", str(opts.eval_limit)] if opts.eval_limit else []
    flags += ["--data_file", opts.eval_data_file] if opts.eval_data_file else []
    flags += ["--system_prompt", cfg.system_prompt] if cfg.system_prompt else []
    return flags


# =====================================================================================
# Statistics
# =====================================================================================
def t_interval(values: list[float]) -> list[float] | None:
    """95% Student-t interval of the mean (None for fewer than 2 values; the normal 1.96 beyond 30 degrees of freedom)."""
    if len(values) < 2:
        return None
    mean, sd = float(np.mean(values)), float(np.std(values, ddof=1))
    half = (T975[len(values) - 2] if len(values) - 1 <= len(T975) else 1.96) * sd / math.sqrt(len(values))
    return [mean - half, mean + half]


def bootstrap_difference(per_seed_a: list[np.ndarray], per_seed_b: list[np.ndarray], statistic, draws: int,
                         rng: np.random.Generator) -> list[float]:
    """95% percentile interval of mean_seeds stat(a) - mean_seeds stat(b); each array is [steps, problems] of
    per-problem accuracy. Resampled: the seeds of each side (with replacement) and the problems (one draw
    for both sides)."""
    problems = per_seed_a[0].shape[1]
    diffs = np.empty(draws)
    for d in range(draws):
        cols = rng.integers(0, problems, problems)
        side = [np.mean([statistic(m[:, cols].mean(1)) for m in (arrays[i] for i in rng.integers(0, len(arrays), len(arrays)))])
                for arrays in (per_seed_a, per_seed_b)]
        diffs[d] = side[0] - side[1]
    return [float(np.percentile(diffs, 2.5)), float(np.percentile(diffs, 97.5))]


def summarize_study(out: Path, runs: list[Run], steps: list[int], temperatures: list[float], bootstrap: int) -> dict:
    """Everything the report says, from the runs' own files (metrics.jsonl, each evaluation's results.json)."""
    summary = {"runs": {}, "methods": {}, "grpo_peak": {}, "differences": {}}
    accuracy = {}  # (run name, T) -> [steps, problems] of per-problem accuracy, for the bootstrap
    for run in runs:
        rows = metrics_rows(run.dir)
        entry = {"method": run.method, "seed": run.seed, "dir": str(run.dir),
                 "train": {k: [r.get(k) for r in rows] for k in ("step", *TRAIN_CURVES)}, "eval": {}}
        for t in temperatures:
            key, curve = temperature_key(t), {"step": [], "avg": [], "pass_at_k": [], "results": []}
            for step in [0, *steps]:
                path = eval_dir(out, run, run.seed, step, t) / "results.json"
                if path.exists():
                    results = json.loads(path.read_text())
                    curve["step"].append(step)
                    curve["avg"].append(results["avg"])
                    curve["pass_at_k"].append(results["pass_at_k"])
                    curve["results"].append(str(path))
                    problems = sorted(results["problems"], key=lambda p: p["id"])
                    accuracy.setdefault((run.name, key), []).append([p["correct"] / p["n"] for p in problems])
            if curve["avg"]:
                best = int(np.argmax(curve["avg"]))
                curve.update(peak=curve["avg"][best], peak_step=curve["step"][best], final=curve["avg"][-1],
                             final_step=curve["step"][-1])
            entry["eval"][key] = curve
        summary["runs"][run.name] = entry
    methods = list(dict.fromkeys(r.method for r in runs))
    rng = np.random.default_rng(0)
    for t in temperatures:
        key = temperature_key(t)
        complete = {m: [r for r in runs if r.method == m and "final" in summary["runs"][r.name]["eval"][key]] for m in methods}
        grpo_peaks = [summary["runs"][r.name]["eval"][key]["peak"] for r in complete.get("grpo", [])]
        target = float(np.mean(grpo_peaks)) if grpo_peaks else None
        summary["grpo_peak"][key] = target
        for m in methods:
            curves = [summary["runs"][r.name]["eval"][key] for r in complete[m]]
            reach = [next((s for s, a in zip(c["step"], c["avg"]) if a >= target), "never") if target is not None else None
                     for c in curves]
            for c, s in zip(curves, reach):
                c["steps_to_grpo_peak"] = s
            stats = {"seeds": [r.seed for r in complete[m]], "steps_to_grpo_peak": reach}
            for stat in ("peak", "final"):
                values = [c[stat] for c in curves]
                stats[stat] = {"mean": float(np.mean(values)) if values else None, "ci95": t_interval(values), "per_seed": values}
            summary["methods"].setdefault(m, {})[key] = stats
            if m != "grpo" and complete.get("grpo") and complete[m]:
                a = [np.array(accuracy[(r.name, key)]) for r in complete[m]]
                b = [np.array(accuracy[(r.name, key)]) for r in complete["grpo"]]
                if len({x.shape for x in a + b}) != 1:
                    continue  # unequal evaluations (a run still missing checkpoints): no paired bootstrap
                summary["differences"].setdefault(f"{m} - grpo", {})[key] = {
                    stat: {"mean": stats[stat]["mean"] - summary["methods"]["grpo"][key][stat]["mean"],
                           "ci95": bootstrap_difference(a, b, fn, bootstrap, rng)}
                    for stat, fn in (("final", lambda c: c[-1]), ("peak", np.max))}
    return summary


# =====================================================================================
# Report: plots and markdown
# =====================================================================================
def smooth(values: list, window: int) -> np.ndarray:
    """Trailing mean over `window` steps (fewer at the start); None counts as NaN."""
    x = np.array([np.nan if v is None else float(v) for v in values])
    return np.array([np.nanmean(x[max(0, i - window + 1):i + 1]) if np.isfinite(x[max(0, i - window + 1):i + 1]).any()
                     else np.nan for i in range(len(x))])


def band(ax, steps, curves: list[np.ndarray], label: str) -> None:
    """mean +- sd over seeds of curves cut to the shortest."""
    n = min(len(c) for c in curves)
    if n == 0:
        return
    stack = np.stack([c[:n] for c in curves])
    mean, sd = np.nanmean(stack, 0), np.nanstd(stack, 0)
    line, = ax.plot(steps[:n], mean, label=f"{label} ({len(curves)} seeds)")
    ax.fill_between(steps[:n], mean - sd, mean + sd, color=line.get_color(), alpha=0.2)


def plot_study(summary: dict, out: Path, window: int) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    by_method = {}
    for entry in summary["runs"].values():
        by_method.setdefault(entry["method"], []).append(entry)
    files = []

    def train_figure(name: str, panels: list[tuple[str, str, bool]]) -> None:
        fig, axes = plt.subplots(len(panels), 1, figsize=(7, 3 * len(panels)), sharex=True, squeeze=False)
        for ax, (key, ylabel, log) in zip(axes[:, 0], panels):
            for method, entries in by_method.items():
                curves = [smooth(e["train"][key], window) for e in entries if e["train"]["step"]]
                if curves and any(np.isfinite(c).any() for c in curves):
                    longest = max(entries, key=lambda e: len(e["train"]["step"]))["train"]["step"]
                    band(ax, np.array(longest), curves, method)
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            if log:
                ax.set_yscale("log")
            if ax.lines:
                ax.legend(fontsize=8)
        axes[-1, 0].set_xlabel(f"training step (trailing mean of {window} steps; band: +- sd over seeds)")
        fig.tight_layout()
        fig.savefig(out / name, dpi=90)
        plt.close(fig)
        files.append(name)

    train_figure("reward.png", [("reward/mean", "training reward", False)])
    train_figure("teacher_gate.png", [("teacher/entropy_median", "teacher entropy (median, nats)", True),
                                      ("gate/open", "gate open (share of steps)", False)])
    train_figure("length.png", [("length/mean", "response tokens", False), ("length/truncated_frac", "truncated", False)])

    keys = list(summary["grpo_peak"])
    fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 3.8), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for method, entries in by_method.items():
            curves = [e["eval"][key] for e in entries if e["eval"][key]["avg"]]
            if curves:
                longest = max(curves, key=lambda c: len(c["step"]))["step"]
                band(ax, np.array(longest), [np.array(c["avg"]) for c in curves], method)
        if summary["grpo_peak"][key] is not None:
            ax.axhline(summary["grpo_peak"][key], color="grey", linestyle=":", label="GRPO peak (mean over seeds)")
        ax.set_title(f"held-out avg@n at {key}")
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "heldout.png", dpi=90)
    plt.close(fig)
    return files[:1] + ["heldout.png"] + files[1:]


def fmt_ci(stat: dict) -> str:
    if stat["mean"] is None:
        return "-"
    ci = stat.get("ci95")
    return f"{stat['mean']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def report_markdown(summary: dict, settings: dict, pngs: list[str]) -> str:
    s = settings
    lines = ["# Study: " + ", ".join(s["methods"]), "",
             f"`{s['command']}`", "",
             f"{len(s['seeds'])} seeds ({', '.join(map(str, s['seeds']))}), {s['max_steps']} steps, checkpoints evaluated every "
             f"{s['eval_every']} steps on `{s['eval_bench']}` ({s['eval_problems']} held-out problems, avg@{s['eval_n']}, "
             f"{s['eval_max_new_tokens']} new tokens). Training flags: `{' '.join(s['training_flags']) or '(defaults)'}`.", ""]
    for key, target in summary["grpo_peak"].items():
        lines += [f"## Held-out avg@{s['eval_n']} at {key}", "",
                  f"Mean +- 95% t-interval over seeds. GRPO's peak (mean of its per-seed peaks): "
                  f"{'-' if target is None else f'{target:.3f}'}.", "",
                  "| method | seeds | peak | final | step reaching GRPO's peak (per seed) |", "|---|---|---|---|---|"]
        for method, per_t in summary["methods"].items():
            m = per_t[key]
            reach = ", ".join(str(x) for x in m["steps_to_grpo_peak"])
            lines.append(f"| {method} | {len(m['seeds'])} | {fmt_ci(m['peak'])} | {fmt_ci(m['final'])} | {reach} |")
        diffs = [(name, d[key]) for name, d in summary["differences"].items() if key in d]
        if diffs:
            lines += ["", "| difference | final | peak |", "|---|---|---|"]
            lines += [f"| {name} | {fmt_ci(d['final'])} | {fmt_ci(d['peak'])} |" for name, d in diffs]
            lines += ["", f"Difference intervals: percentile bootstrap ({s['bootstrap']} draws) resampling each method's "
                      "seeds with replacement and the held-out problems (one draw shared by both methods)."]
        lines.append("")
    lines += ["## Per run", "", "| run | reward first 10 -> last 10 steps | gate open (share of steps) | "
              "teacher entropy (median of steps) | truncated (mean) | " + " | ".join(
                  f"{k} peak (step) / final" for k in summary["grpo_peak"]) + " |",
              "|---|---|---|---|---|" + "---|" * len(summary["grpo_peak"])]
    for name, e in summary["runs"].items():
        t = e["train"]
        reward = [v for v in t["reward/mean"] if v is not None]
        gate = [v for v in t["gate/open"] if v is not None]
        entropy = [v for v in t["teacher/entropy_median"] if v is not None]
        trunc = [v for v in t["length/truncated_frac"] if v is not None]
        cells = [f"{np.mean(reward[:10]):.3f} -> {np.mean(reward[-10:]):.3f}" if reward else "-",
                 f"{np.mean(gate):.2f}" if gate else "-", f"{np.median(entropy):.4f}" if entropy else "-",
                 f"{np.mean(trunc):.3f}" if trunc else "-"]
        cells += [f"{c['peak']:.3f} ({c['peak_step']}) / {c['final']:.3f}" if "final" in c else "-" for c in e["eval"].values()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", *[f"![{p}]({p})" for p in pngs], ""]
    return "\n".join(lines)


# =====================================================================================
# The study
# =====================================================================================
def parse_args(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Every other flag is a training flag (python train_antisd.py --help), passed to "
                                            "every run; the study sets " + ", ".join(f"--{k}" for k in STUDY_OWNED) + " itself.")
    parser.add_argument("--output_dir", "--output-dir", required=True, help="The study folder (runs/, logs/, eval/, report).")
    parser.add_argument("--methods", nargs="+", choices=train_antisd.METHODS, default=None,
                        help="Methods to train (default: grpo sd sd_jsd antisd; --quick: grpo antisd).")
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="Training seeds (default: 0 1 2; --quick: 0 1).")
    parser.add_argument("--parallel", type=int, default=2, help="Runs and evaluations at once; the physical cores are split between them.")
    parser.add_argument("--eval_every", "--eval-every", type=int, default=None,
                        help="Checkpoint and evaluate every N training steps (default 50; --quick: 2).")
    parser.add_argument("--eval_n", "--eval-n", type=int, default=None, help="Samples per held-out problem (default 2; --quick: 1).")
    parser.add_argument("--eval_limit", "--eval-limit", type=int, default=None,
                        help="Only the first N held-out problems (default: all; --quick: 8).")
    parser.add_argument("--eval_max_new_tokens", "--eval-max-new-tokens", type=int, default=None,
                        help="Evaluation generation budget (default: the training --max_new_tokens).")
    parser.add_argument("--eval_bench", "--eval-bench", default=None,
                        help="evaluate.py --bench of the held-out split (default: the embedded task's own for --dataset "
                             "arith / arith_checks; needed otherwise).")
    parser.add_argument("--eval_data_file", "--eval-data-file", default=None, help="evaluate.py --data_file for --eval_bench.")
    parser.add_argument("--bootstrap", type=int, default=2000, help="Bootstrap draws of each difference's interval.")
    parser.add_argument("--smooth", type=int, default=10, help="Trailing-mean window of the training curves, in steps.")
    parser.add_argument("--quick", action="store_true",
                        help="A test-sized study: 2 methods x 2 seeds x 4 steps of 2 prompts x 4 rollouts, 8 held-out problems "
                             "(flags given still win).")
    opts, training_flags = parser.parse_known_args(argv)
    for name, value in (QUICK if opts.quick else {"methods": list(train_antisd.METHODS), "seeds": [0, 1, 2], "eval_every": 50,
                                                   "eval_n": 2}).items():
        if getattr(opts, name) is None:
            setattr(opts, name, value)
    owned = [f for f in training_flags if f.startswith("--") and f[2:].split("=")[0].replace("-", "_") in STUDY_OWNED]
    if owned:
        parser.error(f"{', '.join(owned)}: set by the study for each run (use --methods, --seeds, --eval_every)")
    training_flags = (QUICK_TRAINING if opts.quick else []) + training_flags
    cfg = train_antisd.parse_config(training_flags)  # the runs' config: bad training flags fail here, before any work
    if opts.eval_bench is None:
        if cfg.dataset not in EMBEDDED_TASKS:
            parser.error(f"--eval_bench: which held-out benchmark goes with --dataset {cfg.dataset}?")
        opts.eval_bench = cfg.dataset
    if opts.parallel < 1 or opts.eval_every < 1 or opts.eval_n < 1:
        parser.error("--parallel, --eval_every and --eval_n must be >= 1")
    return opts, training_flags, cfg


def main(argv: list[str] | None = None) -> int:
    opts, training_flags, cfg = parse_args(argv)
    out = Path(opts.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    import psutil

    threads = max(1, (psutil.cpu_count(logical=False) or 1) // opts.parallel)
    steps = sorted({*range(opts.eval_every, cfg.max_steps + 1, opts.eval_every), cfg.max_steps})
    temperatures = list(dict.fromkeys([cfg.temperature, EVAL_TEMPERATURE]))
    runs = [Run(m, s, out) for s in opts.seeds for m in opts.methods]  # seed by seed: early seeds finish first
    init_model = cfg.init_from or cfg.model
    if init_model in EMBEDDED_MODELS:  # built here once, not by --parallel jobs at the same time
        ensure_embedded_model(init_model)
    log = lambda msg: print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)  # noqa: E731

    failures = []
    context = multiprocessing.get_context("spawn")
    # One job per slot. A free slot takes a waiting evaluation before a new training run, so the runs that
    # have finished are evaluated (and reportable) while the rest train.
    evaluations, trainings, running = [], [], {}  # waiting (label, args) jobs; running future -> job
    with ThreadPoolExecutor(opts.parallel) as slots, ProcessPoolExecutor(opts.parallel, mp_context=context) as workers:
        def queue_evaluation(model: str, target: Path, seed: int, t: float, label: str) -> None:
            if not (target / "results.json").exists():
                evaluations.append((label, (model, str(target), eval_flags(opts, cfg, seed, t), threads)))

        def queue_checkpoint_evaluations(run: Run) -> None:
            for step in steps:
                folder = run.dir / f"checkpoint-{step}"
                for t in temperatures:
                    target = eval_dir(out, run, run.seed, step, t)
                    if not folder.is_dir() and not (target / "results.json").exists():
                        log(f"warning: {folder} is missing: step {step} of {run.name} is not evaluated")
                        continue
                    queue_evaluation(str(folder), target, run.seed, t, f"evaluate {run.name} step {step} at T={t:g}")

        for seed in opts.seeds:
            for t in temperatures:
                queue_evaluation(init_model, eval_dir(out, None, seed, 0, t), seed, t,
                                 f"evaluate the initial model, seed {seed}, T={t:g}")
        for run in runs:
            state = run_state(run.dir, cfg.max_steps)
            if state == "finished":
                log(f"{run.name}: finished, adopted")
                queue_checkpoint_evaluations(run)
            else:
                trainings.append((run, training_command(run, state, opts.eval_every, cfg.max_steps, threads, training_flags)))
        while evaluations or trainings or running:
            while len(running) < opts.parallel and (evaluations or trainings):
                if evaluations:
                    label, args = evaluations.pop(0)
                    running[slots.submit(lambda a=args: workers.submit(evaluate_model, *a).result())] = label
                else:
                    run, command = trainings.pop(0)
                    log(f"{run.name}: {'resuming' if '--resume' in command else 'training'}: {' '.join(command[1:])}")
                    running[slots.submit(train, run, command)] = run
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                job = running.pop(future)
                try:
                    future.result()
                except Exception as err:  # one failed run or evaluation does not stop the others
                    failures.append(f"{job.name if isinstance(job, Run) else job}: {err}")
                    log(f"FAILED {failures[-1]}")
                    continue
                if isinstance(job, Run):
                    log(f"{job.name}: trained")
                    queue_checkpoint_evaluations(job)
                else:
                    log(f"done: {job}")

    summary = summarize_study(out, runs, steps, temperatures, opts.bootstrap)
    settings = {"command": "python -m analysis.compare " + " ".join(argv if argv is not None else sys.argv[1:]),
                "methods": opts.methods, "seeds": opts.seeds, "max_steps": cfg.max_steps, "eval_every": opts.eval_every,
                "eval_steps": steps, "eval_bench": opts.eval_bench, "eval_n": opts.eval_n,
                "eval_problems": opts.eval_limit or "all", "eval_max_new_tokens": opts.eval_max_new_tokens or cfg.max_new_tokens,
                "eval_temperatures": temperatures, "training_flags": training_flags, "parallel": opts.parallel,
                "threads_per_job": threads, "bootstrap": opts.bootstrap, "smooth": opts.smooth, "failures": failures}
    pngs = plot_study(summary, out, opts.smooth)
    (out / "summary.json").write_text(json.dumps({"settings": settings, **summary}, indent=2) + "\n")
    (out / "report.md").write_text(report_markdown(summary, settings, pngs))
    log(f"report: {out / 'report.md'}, summary: {out / 'summary.json'}")
    if failures:
        print("failed:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
