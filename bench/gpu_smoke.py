"""GPU smoke run: GRPO and AntiSD at Qwen3-0.6B's shape, bf16 FSDP2, gradient checkpointing, 2,048-token rollouts.

    python bench/gpu_smoke.py                       # one GPU: 3 steps of grpo, then 3 of antisd
    python bench/gpu_smoke.py --allow_cpu --shape small --steps 2 --max_new_tokens 32   # the same path on CPU
    python bench/gpu_smoke.py -- --micro_batch_size 8   # flags after -- go to train_antisd.py
    python bench/gpu_smoke.py --rollout_backend transformers vllm   # both backends (vllm: pip install -r requirements-vllm.txt)

Builds a random-weight Qwen3-0.6B-shaped model (bench/random_qwen3.py: real 151,936-token vocabulary,
the embedded 512-token tokenizer; nothing from the hub) in a temp dir, then for each method runs
train_antisd.py on the embedded `arith` task under `torchrun --nproc_per_node 1` with FSDP2
(ACCELERATE_USE_FSDP=true, FSDP_VERSION=2, TRANSFORMER_BASED_WRAP), `--bf16 --gradient_checkpointing`,
8 prompts x 8 rollouts a step. Random weights almost never sample EOS (1 id in 151,936), so every
rollout runs the full --max_new_tokens. Prints each step as it lands, then a table per method:
seconds per phase (generate / reward / teacher / update / step) of step 1 (warm-up) and the mean of
steps 2..N, tokens/s, decode ms/token (generate seconds / longest rollout), mean rollout length,
peak memory (GPU: torch.cuda.max_memory_allocated; with --allow_cpu on CPU: peak RSS), and the
method's wall time including start-up and the final checkpoint write.

Time on one H100/H200 (an estimate, not a measurement): HF `generate` is launch-bound for a 28-layer
model in eager mode, ~25-40 ms per decoded token almost regardless of batch size, so the 64
rollouts of a step share one `generate` call (--generation_kv_tokens is set to fit them) and a step
costs 2,048 x 25-40 ms = 51-82 s of generation; teacher scoring and the update of 64 x 2,048 tokens
take seconds. 6 steps: 5.1-8.2 min, plus ~1 min of start-up, model build and checkpoint writes
(to /dev/shm when it has room). Under 8 min needs decode <= ~33 ms/token; the printed ms/token
says which it was. If it runs long, --max_new_tokens 1536 saves a quarter. P x G barely moves the
generation time (it only sets the batch of one launch-bound call); it sets teacher/update time
and memory.

On CPU (--allow_cpu) the path is the same but bf16 matmuls have no native support there and
dominate the update: use it to check that everything runs, not for figures.

With `--rollout_backend vllm` the rollouts come from a colocated vLLM engine in the training
process (`--vllm_gpu_memory_utilization`, default 0.3, after --); each backend's table prints its
tokens/s and the generate / teacher / update seconds. Not run yet: no GPU with vLLM was available.

Exits 2 with a message when there is no CUDA GPU (unless --allow_cpu) or when the installed
packages cannot run train_antisd.py (transformers without the `cache=` forward keyword, i.e. < 5.24,
no math_verify for the verifier, or no vllm for --rollout_backend vllm).
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
PHASES = ("generate", "reward", "teacher", "update", "step")


def preflight(allow_cpu: bool, backends: list[str]) -> str:
    """The device to use, or exit 2 saying what is missing."""
    from transformers.models.qwen3.modeling_qwen3 import Qwen3Model

    problems = []
    if "cache" not in inspect.signature(Qwen3Model.forward).parameters:
        import transformers

        problems.append(f"transformers {transformers.__version__} lacks the `cache=` forward keyword antisd/scoring.py uses: "
                        "install transformers>=5.24 (requirements.txt)")
    if importlib.util.find_spec("math_verify") is None:
        problems.append("math_verify is not installed (the verifier's workers need it): pip install math-verify==0.9.0")
    if "vllm" in backends and importlib.util.find_spec("vllm") is None:
        problems.append("--rollout_backend vllm needs vllm: pip install -r requirements-vllm.txt")
    if not torch.cuda.is_available() and not allow_cpu:
        problems.append("no CUDA GPU found: this smoke test is meant for one GPU (pass --allow_cpu to run it on CPU, "
                        "e.g. --allow_cpu --shape small --max_new_tokens 32)")
    if problems:
        print("gpu_smoke.py cannot run:\n  " + "\n  ".join(problems), file=sys.stderr)
        sys.exit(2)
    return "cuda" if torch.cuda.is_available() else "cpu"


def run_method(method: str, backend: str, model_dir: Path, work: Path, args, device: str) -> tuple[list[dict], float]:
    """train_antisd.py under torchrun (FSDP2, one process); returns its metrics rows and wall seconds."""
    out = work / f"{method}-{backend}"
    kv_tokens = args.prompts_per_step * args.group_size * (args.max_new_tokens + 256)  # one generate() call a step
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
           str(REPO / "train_antisd.py"), "--model", str(model_dir), "--dataset", "arith", "--method", method,
           "--max_steps", str(args.steps), "--max_new_tokens", str(args.max_new_tokens),
           "--prompts_per_step", str(args.prompts_per_step), "--group_size", str(args.group_size), "--rollout_backend", backend,
           "--bf16", "--gradient_checkpointing", "--output_dir", str(out), "--report_to", "none", "--save_steps", "0",
           "--logit_chunk_mb", str(args.logit_chunk_mb), "--generation_kv_tokens", str(kv_tokens), *args.extra]
    env = {**os.environ, "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2",
           "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP", "PYTHONUNBUFFERED": "1"}
    if device == "cpu":
        env["ACCELERATE_USE_CPU"] = "true"
    label = f"{method}, {backend}"
    log_path, seen, start = out.with_suffix(".log"), 0, time.perf_counter()
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        while True:  # report each step as it lands: a run cut short by a time limit still shows its steps
            done = proc.poll() is not None
            rows = read_metrics(out)
            for r in rows[seen:]:
                print(f"[{label}] step {r['step']}/{args.steps}: " + ", ".join(
                    f"{p} {r[f'time/{p}_s']:.1f} s" for p in PHASES) + f", mean length {r['length/mean']:.0f}", flush=True)
            seen = len(rows)
            if done:
                break
            time.sleep(2)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        print(f"[{label}] train_antisd.py failed (exit {proc.returncode}); end of its log:\n"
              + log_path.read_text()[-6000:], file=sys.stderr)
        sys.exit(1)
    return read_metrics(out), wall


def read_metrics(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def print_table(method: str, rows: list[dict], wall: float, args, device: str) -> None:
    """Step 1 (warm-up) beside the mean of steps 2..N ("n/a" for --steps 1)."""
    first, later = rows[0], rows[1:]
    label = f"mean steps 2-{len(rows)}" if len(rows) > 2 else "step 2" if later else "steps 2+"
    ms_token = lambda r: 1000 * r["time/generate_s"] / max(r["length/max"], 1)  # noqa: E731
    rows_out = [(f"{p} s", lambda r, p=p: r[f"time/{p}_s"], ".2f") for p in PHASES] + [
        ("tokens/s", lambda r: r["tokens_per_s"], ".0f"), ("decode ms/token", ms_token, ".1f"),
        ("mean length", lambda r: r["length/mean"], ".0f")]
    print(f"\n{method}: {args.shape}, {args.prompts_per_step} prompts x {args.group_size} rollouts, max_new_tokens "
          f"{args.max_new_tokens}, bf16 FSDP2 (1 process), gradient checkpointing, {device}")
    print(f"| | step 1 | {label} |\n|---|---|---|")
    for name, get, fmt in rows_out:
        print(f"| {name} | {get(first):{fmt}} | " + (f"{statistics.fmean(map(get, later)):{fmt}}" if later else "n/a") + " |")
    memory = "peak GPU memory GiB" if device == "cuda" else "peak RSS GiB"
    peak_later = f"{max(r['memory/peak_gib'] for r in later):.2f} (max)" if later else "n/a"
    print(f"| {memory} | {first['memory/peak_gib']:.2f} | {peak_later} |")
    print(f"wall time of the {method} run (start-up, {len(rows)} steps, final checkpoint): {wall:.0f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="qwen3-0.6b", choices=("qwen3-0.6b", "small"))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--max_new_tokens", type=int, default=2048)
    parser.add_argument("--methods", nargs="+", default=["grpo", "antisd"])
    parser.add_argument("--rollout_backend", nargs="+", default=["transformers"], choices=("transformers", "vllm"),
                        help="rollout backend(s) to run each method with")
    parser.add_argument("--prompts_per_step", type=int, default=8)
    parser.add_argument("--group_size", type=int, default=8)
    parser.add_argument("--logit_chunk_mb", type=int, default=512)
    parser.add_argument("--allow_cpu", action="store_true", help="run on CPU when there is no CUDA GPU")
    parser.add_argument("extra", nargs="*", help="flags for train_antisd.py, after --")
    args = parser.parse_args()
    device = preflight(args.allow_cpu, args.rollout_backend)

    from bench.random_qwen3 import build_random_qwen3

    big = args.shape == "qwen3-0.6b" and os.path.isdir("/dev/shm") and shutil.disk_usage("/dev/shm").free > 24e9
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_smoke_", dir="/dev/shm" if big else None) as tmp:
        work = Path(tmp)
        model_dir = build_random_qwen3(args.shape, work / "model", device=device)
        if device == "cuda":
            torch.cuda.empty_cache()  # the training processes get the whole GPU
        print(f"random {args.shape} model built in {time.perf_counter() - start:.0f} s: {model_dir}", flush=True)
        for backend in args.rollout_backend:
            for method in args.methods:
                rows, wall = run_method(method, backend, model_dir, work, args, device)
                print_table(f"{method}, {backend} rollouts", rows, wall, args, device)
                shutil.rmtree(work / f"{method}-{backend}")  # checkpoints of the 0.6B model take ~9 GB
    print(f"\ntotal wall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
