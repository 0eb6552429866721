"""The bench scripts run end to end, tiny, on CPU: gpu_smoke.py's CPU path and scoring_memory.py's short size."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def run_bench(script: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "bench" / script), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_random_qwen3_ids_fit_the_tokenizer():
    from bench.random_qwen3 import VOCAB_SIZE, check_decoding, random_qwen3

    model, tokenizer = random_qwen3("small", device="meta")
    check_decoding(tokenizer)  # ids >= 512 decode to nothing instead of raising
    assert model.config.vocab_size == VOCAB_SIZE and model.config.tie_word_embeddings
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id < len(tokenizer)


def test_gpu_smoke_cpu_path():
    proc = run_bench("gpu_smoke.py", "--allow_cpu", "--shape", "small", "--steps", "1", "--max_new_tokens", "8",
                     "--methods", "antisd", "--prompts_per_step", "2", "--group_size", "2",
                     "--", "--cpu_threads", "1", "--verifier_workers", "1")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    for row in ("generate s", "reward s", "teacher s", "update s", "step s", "tokens/s", "peak RSS GiB"):
        assert f"| {row} |" in proc.stdout, proc.stdout
    assert "[antisd, transformers] step 1/1" in proc.stdout


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="checks the refusal where vllm is missing")
def test_gpu_smoke_names_missing_vllm():
    proc = run_bench("gpu_smoke.py", "--allow_cpu", "--rollout_backend", "transformers", "vllm", timeout=120)
    assert proc.returncode == 2 and "--rollout_backend vllm needs vllm: pip install -r requirements-vllm.txt" in proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_gpu_smoke_refuses_without_gpu():
    proc = run_bench("gpu_smoke.py", "--shape", "small", timeout=120)
    assert proc.returncode == 2 and "no CUDA GPU found" in proc.stderr and "--allow_cpu" in proc.stderr


def test_step_time_compares_decodings():
    proc = run_bench("step_time.py", "--decodings", "generate", "shrink", "--steps", "2", "--",
                     "--prompts_per_step", "2", "--group_size", "2", "--max_new_tokens", "8", "--cpu_threads", "1",
                     "--verifier_workers", "1")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in proc.stdout.splitlines()
            if line.startswith("| generate |") or line.startswith("| shrink |")}
    assert rows.keys() == {"generate", "shrink"} and rows["generate"][1].strip() == "1.000"
    assert all(float(rows[d][0]) > 0 for d in rows)  # generate ms/token


def test_scoring_memory_short_size():
    proc = run_bench("scoring_memory.py", "--sizes", "64")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "logit_chunk_mb 512 (294 rows/chunk)  8 x    64 tokens: peak RSS" in proc.stdout, proc.stdout
