"""Our GRPO step against TRL's GRPOTrainer on the same task, model and settings (CPU is fine).

    pip install --no-deps trl==1.16.0          # bench only; trl's other requirements are ours already
    python bench/vs_trl.py --steps 8 --repeats 2
    python bench/vs_trl.py --decodings generate shrink   # our rollouts decoded each way (train_antisd.py --transformers_decoding)

Both train the embedded default (tiny model, arith, 8 prompts x 8 rollouts, 128 new tokens, T=1,
top-p 1, lr 2e-4 constant, no KL, PPO clip 0.2, token-mean loss over the step, micro-batches of 16
sequences, one optimizer step per rollout batch, fp32, no gradient checkpointing, torch threads as
our trainer sets them), seeded alike, with the same prompts (chat template, no system prompt) and the
same math-verify reward. TRL: `per_device_train_batch_size` 16 x `gradient_accumulation_steps` 4 =
one generation batch of 64 per step. Runs are interleaved
(ours, TRL, ours, TRL, ...) and each figure is the mean over steps 2..N: ours from metrics.jsonl
(`time/step_s`), TRL's from the wall time between consecutive optimizer steps (a callback). The
prompts of a step differ between the two (each shuffles its own way), so compare seconds per
generated token as well as per step.
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from antisd.generation import DECODINGS  # noqa: E402
from step_time import measure  # noqa: E402
from train_antisd import load_rows, parse_config, render_prompts  # noqa: E402


def measure_trl(steps: int) -> dict[str, float]:
    """TRL GRPOTrainer on the embedded default: mean seconds per step and per generated token, steps 2..N."""
    from accelerate.state import AcceleratorState
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from antisd.model_loading import load_causal_lm
    from antisd.distributed import set_cpu_threads
    from models.build_tiny_model import ensure_embedded_model
    from verifiers.math import MathVerifier

    cfg = parse_config([])
    path = str(ensure_embedded_model(cfg.model))
    model, tokenizer = load_causal_lm(path), AutoTokenizer.from_pretrained(path)  # fp32, as our trainer's master weights
    rows = load_rows(cfg)
    prompts, _ = render_prompts(cfg, tokenizer, rows)
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": p}], "answer": r["answer"]}
                                 for p, r in zip(prompts, rows)])

    class StepClock(TrainerCallback):
        def __init__(self):
            self.ends = []

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as out, MathVerifier(num_workers=cfg.verifier_workers) as verifier:
        def math_verify(completions, answer, **kwargs):  # conversational prompts: completions are message lists
            return verifier.score([c[-1]["content"] for c in completions], answer)

        micro = cfg.micro_batch_size
        args = GRPOConfig(
            output_dir=out, max_steps=steps, seed=cfg.seed, use_cpu=True, report_to="none", save_strategy="no",
            logging_steps=1, per_device_train_batch_size=micro,
            gradient_accumulation_steps=cfg.prompts_per_step * cfg.group_size // micro,
            num_generations=cfg.group_size, max_completion_length=cfg.max_new_tokens, temperature=cfg.temperature,
            top_p=cfg.top_p, learning_rate=cfg.learning_rate, lr_scheduler_type="constant", weight_decay=0.0,
            max_grad_norm=cfg.max_grad_norm, beta=0.0, epsilon=0.2, num_iterations=1, loss_type="dapo",
            gradient_checkpointing=cfg.gradient_checkpointing,  # TRL's default is on, ours off
            bf16=cfg.bf16)  # TRL's default is bf16 autocast, ours fp32 (and CPU bf16 matmuls are ~30x slower here)
        clock = StepClock()
        trainer = GRPOTrainer(model=model, reward_funcs=math_verify, args=args, train_dataset=dataset,
                              processing_class=tokenizer, callbacks=[clock])
        set_cpu_threads(trainer.accelerator, cfg.cpu_threads)  # the thread count our trainer takes
        trainer.train()
    AcceleratorState._reset_state(reset_partial_state=True)  # our trainer builds its own Accelerator next
    step_s = [b - a for a, b in zip(clock.ends, clock.ends[1:])]  # steps 2..N
    lengths = [log["completions/mean_length"] for log in trainer.state.log_history if "completions/mean_length" in log][1:]
    rollouts = cfg.prompts_per_step * cfg.group_size
    return {"step": statistics.fmean(step_s), "length": statistics.fmean(lengths),
            "s_per_token": statistics.fmean(s / (n * rollouts) for s, n in zip(step_s, lengths))}


def measure_ours(steps: int, decoding: str) -> dict[str, float]:
    r = measure("grpo", steps, ["--transformers_decoding", decoding])
    cfg = parse_config([])
    rollouts = cfg.prompts_per_step * cfg.group_size
    return {"step": r["step"], "length": r["length"], "s_per_token": r["step"] / (r["length"] * rollouts)}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1, help="interleaved rounds (ours per decoding, then TRL)")
    parser.add_argument("--decodings", nargs="+", choices=DECODINGS, default=["generate"],
                        help="our rollout decodings to run against TRL (its GRPOTrainer calls generate)")
    opts = parser.parse_args()
    runs = {**{f"ours ({d})": [] for d in opts.decodings}, "TRL GRPOTrainer": []}
    for _ in range(opts.repeats):
        for decoding in opts.decodings:
            runs[f"ours ({decoding})"].append(measure_ours(opts.steps, decoding))
        runs["TRL GRPOTrainer"].append(measure_trl(opts.steps))
    trl_step = statistics.fmean(r["step"] for r in runs["TRL GRPOTrainer"])
    trl_token = statistics.fmean(r["s_per_token"] for r in runs["TRL GRPOTrainer"])
    print(f"\nGRPO on the embedded default, mean over steps 2..{opts.steps} and {opts.repeats} run(s) each (interleaved)")
    print("| trainer | step s | vs TRL | step ms per generated token | vs TRL | mean length |")
    print("|---" * 6 + "|")
    for name, results in runs.items():
        step = statistics.fmean(r["step"] for r in results)
        token = statistics.fmean(r["s_per_token"] for r in results)
        length = statistics.fmean(r["length"] for r in results)
        print(f"| {name} | {step:.2f} | {step / trl_step:.3f} | {1000 * token:.3f} | {token / trl_token:.3f} | {length:.1f} |")
