"""How the update reads the policy on a step's rollouts, beside scoring.py; train_antisd.update_policy
asks for each read by name and keeps only the math.

- micro-batches sorted by length; where the model allows (`scoring.shares_prompts`: one process, full
  attention, no gradient checkpointing, no dropout) the G rollouts of a prompt share one read of it per
  epoch (`scoring.SharedPromptScores`) and only response lengths pad a micro-batch;
- `eval_mode_logprobs`: a model with dropout (LoRA dropout) takes the behaviour log-probs (the student's
  log pi_S for u, PPO's old log-probs) from a no-grad eval-mode pass, so u carries no dropout noise;
- `sampler_weights`: a sampler with its own kernels and precision (vLLM) samples from a slightly different
  distribution than the trainer scores; each token's term is weighted by min(pi_trainer / pi_sampler, cap),
  TRL's token-level truncated importance sampling.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from antisd.generation import Samples
from antisd.scoring import (SharedPromptScores, eval_mode_logprobs, has_dropout, length_sorted_batches, pack_sequences,
                            shares_prompts, token_logprobs)


def truncated_is_weights(trainer_logp: torch.Tensor, sampler_logp: torch.Tensor, mask: torch.Tensor, cap: float):
    """(weights, ratios): ratio = pi_trainer / pi_sampler of each sampled token (1 off the mask) and
    the weight min(ratio, cap) that multiplies its policy-gradient term; cap 0 leaves the weights at 1."""
    ratio = torch.exp((trainer_logp.detach() - sampler_logp) * mask)
    return (ratio.clamp(max=cap) if cap else torch.ones_like(ratio)), ratio


class PolicyReads:
    """The policy's log-probs of one step's rollouts, micro-batch by micro-batch, at the sampling temperature."""

    def __init__(self, accelerator, model, rollout: Samples, pad_id: int, micro_batch_size: int, chunk_rows: int,
                 temperature: float, importance_sampling_cap: float):
        self.accelerator, self.model, self.rollout, self.pad_id = accelerator, model, rollout, pad_id
        self.chunk_rows, self.temperature, self.cap = chunk_rows, temperature, importance_sampling_cap
        self.noisy = has_dropout(model)
        self.shared = shares_prompts(model, accelerator.num_processes) and min(map(len, rollout.prompt_ids)) > 1
        self.micro_batches = length_sorted_batches([len(c) + (0 if self.shared else len(p)) for p, c in
                                                    zip(rollout.prompt_ids, rollout.completion_ids)], micro_batch_size)
        self.shared_prompts, self.is_values = None, []  # (ratio, weight) of each trained token, per micro-batch

    def start_epoch(self) -> None:
        """The shared prompts are read with this epoch's weights."""
        if self.shared:
            self.shared_prompts = SharedPromptScores(self.model, self.rollout.prompt_ids, self.pad_id, self.accelerator.device)

    def pack(self, idx: list[int]):
        """Rows `idx` as scoring.pack_sequences tensors (the response mask last)."""
        return pack_sequences([self.rollout.prompt_ids[i] for i in idx], [self.rollout.completion_ids[i] for i in idx],
                              self.pad_id, self.accelerator.device)

    def eval_mode_logprobs(self, packed) -> torch.Tensor | None:
        """The behaviour log-probs of a model with dropout (no grad, eval mode); None without dropout, where
        the first training pass (parameters not yet moved) is the behaviour policy."""
        return eval_mode_logprobs(self.model, *packed, self.chunk_rows, self.temperature) if self.noisy else None

    def gradient_sync(self, k: int):
        """Processes synchronize gradients on the last micro-batch only."""
        return nullcontext() if k == len(self.micro_batches) - 1 else self.accelerator.no_sync(self.model)

    def logprobs(self, idx: list[int], packed) -> torch.Tensor:
        """log pi of rows `idx`, with grad."""
        if self.shared:
            return self.shared_prompts.logprobs(idx, [self.rollout.completion_ids[i] for i in idx], self.pad_id,
                                                self.chunk_rows, self.temperature)
        return token_logprobs(self.model, *packed, self.chunk_rows, temperature=self.temperature)[0]

    def finish_epoch(self) -> None:
        """The shared prompts' share of the gradient, after every micro-batch's own backward."""
        if self.shared:
            self.shared_prompts.backward()

    def sampler_weights(self, idx: list[int], old_logp: torch.Tensor, mask: torch.Tensor, trained: torch.Tensor):
        """Truncated importance weights of rows `idx` against the sampler's own log-probs (None when the
        trainer's model sampled); the (ratio, weight) of their trained tokens are kept for the logs."""
        if self.rollout.sampler_logprobs is None:
            return None
        sampler_logp = torch.nn.utils.rnn.pad_sequence([torch.tensor(self.rollout.sampler_logprobs[i]) for i in idx],
                                                       batch_first=True).to(self.accelerator.device)
        weights, ratio = truncated_is_weights(old_logp, sampler_logp, mask, self.cap)
        on = mask.bool() & trained
        self.is_values.append(torch.stack([ratio[on], weights[on]]))
        return weights

    def importance_values(self) -> torch.Tensor | None:
        """[2, tokens]: ratio and weight of every trained token (metrics: sampling/is_*), or None."""
        return torch.cat(self.is_values, dim=1) if self.is_values else None
