r"""Anti-Self-Distillation (AntiSD) for reasoning RL, in one script (arXiv 2605.11609).

A policy samples G solutions per math problem; a verifier scores them (GRPO advantages); the same
model, shown a privileged context (a verified sibling solution + feedback), re-scores every
sampled token. The per-token PMI u = log pi_T - log pi_S becomes a bounded bonus -phi(u) that
rewards deliberation tokens (u < 0) and penalizes shortcut tokens (u > 0); a teacher-entropy gate
switches it off when the teacher grows too sure of itself.

    accelerate launch train_antisd.py                                   # embedded task + tiny model, CPU ok
    accelerate launch --config_file configs/accelerate/fsdp2.yaml train_antisd.py \
        --config configs/qwen3_8b_antisd.yaml --output_dir runs/qwen3-8b  # real scale

Reading order: Config -> method (signal, advantages, gate, loss) -> privileged context ->
chunked scoring -> checkpoints -> main() (data -> rollout -> reward -> context -> teacher ->
signal + gate -> update -> log/checkpoint). Importing this file does no work.
"""

from __future__ import annotations

import json
import logging
import math
import random
import statistics
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from checkpoints import latest_checkpoint, load_causal_lm, model_dir, save_checkpoint, save_final_model
from cli import parse_layered
from distributed import full_weights_for_generation, gather_floats, make_accelerator, peak_memory_gib, set_cpu_threads
from prompts import answer_feedback, teacher_user_message, user_prompt
from scoring import install_scoring_head, length_sorted_batches, logit_chunk_rows, pack_sequences, teacher_scores, token_logprobs
from verifiers.math import last_boxed_span

logger = logging.getLogger("antisd")

METHODS = ("grpo", "sd", "sd_jsd", "antisd")
PRESETS = ("paper", "release")
# A preset is a layer of defaults: a recipe value or a CLI flag always wins over it.
PRESET_DEFAULTS = {"paper": {}, "release": {"gate_reopen_ratio": 1.07}}


# =====================================================================================
# Config: every field is a flag (--max_steps or --max-steps); --config recipe.yaml sets defaults
# =====================================================================================
@dataclass
class Config:
    config: str | None = field(default=None, metadata={"help": "YAML recipe; CLI flags override it."})
    # --- run
    output_dir: str = field(default="runs/antisd-arith", metadata={"help": "Checkpoints, metrics.jsonl, final model."})
    seed: int = 0
    max_steps: int = field(default=300, metadata={"help": "Optimizer steps (one rollout batch each)."})
    save_steps: int = field(default=50, metadata={"help": "Checkpoint every N steps (0: only at the end)."})
    save_total_limit: int = field(default=2, metadata={"help": "Keep this many newest checkpoints."})
    resume: bool = field(default=False, metadata={"help": "Continue the run in --output_dir from its last checkpoint."})
    init_from: str | None = field(default=None, metadata={"help": "Start a new run from this model/checkpoint dir (gate re-warmed)."})
    report_to: str = field(default="tensorboard", metadata={"help": "accelerate tracker(s), comma-separated: tensorboard, wandb, trackio, none."})
    # --- model and data
    model: str = field(default="tiny", metadata={"help": "HF model id or path; 'tiny' = the embedded model (built on first use)."})
    dataset: str = field(default="arith", metadata={"help": "'arith' (embedded task), a HF dataset id, or a local .jsonl/.parquet."})
    dataset_split: str = "train"
    skip_bad_rows: bool = field(default=False, metadata={"help": "Drop (and count) rows without answer or with a gold that does not parse."})
    instruction: str | None = field(default=None, metadata={"help": "Appended to each problem; default: none for arith, the boxed instruction otherwise."})
    system_prompt: str | None = None
    enable_thinking: bool | None = field(default=None, metadata={"help": "Passed to chat templates that read it (Qwen3)."})
    # --- rollout
    prompts_per_step: int = field(default=8, metadata={"help": "Prompts per optimizer step, over all processes."})
    group_size: int = field(default=8, metadata={"help": "Rollouts per prompt (G)."})
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    generation_batch_size: int = field(default=64, metadata={"help": "Most sequences per generate() call."})
    generation_kv_tokens: int = field(default=196_608, metadata={"help": "KV-cache budget of one generate() call in tokens: "
                                      "a call takes at most this // (longest prompt + max_new_tokens) sequences. The default "
                                      "holds 27 GiB of Qwen3-4B/8B bf16 KV cache (144 KiB a token), which fits beside an FSDP2 "
                                      "shard of the 8B recipe on an 80 GB GPU (computed, not measured)."})
    truncated_completions: str = field(default="wrong", metadata={"help": "'wrong': reward 0 and trained on; 'mask': no loss on completions without EOS."})
    verifier_workers: int = 2
    verifier_timeout_s: float = 4.0
    # --- method
    method: str = field(default="antisd", metadata={"help": "grpo | sd (+u) | sd_jsd (+phi(u)) | antisd (-phi(u))."})
    preset: str = field(default="paper", metadata={"help": "paper: entropy Schmitt gate; release: the authors' perplexity controller."})
    gate: str = field(default="entropy", metadata={"help": "paper preset: 'entropy' gate or 'none' (lambda_max always)."})
    lambda_max: float = 0.5
    gate_warmup_steps: int = field(default=5, metadata={"help": "W: steps of pure GRPO that calibrate the gate (10 for think models)."})
    gate_down_ratio: float = 0.93
    gate_reopen_ratio: float = field(default=1.0, metadata={"help": "Re-open at this x H_warm (paper 1.00; release 1.07)."})
    dataset_solution_fallback: bool = field(default=True, metadata={"help": "Show the dataset's solution when no sibling is correct."})
    solution_max_tokens: int = field(default=1024, metadata={"help": "Shown solution budget in tokens; a longer one keeps its first quarter and last three quarters."})
    release_max_response_tokens: int = field(default=8192, metadata={"help": "release preset: no signal on longer responses."})
    # --- optimization
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    lr_scheduler: str = field(default="constant_with_warmup", metadata={"help": "transformers scheduler: constant_with_warmup, linear, cosine, ..."})
    lr_warmup_steps: int = 0
    clip_eps: float = 0.2
    clip_eps_high: float | None = field(default=None, metadata={"help": "Clip-higher upper epsilon (DAPO); default = clip_eps."})
    loss_aggregation: str = field(default="token-mean", metadata={"help": "token-mean (DAPO) or seq-mean-token-mean."})
    ppo_epochs: int = field(default=1, metadata={"help": "Optimizer updates per rollout batch (1 = on-policy)."})
    micro_batch_size: int = field(default=16, metadata={"help": "Sequences per forward/backward."})
    score_batch_size: int = field(default=16, metadata={"help": "Teacher prompts, then responses, per no-grad teacher forward."})
    max_grad_norm: float = 1.0
    # --- systems
    bf16: bool = False
    gradient_checkpointing: bool = False
    logit_chunk_mb: int = field(default=512, metadata={"help": "Memory for one chunk of the vocabulary projection (fp32 "
                                "logits and their temporaries): a chunk takes as many token rows as fit."})
    cpu_threads: int = field(default=0, metadata={"help": "Torch threads per process on CPU; 0: the machine's physical cores "
                                                          "shared among its processes (accelerate launch alone sets 1)."})

    def validate(self, num_processes: int) -> None:
        problems = []
        if self.method not in METHODS:
            problems.append(f"--method must be one of {METHODS}, got {self.method!r}")
        if self.preset not in PRESETS:
            problems.append(f"--preset must be one of {PRESETS}, got {self.preset!r}")
        if self.gate not in ("entropy", "none"):
            problems.append(f"--gate must be 'entropy' or 'none', got {self.gate!r}")
        if self.group_size < 2:
            problems.append(f"--group_size must be >= 2 for group advantages, got {self.group_size}")
        if self.prompts_per_step % num_processes:
            problems.append(f"--prompts_per_step {self.prompts_per_step} must be divisible by the "
                            f"{num_processes} processes: use e.g. {num_processes * max(1, self.prompts_per_step // num_processes)}")
        if self.truncated_completions not in ("mask", "wrong"):
            problems.append("--truncated_completions must be 'mask' or 'wrong'")
        if self.loss_aggregation not in ("token-mean", "seq-mean-token-mean"):
            problems.append("--loss_aggregation must be 'token-mean' or 'seq-mean-token-mean'")
        if self.lr_scheduler == "constant" and self.lr_warmup_steps:
            problems.append("--lr_scheduler constant ignores --lr_warmup_steps: use constant_with_warmup")
        if self.resume and self.init_from:
            problems.append("--resume continues a run, --init_from starts a new one: pass only one")
        if self.cpu_threads < 0:
            problems.append(f"--cpu_threads must be >= 0 (0: all cores), got {self.cpu_threads}")
        for name in ("max_steps", "micro_batch_size", "score_batch_size", "max_new_tokens", "ppo_epochs", "gate_warmup_steps"):
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
# Method: per-token signal, advantages, gates, loss (pure functions; tests import them)
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


def grpo_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """(R - mean_group) / (std_group + eps) for rewards laid out group after group."""
    grouped = rewards.view(-1, group_size)
    adv = (grouped - grouped.mean(dim=1, keepdim=True)) / (grouped.std(dim=1, keepdim=True) + eps)
    return adv.view(-1)


def combine_advantages(seq_adv: torch.Tensor, signal: torch.Tensor, lam, mask: torch.Tensor) -> torch.Tensor:
    """A_t = A_seq + lambda * delta_t on active tokens; lam is a scalar or one value per sequence."""
    lam = torch.as_tensor(lam, dtype=signal.dtype, device=signal.device)
    if lam.dim() == 1:
        lam = lam[:, None]
    return (seq_adv[:, None].to(signal.dtype) + lam * signal.detach()) * mask


class EntropyGate:
    """The paper's gate (Eq. 7): a Schmitt trigger on the median teacher entropy H of each step.

    Steps 0..W-1 are pure GRPO (lambda 0) and record H; H_warm = their median. Then, with g = 1:
    close when H < down_ratio * H_warm, re-open when H >= reopen_ratio * H_warm; lambda = g * lambda_max.
    """

    def __init__(self, warmup_steps: int = 5, down_ratio: float = 0.93, lambda_max: float = 0.5,
                 reopen_ratio: float = 1.0):
        self.warmup_steps, self.down_ratio = warmup_steps, down_ratio
        self.lambda_max, self.reopen_ratio = lambda_max, reopen_ratio
        self.step, self.open, self.h_warm, self.warmup_values = 0, False, None, []

    def update(self, h: float) -> float:
        """Record this step's H and return this step's lambda."""
        step, self.step = self.step, self.step + 1
        if step < self.warmup_steps:
            self.warmup_values.append(float(h))
            if step == self.warmup_steps - 1:
                self.h_warm, self.open = statistics.median(self.warmup_values), True
            return 0.0
        if self.open and h < self.down_ratio * self.h_warm:
            self.open = False
        elif not self.open and h >= self.reopen_ratio * self.h_warm:
            self.open = True
        return self.lambda_max if self.open else 0.0

    def state_dict(self) -> dict:
        return {"step": self.step, "open": self.open, "h_warm": self.h_warm, "warmup_values": list(self.warmup_values)}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.open, self.h_warm = state["step"], state["open"], state["h_warm"]
        self.warmup_values = list(state["warmup_values"])


class ReleaseController:
    """The authors' released controller (`--preset release`), not the paper's gate.

    Gate on teacher perplexity PPL_i = exp(-mean_t log pi_T) of each sequence, decided from the
    previous step's average; continuous per-sequence lambda; u zeroed beyond 2 sigma_ref (the mean
    warm-up std of u), clamped, z-scored per sequence, clipped; long responses get no signal.
    """

    PPL_CAP, U_CLAMP, Z_CLIP = 3.0, 5.0, 5.0

    def __init__(self, warmup_steps: int = 5, down_ratio: float = 0.93, reopen_ratio: float = 1.07,
                 lambda_max: float = 0.5, max_response_tokens: int = 8192):
        self.warmup_steps, self.down_ratio, self.reopen_ratio = warmup_steps, down_ratio, reopen_ratio
        self.lambda_max, self.max_response_tokens = lambda_max, max_response_tokens
        self.step, self.open, self.prev_avg = 0, False, None
        self.warmup_ppl, self.warmup_u_std = [], []
        self.warm_median = self.tau = self.sigma_ref = None

    def sequence_lambdas(self, ppl: torch.Tensor) -> torch.Tensor:
        """lambda_i for this step, before its update; the gate follows the previous step's average."""
        if self.step < self.warmup_steps:
            return torch.zeros_like(ppl)
        if self.open and self.prev_avg < self.tau:
            self.open = False
        elif not self.open and self.prev_avg >= self.reopen_ratio * self.warm_median:
            self.open = True
        lam = (0.2 * torch.log(torch.clamp(ppl / self.tau, 0.5, 3.0))).clamp(0.0, self.lambda_max)
        return torch.where((ppl > self.PPL_CAP) | (not self.open), torch.zeros_like(lam), lam)

    def process(self, u: torch.Tensor, mask: torch.Tensor, method: str) -> torch.Tensor:
        """The release signal: outlier zeroing, clamp, phi, per-sequence z-score, clip, length mask."""
        keep = mask.bool()
        if self.sigma_ref is not None:
            keep &= u.abs() <= 2 * self.sigma_ref
        signal = token_signal(u.clamp(-self.U_CLAMP, self.U_CLAMP), method) * keep
        count = keep.sum(1, keepdim=True).clamp(min=1)
        mean = signal.sum(1, keepdim=True) / count
        std = (((signal - mean) ** 2) * keep).sum(1, keepdim=True).div(count).sqrt()
        z = ((signal - mean) / (std + 1e-6)).clamp(-self.Z_CLIP, self.Z_CLIP) * keep
        too_long = mask.sum(1, keepdim=True) > self.max_response_tokens
        return torch.where(too_long, torch.zeros_like(z), z)

    def end_step(self, avg_ppl: float, u_std: float) -> None:
        """Record the step's average PPL (sequences with PPL < 3) and the std of u."""
        if self.step < self.warmup_steps:
            self.warmup_ppl.append(avg_ppl)
            self.warmup_u_std.append(u_std)
            if self.step == self.warmup_steps - 1:
                self.warm_median = statistics.median(v for v in self.warmup_ppl if math.isfinite(v))
                self.tau = max(self.down_ratio * self.warm_median, 1.01)
                self.sigma_ref = statistics.fmean(self.warmup_u_std)
                self.open = True
        self.prev_avg = avg_ppl
        self.step += 1

    def state_dict(self) -> dict:
        return {k: v for k, v in vars(self).items()}

    def load_state_dict(self, state: dict) -> None:
        vars(self).update(state)


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
# Privileged context (paper App. C): a verified sibling solution + feedback on the own attempt
# =====================================================================================
# The texts (teacher_user_message, the feedback lines) live in prompts.py.
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


def teacher_prompt_ids(tokenizer, cfg: Config, prompt: str, solution: str | None, correct: bool) -> list[int]:
    from generation import chat_messages, chat_prompt_ids

    if solution is not None:
        solution = fit_token_budget(cut_after_last_boxed(solution), tokenizer, cfg.solution_max_tokens)
    messages = chat_messages(teacher_user_message(prompt, solution, answer_feedback(correct)), cfg.system_prompt)
    return chat_prompt_ids(tokenizer, messages, cfg.enable_thinking)


# =====================================================================================
# Plumbing: accelerator, model, logging
# =====================================================================================
def load_model_and_tokenizer(name_or_path: str, cfg: Config):
    from transformers import AutoTokenizer

    if name_or_path == "tiny":
        from models.build_tiny_model import ensure_tiny_model

        name_or_path = str(ensure_tiny_model())
    model = load_causal_lm(name_or_path, dtype=torch.float32)  # fp32 master weights; --bf16 casts in forward
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    install_scoring_head(model)
    if cfg.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return model, tokenizer


def plot_metrics(metrics_path: Path, png_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    if not rows:
        return
    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(3, 1, figsize=(7, 7), sharex=True)
    for ax, key in zip(axes, ("reward/mean", "gate/lambda", "teacher/entropy_median")):
        values = [r.get(key) if r.get(key) is not None else float("nan") for r in rows]
        ax.plot(steps, values, alpha=0.5 if key == "reward/mean" else 1.0)
        if key == "reward/mean":  # per-step reward is noisy (few prompts a step): show the trend too
            window = min(10, len(values))
            ax.plot(steps[window - 1:], [statistics.fmean(values[i - window + 1:i + 1]) for i in range(window - 1, len(values))],
                    label=f"mean of {window} steps")
            ax.legend(loc="lower right")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


# =====================================================================================
# The loop
# =====================================================================================
def main(cfg: Config) -> None:
    import yaml
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    from data.loading import default_instruction, load_math_dataset
    from generation import chat_messages, chat_prompt_ids, sample
    from verifiers.math import MathVerifier

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    accelerator = make_accelerator(cfg.output_dir, cfg.bf16, cfg.report_to)
    cfg.validate(accelerator.num_processes)
    if accelerator.device.type == "cpu":
        logger.info("%d torch threads per process", set_cpu_threads(accelerator, cfg.cpu_threads))
    rank, world = accelerator.process_index, accelerator.num_processes
    out = Path(cfg.output_dir)
    resume_from = latest_checkpoint(out) if cfg.resume else None
    if cfg.resume and resume_from is None:
        logger.warning("--resume: no complete checkpoint in %s, starting from scratch", out)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump({k: v for k, v in asdict(cfg).items() if k != "resume"}, sort_keys=False))
        logger.info("config:\n%s", yaml.safe_dump(asdict(cfg), sort_keys=False))
    set_seed(cfg.seed)

    # ---- data: every prompt rendered once; step k uses prompts [k*P, (k+1)*P) of a seeded order
    rows = load_math_dataset(cfg.dataset, cfg.dataset_split, skip_bad_rows=cfg.skip_bad_rows, seed=cfg.seed)
    instruction = default_instruction(cfg.dataset) if cfg.instruction is None else cfg.instruction
    model, tokenizer = load_model_and_tokenizer(model_dir(cfg.init_from, out / "init_model", accelerator) if cfg.init_from else cfg.model, cfg)
    prompts = [user_prompt(r["problem"], instruction) for r in rows]
    prompt_ids = [chat_prompt_ids(tokenizer, chat_messages(p, cfg.system_prompt), cfg.enable_thinking) for p in prompts]

    def prompt_order(epoch: int) -> list[int]:
        order = list(range(len(rows)))
        random.Random(cfg.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def step_prompts(step: int) -> list[int]:
        per_rank = cfg.prompts_per_step // world
        first = step * cfg.prompts_per_step + rank * per_rank
        return [prompt_order(i // len(rows))[i % len(rows)] for i in range(first, first + per_rank)]

    # ---- model, optimizer, controller, trackers
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                              num_training_steps=cfg.max_steps * cfg.ppo_epochs)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()  # from_pretrained leaves eval mode; layers are only recomputed (--gradient_checkpointing) in training mode
    chunk_rows = logit_chunk_rows(model.config.get_text_config(decoder=True).vocab_size, cfg.logit_chunk_mb)
    accelerator.register_for_checkpointing(scheduler)  # stepped by hand: accelerate would step it per process
    if cfg.preset == "paper":
        controller = EntropyGate(cfg.gate_warmup_steps, cfg.gate_down_ratio, cfg.lambda_max, cfg.gate_reopen_ratio)
    else:
        controller = ReleaseController(cfg.gate_warmup_steps, cfg.gate_down_ratio, cfg.gate_reopen_ratio,
                                       cfg.lambda_max, cfg.release_max_response_tokens)
    start_step = 0
    if resume_from is not None:
        accelerator.load_state(str(resume_from))
        state = json.loads((resume_from / "trainer_state.json").read_text())
        controller.load_state_dict(state["controller"])
        start_step = state["step"]
        logger.info("resumed from %s at step %d", resume_from, start_step)
    metrics_path = out / "metrics.jsonl"
    if accelerator.is_main_process and metrics_path.exists():  # drop steps past the checkpoint
        kept = [l for l in metrics_path.read_text().splitlines() if l.strip() and start_step and json.loads(l)["step"] <= start_step]
        metrics_path.write_text("".join(line + "\n" for line in kept))
    accelerator.init_trackers("antisd", config={k: v for k, v in asdict(cfg).items() if v is not None})
    verifier = MathVerifier(num_workers=cfg.verifier_workers, timeout_s=cfg.verifier_timeout_s)
    unwrapped = accelerator.unwrap_model(model)
    pad_id = tokenizer.pad_token_id
    device = accelerator.device
    clip_high = cfg.clip_eps if cfg.clip_eps_high is None else cfg.clip_eps_high
    uses_teacher = cfg.method != "grpo"
    gated = uses_teacher and (cfg.preset == "release" or cfg.gate == "entropy")
    def trainer_state(step: int) -> dict:
        return {"next_prompt": step * cfg.prompts_per_step, "controller": controller.state_dict()}

    bar = tqdm(range(start_step, cfg.max_steps), initial=start_step, total=cfg.max_steps,
               disable=not accelerator.is_main_process, desc="train")

    for step in bar:
        t_step = time.perf_counter()
        timings = {}
        # ---- rollout: G samples of each of this process's prompts, seeded by (seed, step, rank)
        t0 = time.perf_counter()
        batch_rows = step_prompts(step)
        torch.manual_seed(cfg.seed * 1_000_003 + step * 1009 + rank)
        with full_weights_for_generation(model):  # FSDP2: shards gathered once per step, freed before the update
            rollout = sample(unwrapped, tokenizer, [prompt_ids[i] for i in batch_rows for _ in range(cfg.group_size)],
                             max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                             batch_size=cfg.generation_batch_size, max_batch_tokens=cfg.generation_kv_tokens)
        timings["generate"] = time.perf_counter() - t0

        # ---- reward and GRPO advantages (groups never straddle processes)
        t0 = time.perf_counter()
        golds = [rows[i]["answer"] for i in batch_rows for _ in range(cfg.group_size)]
        rewards = verifier.score(rollout.texts, golds)
        truncated = torch.tensor(rollout.truncated, dtype=torch.bool)
        if cfg.truncated_completions == "wrong":
            rewards = [0.0 if t else r for r, t in zip(rewards, rollout.truncated)]
        reward_t = torch.tensor(rewards)
        seq_adv = grpo_advantages(reward_t, cfg.group_size).to(device)
        timings["reward"] = time.perf_counter() - t0

        # ---- privileged context and teacher scoring (no grad; same response ids appended)
        t0 = time.perf_counter()
        n_seq = len(rollout.completion_ids)
        teacher_logp, teacher_entropy = [None] * n_seq, []
        if uses_teacher:
            rng = random.Random(cfg.seed * 7919 + step * 104729 + rank)
            solutions = [rows[i]["solution"] if cfg.dataset_solution_fallback else None for i in batch_rows]
            shown = choose_shown_solutions(rewards, rollout.texts, cfg.group_size, solutions, rng)
            contexts = [(batch_rows[i // cfg.group_size], shown[i], rewards[i] > 0.5) for i in range(n_seq)]
            rendered = {c: teacher_prompt_ids(tokenizer, cfg, prompts[c[0]], c[1], c[2]) for c in set(contexts)}
            teacher_prompts = [rendered[c] for c in contexts]
            teacher_logp, teacher_entropy = teacher_scores(
                model, teacher_prompts, rollout.completion_ids, pad_id, device, cfg.score_batch_size, chunk_rows,
                agree_calls=lambda n: int(accelerator.gather(torch.tensor([n], device=device)).max()))
        timings["teacher"] = time.perf_counter() - t0

        # ---- gate: lambda for this step (the step's median teacher entropy decides it)
        all_entropy = gather_floats(accelerator, torch.cat(teacher_entropy) if teacher_entropy else torch.zeros(0))
        entropy_median = all_entropy.median().item() if all_entropy.numel() else None
        seq_ppl = torch.tensor([math.exp(-(tl.sum() / max(len(c), 1)).item()) if tl is not None else float("nan")
                                for tl, c in zip(teacher_logp, rollout.completion_ids)])
        if not uses_teacher:
            seq_lambda = torch.zeros(n_seq)
        elif cfg.preset == "paper":
            lam = controller.update(entropy_median) if cfg.gate == "entropy" else cfg.lambda_max
            seq_lambda = torch.full((n_seq,), lam)
        else:
            seq_lambda = controller.sequence_lambdas(seq_ppl)

        # ---- update: PPO-clip with A_t = A_seq + lambda * delta_t, token-mean over the whole batch
        t0 = time.perf_counter()
        trained = (~truncated) if cfg.truncated_completions == "mask" else torch.ones(n_seq, dtype=torch.bool)
        resp_lens = torch.tensor([len(c) for c in rollout.completion_ids], dtype=torch.float)
        total_tokens = accelerator.reduce((resp_lens * trained).sum().to(device), "sum").clamp(min=1)
        total_seqs = accelerator.reduce(trained.sum().float().to(device), "sum").clamp(min=1)
        micro_batches = length_sorted_batches([len(p) + len(c) for p, c in zip(rollout.prompt_ids, rollout.completion_ids)],
                                              cfg.micro_batch_size)  # token-mean weights make grouping irrelevant
        old_logp, u_values, stats = {}, [], {"loss": 0.0, "clipped": 0.0, "bonus": 0.0, "penalty": 0.0}
        grad_norm, skipped = None, False
        for epoch in range(cfg.ppo_epochs):
            for k, idx in enumerate(micro_batches):
                ids, attn, targets, pos, mask = pack_sequences([rollout.prompt_ids[i] for i in idx],
                                                               [rollout.completion_ids[i] for i in idx], pad_id, device)
                sync = k == len(micro_batches) - 1
                with nullcontext() if sync else accelerator.no_sync(model):
                    logp, _ = token_logprobs(model, ids, attn, targets, pos, mask, chunk_rows)
                    if epoch == 0:  # parameters have not moved yet: this pass is the behaviour policy
                        old_logp[k] = logp.detach()
                    signal = torch.zeros_like(logp)
                    if uses_teacher:
                        t_logp = torch.nn.utils.rnn.pad_sequence([teacher_logp[i] for i in idx], batch_first=True)
                        u = (t_logp - old_logp[k]) * mask
                        signal = controller.process(u, mask, cfg.method) if cfg.preset == "release" else token_signal(u, cfg.method) * mask
                        if epoch == 0:
                            u_values.append(u[mask.bool()])
                            weighted = (seq_lambda[idx] * trained[idx]).to(device)[:, None] * signal  # masked rows carry no loss
                            stats["bonus"] += weighted.clamp(min=0).sum().item()
                            stats["penalty"] += weighted.clamp(max=0).sum().item()
                    adv = combine_advantages(seq_adv[idx], signal, seq_lambda[idx].to(device), mask)
                    weights = loss_weights(mask * trained[idx].to(device)[:, None], cfg.loss_aggregation,
                                           total_tokens, total_seqs) * world  # DDP/FSDP average gradients over processes
                    loss, clipped = ppo_clip_loss(logp, old_logp[k], adv, weights, cfg.clip_eps, clip_high)
                    accelerator.backward(loss)
                stats["loss"] += loss.item() / world
                stats["clipped"] += clipped.item()
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            if not torch.isfinite(grad_norm):
                logger.warning("step %d: non-finite gradient norm (%s), update skipped", step, grad_norm.item())
                optimizer.zero_grad(set_to_none=True)
                skipped = True
                break
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        timings["update"] = time.perf_counter() - t0

        # ---- controller bookkeeping (release preset learns its references from warm-up steps)
        u_all = gather_floats(accelerator, torch.cat(u_values) if u_values else torch.zeros(0))
        if cfg.preset == "release" and uses_teacher:
            finite = seq_ppl[torch.isfinite(seq_ppl) & (seq_ppl < ReleaseController.PPL_CAP)]
            ppl_sum = accelerator.reduce(torch.tensor([finite.sum().item(), float(finite.numel())], device=device), "sum")
            controller.end_step((ppl_sum[0] / ppl_sum[1].clamp(min=1)).item(), u_all.std().item() if u_all.numel() > 1 else 0.0)

        # ---- log
        step_s = time.perf_counter() - t_step
        all_rewards = gather_floats(accelerator, reward_t)
        all_lens = gather_floats(accelerator, resp_lens)
        all_trunc = gather_floats(accelerator, truncated.float())
        all_lambda = gather_floats(accelerator, seq_lambda)
        group_std = gather_floats(accelerator, reward_t.view(-1, cfg.group_size).std(dim=1))
        sums = accelerator.reduce(torch.tensor([stats["clipped"], stats["bonus"], stats["penalty"], stats["loss"]], device=device), "sum")
        metrics = {
            "step": step + 1,
            "reward/mean": all_rewards.mean().item(),
            "reward/std": all_rewards.std().item(),
            "reward/zero_std_groups": (group_std < 1e-8).float().mean().item(),
            "gate/open": bool(controller.open) if gated else None,
            "gate/lambda": all_lambda.mean().item(),
            "teacher/entropy_median": entropy_median,
            "u/mean": u_all.mean().item() if u_all.numel() else None,
            "u/frac_negative": (u_all < 0).float().mean().item() if u_all.numel() else None,
            "signal/bonus_mass": sums[1].item() / total_tokens.item(),
            "signal/penalty_mass": sums[2].item() / total_tokens.item(),
            "loss": sums[3].item() / cfg.ppo_epochs,
            "grad_norm": grad_norm.item() if grad_norm is not None else None,
            "clip_fraction": sums[0].item() / total_tokens.item() / cfg.ppo_epochs,
            "update_skipped": skipped,
            "length/mean": all_lens.mean().item(),
            "length/max": all_lens.max().item(),
            "length/truncated_frac": all_trunc.mean().item(),
            "lr": scheduler.get_last_lr()[0],
            **{f"time/{k}_s": v for k, v in timings.items()},
            "time/step_s": step_s,
            "tokens_per_s": all_lens.sum().item() / step_s,
            "memory/peak_gib": peak_memory_gib(device),
        }
        if accelerator.is_main_process:
            with metrics_path.open("a") as f:
                f.write(json.dumps(metrics) + "\n")
            bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}", lam=f"{metrics['gate/lambda']:.2f}", s=f"{step_s:.1f}")
            if metrics["length/truncated_frac"] >= 0.5:  # a drifting policy can end here, with little or no gradient left
                logger.warning("step %d: %.0f%% of completions hit --max_new_tokens %d (--truncated_completions %s)",
                               step + 1, 100 * metrics["length/truncated_frac"], cfg.max_new_tokens, cfg.truncated_completions)
        accelerator.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step + 1)

        # ---- checkpoint
        if cfg.save_steps and (step + 1) % cfg.save_steps == 0 and step + 1 < cfg.max_steps:
            save_checkpoint(accelerator, model, tokenizer, cfg.output_dir, step + 1, trainer_state(step + 1), cfg.save_total_limit)

    save_checkpoint(accelerator, model, tokenizer, cfg.output_dir, cfg.max_steps, trainer_state(cfg.max_steps), cfg.save_total_limit)
    save_final_model(accelerator, model, tokenizer, cfg.output_dir, torch.bfloat16 if cfg.bf16 else torch.float32)
    if accelerator.is_main_process:
        plot_metrics(metrics_path, out / "metrics.png")
        logger.info("done: model in %s, metrics in %s", out, metrics_path)
    verifier.close()
    accelerator.end_training()


if __name__ == "__main__":
    main(parse_config())
