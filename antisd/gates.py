"""The gates: how much of the token signal each sequence gets, step by step (train_antisd.make_gate
picks one from the config; the signal itself, `token_signal`, is train_antisd's and passed in).

- `EntropyGate`: the paper's gate (Eq. 7), a Schmitt trigger on the teacher's median entropy; the default.
- `ReleaseController`: the authors' released controller (`--gate release`, the release preset): teacher
  perplexity, continuous per-sequence lambda, and its own processing of u and the signal.
- `ConstantLambda`: no gate (`--gate none`; 0 for grpo).
- Our guard `close_above` (`--gate_close_above`) closes either gate while its statistic is too high.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class TeacherStats:
    """What a gate reads each step, before the update."""
    entropy_median: float | None  # median teacher entropy over every generated token of the step, all processes
    seq_ppl: torch.Tensor  # teacher perplexity exp(-mean_t log pi_T) of each of this process's sequences


def schmitt_trigger(is_open: bool, closed_by: str | None, value: float, close_below: float, reopen_at: float,
                    close_above: float = math.inf) -> tuple[bool, str | None]:
    """(open, why closed) after reading `value`: an open gate closes below `close_below` (the paper) or
    above `close_above` (our guard, inf = off); a closed one re-opens once `reopen_at <= value <= close_above`."""
    if is_open:
        if value < close_below:
            return False, "below"
        return (False, "above") if value > close_above else (True, None)
    return (True, None) if reopen_at <= value <= close_above else (False, closed_by)


class Gate:
    """How much of the token signal each sequence gets. Each step the loop calls `lambdas` (before
    the update: one lambda per sequence), `signal` (inside the update: the per-token delta of u) and
    `end_step` (after it, with the step's average teacher PPL, None when no sequence counts, and the
    std of u over all processes). `open` is logged as gate/open (None: no gate), `closed_by` as
    gate/closed_by (warmup, below, above); the state dict goes into checkpoints."""

    open: bool | None = None
    closed_by: str | None = None

    def lambdas(self, stats: TeacherStats) -> torch.Tensor:
        raise NotImplementedError

    def signal(self, u: torch.Tensor, mask: torch.Tensor, token_signal: Callable) -> torch.Tensor:
        """The per-token signal delta of u: the method's `token_signal(u)` (train_antisd.token_signal) on active tokens."""
        return token_signal(u) * mask

    def end_step(self, avg_ppl: float | None, u_std: float) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class ConstantLambda(Gate):
    """No gate: the same lambda on every step (`--gate none`, and 0 for grpo)."""

    def __init__(self, value: float):
        self.value = value

    def lambdas(self, stats: TeacherStats) -> torch.Tensor:
        return torch.full(stats.seq_ppl.shape, self.value)


class EntropyGate(Gate):
    """The paper's gate (Eq. 7): a Schmitt trigger on the median teacher entropy H of each step.

    Steps 0..W-1 are pure GRPO (lambda 0) and record H; H_warm = their median. Then, with g = 1:
    close when H < down_ratio * H_warm, re-open when H >= reopen_ratio * H_warm; lambda = g * lambda_max.
    `close_above` R > 0 (our guard, not the paper's) also closes it while H > R * H_warm.
    """

    def __init__(self, warmup_steps: int = 5, down_ratio: float = 0.93, lambda_max: float = 0.5,
                 reopen_ratio: float = 1.0, close_above: float = 0.0):
        self.warmup_steps, self.down_ratio = warmup_steps, down_ratio
        self.lambda_max, self.reopen_ratio, self.close_above = lambda_max, reopen_ratio, close_above
        self.step, self.open, self.closed_by, self.h_warm, self.warmup_values = 0, False, "warmup", None, []

    def lambdas(self, stats: TeacherStats) -> torch.Tensor:
        return torch.full(stats.seq_ppl.shape, self.update(stats.entropy_median))

    def update(self, h: float) -> float:
        """Record this step's H and return this step's lambda."""
        step, self.step = self.step, self.step + 1
        if step < self.warmup_steps:
            self.warmup_values.append(float(h))
            if step == self.warmup_steps - 1:
                self.h_warm, self.open, self.closed_by = statistics.median(self.warmup_values), True, None
            return 0.0
        self.open, self.closed_by = schmitt_trigger(self.open, self.closed_by, h, self.down_ratio * self.h_warm,
                                                    self.reopen_ratio * self.h_warm,
                                                    self.close_above * self.h_warm if self.close_above else math.inf)
        return self.lambda_max if self.open else 0.0

    def state_dict(self) -> dict:
        return {"step": self.step, "open": self.open, "closed_by": self.closed_by, "h_warm": self.h_warm,
                "warmup_values": list(self.warmup_values)}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.open, self.h_warm = state["step"], state["open"], state["h_warm"]
        self.warmup_values = list(state["warmup_values"])
        # checkpoints from before the guard have no closed_by
        self.closed_by = state.get("closed_by", None if self.open else "warmup" if self.h_warm is None else "below")


class ReleaseController(Gate):
    """The authors' released controller (`--gate release`, the release preset), not the paper's gate.

    Gate on teacher perplexity PPL_i = exp(-mean_t log pi_T) of each sequence, decided from the
    previous step's average over sequences with PPL < 3 (a step without one has no average and leaves
    the gate as it is); continuous per-sequence lambda; u zeroed beyond 2 sigma_ref (the mean warm-up
    std of u), clamped, z-scored per sequence, clipped; responses at least `max_response_tokens` long
    get no signal. `close_above` R > 0 (our guard) also closes it while the average > R * warm_median.
    The warm-up lasts W steps, longer if none of them had an average.
    """

    PPL_CAP, U_CLAMP, Z_CLIP = 3.0, 5.0, 5.0

    def __init__(self, warmup_steps: int = 5, down_ratio: float = 0.93, reopen_ratio: float = 1.07,
                 lambda_max: float = 0.5, max_response_tokens: int = 12000, close_above: float = 0.0):
        self.warmup_steps, self.down_ratio, self.reopen_ratio = warmup_steps, down_ratio, reopen_ratio
        self.lambda_max, self.max_response_tokens, self.close_above = lambda_max, max_response_tokens, close_above
        self.step, self.open, self.closed_by, self.prev_avg = 0, False, "warmup", None
        self.warmup_ppl, self.warmup_u_std = [], []
        self.warm_median = self.tau = self.sigma_ref = None

    def lambdas(self, stats: TeacherStats) -> torch.Tensor:
        """lambda_i for this step, before its update; the gate follows the previous step's average."""
        ppl = stats.seq_ppl
        if self.warm_median is None:
            return torch.zeros_like(ppl)
        if self.prev_avg is not None:
            self.open, self.closed_by = schmitt_trigger(
                self.open, self.closed_by, self.prev_avg, self.tau, self.reopen_ratio * self.warm_median,
                self.close_above * self.warm_median if self.close_above else math.inf)
        lam = (0.2 * torch.log(torch.clamp(ppl / self.tau, 0.5, 3.0))).clamp(0.0, self.lambda_max)
        return torch.where((ppl > self.PPL_CAP) | (not self.open), torch.zeros_like(lam), lam)

    def signal(self, u: torch.Tensor, mask: torch.Tensor, token_signal: Callable) -> torch.Tensor:
        """The release signal: outlier zeroing, clamp, the method's signal, per-sequence z-score, clip, length mask.

        As the released `dp_actor.py` (FloyedShen/AntiSD, `grpo_ca` branch) does it: an outlier's u is set
        to 0 (so its signal is phi(0) = 0) and it stays in its sequence's mean and population std like
        any response token, so after the z-score it carries (0 - mean) / std, not 0; std is clamped at 1e-6.
        """
        if self.sigma_ref is not None:
            u = torch.where(u.abs() <= 2 * self.sigma_ref, u, torch.zeros_like(u))
        signal = token_signal(u.clamp(-self.U_CLAMP, self.U_CLAMP)) * mask
        count = mask.sum(1, keepdim=True).clamp(min=1)
        centered = (signal - signal.sum(1, keepdim=True) / count) * mask
        std = (centered ** 2).sum(1, keepdim=True).div(count).sqrt().clamp(min=1e-6)
        z = (centered / std).clamp(-self.Z_CLIP, self.Z_CLIP)
        too_long = mask.sum(1, keepdim=True) >= self.max_response_tokens
        return torch.where(too_long, torch.zeros_like(z), z)

    def end_step(self, avg_ppl: float | None, u_std: float) -> None:
        """Record the step's average PPL over its sequences with PPL < 3 (None: there were none) and the std of u."""
        if self.warm_median is None:
            if avg_ppl is not None:
                self.warmup_ppl.append(avg_ppl)
            self.warmup_u_std.append(u_std)
            if self.step >= self.warmup_steps - 1 and self.warmup_ppl:
                self.warm_median = statistics.median(self.warmup_ppl)
                self.tau = max(self.down_ratio * self.warm_median, 1.01)
                self.sigma_ref = statistics.fmean(self.warmup_u_std)
                self.open, self.closed_by = True, None
        self.prev_avg = avg_ppl
        self.step += 1

    def state_dict(self) -> dict:
        return dict(vars(self))

    def load_state_dict(self, state: dict) -> None:
        vars(self).update(state)
