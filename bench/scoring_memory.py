"""Peak CPU memory of one AntiSD step's scoring, long vs short responses, with the 151,936 vocabulary.

    python bench/scoring_memory.py                          # --logit_chunk_mb 512 (the training default)
    python bench/scoring_memory.py --logit_chunk_mb 128
    python bench/scoring_memory.py --also_mb 128            # the default budget, then 128 MB as well
    python bench/scoring_memory.py --sizes 64               # one size only (the quick test)

For each response length (8 x 2,048 and 8 x 64 tokens by default), a fresh subprocess builds the
small random Qwen3-shaped model (bench/random_qwen3.py: hidden 160, 4 layers, vocab 151,936, fp32,
training mode) and does what one AntiSD step does with the rollouts of one group: `teacher_scores`
(log-probs + full-vocabulary entropy, no grad, two distinct 128-token teacher prompts continued by
4 responses each), then the student's `token_logprobs` with grad behind a 64-token prompt, the
AntiSD advantage and the PPO-clip loss of train_antisd.py, and `backward()`. Each subprocess
reports its peak RSS (`resource.getrusage(...).ru_maxrss`), which includes Python, torch and the
model; the growth from the short to the long responses is what the scoring of longer responses
costs. Prints, per budget, the peak at each size, the growth, and the target
"growth <= 1.5 GB on CPU" with PASS/FAIL (GB = 10^9 bytes; GiB shown beside).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TARGET_GB = 1.5
ROLLOUTS, STUDENT_PROMPT, TEACHER_PROMPT = 8, 64, 128


def one_size(response_tokens: int, logit_chunk_mb: int, gradient_checkpointing: bool) -> dict:
    """Run one step's scoring in this process; returns peak RSS in bytes."""
    import torch

    from bench.random_qwen3 import random_qwen3
    from antisd.scoring import install_scoring_head, logit_chunk_rows, pack_sequences, teacher_scores, token_logprobs
    from train_antisd import combine_advantages, ppo_clip_loss, token_signal

    model, tokenizer = random_qwen3("small")
    install_scoring_head(model)
    if gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    vocab, pad_id = model.config.vocab_size, tokenizer.pad_token_id
    chunk_rows = logit_chunk_rows(vocab, logit_chunk_mb)
    g = torch.Generator().manual_seed(0)
    ids = lambda n, high: torch.randint(3, high, (n,), generator=g).tolist()  # noqa: E731
    student_prompt = ids(STUDENT_PROMPT, len(tokenizer))
    teacher_prompts = [ids(TEACHER_PROMPT, len(tokenizer)) for _ in range(2)]  # a group's correct / incorrect contexts
    responses = [ids(response_tokens, vocab) for _ in range(ROLLOUTS)]

    t_logp, t_entropy = teacher_scores(model, [teacher_prompts[i % 2] for i in range(ROLLOUTS)], responses, pad_id,
                                       "cpu", batch_size=16, chunk_rows=chunk_rows)
    packed = pack_sequences([student_prompt] * ROLLOUTS, responses, pad_id, "cpu")
    mask = packed[-1]
    logp, _ = token_logprobs(model, *packed, chunk_rows)
    u = (torch.stack(t_logp) - logp.detach()) * mask
    adv = combine_advantages(torch.randn(ROLLOUTS), token_signal(u, "antisd") * mask, 0.5, mask)
    loss, _ = ppo_clip_loss(logp, logp.detach(), adv, mask / mask.sum(), 0.2, 0.2)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(e).all() for e in t_entropy)
    return {"peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "chunk_rows": chunk_rows}


def measure(response_tokens: int, logit_chunk_mb: int, gradient_checkpointing: bool) -> dict:
    """`one_size` in a fresh subprocess, so that its peak RSS is its own."""
    cmd = [sys.executable, __file__, "--_child", str(response_tokens), "--logit_chunk_mb", str(logit_chunk_mb)]
    proc = subprocess.run(cmd + (["--gradient_checkpointing"] if gradient_checkpointing else []),
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"size {response_tokens} failed:\n{proc.stdout[-2000:]}{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def report(logit_chunk_mb: int, sizes: list[int], gradient_checkpointing: bool) -> None:
    peaks = {}
    for n in sizes:
        result = measure(n, logit_chunk_mb, gradient_checkpointing)
        peaks[n] = result["peak_bytes"]
        print(f"logit_chunk_mb {logit_chunk_mb} ({result['chunk_rows']} rows/chunk)  {ROLLOUTS} x {n:>5} tokens: "
              f"peak RSS {peaks[n] / 1e9:.2f} GB ({peaks[n] / 2**30:.2f} GiB)", flush=True)
    if len(sizes) == 2:
        small, large = sorted(sizes)
        growth = peaks[large] - peaks[small]
        verdict = "PASS" if growth / 1e9 <= TARGET_GB else "FAIL"
        print(f"logit_chunk_mb {logit_chunk_mb}  growth {ROLLOUTS}x{large} - {ROLLOUTS}x{small}: {growth / 1e9:+.2f} GB "
              f"({growth / 2**30:+.2f} GiB)   target growth <= {TARGET_GB} GB on CPU: {verdict}", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--logit_chunk_mb", type=int, default=512, help="as train_antisd.py's flag (default: its default)")
    parser.add_argument("--also_mb", type=int, nargs="*", default=[], help="further budgets to measure afterwards")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 2048], help="response tokens per rollout")
    parser.add_argument("--gradient_checkpointing", action="store_true", help="recompute the layers in backward")
    parser.add_argument("--_child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child is not None:
        print(json.dumps(one_size(args._child, args.logit_chunk_mb, args.gradient_checkpointing)))
        sys.exit(0)
    print(f"small random Qwen3 (hidden 160, 4 layers, vocab 151,936), fp32, gradient checkpointing "
          f"{'on' if args.gradient_checkpointing else 'off'}; teacher + student scoring + backward, fresh process per size")
    for budget in [args.logit_chunk_mb, *args.also_mb]:
        report(budget, args.sizes, args.gradient_checkpointing)
