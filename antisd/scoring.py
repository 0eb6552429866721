"""Sampled-token scoring: log pi(y_t) and the full-vocabulary entropy, never a [batch, length, vocab] tensor.

- `ScoringHead` replaces the model's LM head (same weights) and, while `sampled_tokens` is set, projects
  only the hidden states that predict response tokens onto the vocabulary, a memory-bounded chunk
  at a time (`logit_chunk_rows`), returning fp32 (log-prob, entropy) pairs; with grad each chunk is
  checkpointed so its logits are rebuilt in backward instead of stored. It runs inside the model's
  own forward, so DDP/FSDP hooks see an ordinary forward.
- Every score is of the distribution sampled from, `log_softmax(logits / temperature)` (as TRL and verl
  score): the PPO ratio, u and the teacher's entropy and PPL refer to what the rollouts drew from.
- `token_logprobs`: the student's (and any single-context) scores of packed prompt+response rows;
  `eval_mode_logprobs` the same without dropout and grad, for models whose training passes are noisy
  (`has_dropout`: LoRA dropout, attention dropout).
- `teacher_scores`: each distinct teacher prompt is read once and its KV cache continued by every
  response shown it (full-attention models); others are scored whole.
- `SharedPromptScores`: the same for the student in the update, gradient included: each distinct
  prompt read once per step for its group (one process, full attention; `shares_prompts`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from accelerate.utils import extract_model_from_parallel
from torch.utils.checkpoint import checkpoint
from transformers import DynamicCache

from antisd.generation import pad_batch


def length_sorted_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices in batches of similar total length, so padding to the longest row wastes little."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]


def pack_sequences(prompts: list[list[int]], responses: list[list[int]], pad_id: int, device):
    """Right-padded prompt+response rows, and where each response token sits."""
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    width, max_resp = max(lengths), max(len(r) for r in responses)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    targets = torch.full((len(prompts), max_resp), pad_id, dtype=torch.long)
    response_mask = torch.zeros((len(prompts), max_resp))
    positions = torch.zeros((len(prompts), max_resp), dtype=torch.long)  # hidden state predicting target
    for row, (p, r) in enumerate(zip(prompts, responses)):
        input_ids[row, : len(p) + len(r)] = torch.tensor(p + r)
        attention_mask[row, : len(p) + len(r)] = 1
        targets[row, : len(r)] = torch.tensor(r)
        response_mask[row, : len(r)] = 1
        positions[row, : len(r)] = torch.arange(len(p) - 1, len(p) + len(r) - 1)
    to = lambda t: t.to(device)  # noqa: E731
    return to(input_ids), to(attention_mask), to(targets), to(positions), to(response_mask)


class ScoringHead(torch.nn.Linear):
    """The model's LM head, which can also score just the sampled tokens, chunk by chunk.

    While `sampled_tokens` is set (by `token_logprobs`), its forward takes the final hidden states [B, L, H], keeps the rows
    that predict response tokens, projects them onto the vocabulary `chunk_rows` at a time and
    returns [N, 2] = (log pi(target), entropy) instead of [B, L, vocab] logits. It runs inside the
    model's own forward, so DDP/FSDP hooks see an ordinary forward; with grad enabled each chunk
    is checkpointed, so its logits are rebuilt in backward instead of stored. Generation never
    sets it and gets plain logits.
    """

    sampled_tokens: dict | None = None  # which hidden states to score against which targets, and how

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.sampled_tokens is None:
            return super().forward(hidden)
        req = self.sampled_tokens
        rows = hidden[req["batch_index"], req["positions"]]
        out = []
        for start in range(0, len(rows), req["chunk_rows"]):
            h, t = rows[start:start + req["chunk_rows"]], req["targets"][start:start + req["chunk_rows"]]
            if torch.is_grad_enabled():  # the student: log-probs only, logits rebuilt in backward
                out.append(torch.stack([checkpoint(self._chunk_logprobs, h, t, req["temperature"], use_reentrant=False),
                                        torch.zeros(len(h), device=h.device)], dim=-1))
                continue
            logits = self._logits(h, req["temperature"])
            log_z = torch.logsumexp(logits, dim=-1)
            logp = logits.gather(1, t[:, None])[:, 0] - log_z
            entropy = torch.zeros_like(logp)
            if req["with_entropy"]:  # in place: at most two [rows, vocab] fp32 tensors alive
                log_softmax = logits.sub_(log_z[:, None])
                entropy = -log_softmax.exp().mul_(log_softmax).sum(-1)
            out.append(torch.stack([logp, entropy], dim=-1))
        return torch.cat(out) if out else rows.new_zeros((0, 2), dtype=torch.float32)

    def _chunk_logprobs(self, hidden: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
        logits = self._logits(hidden, temperature)
        return logits.gather(1, targets[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)

    def _logits(self, hidden: torch.Tensor, temperature: float) -> torch.Tensor:
        """fp32 logits / temperature (bf16 weights give bf16 logits: fp32 from here on); T = 1 skips the division."""
        logits = super().forward(hidden).float()
        return logits if temperature == 1.0 else logits.div_(temperature)


# Config fields of models that transform the LM head's output (Gemma-2/3 soft-capping, Cohere and
# Granite scaling): the chunked scores read the head's raw output, so they would be silently wrong.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")
LOGIT_BYTES = 3 * 4  # fp32 logits and up to two fp32 temporaries of their shape alive at once


def logit_chunk_rows(vocab_size: int, budget_mb: int) -> int:
    """Token rows per chunk of the vocabulary projection that fit `budget_mb`."""
    return max(1, budget_mb * 2**20 // (vocab_size * LOGIT_BYTES))


def install_scoring_head(model) -> None:
    """Turn the model's nn.Linear LM head into a ScoringHead (same weights, tying kept); before prepare()."""
    config = model.config.get_text_config(decoder=True)
    transforms = {name: getattr(config, name) for name in LOGIT_TRANSFORMS if getattr(config, name, None) not in (None, 1, 1.0)}
    if transforms:
        raise ValueError(f"{type(model).__name__} transforms its logits after the LM head ({transforms}); the chunked "
                         "sampled-token scoring reads the raw head output and would give wrong log-probs and entropies. "
                         "Models with logit soft-capping or scaling are not supported.")
    head = model.get_output_embeddings()
    if type(head) is not torch.nn.Linear and not isinstance(head, ScoringHead):
        raise TypeError(f"chunked scoring needs an nn.Linear LM head, got {type(head).__name__}")
    head.__class__ = ScoringHead


def token_logprobs(model, input_ids, attention_mask, targets, positions, response_mask,
                   chunk_rows: int, with_entropy: bool = False, cache=None, position_ids=None, temperature: float = 1.0):
    """log pi(target) at each response position ([B, T], 0 off-mask), and the entropy if asked, of
    softmax(logits / temperature): the sampling temperature.

    With a KV `cache` of a prefix, `input_ids` continue it: `attention_mask` then covers prefix +
    input and `position_ids` give the input's positions after the prefix's own tokens.
    """
    head = extract_model_from_parallel(model).get_output_embeddings()
    if not isinstance(head, ScoringHead):
        raise TypeError("call install_scoring_head(model) before accelerator.prepare(model)")
    active = response_mask.bool()
    batch_index = torch.arange(len(input_ids), device=input_ids.device)[:, None].expand_as(positions)
    head.sampled_tokens = {"batch_index": batch_index[active], "positions": positions[active], "targets": targets[active],
                    "chunk_rows": chunk_rows, "with_entropy": with_entropy, "temperature": temperature}
    try:
        scored = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       cache=cache, use_cache=cache is not None).logits
    finally:
        head.sampled_tokens = None
    logp = torch.zeros(response_mask.shape, device=scored.device, dtype=torch.float32).masked_scatter(active, scored[:, 0])
    entropy = torch.zeros_like(logp).masked_scatter(active, scored[:, 1]) if with_entropy else None
    return logp, entropy


def has_dropout(model) -> bool:
    """Whether a training-mode forward is noisy: a dropout module with p > 0 or attention dropout."""
    config = extract_model_from_parallel(model).config.get_text_config(decoder=True)
    return (getattr(config, "attention_dropout", 0.0) or 0.0) > 0 or any(
        isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules())


@torch.no_grad()
def eval_mode_logprobs(model, input_ids, attention_mask, targets, positions, response_mask, chunk_rows: int,
                       temperature: float = 1.0):
    """token_logprobs in eval mode (no dropout) and without grad; the model's mode is restored."""
    was_training = model.training
    model.eval()
    try:
        return token_logprobs(model, input_ids, attention_mask, targets, positions, response_mask, chunk_rows,
                              temperature=temperature)[0]
    finally:
        model.train(was_training)


def caches_prefixes(model) -> bool:
    """Prefix KV caches can be reused by any continuation when every layer is full attention."""
    config = model.config.get_text_config(decoder=True)
    sliding = getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True)
    return not sliding and set(getattr(config, "layer_types", None) or ["full_attention"]) == {"full_attention"}


@torch.no_grad()
def teacher_scores(model, prefixes: list[list[int]], responses: list[list[int]], pad_id: int, device,
                   batch_size: int, chunk_rows: int, agree_calls=None, temperature: float = 1.0) -> tuple[list, list]:
    """The teacher's log pi(y_t) and full-vocabulary entropy for each response after its prefix, at
    the sampling `temperature`.

    Rollouts shown the same solution with the same feedback have the same prefix: it is run once
    (all but its last token) and each of those responses continues its KV cache as
    [last prefix token] + response, so prefix tokens are not re-read per rollout. Models with
    sliding-window or linear-attention layers score prefix + response whole instead.
    `agree_calls(n) -> N >= n` agrees on a forward count across processes: a sharded (FSDP)
    model gathers its weights in every forward, so processes with fewer pad with dummy ones.
    """
    logp, entropy = [None] * len(responses), [None] * len(responses)
    was_training = model.training
    model.eval()  # a checkpointing model in training mode would refuse the prefix KV cache
    if caches_prefixes(extract_model_from_parallel(model)):
        index: dict[tuple, int] = {}
        owner = [index.setdefault(tuple(p), len(index)) for p in prefixes]
        distinct = [list(p) for p in index]
        plan = []  # (distinct prefixes read together, the batches of responses that continue them)
        for batch in length_sorted_batches([len(p) for p in distinct], batch_size):
            members = [i for i, d in enumerate(owner) if d in batch]
            plan.append((batch, [[members[k] for k in sub]
                                 for sub in length_sorted_batches([len(responses[i]) for i in members], batch_size)]))
    else:
        plan = [(None, length_sorted_batches([len(p) + len(r) for p, r in zip(prefixes, responses)], batch_size))]
    forwards = sum(len(subs) + (batch is not None) for batch, subs in plan)
    for _ in range((agree_calls(forwards) if agree_calls else forwards) - forwards):  # agreed before any real forward
        model(input_ids=torch.full((1, 1), pad_id, device=device), use_cache=False, logits_to_keep=1)

    for batch, subs in plan:
        if batch is None:
            scored = [(rows, token_logprobs(model, *pack_sequences([prefixes[i] for i in rows], [responses[i] for i in rows],
                                                                   pad_id, device), chunk_rows, with_entropy=True,
                                                    temperature=temperature))
                      for rows in subs]
        else:
            prefix = read_prefixes(model, [distinct[d] for d in batch], pad_id, device)
            cache_row = {d: r for r, d in enumerate(batch)}
            scored = [(rows, prefix.continue_with([cache_row[owner[i]] for i in rows], [responses[i] for i in rows], pad_id,
                                                  chunk_rows, with_entropy=True, temperature=temperature))
                      for rows in subs]
        for rows, (lp, ent) in scored:
            for j, i in enumerate(rows):
                logp[i], entropy[i] = lp[j, : len(responses[i])], ent[j, : len(responses[i])]
    model.train(was_training)
    return logp, entropy


@dataclass
class PrefixCache:
    """The KV cache of prompts read once (all but their last token, right-padded), which responses continue."""
    model: torch.nn.Module
    prompts: list[list[int]]
    layers: list  # (keys, values) per layer, [prompts, kv heads, longest prefix, head dim]
    mask: torch.Tensor  # [prompts, longest prefix]

    def continue_with(self, rows: list[int], responses: list[list[int]], pad_id: int, chunk_rows: int,
                      with_entropy: bool = False, layers: list | None = None, temperature: float = 1.0):
        """token_logprobs of each response after prompt `rows[j]`, read as [last prompt token] + response
        on a copy of that prompt's cache (of `layers` instead, if given: the same cache as other tensors)."""
        device = self.mask.device
        select = torch.tensor(rows, device=device)
        cache = DynamicCache([(keys[select], values[select]) for keys, values in (layers or self.layers)])
        ids, mask, targets, positions, response_mask = pack_sequences([self.prompts[r][-1:] for r in rows], responses,
                                                                      pad_id, device)
        starts = torch.tensor([len(self.prompts[r]) - 1 for r in rows], device=device)
        return token_logprobs(self.model, ids, torch.cat([self.mask[select], mask], 1), targets, positions, response_mask,
                              chunk_rows, with_entropy=with_entropy, cache=cache,
                              position_ids=starts[:, None] + torch.arange(ids.shape[1], device=device), temperature=temperature)


def read_prefixes(model, prompts: list[list[int]], pad_id: int, device) -> PrefixCache:
    """One forward over `prompts` (each at least 2 tokens) but their last tokens; with grad if enabled."""
    ids, mask = (t.to(device) for t in pad_batch([p[:-1] for p in prompts], pad_id, side="right"))
    cache = model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1).cache
    return PrefixCache(model, [list(p) for p in prompts], [(keys, values) for keys, values, *_ in cache], mask)


def shares_prompts(model, num_processes: int) -> bool:
    """Whether the update can read each distinct prompt once (`SharedPromptScores`): full attention, one
    process (under DDP/FSDP the prompt forward's gradient would arrive outside the wrapper's hooks), no
    gradient checkpointing (it refuses a KV cache) and no dropout (the rows of a group would share one mask)."""
    unwrapped = extract_model_from_parallel(model)
    return (num_processes == 1 and caches_prefixes(unwrapped) and not has_dropout(model)
            and not getattr(unwrapped, "is_gradient_checkpointing", False))


class SharedPromptScores:
    """The student's log-probs of a whole batch with each distinct prompt read once, gradient included.

    The G rollouts of a group share their prompt: it is run once (with grad), and each micro-batch
    continues a detached copy of its KV cache, leaf tensors that collect the micro-batch's gradient
    with respect to the prompt's keys and values; `backward()` after the last micro-batch sends what
    they collected through the prompt forward, once. The gradient is the same as with every row read
    whole; the prompt tokens are computed once instead of G times (the update phase is 1.7x faster on
    the embedded default: README, "Rollout backends").
    """

    def __init__(self, model, prompts: list[list[int]], pad_id: int, device):
        index: dict[tuple, int] = {}
        self.owner = [index.setdefault(tuple(p), len(index)) for p in prompts]
        self.prefix = read_prefixes(model, [list(p) for p in index], pad_id, device)
        self.leaves = [(keys.detach().requires_grad_(), values.detach().requires_grad_()) for keys, values in self.prefix.layers]

    def logprobs(self, rows: list[int], responses: list[list[int]], pad_id: int, chunk_rows: int,
                 temperature: float = 1.0) -> torch.Tensor:
        """log pi(y_t) of rollouts `rows` (their `responses`), [len(rows), longest response]."""
        return self.prefix.continue_with([self.owner[i] for i in rows], responses, pad_id, chunk_rows, layers=self.leaves,
                                         temperature=temperature)[0]

    def backward(self) -> None:
        """The prompts' share of the gradient, after every micro-batch's own backward."""
        pairs = [(t, leaf.grad) for kv, leaf_kv in zip(self.prefix.layers, self.leaves) for t, leaf in zip(kv, leaf_kv)
                 if leaf.grad is not None]
        if pairs:
            torch.autograd.backward(*zip(*pairs))
