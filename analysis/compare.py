"""A GRPO / SD / AntiSD study in one command: train every arm over seeds, evaluate the checkpoints on the
held-out split, and compare each arm with GRPO seed by seed.

    python -m analysis.compare --output_dir studies/embedded --methods grpo sd antisd --seeds 0 1 2
    python -m analysis.compare --output_dir studies/quick --quick          # a test-sized study
    python -m analysis.compare --output_dir studies/lr3e-4 --learning_rate 3e-4   # any training flag passes through
    python -m analysis.compare --output_dir studies/arms --seeds 0 1 2 3 4 --methods grpo antisd \\
        antisd_release="--method antisd --preset release" antisd_nogate="--method antisd --gate none"

Arms. Each --methods entry is an arm: a plain method name (`grpo`, `sd`, `sd_jsd`, `antisd`) or
`NAME=FLAGS`, a named arm that trains `--method M` (required in FLAGS) with its own training flags
(shell-split; quote the entry). An arm's flags come after the flags shared by every run, so they win;
they are parsed with the study's training config before any work, may not set the study's own flags
(--seed, --output_dir, ...) nor change what the evaluation shares across runs (--max_steps, --model,
--init_from, --dataset, --temperature, --top_p, --max_new_tokens, --system_prompt). NAME is letters,
digits, `_ . -`, not a method's name (that folder belongs to the plain method) and not `init`.

Layout of --output_dir (every step resumes: finished runs and evaluations are never redone):
- `runs/<arm>-seed<seed>/`: one `train_antisd.py` run each (a plain method's arm is the method's name, so
  older studies resume as they were), checkpoints every --eval_every steps, all of them kept; its output in
  `logs/<arm>-seed<seed>.log`. A run counts as finished when its final `model.safetensors` exists and
  `metrics.jsonl` has --max_steps rows; any other run folder is continued with `--resume`. --parallel runs
  (and evaluations) go at once, the CPU cores split between them.
- `eval/<arm>-seed<seed>/step<k>-T<t>/` and `eval/init-seed<seed>/T<t>/` (the untrained model, shared by
  the arms of a seed): the evaluation core's `run` (antisd/evaluation.py, what evaluate.py runs) on the
  held-out split, at the training temperature (and top-p) and at 0.6 (top-p 0.95, evaluate.py's
  defaults), seeded by the run's seed; its `results.json` is the cache.
- `summary.json` (every number of the report, per seed and aggregated), `report.md`, and plots:
  `reward.png` (training reward, smoothed, mean +- sd over seeds), `heldout.png` (avg@n over steps),
  `teacher_gate.png` (teacher entropy, share of seeds with the gate open), `length.png` (response
  length, truncation).

Statistics, at each evaluation temperature, from the runs whose every checkpoint (step 0 included) is
evaluated at it. Metrics of a run's held-out avg@n, the primary one declared before any numbers:
- `primary`: the mean over the evaluated checkpoints of the second half of training, steps > max_steps/2
  (the final step included; e.g. 150 and 200 of a 200-step study evaluated every 50);
- `final`: at the final step; `peak`: the best checkpoint, step 0 included.
Per arm: each metric's mean over seeds with a 95% Student-t interval; GRPO's peak = the mean of GRPO's
per-seed peaks, and for each seed the first evaluated step whose avg@n reaches it ('never' if none).
Each arm against GRPO, paired by seed (a seed gives both runs the same prompts; only seeds both have):
the per-seed differences arm - grpo, their mean, a 95% Student-t interval with n-1 degrees of freedom
(none for n < 2) and a two-sided exact sign-test p (binomial; ties, i.e. zero differences, dropped; see
study_report.sign_test_p). The report calls a difference higher/lower only when its interval excludes 0, else "no
difference shown".

Steps to GRPO's peak are also read off the training reward (`training_reward`): per finished run, the first step
whose trailing --smooth-step mean reaches the mean of GRPO's per-seed peaks of that mean.

summary.json (4 decimals): `runs[<arm>-seed<seed>]` (training curves, `eval[T<t>]` curves and metrics),
`methods[<arm>][T<t>][<metric>]` = {mean, ci95, per_seed}, `metrics` (what each metric is, its steps),
`differences_by_temperature[T<t>][<arm>][<metric>]` for every temperature, and `differences[<arm>][<metric>]`
the same at the training temperature, each {per_seed: [{seed, value}], mean, ci95: [lo, hi] or null,
sign_test_p} (value = arm - grpo).
Do not run a study on a folder that another process is training in.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import re
import shlex
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
from analysis.study_report import (BASELINE, METRICS, paired_difference, plot_study, report_markdown, smooth,  # noqa: E402
                                   t_interval)
from data.loading import EMBEDDED_TASKS  # noqa: E402
from models import EMBEDDED_MODELS  # noqa: E402
from models.build_tiny_model import ensure_embedded_model  # noqa: E402

QUICK = {"methods": ["grpo", "antisd"], "seeds": [0, 1], "eval_every": 2, "eval_n": 1, "eval_limit": 8}
QUICK_TRAINING = ["--max_steps", "4", "--prompts_per_step", "2", "--group_size", "4", "--max_new_tokens", "40",
                  "--gate_warmup_steps", "1", "--micro_batch_size", "4", "--verifier_workers", "1"]
STUDY_OWNED = ("method", "seed", "output_dir", "save_steps", "save_total_limit", "resume")  # set per run by the study
# One set of evaluation steps, one initial model (its step-0 evaluation serves every arm of a seed), one held-out
# split and one decoding for every run: an arm may not change these, or its runs would not be comparable.
STUDY_SHARED = ("max_steps", "model", "init_from", "dataset", "temperature", "top_p", "max_new_tokens", "system_prompt")
ARM_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
EVAL_TEMPERATURE, EVAL_TOP_P = 0.6, 0.95  # evaluate.py's defaults
TRAIN_CURVES = ("reward/mean", "teacher/entropy_median", "gate/open", "length/mean", "length/truncated_frac")


@dataclass(frozen=True)
class Arm:
    """What a set of runs trains: a method, and for a named arm its own training flags."""
    name: str
    method: str
    flags: tuple[str, ...] = ()


def study_owned(flags: list[str] | tuple[str, ...]) -> list[str]:
    """The flags among `flags` that the study sets for each run itself."""
    return [f for f in flags if f.startswith("--") and f[2:].split("=")[0].replace("-", "_") in STUDY_OWNED]


def parse_arm(spec: str) -> Arm:
    """A --methods entry: a method name, or `NAME=--method M FLAGS...` (the flags shell-split, --method taken out)."""
    if "=" not in spec:
        if spec not in train_antisd.METHODS:
            raise argparse.ArgumentTypeError(f"{spec!r}: a method ({', '.join(train_antisd.METHODS)}) or NAME=FLAGS")
        return Arm(spec, spec)
    name, flag_text = spec.split("=", 1)
    if not ARM_NAME.fullmatch(name) or name in (*train_antisd.METHODS, "init"):
        raise argparse.ArgumentTypeError(f"arm {name!r}: a name of letters, digits, _ . - that is neither a method's "
                                         "name nor 'init'")
    tokens, flags, methods = iter(shlex.split(flag_text)), [], []
    for token in tokens:
        if token == "--method":
            methods.append(next(tokens, None))
        elif token.startswith("--method="):
            methods.append(token.split("=", 1)[1])
        else:
            flags.append(token)
    if len(methods) != 1 or methods[0] not in train_antisd.METHODS:
        raise argparse.ArgumentTypeError(f"arm {name}: its flags need one --method, one of "
                                         f"{', '.join(train_antisd.METHODS)}")
    if study_owned(flags):
        raise argparse.ArgumentTypeError(f"arm {name}: {', '.join(study_owned(flags))} is set by the study for each run")
    return Arm(name, methods[0], tuple(flags))


@dataclass(frozen=True)
class Run:
    arm: Arm
    seed: int
    out: Path  # the study's output_dir

    @property
    def name(self) -> str:
        return f"{self.arm.name}-seed{self.seed}"

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
    """The run's train_antisd.py command: every eval_every steps a checkpoint, all of them kept; the arm's own
    flags last, so that they win over the flags every run shares."""
    return [sys.executable, str(REPO / "train_antisd.py"), "--method", run.arm.method, "--seed", str(run.seed),
            "--output_dir", str(run.dir), "--cpu_threads", str(threads), "--save_steps", str(eval_every),
            "--save_total_limit", str(max_steps // eval_every + 1), "--report_to", "none",
            *(["--resume"] if state == "resume" else []), *training_flags, *run.arm.flags]


def train(run: Run, command: list[str]) -> None:
    run.log.parent.mkdir(parents=True, exist_ok=True)
    with run.log.open("w") as log:
        rc = subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT).returncode
    if rc:
        tail = "\n".join(run.log.read_text().splitlines()[-15:])
        raise RuntimeError(f"{run.name}: train_antisd.py exited with {rc} (log {run.log}):\n{tail}")


# =====================================================================================
# Held-out evaluation (the evaluation core's functions, in long-lived worker processes)
# =====================================================================================
def temperature_key(temperature: float) -> str:
    return f"T{temperature:g}"


def eval_dir(out: Path, run: Run | None, seed: int, step: int, temperature: float) -> Path:
    """Where a checkpoint's evaluation lives; the untrained model's (step 0) is shared by the seed's runs."""
    if step == 0:
        return out / "eval" / f"init-seed{seed}" / temperature_key(temperature)
    return out / "eval" / run.name / f"step{step}-{temperature_key(temperature)}"


def evaluate_model(model: str, out_dir: str, flags: list[str], threads: int) -> None:
    """The evaluation core (antisd.evaluation.run) on one model, its output in <out_dir>/eval.log (in a worker process)."""
    import evaluate
    from antisd.evaluation import run

    Path(out_dir).mkdir(parents=True, exist_ok=True)
    args = evaluate.parse_config(["--model", model, "--output_dir", out_dir, "--num_threads", str(threads), *flags])
    with open(Path(out_dir) / "eval.log", "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        run(args)


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
def second_half_steps(steps: list[int], max_steps: int) -> list[int]:
    """The primary metric's checkpoints: the evaluated steps after the first half of training (the final one included)."""
    return [s for s in steps if 2 * s > max_steps]


def eval_curve(out: Path, run: Run, steps: list[int], temperature: float) -> dict:
    """A run's held-out curve at one temperature; with the metrics when every checkpoint (step 0 too) is evaluated,
    so that the runs of a comparison are measured at the same steps."""
    curve = {"step": [], "avg": [], "pass_at_k": [], "results": []}
    for step in [0, *steps]:
        path = eval_dir(out, run, run.seed, step, temperature) / "results.json"
        if path.exists():
            results = json.loads(path.read_text())
            curve["step"].append(step)
            curve["avg"].append(results["avg"])
            curve["pass_at_k"].append(results["pass_at_k"])
            curve["results"].append(str(path))
    if curve["step"] == [0, *steps]:
        best, late = int(np.argmax(curve["avg"])), second_half_steps(steps, steps[-1])
        curve.update(primary=float(np.mean([a for s, a in zip(curve["step"], curve["avg"]) if s in late])),
                     peak=curve["avg"][best], peak_step=curve["step"][best], final=curve["avg"][-1], final_step=steps[-1])
    return curve


def summarize_study(out: Path, runs: list[Run], steps: list[int], temperatures: list[float], window: int = 10) -> dict:
    """Everything the report says, from the runs' own files (metrics.jsonl, each evaluation's results.json).
    `steps` are the evaluated checkpoints, the last one the final step; `temperatures[0]` is the training one;
    `window`: the trailing mean of the training reward."""
    late = second_half_steps(steps, steps[-1])
    summary = {"runs": {}, "methods": {}, "grpo_peak": {}, "metrics": {
        "primary": {"steps": late, "definition": f"mean held-out avg@n over the evaluated checkpoints of steps > "
                                                 f"{steps[-1]}/2 (steps {', '.join(map(str, late))})"},
        "final": {"steps": steps[-1:], "definition": f"held-out avg@n at the final step {steps[-1]}"},
        "peak": {"steps": [0, *steps], "definition": "best held-out avg@n over the evaluated checkpoints, step 0 included"}},
        "differences_by_temperature": {}}
    for run in runs:
        rows = metrics_rows(run.dir)
        summary["runs"][run.name] = {"arm": run.arm.name, "method": run.arm.method, "arm_flags": list(run.arm.flags),
                                     "seed": run.seed, "dir": str(run.dir),
                                     "train": {k: [r.get(k) for r in rows] for k in ("step", *TRAIN_CURVES)},
                                     "eval": {temperature_key(t): eval_curve(out, run, steps, t) for t in temperatures}}
    arms = list(dict.fromkeys(r.arm.name for r in runs))
    for t in temperatures:
        key = temperature_key(t)
        curves = {arm: {r.seed: summary["runs"][r.name]["eval"][key] for r in runs if r.arm.name == arm} for arm in arms}
        curves = {arm: {seed: c for seed, c in by_seed.items() if "final" in c} for arm, by_seed in curves.items()}
        grpo_peaks = [c["peak"] for c in curves.get(BASELINE, {}).values()]
        target = float(np.mean(grpo_peaks)) if grpo_peaks else None
        summary["grpo_peak"][key] = target
        differences = summary["differences_by_temperature"][key] = {}
        for arm, by_seed in curves.items():
            reach = [next((s for s, a in zip(c["step"], c["avg"]) if a >= target), "never") if target is not None else None
                     for c in by_seed.values()]
            for c, s in zip(by_seed.values(), reach):
                c["steps_to_grpo_peak"] = s
            stats = {"seeds": list(by_seed), "steps_to_grpo_peak": reach}
            for metric in METRICS:
                values = [c[metric] for c in by_seed.values()]
                stats[metric] = {"mean": float(np.mean(values)) if values else None, "ci95": t_interval(values),
                                 "per_seed": values}
            summary["methods"].setdefault(arm, {})[key] = stats
            if arm != BASELINE and BASELINE in curves:
                differences[arm] = {metric: paired_difference({s: c[metric] for s, c in by_seed.items()},
                                                              {s: c[metric] for s, c in curves[BASELINE].items()})
                                    for metric in METRICS}
    summary["differences"] = summary["differences_by_temperature"][temperature_key(temperatures[0])]
    summary["training_reward"] = steps_to_grpo_training_peak(summary, runs, steps[-1], window)
    return summary


def steps_to_grpo_training_peak(summary: dict, runs: list[Run], max_steps: int, window: int) -> dict:
    """Steps to GRPO's peak read off the training reward, which has a value at every step (the held-out curve has
    one per checkpoint): per finished run, the first step whose trailing `window`-step mean reward reaches the
    target, the mean over seeds of GRPO's per-seed peaks of that trailing mean ("never" if it does not)."""
    finished = [r for r in runs if len(summary["runs"][r.name]["train"]["step"]) >= max_steps]
    curves = {r.name: smooth(summary["runs"][r.name]["train"]["reward/mean"], window) for r in finished}
    peaks = [float(np.nanmax(curves[r.name])) for r in finished if r.arm.name == BASELINE]
    target = float(np.mean(peaks)) if peaks else None
    reach = {}
    for r in finished:
        hit = np.flatnonzero(curves[r.name] >= target - 1e-12) if target is not None else []
        reach.setdefault(r.arm.name, {})[r.seed] = summary["runs"][r.name]["train"]["step"][hit[0]] if len(hit) else "never"
    return {"definition": f"first step whose trailing {window}-step mean training reward reaches {BASELINE}'s peak of "
                          f"it (mean over seeds of the per-seed peaks)", "window": window, "grpo_peak": target,
            "steps_to_grpo_peak": reach}


def summary_json(obj, indent: str = "") -> str:
    """JSON with 4 decimals and each list of numbers on one line: a 5 x 5 study's per-step curves stay a few
    hundred kB (one number a line would triple it)."""
    if isinstance(obj, float):
        return json.dumps(round(obj, 4))
    if isinstance(obj, list) and all(not isinstance(x, (dict, list)) for x in obj):
        return "[" + ", ".join(summary_json(x) for x in obj) + "]"
    inner = indent + "  "
    if isinstance(obj, dict) and obj:
        return "{\n" + ",\n".join(f"{inner}{json.dumps(str(k))}: {summary_json(v, inner)}" for k, v in obj.items()) + "\n" + indent + "}"
    if isinstance(obj, list) and obj:
        return "[\n" + ",\n".join(inner + summary_json(x, inner) for x in obj) + "\n" + indent + "]"
    return json.dumps(obj)


# =====================================================================================
# The study
# =====================================================================================
def parse_args(argv: list[str] | None = None):
    # allow_abbrev=False: a training flag is never read as the prefix of a study flag (--seed as --seeds)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False,
                                     epilog="Every other flag is a training flag (python train_antisd.py --help), passed to "
                                            "every run; the study sets " + ", ".join(f"--{k}" for k in STUDY_OWNED) + " itself.")
    parser.add_argument("--output_dir", "--output-dir", required=True, help="The study folder (runs/, logs/, eval/, report).")
    parser.add_argument("--methods", nargs="+", type=parse_arm, default=None, metavar="ARM",
                        help="Arms to train, each compared with grpo: a method (grpo sd sd_jsd antisd) or NAME=FLAGS, a named "
                             "arm with its own training flags, --method among them, e.g. "
                             "antisd_release=\"--method antisd --preset release\" (runs/NAME-seed<seed>). "
                             "Default: grpo sd sd_jsd antisd; --quick: grpo antisd.")
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
    parser.add_argument("--smooth", type=int, default=10, help="Trailing-mean window of the training curves, in steps.")
    parser.add_argument("--quick", action="store_true",
                        help="A test-sized study: 2 methods x 2 seeds x 4 steps of 2 prompts x 4 rollouts, 8 held-out problems "
                             "(flags given still win).")
    opts, training_flags = parser.parse_known_args(argv)
    for name, value in (QUICK if opts.quick else {"methods": list(train_antisd.METHODS), "seeds": [0, 1, 2], "eval_every": 50,
                                                   "eval_n": 2}).items():
        if getattr(opts, name) is None:
            setattr(opts, name, [parse_arm(m) for m in value] if name == "methods" else value)
    if study_owned(training_flags):
        parser.error(f"{', '.join(study_owned(training_flags))}: set by the study for each run (use --methods, --seeds, "
                     "--eval_every)")
    names = [arm.name for arm in opts.methods]
    if len(set(names)) < len(names):
        parser.error(f"--methods: an arm is named twice in {' '.join(names)}")
    training_flags = (QUICK_TRAINING if opts.quick else []) + training_flags
    cfg = train_antisd.parse_config(training_flags)  # the runs' config: bad training flags fail here, before any work
    for arm in opts.methods:  # and each arm's, as its runs will read it
        try:
            arm_cfg = train_antisd.parse_config([*training_flags, "--method", arm.method, *arm.flags])
            arm_cfg.validate(num_processes=1)  # a study's run is one process
        except SystemExit as err:
            parser.error(f"arm {arm.name} (--method {arm.method} {shlex.join(arm.flags)}): "
                         f"{err.code if isinstance(err.code, str) else 'its training flags do not parse (above)'}")
        changed = [f"--{f}" for f in STUDY_SHARED if getattr(arm_cfg, f) != getattr(cfg, f)]
        if changed:
            parser.error(f"arm {arm.name}: {', '.join(changed)} must be the same for every run of a study")
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
    runs = [Run(arm, s, out) for s in opts.seeds for arm in opts.methods]  # seed by seed: early seeds finish first
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
                    log(f"{run.name}: {'resuming' if '--resume' in command else 'training'}: {shlex.join(command[1:])}")
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

    summary = summarize_study(out, runs, steps, temperatures, opts.smooth)
    settings = {"command": "python -m analysis.compare " + shlex.join(argv if argv is not None else sys.argv[1:]),
                "methods": [arm.name for arm in opts.methods],
                "arms": {arm.name: {"method": arm.method, "flags": list(arm.flags)} for arm in opts.methods},
                "seeds": opts.seeds, "max_steps": cfg.max_steps, "eval_every": opts.eval_every,
                "eval_steps": steps, "eval_bench": opts.eval_bench, "eval_n": opts.eval_n,
                "eval_problems": opts.eval_limit or "all", "eval_max_new_tokens": opts.eval_max_new_tokens or cfg.max_new_tokens,
                "eval_temperatures": temperatures, "training_flags": training_flags, "parallel": opts.parallel,
                "threads_per_job": threads, "smooth": opts.smooth, "failures": failures}
    pngs = plot_study(summary, out, opts.smooth)
    (out / "summary.json").write_text(summary_json({"settings": settings, **summary}) + "\n")
    (out / "report.md").write_text(report_markdown(summary, settings, pngs))
    log(f"report: {out / 'report.md'}, summary: {out / 'summary.json'}")
    if failures:
        print("failed:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
