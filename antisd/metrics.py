"""The training run's metrics: one metrics.jsonl row per step (`step_metrics`, what the update's token
signal was: `SignalLog`; where the row goes: `write_step`), the file as a picture (`plot_metrics`,
metrics.png beside it), and sampled rollouts (`log_completions`)."""

from __future__ import annotations

import json
import logging
import math
import statistics
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from antisd.distributed import gather_floats, peak_memory_gib

logger = logging.getLogger("antisd")


@contextmanager
def phase(timings: dict, name: str):
    """Seconds the block takes, as timings[name] (metrics: time/<name>_s)."""
    start = time.perf_counter()
    yield
    timings[name] = time.perf_counter() - start


def plot_metrics(metrics_path: Path, png_path: Path) -> None:
    """reward (with its 10-step mean), lambda and the teacher's median entropy over the steps."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
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


def step_metrics(accelerator, step: int, group_size: int, ppo_epochs: int, rewards: list[float],
                 reward_parts: dict[str, list[float]], truncated: list[bool],
                 entropy_median: float | None, seq_lambda: torch.Tensor, group_weight: torch.Tensor, gate, update: dict,
                 u_all: torch.Tensor, lr: float, timings: dict, step_s: float, verifier_timeouts: int | None) -> dict:
    """One metrics.jsonl row of the training loop, over all processes (`update` is what
    train_antisd.update_policy returns, `gate` its Gate; `verifier_timeouts` this process's checks of the
    step that ran past the verifier's CPU limit, None without the math verifier)."""
    reward_t = torch.tensor(rewards)
    grouped = reward_t.view(-1, group_size)
    zero_std = (grouped.amax(1) == grouped.amin(1)).repeat_interleave(group_size)
    bonus = accelerator.reduce(torch.stack([update["seq_bonus"][zero_std].sum(), update["seq_bonus"].sum()]).to(accelerator.device),
                               "sum")
    all_rewards, all_lens = gather_floats(accelerator, reward_t), gather_floats(accelerator, update["resp_lens"])
    group_std = gather_floats(accelerator, reward_t.view(-1, group_size).std(dim=1))
    sums = accelerator.reduce(torch.tensor([update["clipped"], update["bonus"], update["penalty"], update["loss"]],
                                           device=accelerator.device), "sum")
    total_tokens = update["total_tokens"]
    sampling = {}
    if update["is_values"] is not None:  # a sampler with its own log-probs (vLLM): importance ratios pi_trainer/pi_sampler
        ratio, weight = (gather_floats(accelerator, values) for values in update["is_values"])
        sampling = {"sampling/is_ratio_mean": ratio.mean().item(), "sampling/is_ratio_max": ratio.max().item(),
                    "sampling/is_capped_frac": (weight < ratio).float().mean().item()} if ratio.numel() else {}
    row = {
        "step": step + 1,
        "reward/mean": all_rewards.mean().item(),
        "reward/std": all_rewards.std().item(),
        "reward/zero_std_groups": (group_std < 1e-8).float().mean().item(),
        **{f"reward/{name}": gathered_nanmean(accelerator, values) for name, values in reward_parts.items()},
        "gate/open": None if gate.open is None else bool(gate.open),
        "gate/closed_by": None if gate.open is None or gate.open else gate.closed_by,
        "gate/lambda": gather_floats(accelerator, seq_lambda).mean().item(),
        "signal/group_weight_mean": gather_floats(accelerator, group_weight).mean().item(),
        "teacher/entropy_median": entropy_median,
        "u/mean": u_all.mean().item() if u_all.numel() else None,
        "u/frac_negative": (u_all < 0).float().mean().item() if u_all.numel() else None,
        "signal/bonus_mass": sums[1].item() / total_tokens,
        "signal/penalty_mass": sums[2].item() / total_tokens,
        # the collapse path: the bonus paid where every rollout scored the same and only the signal acts
        "signal/zero_std_bonus_share": bonus[0].item() / bonus[1].item() if bonus[1] > 0 else None,
        "loss": sums[3].item() / ppo_epochs,
        "grad_norm": update["grad_norm"].item() if update["grad_norm"] is not None else None,
        "clip_fraction": sums[0].item() / total_tokens / ppo_epochs,
        "update_skipped": update["skipped"],
        **sampling,
        "length/mean": all_lens.mean().item(),
        "length/max": all_lens.max().item(),
        "length/truncated_frac": gather_floats(accelerator, torch.tensor(truncated, dtype=torch.float)).mean().item(),
        "lr": lr,
        **{f"time/{k}_s": v for k, v in timings.items()},
        "time/step_s": step_s,
        "tokens_per_s": all_lens.sum().item() / step_s,
        "memory/peak_gib": peak_memory_gib(accelerator.device),
    }
    if verifier_timeouts is not None:  # checks over the verifier's CPU limit score 0: right answers may have been lost
        row["reward/verifier_timeouts"] = accelerator.reduce(torch.tensor(float(verifier_timeouts), device=accelerator.device),
                                                             "sum").item()
    return row


class SignalLog:
    """The token signal of one update as the logs show it (first epoch): u of every active token, each
    sequence's mean u and bonus, and the bonus and penalty mass of lambda x delta."""

    def __init__(self, num_sequences: int):
        self.u, self.bonus, self.penalty = [], 0.0, 0.0
        self.seq_u_mean, self.seq_bonus = torch.full((num_sequences,), math.nan), torch.zeros(num_sequences)

    def add(self, idx: list[int], u: torch.Tensor, mask: torch.Tensor, weighted: torch.Tensor) -> None:
        """Rows `idx`: their u and their signal times lambda (`weighted`, 0 on rows without loss)."""
        self.u.append(u[mask.bool()])
        self.seq_u_mean[idx] = (u.sum(1) / mask.sum(1).clamp(min=1)).cpu()
        self.seq_bonus[idx] = weighted.clamp(min=0).sum(1).cpu()
        self.bonus += weighted.clamp(min=0).sum().item()
        self.penalty += weighted.clamp(max=0).sum().item()

    def as_dict(self) -> dict:
        return {"bonus": self.bonus, "penalty": self.penalty, "u": torch.cat(self.u) if self.u else torch.zeros(0),
                "seq_u_mean": self.seq_u_mean, "seq_bonus": self.seq_bonus}


def write_step(accelerator, path: Path, metrics: dict, bar, max_new_tokens: int, truncated_completions: str) -> None:
    """The step's row to metrics.jsonl and the progress bar (main process) and to the trackers; a warning
    when half the completions hit the budget, where a drifting policy can end with little gradient left."""
    if accelerator.is_main_process:
        with path.open("a") as f:
            f.write(json.dumps(metrics) + "\n")
        bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}", lam=f"{metrics['gate/lambda']:.2f}",
                        s=f"{metrics['time/step_s']:.1f}")
        if metrics["length/truncated_frac"] >= 0.5:
            logger.warning("step %d: %.0f%% of completions hit --max_new_tokens %d (--truncated_completions %s)",
                           metrics["step"], 100 * metrics["length/truncated_frac"], max_new_tokens, truncated_completions)
    accelerator.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=metrics["step"])


def gathered_nanmean(accelerator, values: list[float]) -> float | None:
    """Mean over all processes of the values that are not NaN (a reward function's None), or None."""
    everything = gather_floats(accelerator, torch.tensor(values))  # drops NaN
    return everything.mean().item() if everything.numel() else None


def log_completions(accelerator, path: Path, step: int, count: int, columns: dict[str, list | torch.Tensor]) -> None:
    """Append the main process's first `count` rollouts (one value each in every column) to
    completions.jsonl and log them as a table to the trackers that take tables (wandb)."""
    if not accelerator.is_main_process:
        return
    rows = []
    for i in range(min(count, len(columns["completion"]))):
        values = {k: v[i].item() if isinstance(v, torch.Tensor) else v[i] for k, v in columns.items()}
        rows.append({"step": step + 1, **{k: None if isinstance(v, float) and v != v else v for k, v in values.items()}})
    with path.open("a") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    names = list(rows[0]) if rows else []
    for tracker in accelerator.trackers:
        if rows and hasattr(tracker, "log_table"):
            tracker.log_table("completions", columns=names, data=[[r[c] for c in names] for r in rows], step=step + 1)


def drop_steps_after(step: int, *paths: Path) -> None:
    """Keep only the rows of these jsonl files up to `step` (a resumed run rewrites what follows; a fresh run, all)."""
    for path in paths:
        if path.exists():
            kept = [line for line in path.read_text().splitlines() if line.strip() and step and json.loads(line)["step"] <= step]
            path.write_text("".join(line + "\n" for line in kept))
