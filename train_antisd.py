r"""Anti-Self-Distillation (AntiSD) for reasoning RL, in one script (arXiv 2605.11609).

A policy samples G solutions per math problem; a verifier scores them (GRPO advantages); the same
model, shown a privileged context (a verified sibling solution + feedback), re-scores every
sampled token. The per-token PMI u = log pi_T - log pi_S becomes a bounded bonus -phi(u) that
rewards deliberation tokens (u < 0) and penalizes shortcut tokens (u > 0); a teacher-entropy gate
switches it off when the teacher grows too sure of itself.

    accelerate launch train_antisd.py                                   # embedded task + tiny model, CPU ok
    accelerate launch --config_file configs/accelerate/fsdp2.yaml train_antisd.py \
        --config configs/qwen3_8b_antisd.yaml --output_dir runs/qwen3-8b  # real scale

Reading order, and where to edit: 1. Config (a flag is a field) -> 2. Method (the signal, the
advantages, the gate choice, the loss: change the algorithm here) -> 3. Privileged context (what the
teacher is shown) -> 4. One training step, phase by phase -> 5. main(): data -> rollout -> reward
-> privileged context -> teacher scoring -> signal + gate -> update -> log/checkpoint.
Beside it: prompts.py (every text the model reads, the teacher prompt included), antisd/gates.py (the
gates: EntropyGate, ReleaseController) and the machinery in antisd/, not for method edits (scoring,
rollouts, distributed, checkpoints, model loading, metrics, evaluation). Importing this file does no work.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import get_scheduler

from antisd.checkpoints import load_checkpoint, model_dir, prepare_output_dir, save_checkpoint, save_final_model
from antisd.cli import parse_layered
from antisd.distributed import gather_floats, make_accelerator, set_cpu_threads
from antisd.evaluation import BENCH_CHOICES, evaluate_during_training, training_eval_config
from antisd.gates import ConstantLambda, EntropyGate, Gate, ReleaseController, TeacherStats
from antisd.generation import DECODINGS, DEFAULT_DECODING, Samples, chat_messages, chat_prompt_ids
from antisd.metrics import SignalLog, drop_steps_after, log_completions, phase, step_metrics, write_step
from antisd.model_card import finish_run
from antisd.model_loading import load_policy
from antisd.policy_reads import PolicyReads
from antisd.rollouts import ROLLOUT_BACKENDS, SamplingSettings, generate_for_step, make_rollouts, rollout_seed
from antisd.scoring import logit_chunk_rows, teacher_scores
from data.code import CODE_TASKS, load_code_dataset
from data.loading import dataset_name, default_instruction, load_math_dataset, step_rows
from prompts import answer_feedback, code_feedback, code_user_prompt, teacher_user_message, user_prompt
from verifiers.math import MathVerifier, last_boxed_span
from verifiers.code_tests import feedback_counts
from verifiers.reward_funcs import CODE_TESTS, MATH_VERIFY, load_reward_funcs, weighted_rewards

logger = logging.getLogger("antisd")

METHODS = ("grpo", "sd", "sd_jsd", "antisd")
GATES = ("entropy", "none", "release")
GROUP_SIGNALS = ("all", "mixed", "bernoulli")
# A preset is a layer of defaults under the recipe and the flags: a recipe value or a flag always wins.
# release = the authors' released pipeline: their controller (its re-open ratio and length mask follow
# from --gate release) and no dataset solution shown when no other rollout of the group is correct.
PRESET_DEFAULTS = {"paper": {"gate": "entropy"}, "release": {"gate": "release", "dataset_solution_fallback": False}}
REOPEN_RATIO = {"entropy": 1.0, "release": 1.07}  # paper Eq. 7; the released controller
RELEASE_LENGTH_MASK = (12000, 16384)  # the released launcher: no signal on responses >= 12000 of 16384 tokens


# =====================================================================================
# 1. Config: every field is a flag (--max_steps or --max-steps); --config recipe.yaml sets defaults.
#    Edit: a new option is a new field here (with help), read as cfg.<name> below.
# =====================================================================================
def arg(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    config: str | None = arg(None, "YAML recipe (may `include:` a shared one); flags override it.")
    # --- run
    output_dir: str | None = arg(None, "Checkpoints, metrics.jsonl, metrics.png, the final model; "
                                       "default: runs/<method>-<dataset name>, e.g. runs/antisd-arith.")
    seed: int = arg(0, "Seeds the prompt order, the rollouts and the shown-solution choice.")
    max_steps: int = arg(300, "Optimizer steps (one rollout batch each). Paper: 200.")
    save_steps: int = arg(50, "Checkpoint every N steps (0: only at the end).")
    save_total_limit: int = arg(2, "Keep this many newest checkpoints.")
    resume: bool = arg(False, "Continue the run in --output_dir from its last complete checkpoint.")
    init_from: str | None = arg(None, "Start a new run from this model or checkpoint folder (the gate re-warms).")
    report_to: str = arg("tensorboard", "accelerate tracker(s), comma-separated: tensorboard, wandb, trackio, none.")
    push_to_hub: bool = arg(False, "Upload the final model, tokenizer, model card and metrics to the Hub at the end.")
    hub_model_id: str | None = arg(None, "Hub repo for --push_to_hub (user/name); default: the output directory's name.")
    # --- model and data
    model: str = arg("tiny", "HF model id or path; 'tiny' / 'tiny-checks' = the embedded models (built on first use).")
    dataset: str = arg("arith", "'arith' / 'arith_checks' (embedded tasks), a HF dataset id, or a local .jsonl/.parquet.")
    dataset_config: str | None = arg(None, "Subset (config name) of a hub dataset.")
    dataset_split: str = arg("train", "Split of a hub dataset.")
    problem_column: str | None = arg(None, "Column of the problem (text or chat messages); default: problem/question.")
    answer_column: str | None = arg(None, "Dataset column holding the gold answer; default: answer.")
    solution_column: str | None = arg(None, "Dataset column holding a reference solution; default: solution.")
    tests_column: str | None = arg(None, "Code data: the column of the tests (assert lines or {input, output} pairs); "
                                         "default: the schema's (data/code.py).")
    entry_point_column: str | None = arg(None, "Code data: the column of the function's name; default: entry_point.")
    skip_bad_rows: bool = arg(False, "Drop (and count) rows without answer or with a gold that does not parse.")
    instruction: str | None = arg(None, "Appended to each problem; default: none for arith, the boxed instruction otherwise.")
    system_prompt: str | None = arg(None, "System message for student and teacher alike.")
    enable_thinking: bool | None = arg(None, "Passed to chat templates that read it (Qwen3).")
    # --- rollout
    prompts_per_step: int = arg(8, "Prompts per optimizer step, over all processes. Paper: 32.")
    group_size: int = arg(8, "Rollouts per prompt (G). Paper: 8.")
    max_new_tokens: int = arg(128, "Generation budget per rollout.")
    temperature: float = arg(1.0, "Rollout sampling temperature. Paper: 1.0.")
    top_p: float = arg(1.0, "Rollout nucleus sampling. Paper: 1.0.")
    generation_batch_size: int = arg(64, "Most sequences per generate() call.")
    generation_kv_tokens: int = arg(196_608, "KV-cache budget of one generate() call in tokens: a call takes at most this "
                                             "// (longest prompt + max_new_tokens) sequences. The default holds 27 GiB of "
                                             "Qwen3-4B/8B bf16 KV cache (144 KiB a token), which fits beside an FSDP2 "
                                             "shard of the 8B recipe on an 80 GB GPU (computed, not measured).")
    rollout_backend: str = arg("transformers", "transformers (the policy samples itself) | vllm (a colocated engine per GPU).")
    transformers_decoding: str = arg(DEFAULT_DECODING, "shrink (a group's prompt prefilled once, finished rollouts leave the "
                                                       "batch; the samples of generate) | generate | static (KV cache) | "
                                                       "compiled (static + torch.compile).")
    vllm_gpu_memory_utilization: float = arg(0.3, "GPU memory share of the vLLM engine while awake (it sleeps otherwise).")
    importance_sampling_cap: float = arg(3.0, "Cap of the per-token ratio pi_trainer/pi_sampler (vLLM log-probs); 0: off.")
    truncated_completions: str = arg("wrong", "'wrong': reward 0 and trained on; 'mask': no loss on completions without EOS.")
    reward_funcs: list[str] | None = arg(None, "pkg.module:function or file.py:function (TRL signature); default: math_verify.")
    reward_weights: list[float] | None = arg(None, "One weight per reward function (default 1 each).")
    code_reward: str = arg("fraction", "code_tests reward: fraction (of the row's tests passed) | binary (1 if all pass).")
    verifier_workers: int = arg(2, "Math-verify worker processes.")
    verifier_timeout_s: float = arg(4.0, "CPU-time limit of one answer check (the check scores 0 past it).")
    # --- method
    method: str = arg("antisd", "grpo (delta 0) | sd (+u, the paper's +SD) | sd_jsd (+phi(u)) | antisd (-phi(u)).")
    preset: str = arg("paper", "Defaults under recipe and flags: paper (entropy gate) or release (the released pipeline: "
                               "--gate release, no --dataset_solution_fallback).")
    gate: str = arg("entropy", "entropy (paper: Schmitt trigger on teacher entropy) | none (lambda_max always) | release.")
    lambda_max: float = arg(0.5, "lambda of the token signal when the gate is open. Paper: 0.5.")
    gate_warmup_steps: int = arg(5, "W: steps of pure GRPO that calibrate the gate. Paper: 5.")
    gate_down_ratio: float = arg(0.93, "Close the gate below this x its warm-up reference. Paper: 0.93.")
    gate_reopen_ratio: float | None = arg(None, "Re-open at this x the warm-up reference; default: 1.00 for --gate entropy "
                                                "(paper), 1.07 for --gate release (released controller).")
    gate_close_above: float = arg(0.0, "Guard (ours): also close the gate while its statistic is above R x its warm-up "
                                       "reference (a degenerating policy makes the teacher less sure); 0: off (paper).")
    group_signal: str = arg("all", "Guard (ours): which groups get the token signal: all (paper) | mixed (only groups whose "
                                   "rewards differ) | bernoulli (weighted by 4p(1-p), p the group's mean reward).")
    dataset_solution_fallback: bool = arg(True, "Show the dataset's solution if no sibling is correct (paper: yes; release: no).")
    solution_max_tokens: int = arg(1024, "Shown-solution budget in tokens (beyond it: first quarter + last three quarters).")
    release_max_response_tokens: int | None = arg(None, "--gate release: no signal on responses at least this long; default: "
                                                        "12000/16384 of --max_new_tokens, as the released launcher.")
    # --- optimization
    learning_rate: float = arg(2e-4, "AdamW learning rate. Paper: 1e-6 (Qwen3); 2e-4 suits the tiny model.")
    weight_decay: float = arg(0.0, "AdamW weight decay.")
    lr_scheduler: str = arg("constant_with_warmup", "transformers scheduler: constant_with_warmup, linear, cosine, ...")
    lr_warmup_steps: int = arg(0, "Scheduler warm-up steps.")
    clip_eps: float = arg(0.2, "PPO clip epsilon. Paper: 0.2.")
    clip_eps_high: float | None = arg(None, "Clip-higher upper epsilon (DAPO); default = clip_eps.")
    loss_aggregation: str = arg("token-mean", "token-mean (DAPO; paper) or seq-mean-token-mean.")
    ppo_epochs: int = arg(1, "Optimizer updates per rollout batch (1 = on-policy; paper).")
    micro_batch_size: int = arg(16, "Sequences per forward/backward.")
    score_batch_size: int = arg(16, "Teacher prompts, then responses, per no-grad teacher forward.")
    max_grad_norm: float = arg(1.0, "Gradient clipping norm.")
    # --- systems
    bf16: bool = arg(False, "bf16 compute (FSDP2: bf16 params, fp32 reduction and outputs; else autocast); fp32 master weights.")
    gradient_checkpointing: bool = arg(False, "Recompute each layer in backward instead of storing its activations.")
    logit_chunk_mb: int = arg(512, "Memory for one chunk of the vocabulary projection (fp32 logits and temporaries).")
    cpu_threads: int = arg(0, "Torch threads per process on CPU; 0: physical cores shared among the processes.")
    log_completions: int = arg(0, "Rollouts per step (main process) written to completions.jsonl and tracker tables.")
    # --- LoRA through peft (TRL's flag names); the teacher is the same adapted model
    use_peft: bool = arg(False, "Train LoRA adapters instead of every weight; output: the adapter (peft format).")
    lora_r: int = arg(16, "LoRA rank.")
    lora_alpha: int = arg(32, "LoRA alpha (the update is scaled by alpha / r).")
    lora_dropout: float = arg(0.05, "Dropout on the LoRA input in training passes (never in scoring passes).")
    lora_target_modules: list[str] | None = arg(None, "Modules that get adapters; default: peft's for the architecture; all-linear.")
    load_in_4bit: bool = arg(False, "QLoRA: the frozen base in 4-bit NF4 (needs bitsandbytes and a CUDA GPU).")
    merge_adapter: bool = arg(False, "Also save the adapter merged into its base as a full model in <output_dir>/merged.")
    # --- evaluation during training (the evaluation core evaluate.py runs, on the main process)
    eval_steps: int = arg(0, "Evaluate every N steps (0: never) into <output_dir>/eval.jsonl and the trackers.")
    eval_bench: str | None = arg(None, "Benchmark of --eval_steps (evaluate.py --bench), e.g. arith or aime2025.")
    eval_n: int = arg(4, "Samples per problem of --eval_steps (avg@n, pass@1 and pass@n).")
    eval_limit: int | None = arg(None, "Only the first N problems of --eval_bench.")

    def __post_init__(self):
        """Defaults that follow from other fields (a value given anywhere wins)."""
        if self.output_dir is None:  # a run of another method or task never lands in the default run's folder
            self.output_dir = f"runs/{self.method}-{dataset_name(self.dataset)}"
        if self.gate_reopen_ratio is None:
            self.gate_reopen_ratio = REOPEN_RATIO.get(self.gate, 1.0)
        if self.reward_funcs is None and self.dataset in CODE_TASKS:  # the embedded code task is scored by its tests
            self.reward_funcs = [CODE_TESTS]
        if self.release_max_response_tokens is None:  # the same share of the budget: length >= ceil(12000/16384 x budget)
            self.release_max_response_tokens = -(-RELEASE_LENGTH_MASK[0] * self.max_new_tokens // RELEASE_LENGTH_MASK[1])

    def validate(self, num_processes: int) -> None:
        choices = {"method": METHODS, "preset": tuple(PRESET_DEFAULTS), "gate": GATES, "group_signal": GROUP_SIGNALS,
                   "truncated_completions": ("mask", "wrong"), "rollout_backend": ROLLOUT_BACKENDS,
                   "transformers_decoding": DECODINGS, "loss_aggregation": ("token-mean", "seq-mean-token-mean"),
                   "code_reward": ("fraction", "binary")}
        problems = [f"--{name} must be one of {allowed}, got {getattr(self, name)!r}"
                    for name, allowed in choices.items() if getattr(self, name) not in allowed]
        if self.group_size < 2:
            problems.append(f"--group_size must be >= 2 for group advantages, got {self.group_size}")
        if self.prompts_per_step % num_processes:
            problems.append(f"--prompts_per_step {self.prompts_per_step} must be divisible by the "
                            f"{num_processes} processes: use e.g. {num_processes * max(1, self.prompts_per_step // num_processes)}")
        if self.lr_scheduler == "constant" and self.lr_warmup_steps:
            problems.append("--lr_scheduler constant ignores --lr_warmup_steps: use constant_with_warmup")
        if self.resume and self.init_from:
            problems.append("--resume continues a run, --init_from starts a new one: pass only one")
        if self.reward_weights is not None and len(self.reward_weights) != len(self.reward_funcs or [MATH_VERIFY]):
            problems.append(f"--reward_weights needs one weight per reward function ({len(self.reward_funcs or [1])}), "
                            f"got {len(self.reward_weights)}")
        if (self.load_in_4bit or self.merge_adapter) and not self.use_peft:
            problems.append("--load_in_4bit and --merge_adapter need --use_peft")
        if self.eval_steps and self.eval_bench not in BENCH_CHOICES:
            problems.append(f"--eval_steps needs --eval_bench, one of {BENCH_CHOICES}; got {self.eval_bench!r}")
        if self.rollout_backend == "vllm" and self.use_peft:
            problems.append("--rollout_backend vllm does not push LoRA adapters into the engine yet: use transformers")
        if self.importance_sampling_cap != 0 and self.importance_sampling_cap < 1:
            problems.append(f"--importance_sampling_cap must be >= 1 (0: off), got {self.importance_sampling_cap}")
        if self.rollout_backend == "vllm" and importlib.util.find_spec("vllm") is None:
            problems.append("--rollout_backend vllm needs the `vllm` package: pip install -r requirements-vllm.txt (CUDA GPUs)")
        if not 0 < self.vllm_gpu_memory_utilization <= 1:
            problems.append(f"--vllm_gpu_memory_utilization must be in (0, 1], got {self.vllm_gpu_memory_utilization}")
        if self.cpu_threads < 0:
            problems.append(f"--cpu_threads must be >= 0 (0: all cores), got {self.cpu_threads}")
        if self.temperature <= 0:
            problems.append(f"--temperature must be > 0: rollouts are sampled and scored at it, got {self.temperature}")
        if self.gate_close_above and self.gate_close_above <= max(self.gate_reopen_ratio, 1.0):
            problems.append(f"--gate_close_above {self.gate_close_above} must be above the re-open ratio "
                            f"{self.gate_reopen_ratio} (and 1), or 0 (off): the gate could never re-open")
        for name in ("max_steps", "micro_batch_size", "score_batch_size", "max_new_tokens", "ppo_epochs", "gate_warmup_steps",
                     "generation_kv_tokens", "logit_chunk_mb"):
            if getattr(self, name) < 1:
                problems.append(f"--{name} must be >= 1")
        if problems:
            raise SystemExit("Bad config:\n  " + "\n  ".join(problems))


def parse_config(argv: list[str] | None = None) -> Config:
    """Dataclass defaults < the --preset's defaults < --config YAML < the saved config of a --resume'd
    run < CLI flags: a recipe value or a flag always wins over a preset."""
    first = parse_layered(Config, argv, __doc__, ignored_keys=("config", "resume"))
    saved = Path(first.output_dir) / "config.yaml"
    return parse_layered(Config, argv, __doc__, base_layers=[PRESET_DEFAULTS.get(first.preset, {})],
                         override_files=[saved] if first.resume and saved.is_file() else [],
                         ignored_keys=("config", "resume"))


# =====================================================================================
# 2. Method: per-token signal, advantages, the gate choice, loss (pure functions; tests import them).
#    Edit here to change the algorithm: a new signal in token_signal; a new gate is a Gate (antisd/gates.py)
#    that make_gate returns.
# =====================================================================================
LOG2 = math.log(2.0)


def jsd_phi(u: torch.Tensor) -> torch.Tensor:
    """phi(u) = (softplus(u) - log 2) / 2: phi(0) = 0, phi' = sigmoid(u)/2, phi >= -log(2)/2."""
    return 0.5 * (F.softplus(u) - LOG2)


def token_signal(u: torch.Tensor, method: str) -> torch.Tensor:
    """delta_t for each method, from the conditional PMI u = log pi_T - log pi_S of the sampled token."""
    if method == "grpo":
        return torch.zeros_like(u)
    if method == "sd":
        return u
    if method == "sd_jsd":
        return jsd_phi(u)
    if method == "antisd":
        return -jsd_phi(u)
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")


def pmi_signal(teacher_logp: torch.Tensor, student_logp: torch.Tensor, mask: torch.Tensor, method: str, gate: Gate):
    """(u, delta): u = log pi_T - log pi_S of each sampled token (0 off the mask; the student taken as
    a constant) and the method's per-token signal of it, as the gate shapes it."""
    u = (teacher_logp - student_logp.detach()) * mask
    return u, gate.signal(u, mask, partial(token_signal, method=method))


def grpo_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """(R - mean_group) / (std_group + eps) for rewards laid out group after group."""
    grouped = rewards.view(-1, group_size)
    adv = (grouped - grouped.mean(dim=1, keepdim=True)) / (grouped.std(dim=1, keepdim=True) + eps)
    return adv.view(-1)


def zero_std_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """For each rollout: whether every rollout of its group scored the same (sequence advantage 0)."""
    grouped = rewards.view(-1, group_size)
    return (grouped.amax(1) == grouped.amin(1)).repeat_interleave(group_size)


def group_signal_weights(rewards: torch.Tensor, group_size: int, mode: str) -> torch.Tensor:
    """Our guard against the collapse path (`--group_signal`): the weight of each rollout's token signal.
    all: 1 (the paper). mixed: 0 in groups whose rewards are all equal, where the signal would act
    alone. bernoulli: 4 p (1 - p), p the group's mean reward (clamped to [0, 1]), as SSOPD weights
    self-distillation: 0 in all-right and all-wrong groups, 1 at p = 1/2."""
    if mode == "all":
        return torch.ones_like(rewards)
    if mode == "mixed":
        return (~zero_std_groups(rewards, group_size)).to(rewards.dtype)
    if mode == "bernoulli":
        p = rewards.view(-1, group_size).mean(1).clamp(0.0, 1.0)
        return (4 * p * (1 - p)).repeat_interleave(group_size)
    raise ValueError(f"unknown --group_signal {mode!r}; choose from {GROUP_SIGNALS}")


def combine_advantages(seq_adv: torch.Tensor, signal: torch.Tensor, lam, mask: torch.Tensor) -> torch.Tensor:
    """A_t = A_seq + lambda * delta_t on active tokens; lam is a scalar or one value per sequence."""
    lam = torch.as_tensor(lam, dtype=signal.dtype, device=signal.device)
    if lam.dim() == 1:
        lam = lam[:, None]
    return (seq_adv[:, None].to(signal.dtype) + lam * signal.detach()) * mask


def make_gate(cfg: Config) -> Gate:
    """The gate of --gate (antisd/gates.py); grpo has none (lambda 0)."""
    if cfg.method == "grpo":
        return ConstantLambda(0.0)
    if cfg.gate == "none":
        return ConstantLambda(cfg.lambda_max)
    if cfg.gate == "release":
        return ReleaseController(cfg.gate_warmup_steps, cfg.gate_down_ratio, cfg.gate_reopen_ratio, cfg.lambda_max,
                                 cfg.release_max_response_tokens, cfg.gate_close_above)
    return EntropyGate(cfg.gate_warmup_steps, cfg.gate_down_ratio, cfg.lambda_max, cfg.gate_reopen_ratio, cfg.gate_close_above)


def ppo_clip_loss(logp, old_logp, adv, weights, clip_low: float, clip_high: float):
    """PPO-clip surrogate summed with per-token `weights` (the normalization lives in the weights).

    Returns (loss, clipped-token count): weights carry 1/N for the whole batch, so micro-steps and
    processes add up to the token-mean of the full generation batch.
    """
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - clip_low, 1 + clip_high) * adv
    loss = -(torch.minimum(unclipped, clipped) * weights).sum()
    return loss, ((unclipped != clipped) & (weights > 0)).sum()


def loss_weights(mask: torch.Tensor, aggregation: str, total_tokens: float, total_seqs: float) -> torch.Tensor:
    """Per-token weights whose sum over the whole batch (all micro-steps, all processes) is 1."""
    if aggregation == "token-mean":
        return mask / total_tokens
    return mask / mask.sum(1, keepdim=True).clamp(min=1) / total_seqs


# =====================================================================================
# 3. Privileged context (paper App. C): a verified sibling solution + feedback on the own attempt.
#    Edit: what is shown here; the texts themselves (teacher template, feedback) are in prompts.py.
# =====================================================================================
def cut_after_last_boxed(text: str) -> str:
    """Drop what follows the box the verifier grades (verifiers.math.last_boxed_span); unchanged
    when the verifier sees no answer in it."""
    span = last_boxed_span(text)
    return text if span is None else text[:span[1]]


def fit_token_budget(text: str, tokenizer, max_tokens: int) -> str:
    """Keep 25% head + 75% tail of an over-long solution, joined by an ellipsis line."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) <= max_tokens:
        return text
    head = max_tokens // 4
    return tokenizer.decode(ids[:head]) + "\n...\n" + tokenizer.decode(ids[len(ids) - (max_tokens - head):])


def choose_shown_solutions(rewards: list[float], texts: list[str], group_size: int,
                           dataset_solutions: list[str | None], rng: random.Random) -> list[str | None]:
    """For rollout i: another correct rollout of its group, else the dataset solution, else None.

    Each group shows one randomly chosen correct rollout to all its other rollouts (and a second
    one to that rollout), so a group has at most three distinct teacher prompts and
    `teacher_scores` reads each once. Each rollout still sees a uniformly chosen correct sibling.
    """
    shown = []
    for start in range(0, len(rewards), group_size):
        group = range(start, start + group_size)
        correct = [j for j in group if rewards[j] > 0.5]
        fallback = dataset_solutions[start // group_size]
        chosen = rng.choice(correct) if correct else None
        for i in group:
            if chosen is None:
                shown.append(fallback)
            elif i != chosen:
                shown.append(texts[chosen])
            else:
                others = [j for j in correct if j != i]
                shown.append(texts[rng.choice(others)] if others else fallback)
    return shown


def teacher_prompt_ids(tokenizer, cfg: Config, prompt: str, solution: str | None, feedback: str) -> list[int]:
    if solution is not None:
        solution = fit_token_budget(cut_after_last_boxed(solution), tokenizer, cfg.solution_max_tokens)
    messages = chat_messages(teacher_user_message(prompt, solution, feedback), cfg.system_prompt)
    return chat_prompt_ids(tokenizer, messages, cfg.enable_thinking)


class TeacherContext(NamedTuple):
    row: int  # the problem's dataset row
    solution: str | None  # the solution shown
    feedback: str  # the feedback on the rollout's own attempt


def rollout_assessments(rewards: list[float], code_counts: list[tuple[int, int]] | None = None):
    """(counts as correct, feedback) per rollout. Math: reward > 0.5, "Your answer is (in)correct.";
    code (the code_tests reward's (passed, total) per rollout): every test passed, code_feedback(passed, total)."""
    if code_counts is None:
        correct = [r > 0.5 for r in rewards]
        return correct, [answer_feedback(c) for c in correct]
    return [total > 0 and passed == total for passed, total in code_counts], [code_feedback(p, t) for p, t in code_counts]


def teacher_prompts(cfg: Config, tokenizer, step: int, rank: int, rows: list[dict], prompts: list[str],
                    batch_rows: list[int], rollout: Samples, rewards: list[float],
                    code_counts: list[tuple[int, int]] | None = None) -> list[list[int]]:
    """Each rollout's teacher prompt: its problem, a correct sibling (or the dataset's solution) and
    feedback on its own attempt (`rollout_assessments`); each distinct one rendered once."""
    rng = random.Random(cfg.seed * 7919 + step * 104729 + rank)
    solutions = [rows[i]["solution"] if cfg.dataset_solution_fallback else None for i in batch_rows]
    correct, feedback = rollout_assessments(rewards, code_counts)
    shown = choose_shown_solutions(correct, rollout.texts, cfg.group_size, solutions, rng)
    contexts = [TeacherContext(batch_rows[i // cfg.group_size], shown[i], feedback[i]) for i in range(len(shown))]
    rendered = {c: teacher_prompt_ids(tokenizer, cfg, prompts[c.row], c.solution, c.feedback) for c in set(contexts)}
    return [rendered[c] for c in contexts]


# =====================================================================================
# 4. One training step, phase by phase (main() calls them in this order).
# =====================================================================================
def load_rows(cfg: Config) -> list[dict]:
    """The dataset's rows; code rows (problem, tests, entry point; data/code.py) for an embedded code task,
    --reward_funcs code_tests or --tests_column. Bad rows stop the run here, before the model loads."""
    code = cfg.dataset in CODE_TASKS or CODE_TESTS in (cfg.reward_funcs or []) or cfg.tests_column is not None
    fields = ("problem", "tests", "entry_point", "solution") if code else ("problem", "answer", "solution")
    columns = {f: getattr(cfg, f"{f}_column") for f in fields if getattr(cfg, f"{f}_column")}
    return (load_code_dataset if code else load_math_dataset)(cfg.dataset, cfg.dataset_split, skip_bad_rows=cfg.skip_bad_rows,
                                                              seed=cfg.seed, config_name=cfg.dataset_config, columns=columns or None)


def render_prompts(cfg: Config, tokenizer, rows: list[dict]) -> tuple[list[str], list[list[int]]]:
    """Each row's student prompt: its text (problem + instruction; code rows: instruction + problem) and its
    chat-rendered token ids."""
    code = "tests" in rows[0]
    instruction = default_instruction(cfg.dataset, code) if cfg.instruction is None else cfg.instruction
    prompts = [(code_user_prompt if code else user_prompt)(r["problem"], instruction) for r in rows]
    return prompts, [chat_prompt_ids(tokenizer, chat_messages(p, cfg.system_prompt), cfg.enable_thinking) for p in prompts]


def rewards_and_advantages(cfg: Config, reward_funcs: dict, rollout: Samples, prompts: list[str], rows: list[dict]):
    """(rewards, GRPO sequence advantages, each reward function's rewards): the weighted sum of the
    reward functions (TRL signature; kwargs: prompts and the rows' columns); truncated completions
    score 0 under 'wrong'."""
    columns = {key: [row.get(key) for row in rows] for key in rows[0]}
    weights = cfg.reward_weights or [1.0] * len(reward_funcs)
    rewards, each = weighted_rewards(reward_funcs, weights, rollout.texts, {"prompts": prompts, **columns})
    if cfg.truncated_completions == "wrong":
        rewards = [0.0 if t else r for r, t in zip(rewards, rollout.truncated)]
    return rewards, grpo_advantages(torch.tensor(rewards), cfg.group_size), each


def score_teacher(cfg: Config, accelerator, model, tokenizer, chunk_rows: int, step: int, rows: list[dict], prompts: list[str],
                  batch_rows: list[int], rollout: Samples, rewards: list[float], counts=None) -> tuple[list, list]:
    """(log pi_T of each response token, the teacher's entropies): the same weights re-read each response
    after its privileged context, no grad (none for grpo)."""
    if cfg.method == "grpo":
        return [None] * len(rollout.completion_ids), []
    device = accelerator.device
    return teacher_scores(model, teacher_prompts(cfg, tokenizer, step, accelerator.process_index, rows, prompts, batch_rows,
                                                 rollout, rewards, counts),
                          rollout.completion_ids, tokenizer.pad_token_id, device, cfg.score_batch_size, chunk_rows,
                          agree_calls=lambda n: int(accelerator.gather(torch.tensor([n], device=device)).max()),
                          temperature=cfg.temperature)


def teacher_stats(accelerator, teacher_logp: list, teacher_entropy: list, completion_ids: list[list[int]]) -> TeacherStats:
    """What the gate reads before the update: the median teacher entropy over every token of all processes,
    and each sequence's teacher perplexity exp(-mean_t log pi_T) (NaN without a teacher)."""
    entropy = gather_floats(accelerator, torch.cat(teacher_entropy) if teacher_entropy else torch.zeros(0))
    seq_ppl = torch.tensor([math.exp(-(tl.sum() / max(len(c), 1)).item()) if tl is not None else float("nan")
                            for tl, c in zip(teacher_logp, completion_ids)])
    return TeacherStats(entropy.median().item() if entropy.numel() else None, seq_ppl)


def end_gate_step(accelerator, gate: Gate, seq_ppl: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """After the update the gate learns the step's average teacher PPL (sequences with PPL < 3, all
    processes; None when there is none) and the std of u; returns u of all processes."""
    u_all = gather_floats(accelerator, u)
    finite = seq_ppl[torch.isfinite(seq_ppl) & (seq_ppl < ReleaseController.PPL_CAP)]
    ppl_sum = accelerator.reduce(torch.tensor([finite.sum().item(), float(finite.numel())], device=accelerator.device), "sum")
    gate.end_step((ppl_sum[0] / ppl_sum[1]).item() if ppl_sum[1] > 0 else None, u_all.std().item() if u_all.numel() > 1 else 0.0)
    return u_all


def trainer_state(cfg: Config, gate: Gate, step: int) -> dict:
    """What a checkpoint holds beside accelerate's state: the data position and the gate."""
    return {"next_prompt": step * cfg.prompts_per_step, "controller": gate.state_dict()}


def update_policy(cfg: Config, accelerator, model, optimizer, scheduler, gate: Gate, rollout: Samples, pad_id: int,
                  teacher_logp: list, seq_adv: torch.Tensor, seq_lambda: torch.Tensor, chunk_rows: int) -> dict:
    """PPO-clip on A_t = A_seq + lambda * delta_t, token-mean over the whole batch of all processes; `seq_lambda`
    is each sequence's lambda (gate x group weight). How the policy is read (micro-batches, shared prompts,
    the behaviour log-probs, importance weights against a sampler's own log-probs): antisd.policy_reads."""
    device, world = accelerator.device, accelerator.num_processes
    reads = PolicyReads(accelerator, model, rollout, pad_id, cfg.micro_batch_size, chunk_rows, cfg.temperature,
                        cfg.importance_sampling_cap)
    trained = ~torch.tensor(rollout.truncated) if cfg.truncated_completions == "mask" else torch.ones(len(rollout.truncated), dtype=torch.bool)
    resp_lens = torch.tensor([len(c) for c in rollout.completion_ids], dtype=torch.float)
    total_tokens = accelerator.reduce((resp_lens * trained).sum().to(device), "sum").clamp(min=1)
    total_seqs = accelerator.reduce(trained.sum().float().to(device), "sum").clamp(min=1)
    clip_high = cfg.clip_eps if cfg.clip_eps_high is None else cfg.clip_eps_high
    old_logp, is_weights, signals, loss_sum, clipped_sum = {}, {}, SignalLog(len(trained)), 0.0, 0.0
    grad_norm, skipped = None, False
    for epoch in range(cfg.ppo_epochs):
        reads.start_epoch()
        for k, idx in enumerate(reads.micro_batches):
            packed = reads.pack(idx)
            mask, rows_trained = packed[-1], trained[idx].to(device)[:, None]
            behaviour = reads.eval_mode_logprobs(packed) if epoch == 0 else None  # None without dropout
            with reads.gradient_sync(k):
                logp = reads.logprobs(idx, packed)
                if epoch == 0:  # parameters not yet moved: the behaviour policy, log pi_S for u and PPO's old log-probs
                    old_logp[k] = logp.detach() if behaviour is None else behaviour
                    is_weights[k] = reads.sampler_weights(idx, old_logp[k], mask, rows_trained)
                signal = torch.zeros_like(logp)
                if cfg.method != "grpo":
                    t_logp = torch.nn.utils.rnn.pad_sequence([teacher_logp[i] for i in idx], batch_first=True)
                    u, signal = pmi_signal(t_logp, old_logp[k], mask, cfg.method, gate)
                    if epoch == 0:  # rows without loss carry no signal mass
                        signals.add(idx, u, mask, (seq_lambda[idx] * trained[idx]).to(device)[:, None] * signal)
                adv = combine_advantages(seq_adv[idx].to(device), signal, seq_lambda[idx].to(device), mask)
                weights = loss_weights(mask * rows_trained, cfg.loss_aggregation, total_tokens, total_seqs) * world
                weights = weights if is_weights[k] is None else weights * is_weights[k]
                loss, clipped = ppo_clip_loss(logp, old_logp[k], adv, weights, cfg.clip_eps, clip_high)
                accelerator.backward(loss)  # DDP/FSDP average gradients over processes: hence `* world` above
            loss_sum, clipped_sum = loss_sum + loss.item() / world, clipped_sum + clipped.item()
        reads.finish_epoch()
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        if skipped := not torch.isfinite(grad_norm):  # the loop logs it
            optimizer.zero_grad(set_to_none=True)
            break
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return {"loss": loss_sum, "clipped": clipped_sum, **signals.as_dict(), "grad_norm": grad_norm, "skipped": skipped,
            "total_tokens": total_tokens.item(), "resp_lens": resp_lens, "is_values": reads.importance_values()}


# =====================================================================================
# 5. The loop: setup, then one step per iteration, top to bottom.
# =====================================================================================
def main(cfg: Config) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    accelerator = make_accelerator(cfg.output_dir, cfg.bf16, cfg.report_to)
    cfg.validate(accelerator.num_processes)
    if accelerator.device.type == "cpu":
        logger.info("%d torch threads per process", set_cpu_threads(accelerator, cfg.cpu_threads))
    rank, world, out = accelerator.process_index, accelerator.num_processes, Path(cfg.output_dir)
    resume_from = prepare_output_dir(accelerator, out, asdict(cfg), cfg.resume)
    set_seed(cfg.seed)

    # ---- data and model: every prompt rendered once
    rows = load_rows(cfg)
    lora = dict(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, target_modules=cfg.lora_target_modules)
    model, tokenizer = load_policy(model_dir(cfg.init_from, out / "init_model", accelerator) if cfg.init_from else cfg.model,
                                   cfg.gradient_checkpointing, lora if cfg.use_peft else None, cfg.load_in_4bit)
    prompts, prompt_ids = render_prompts(cfg, tokenizer, rows)

    # ---- optimizer, gate, rewards, rollouts, trackers
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                              num_training_steps=cfg.max_steps * cfg.ppo_epochs)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()  # from_pretrained leaves eval mode; layers are only recomputed (--gradient_checkpointing) in training mode
    accelerator.register_for_checkpointing(scheduler)  # stepped by hand: accelerate would step it per process
    gate = make_gate(cfg)
    start_step = load_checkpoint(accelerator, resume_from, gate) if resume_from is not None else 0
    metrics_path = out / "metrics.jsonl"
    if accelerator.is_main_process:
        drop_steps_after(start_step, metrics_path, out / "completions.jsonl", out / "eval.jsonl")
    accelerator.init_trackers("antisd", config={k: v for k, v in asdict(cfg).items() if v is not None})
    names = cfg.reward_funcs or [MATH_VERIFY]
    verifier = MathVerifier(num_workers=cfg.verifier_workers, timeout_s=cfg.verifier_timeout_s) if MATH_VERIFY in names else None
    reward_funcs, timeouts_logged = load_reward_funcs(names, verifier, cfg.code_reward, cfg.verifier_workers), 0  # timeouts: per step
    unwrapped = accelerator.unwrap_model(model)
    chunk_rows = logit_chunk_rows(unwrapped.config.get_text_config(decoder=True).vocab_size, cfg.logit_chunk_mb)
    rollouts = make_rollouts(cfg.rollout_backend, unwrapped, tokenizer, cfg.transformers_decoding, cfg.generation_batch_size,
                             cfg.generation_kv_tokens, torch.bfloat16 if cfg.bf16 else torch.float32, cfg.seed,
                             cfg.vllm_gpu_memory_utilization, max_model_len=max(map(len, prompt_ids)) + cfg.max_new_tokens)
    sampling, orders = SamplingSettings(cfg.max_new_tokens, cfg.temperature, cfg.top_p), {}
    bar = tqdm(range(start_step, cfg.max_steps), initial=start_step, total=cfg.max_steps,
               disable=not accelerator.is_main_process, desc="train")
    for step in bar:
        t_step, timings = time.perf_counter(), {}
        with phase(timings, "generate"):  # G samples of each of this process's prompts, seeded by (seed, step, rank)
            batch_rows = step_rows(cfg.seed, cfg.prompts_per_step, step, rank, world, len(rows), orders)
            per_rollout = [i for i in batch_rows for _ in range(cfg.group_size)]
            rollout = generate_for_step(rollouts, unwrapped, [prompt_ids[i] for i in per_rollout], sampling,
                                        rollout_seed(cfg.seed, step, rank))
        with phase(timings, "reward"):  # and GRPO advantages (groups never straddle processes)
            rewards, seq_adv, reward_parts = rewards_and_advantages(cfg, reward_funcs, rollout, [prompts[i] for i in per_rollout],
                                                                    [rows[i] for i in per_rollout])
        with phase(timings, "teacher"):  # privileged context and teacher scoring
            teacher_logp, teacher_entropy = score_teacher(cfg, accelerator, model, tokenizer, chunk_rows, step, rows, prompts,
                                                          batch_rows, rollout, rewards, 
                                                          feedback_counts(reward_funcs, rollout.truncated, cfg.truncated_completions == "wrong"))
        stats = teacher_stats(accelerator, teacher_logp, teacher_entropy, rollout.completion_ids)
        seq_lambda = gate.lambdas(stats)  # this step's teacher statistics decide its lambda, times the group guard
        group_weight = group_signal_weights(torch.tensor(rewards), cfg.group_size, cfg.group_signal)
        with phase(timings, "update"):
            update = update_policy(cfg, accelerator, model, optimizer, scheduler, gate, rollout, tokenizer.pad_token_id,
                                   teacher_logp, seq_adv, seq_lambda * group_weight, chunk_rows)
        if update["skipped"]:
            logger.warning("step %d: non-finite gradient norm (%s), update skipped", step + 1, update["grad_norm"].item())
        u_all = end_gate_step(accelerator, gate, stats.seq_ppl, update["u"])  # the release controller learns here

        # ---- log, evaluate (evaluate.py's core on the current weights, the training RNG untouched), checkpoint
        step_timeouts, timeouts_logged = (verifier.timeouts - timeouts_logged, verifier.timeouts) if verifier else (None, 0)
        metrics = step_metrics(accelerator, step, cfg.group_size, cfg.ppo_epochs, rewards, reward_parts, rollout.truncated,
                               stats.entropy_median, seq_lambda, group_weight, gate, update, u_all, scheduler.get_last_lr()[0],
                               timings, time.perf_counter() - t_step, step_timeouts)
        if cfg.log_completions:
            log_completions(accelerator, out / "completions.jsonl", step, cfg.log_completions, {
                "prompt": [prompts[i] for i in per_rollout], "completion": rollout.texts, "reward": rewards,
                "advantage": seq_adv, "u_mean": update["seq_u_mean"], "lambda": seq_lambda})
        write_step(accelerator, metrics_path, metrics, bar, cfg.max_new_tokens, cfg.truncated_completions)
        if cfg.eval_steps and (step + 1) % cfg.eval_steps == 0:
            evaluate_during_training(accelerator, model, tokenizer, training_eval_config(cfg), step + 1, out / "eval.jsonl")
        if cfg.save_steps and (step + 1) % cfg.save_steps == 0 and step + 1 < cfg.max_steps:
            save_checkpoint(accelerator, model, tokenizer, cfg.output_dir, step + 1, trainer_state(cfg, gate, step + 1),
                            cfg.save_total_limit)

    save_checkpoint(accelerator, model, tokenizer, cfg.output_dir, cfg.max_steps, trainer_state(cfg, gate, cfg.max_steps),
                    cfg.save_total_limit)
    save_final_model(accelerator, model, tokenizer, cfg.output_dir, torch.bfloat16 if cfg.bf16 else torch.float32,
                     cfg.merge_adapter)
    if accelerator.is_main_process:
        finish_run(out, {k: v for k, v in asdict(cfg).items() if k != "resume"})
    if verifier is not None:
        verifier.close()
    accelerator.end_training()


if __name__ == "__main__":
    main(parse_config())
