"""The evaluation core behind evaluate.py (its CLI) and training's --eval_steps: avg@n and unbiased pass@k.

Reading order: args (`EvalConfig`) -> load problems -> generate (resumable) -> score -> write results.
`run(args)` evaluates --model; `run(args, policy=(model, tokenizer))` a model already in memory, which
is how train_antisd.py's --eval_steps calls it (`evaluate_during_training`). evaluate.py's docstring
describes prompts, resumable generation, scoring and results.json.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import socket
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlparse

from data.code import CODE_TASKS
from data.loading import BENCHMARKS, EMBEDDED_TASKS, DataError, default_instruction, load_benchmark
from antisd.generation import DECODINGS, DEFAULT_DECODING
from antisd.model_loading import resolve_model
from models import EMBEDDED_MODELS
from prompts import EVALPLUS_INSTRUCTION, code_prompt, user_prompt

CODE_BENCH = "mbppplus"
BENCH_CHOICES = sorted([*BENCHMARKS, CODE_BENCH])
TINY_DEFAULT_MAX_NEW_TOKENS = 256  # the embedded model writes ~53 tokens (models/tiny-qwen3/build_info.json)
DEFAULT_MAX_NEW_TOKENS = 4096
# Settings that shape the samples: resuming into an output_dir made with other values is refused.
SAMPLE_SHAPING = ("bench", "model", "data_file", "temperature", "top_p", "max_new_tokens",
                  "system_prompt", "instruction", "enable_thinking")


class EvalError(Exception):
    """A problem with the user's input (samples file, output dir); reported without a traceback."""


# =====================================================================================
# Pure scoring helpers
# =====================================================================================
def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of a problem with c correct out of n samples: 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    # C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k / i): no huge binomials
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def summarize(bench: str, per_problem: list[dict], ks) -> dict:
    """results.json content from per-problem `{"id", "n", "correct", ...}` entries (SPEC §2)."""
    if not per_problem:
        raise ValueError("no problems to summarize")
    ns = [p["n"] for p in per_problem]
    pass_k, pass_k_count = {}, {}
    for k in sorted(set(ks)):
        eligible = [p for p in per_problem if p["n"] >= k]
        if eligible:
            pass_k[str(k)] = sum(pass_at_k(p["n"], p["correct"], k) for p in eligible) / len(eligible)
            pass_k_count[str(k)] = len(eligible)
    return {
        "bench": bench,
        "n": max(ns),
        "n_min": min(ns),
        "num_problems": len(per_problem),
        "avg": sum(p["correct"] / p["n"] for p in per_problem) / len(per_problem),
        "pass_at_k": pass_k,
        "pass_at_k_num_problems": pass_k_count,
        "problems": per_problem,
    }


def markdown_table(results: dict) -> str:
    ks = list(results["pass_at_k"])
    n = str(results["n"]) if results["n"] == results["n_min"] else f"{results['n_min']}-{results['n']}"
    head = ["bench", "problems", "n", f"avg@{n}"] + [f"pass@{k}" for k in ks]
    row = [results["bench"], str(results["num_problems"]), n, f"{results['avg']:.4f}"]
    row += [f"{results['pass_at_k'][k]:.4f}" for k in ks]
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head), "| " + " | ".join(row) + " |"])


# =====================================================================================
# Arguments
# =====================================================================================
@dataclass
class EvalConfig:
    """Every field is a flag (--max_new_tokens or --max-new-tokens); --config eval.yaml sets defaults."""

    bench: str = field(metadata={"choices": BENCH_CHOICES, "help": "benchmark ('arith', 'arith_checks': the embedded tasks)"})
    config: str | None = field(default=None, metadata={"help": "YAML file of field: value; CLI flags override it"})
    model: str | None = field(default=None, metadata={
        "help": "HF model id or local path; 'tiny' / 'tiny-checks' = the embedded models (models/tiny-qwen3, "
                "models/tiny-qwen3-checks; built on first use). "
                "Not needed with --samples"})
    data_file: str | None = field(default=None, metadata={
        "help": "local .jsonl/.parquet with {id, problem, answer} instead of the hub; "
                "for mbppplus an evalplus-format MbppPlus .jsonl[.gz]"})
    samples: str | None = field(default=None, metadata={
        "help": "score the completions in this samples file (jsonl with id, completion) "
                "instead of generating; scores exactly the problems in it"})
    output_dir: str | None = field(default=None, metadata={
        "help": "where samples.jsonl, results.json, settings.json go; default "
                "outputs/eval/<bench>-<model> (with --samples: the samples file's folder)"})
    n: int = field(default=4, metadata={"help": "samples per problem"})
    k: list[int] | None = field(default=None, metadata={"help": "k values for pass@k (default: 1 and n)"})
    temperature: float = field(default=0.6, metadata={"help": "sampling temperature (0: greedy)"})
    top_p: float = field(default=0.95, metadata={"help": "nucleus sampling: keep the top tokens up to this mass"})
    max_new_tokens: int | None = field(default=None, metadata={
        "help": f"generation budget per sample; default {TINY_DEFAULT_MAX_NEW_TOKENS} for the embedded models, "
                f"else {DEFAULT_MAX_NEW_TOKENS}"})
    seed: int = field(default=0, metadata={"help": "seeds sampling (each batch from it and its first sample)"})
    system_prompt: str | None = field(default=None, metadata={"help": "system message (default: none)"})
    instruction: str | None = field(default=None, metadata={
        "help": "appended to each problem; default: the boxed instruction for math "
                "benches, none for arith, evalplus's instruction for mbppplus ('' = none)"})
    enable_thinking: bool | None = field(default=None, metadata={
        "help": "passed to chat templates that read it (Qwen3); default: the template's own default"})
    batch_size: int | None = field(default=None, metadata={
        "help": "sequences per generate call (default: 32 transformers, 512 vllm)"})
    backend: str = field(default="auto", metadata={
        "choices": ["auto", "transformers", "vllm"],
        "help": "auto: vllm if it is installed and a GPU is present, else transformers"})
    transformers_decoding: str = field(default=DEFAULT_DECODING, metadata={
        "choices": list(DECODINGS),
        "help": "how the transformers backend decodes (as train_antisd.py --transformers_decoding): shrink (a "
                "group's prompt prefilled once, finished samples leave the batch; the samples of generate, faster), "
                "generate, static or compiled"})
    limit: int | None = field(default=None, metadata={
        "help": "only the first N problems of the benchmark (smoke tests)"})
    cache_dir: str | None = field(default=None, metadata={
        "help": "evalplus ground-truth cache (default ~/.cache/antisd/evalplus)"})
    skip_bad_rows: bool = field(default=False, metadata={
        "help": "drop (and count) rows with a missing field or unparsable gold instead of failing"})
    num_threads: int | None = field(default=None, metadata={
        "help": "torch CPU threads; default 1 for the embedded models (their matrices are too small to split, and on a busy "
                "machine more threads wait on each other), else torch's default"})
    num_workers: int = field(default=min(4, os.cpu_count() or 1), metadata={"help": "verifier processes"})
    checkpoints: bool = field(default=False, metadata={
        "help": "--model is a training run directory: evaluate each of its checkpoint-<step> folders (into "
                "<output_dir>/checkpoint-<step>) and write checkpoints.json (a row per step) and checkpoints.png "
                "(avg@n over the steps)"})

    def __post_init__(self):
        """Checks the values and fills the computed defaults (a ValueError is a usage error on the CLI)."""
        if self.samples is None and not self.model:
            raise ValueError("--model is required unless --samples is given")
        if self.checkpoints and self.samples:
            raise ValueError("--checkpoints evaluates the checkpoints of the run in --model: not with --samples")
        if self.n < 1 or (self.k and min(self.k) < 1) or (self.limit is not None and self.limit < 1):
            raise ValueError("--n, --k and --limit must be >= 1")
        if self.instruction is None:
            self.instruction = EVALPLUS_INSTRUCTION if self.bench == CODE_BENCH else default_instruction(self.bench)
        if self.max_new_tokens is None:
            self.max_new_tokens = TINY_DEFAULT_MAX_NEW_TOKENS if self.model in EMBEDDED_MODELS else DEFAULT_MAX_NEW_TOKENS
        if self.output_dir is None:
            if self.samples:
                self.output_dir = str(Path(self.samples).resolve().parent)
            else:
                model = self.model.rstrip("/").replace("/", "__")
                self.output_dir = str(Path("outputs") / "eval" / f"{self.bench}-{model}")


# =====================================================================================
# Problems
# =====================================================================================
def go_offline_without_hub(timeout_s: float = 3.0) -> None:
    """No route to the hub: switch HF libraries to offline mode (cached files still load) so that a
    missing dataset fails at once with its hint instead of after ~25 s of retries. The HF libraries read
    the variables when imported: huggingface_hub (imported with the argument parser) is told directly."""
    if any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        return
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or (80 if url.scheme == "http" else 443)), timeout=timeout_s).close()
    except OSError:
        print(f"{url.hostname} unreachable: Hugging Face hub offline mode")
        os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
        if "huggingface_hub.constants" in sys.modules:
            sys.modules["huggingface_hub.constants"].HF_HUB_OFFLINE = True


def load_problems(args) -> list[dict]:
    """Rows {id, problem, answer, ...} of the benchmark (MBPP+ rows carry their evalplus `task`)."""
    if args.bench != CODE_BENCH:
        return load_benchmark(args.bench, args.data_file, skip_bad_rows=args.skip_bad_rows)
    from verifiers.mbpp import load_mbpp_plus

    try:
        tasks = load_mbpp_plus(args.data_file)
    except (OSError, RuntimeError, ValueError, KeyError) as err:
        raise DataError(f"MBPP+ data: {err}\nWithout network pass --data_file with an evalplus-format "
                        "MbppPlus .jsonl[.gz], e.g. ../shared/data/mbpp_plus/MbppPlus-v0.2.0.jsonl.gz") from err
    return [{"id": tid, "problem": task["prompt"], "answer": None, "task": task} for tid, task in tasks.items()]


def prompt_text(row: dict, args) -> str:
    if args.bench == CODE_BENCH:
        return code_prompt(row["problem"], args.instruction)
    return user_prompt(row["problem"], args.instruction)


def read_samples_file(path: Path) -> list[dict]:
    """Lines of a user-given samples file, validated (id and completion on every line)."""
    if not path.is_file():
        raise EvalError(f"--samples {path}: no such file")
    samples = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise EvalError(f"{path}, line {number}: not JSON ({err})") from None
        if not isinstance(obj, dict) or "id" not in obj or not isinstance(obj.get("completion", 0), (str, type(None))):
            raise EvalError(f"{path}, line {number}: needs an 'id' and a string 'completion'")
        samples.append({**obj, "id": str(obj["id"]), "completion": obj["completion"] or ""})
    if not samples:
        raise EvalError(f"{path}: no samples")
    return samples


def read_own_samples(path: Path) -> list[dict]:
    """samples.jsonl of an earlier (maybe killed) run; a torn last line is dropped from the file."""
    if not path.exists():
        return []
    text = path.read_text()
    lines = text.splitlines()
    samples, bad = [], 0
    for line in lines:
        try:
            obj = json.loads(line)
            samples.append({**obj, "id": str(obj["id"])})
        except (json.JSONDecodeError, KeyError, TypeError):
            bad += 1
    if bad or (text and not text.endswith("\n")):
        print(f"{path}: dropping {bad} unreadable line(s) (interrupted write)")
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(s) + "\n" for s in samples))
        os.replace(tmp, path)
    return samples


def group_samples(samples: list[dict], problems: dict, limit_per_id: int | None = None) -> dict[str, list[dict]]:
    """id -> samples (by sample_index when present, else file order), in benchmark order."""
    by_id = defaultdict(list)
    for s in samples:
        by_id[s["id"]].append(s)
    ordered = {}
    for pid in problems:
        if pid in by_id:
            group = sorted(by_id[pid], key=lambda s: s.get("sample_index", 0))
            ordered[pid] = group[:limit_per_id] if limit_per_id else group
    return ordered


# =====================================================================================
# Generation
# =====================================================================================
def pick_backend(backend: str) -> str:
    if backend != "auto":
        return backend
    import importlib.util

    import torch

    return "vllm" if importlib.util.find_spec("vllm") and torch.cuda.is_available() else "transformers"


def make_rollouts(model_path: str, tokenizer, args):
    """The rollout backend (rollouts.py, shared with training) for args.backend."""
    import torch

    from antisd.generation import eos_token_ids
    from antisd.rollouts import TransformersRollouts, VLLMRollouts

    if args.backend == "vllm":
        from transformers import GenerationConfig

        return VLLMRollouts(model_path, tokenizer, eos_token_ids(GenerationConfig.from_pretrained(model_path), tokenizer),
                            dtype="auto", gpu_memory_utilization=0.9, max_model_len=None, seed=args.seed, colocate=False,
                            tensor_parallel_size=torch.cuda.device_count())
    from antisd.model_loading import load_causal_lm

    device = "cuda" if torch.cuda.is_available() else "cpu"
    threads = args.num_threads or (1 if args.model in EMBEDDED_MODELS else None)
    if threads and device == "cpu":
        torch.set_num_threads(threads)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    return TransformersRollouts(load_causal_lm(model_path, dtype=dtype).to(device).eval(), tokenizer,
                                batch_size=args.batch_size or 32, decoding=args.transformers_decoding)


def encode_prompt(tokenizer, row: dict, args) -> list[int]:
    from antisd.generation import chat_messages, chat_prompt_ids

    messages = chat_messages(prompt_text(row, args), args.system_prompt)
    if getattr(tokenizer, "chat_template", None) is None:  # base model: plain text
        text = "\n\n".join(m["content"] for m in messages) + "\n"
        return tokenizer(text)["input_ids"]
    return chat_prompt_ids(tokenizer, messages, args.enable_thinking)


def batch_seed(seed: int, pid: str, sample_index: int) -> int:
    return int(hashlib.sha256(f"{seed}:{pid}:{sample_index}".encode()).hexdigest()[:8], 16)


def generate_missing(problems: dict, args, samples_path: Path, policy=None) -> int:
    """Append the samples still missing for each problem to samples_path; returns how many were made.
    `policy`: (model, tokenizer) already in memory, used instead of loading --model."""
    done = defaultdict(int)
    for s in read_own_samples(samples_path):
        done[s["id"]] += 1
    jobs = [(pid, i) for pid in problems for i in range(done[pid], args.n)]
    have = sum(min(done[pid], args.n) for pid in problems)
    print(f"{have} samples already in {samples_path}, {len(jobs)} to generate")
    if not jobs:
        return 0
    from tqdm.auto import tqdm
    from transformers import AutoConfig, AutoTokenizer

    from antisd.checkpoints import model_dir

    if policy is None:
        # a training checkpoint (FSDP shards, wrapper-prefixed weights, a LoRA adapter) is converted once into <output_dir>/model
        model_path = model_dir(resolve_model(args.model), samples_path.parent / "model")
        tokenizer, config = AutoTokenizer.from_pretrained(model_path), AutoConfig.from_pretrained(model_path)
    else:
        tokenizer, config = policy[1], policy[0].config
    prompts = {pid: encode_prompt(tokenizer, problems[pid], args) for pid in dict.fromkeys(pid for pid, _ in jobs)}
    context = getattr(config, "max_position_embeddings", None)
    too_long = [pid for pid, ids in prompts.items() if context and len(ids) + args.max_new_tokens > context]
    if too_long:
        print(f"warning: {len(too_long)} of {len(prompts)} prompts + --max_new_tokens exceed the model's "
              f"max_position_embeddings ({context}), e.g. {too_long[0]} ({len(prompts[too_long[0]])} prompt tokens)")
    jobs.sort(key=lambda job: -len(prompts[job[0]]))  # similar lengths share a batch: less padding
    from antisd.rollouts import SamplingSettings, TransformersRollouts

    batch_size = args.batch_size or (512 if args.backend == "vllm" else 32)
    rollouts = (TransformersRollouts(policy[0], tokenizer, batch_size=batch_size, decoding=args.transformers_decoding)
                if policy is not None
                else make_rollouts(model_path, tokenizer, args))
    settings = SamplingSettings(args.max_new_tokens, args.temperature, args.top_p)
    with open(samples_path, "a") as f, tqdm(total=len(jobs), desc=f"generate {args.bench}", unit="sample") as bar:
        for start in range(0, len(jobs), batch_size):
            batch = jobs[start:start + batch_size]
            out = rollouts.generate([prompts[pid] for pid, _ in batch], settings, batch_seed(args.seed, *batch[0]))
            for (pid, index), text, truncated, ids in zip(batch, out.texts, out.truncated, out.completion_ids):
                f.write(json.dumps({"id": pid, "sample_index": index, "completion": text,
                                    "truncated": truncated, "num_tokens": len(ids)}) + "\n")
            f.flush()
            bar.update(len(batch))
    return len(jobs)


# =====================================================================================
# Scoring
# =====================================================================================
def score_math(problems: dict, grouped: dict, args) -> dict[str, list[float]]:
    from verifiers.math import MathVerifier

    flat = [(pid, s["completion"]) for pid, group in grouped.items() for s in group]
    with MathVerifier(num_workers=max(1, args.num_workers), timeout_s=4.0) as verifier:
        scores = verifier.score([c for _, c in flat], [problems[pid]["answer"] for pid, _ in flat])
        if verifier.timeouts or verifier.errors:
            print(f"warning: {verifier.timeouts} answer checks ran past the verifier's CPU limit and "
                  f"{verifier.errors} failed; each scored 0")
    out = defaultdict(list)
    for (pid, _), score in zip(flat, scores):
        out[pid].append(score)
    return out


def score_mbpp(problems: dict, grouped: dict, args) -> dict[str, list[float]]:
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

    from verifiers.mbpp import check_mbpp_sample, mbpp_groundtruth

    tasks = {pid: problems[pid]["task"] for pid in grouped}
    expected = mbpp_groundtruth(tasks, args.cache_dir, progress=True)
    flat = [(pid, s["completion"]) for pid, group in grouped.items() for s in group]

    def check(item):
        pid, completion = item
        return float(check_mbpp_sample(tasks[pid], completion, expected[pid])["passed"])

    with ThreadPoolExecutor(max_workers=max(1, args.num_workers)) as pool:
        scores = list(tqdm(pool.map(check, flat), total=len(flat), desc="check mbpp+", leave=False))
    out = defaultdict(list)
    for (pid, _), score in zip(flat, scores):
        out[pid].append(score)
    return out


def score_code(problems: dict, grouped: dict, args) -> dict[str, list[float]]:
    """Code rows with their own tests (the embedded code_arith task): a sample is correct when its program
    passes every test in the sandbox (verifiers.code_tests)."""
    from verifiers.code_tests import CodeTester, CodeTestsReward

    flat = [(pid, s["completion"]) for pid, group in grouped.items() for s in group]
    reward = CodeTestsReward("binary", CodeTester(num_workers=max(1, args.num_workers)))
    scores = reward([c for _, c in flat], [problems[pid]["tests"] for pid, _ in flat])
    out = defaultdict(list)
    for (pid, _), score in zip(flat, scores):
        out[pid].append(score)
    return out


def per_problem_results(grouped: dict, scores: dict) -> list[dict]:
    rows = []
    for pid, group in grouped.items():
        entry = {"id": pid, "n": len(group), "correct": int(sum(scores[pid])), "scores": scores[pid]}
        if all("truncated" in s for s in group):
            entry["truncated"] = sum(bool(s["truncated"]) for s in group)
        rows.append(entry)
    return rows


# =====================================================================================
# Main
# =====================================================================================
def settings_of(args, num_problems: int) -> dict:
    import torch
    import transformers

    return {**vars(args), "mode": "score_samples" if args.samples else "generate", "num_problems": num_problems,
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__}}


def write_settings(out_dir: Path, settings: dict) -> None:
    path = out_dir / "settings.json"
    old = json.loads(path.read_text()) if path.exists() else None
    if settings["mode"] == "generate" and old and old.get("mode") == "generate" and (out_dir / "samples.jsonl").exists():
        changed = [k for k in SAMPLE_SHAPING if old.get(k) != settings.get(k)]
        if changed:
            raise EvalError(f"{out_dir} holds samples made with other settings ({', '.join(changed)}: "
                            f"{[old.get(k) for k in changed]} -> {[settings.get(k) for k in changed]}); "
                            "pass another --output_dir or delete its samples.jsonl")
    if settings["mode"] == "score_samples" and old and old.get("mode") == "generate":
        settings = {**old, "rescored": settings}  # keep the generating run's settings
    path.write_text(json.dumps(settings, indent=2) + "\n")


def run(args, policy=None) -> dict:
    """Evaluate --model (or `policy`: a (model, tokenizer) in memory) on --bench; results.json's content."""
    t0 = time.time()
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    # 1) problems
    hub_model = policy is None and not args.samples and args.model not in EMBEDDED_MODELS and not Path(args.model).exists()
    if hub_model or (args.data_file is None and args.bench not in (*EMBEDDED_TASKS, CODE_BENCH)):
        go_offline_without_hub()
    problems = {row["id"]: row for row in load_problems(args)}
    if args.samples:
        samples = read_samples_file(Path(args.samples))
        unknown = list(dict.fromkeys(s["id"] for s in samples if s["id"] not in problems))
        if unknown:
            raise EvalError(f"{args.samples}: {len(unknown)} id(s) not in {args.bench}"
                            f"{' (' + args.data_file + ')' if args.data_file else ''}: {', '.join(unknown[:5])}"
                            f"{', ...' if len(unknown) > 5 else ''}")
        present = {s["id"] for s in samples}
        problems = {pid: row for pid, row in problems.items() if pid in present}
    if args.limit:
        problems = dict(list(problems.items())[:args.limit])
    if not args.samples:
        args.backend = "transformers" if policy is not None else pick_backend(args.backend)
    write_settings(out_dir, settings_of(args, len(problems)))
    t_load = time.time() - t0

    # 2) generate (resumable) or read the given samples
    generated = 0
    if args.samples:
        grouped = group_samples(samples, problems)
    else:
        samples_path = out_dir / "samples.jsonl"
        generated = generate_missing(problems, args, samples_path, policy)
        grouped = group_samples(read_own_samples(samples_path), problems, limit_per_id=args.n)
    t_gen = time.time() - t0 - t_load

    # 3) score
    scorer = score_mbpp if args.bench == CODE_BENCH else score_code if args.bench in CODE_TASKS else score_math
    per_problem = per_problem_results(grouped, scorer(problems, grouped, args))
    t_score = time.time() - t0 - t_load - t_gen

    # 4) results
    ks = args.k or [1, max(p["n"] for p in per_problem)]
    results = summarize(args.bench, per_problem, ks)
    skipped_k = sorted({k for k in ks if str(k) not in results["pass_at_k"]})
    partial_k = [k for k, c in results["pass_at_k_num_problems"].items() if c < results["num_problems"]]
    num_tokens = [s["num_tokens"] for g in grouped.values() for s in g if "num_tokens" in s]
    truncated = [bool(s["truncated"]) for g in grouped.values() for s in g if "truncated" in s]
    results.update({
        "model": args.model, "samples_file": args.samples, "generated": generated,
        "mean_completion_tokens": sum(num_tokens) / len(num_tokens) if num_tokens else None,
        "truncated_frac": sum(truncated) / len(truncated) if truncated else None,
        "timing_s": {"load": round(t_load, 2), "generate": round(t_gen, 2), "score": round(t_score, 2),
                     "total": round(time.time() - t0, 2)},
    })
    (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")

    print()
    print(markdown_table(results))
    if skipped_k:
        print(f"pass@k left out for k={skipped_k}: above every problem's n")
    if partial_k:
        counts = ", ".join(f"pass@{k}: {results['pass_at_k_num_problems'][k]}" for k in partial_k)
        print(f"pass@k averaged over the problems with n >= k only ({counts} of {results['num_problems']} problems)")
    if num_tokens and truncated:
        print(f"mean completion length {results['mean_completion_tokens']:.1f} tokens, "
              f"{results['truncated_frac']:.1%} truncated" + ("" if args.samples else f" at --max_new_tokens {args.max_new_tokens}"))
    timing = results["timing_s"]
    print(f"\ngenerated {generated} samples; time: load {timing['load']:.1f}s, generate {timing['generate']:.1f}s, "
          f"score {timing['score']:.1f}s, total {timing['total']:.1f}s")
    print(f"results: {out_dir / 'results.json'}")
    return results


def run_checkpoints(args) -> list[dict]:
    """`run` on every complete checkpoint of the training run in --model; one row per step."""
    from antisd.checkpoints import checkpoint_step, complete_checkpoints

    folders = complete_checkpoints(args.model)
    if not folders:
        raise EvalError(f"{args.model}: no complete checkpoint-<step> folders (a training run's --output_dir?)")
    out_dir = Path(args.output_dir)
    rows = []
    for folder in folders:
        results = run(replace(args, model=str(folder), output_dir=str(out_dir / folder.name), checkpoints=False))
        rows.append({"step": checkpoint_step(folder), "checkpoint": str(folder), **{
            k: results[k] for k in ("bench", "n", "num_problems", "avg", "pass_at_k")}})
    (out_dir / "checkpoints.json").write_text(json.dumps(rows, indent=2) + "\n")
    plot_over_steps(rows, out_dir / "checkpoints.png")
    print("\n| step | avg@n | " + " | ".join(f"pass@{k}" for k in rows[0]["pass_at_k"]) + " |")
    for row in rows:
        print(f"| {row['step']} | {row['avg']:.4f} | " + " | ".join(f"{v:.4f}" for v in row["pass_at_k"].values()) + " |")
    return rows


def training_eval_config(cfg) -> EvalConfig:
    """The evaluation of train_antisd.py's --eval_steps: its bench, n and limit, evaluate.py's sampling
    defaults (T=0.6, top-p 0.95), and the training run's budget, seed, prompts and decoding."""
    return EvalConfig(bench=cfg.eval_bench, model=cfg.model, output_dir=str(Path(cfg.output_dir) / "eval"), n=cfg.eval_n,
                      limit=cfg.eval_limit, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed, system_prompt=cfg.system_prompt,
                      enable_thinking=cfg.enable_thinking, num_workers=cfg.verifier_workers,
                      transformers_decoding=cfg.transformers_decoding)


def evaluate_during_training(accelerator, model, tokenizer, args, step: int, log_path: Path) -> dict:
    """`run` on the training policy's current weights (FSDP2 shards gathered) on the main process, the
    others waiting; torch's RNG state is restored afterwards, so the training steps are the same as
    without it. Results go to <args.output_dir>/step-<step>/, a row to `log_path` and the trackers."""
    import torch

    from antisd.distributed import full_weights_for_generation

    row = {}
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with full_weights_for_generation(model), torch.random.fork_rng(devices=devices):
        if accelerator.is_main_process:
            results = run(replace(args, output_dir=str(Path(args.output_dir) / f"step-{step}")),
                          policy=(accelerator.unwrap_model(model), tokenizer))
            row = {"step": step, **{k: results[k] for k in ("bench", "n", "num_problems", "avg", "pass_at_k",
                                                            "mean_completion_tokens", "truncated_frac")}}
            with log_path.open("a") as f:
                f.write(json.dumps(row) + "\n")
        accelerator.wait_for_everyone()
    if row:
        accelerator.log({"eval/avg": row["avg"], **{f"eval/pass@{k}": v for k, v in row["pass_at_k"].items()}}, step=step)
    return row


def plot_over_steps(rows: list[dict], png_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in rows], [r["avg"] for r in rows], marker="o")
    ax.set_xlabel("training step")
    ax.set_ylabel(f"{rows[0]['bench']} avg@{rows[0]['n']}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
