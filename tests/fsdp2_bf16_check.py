"""Run with 2 processes (torchrun, gloo, FSDP2 on CPU) under the GPU recipe's precision policy
(`--bf16 --gradient_checkpointing`): make_accelerator's FSDP2 policy is params bf16, reduction fp32,
outputs not cast; sampled-token log-probs and teacher entropies of the sharded bf16 model come back
in fp32, unrounded, within bf16 tolerance of the unsharded fp32 model; layers are recomputed in
backward; generation from the weights gathered once equals unsharded generation, while the two
processes generate different numbers of sequences and tokens (no collective per token); the weights
a vLLM engine is sent (`full_parameters`, one gathered at a time) are the unsharded model's, by name.
Prints BF16-CHECK OK on rank 0; exits non-zero on a mismatch. Used by tests/test_training.py."""

import copy
import sys

import torch
from transformers.models.qwen3.modeling_qwen3 import Qwen3MLP

from data.arith import generate_split
from antisd.distributed import full_parameters, full_weights_for_generation, make_accelerator
from antisd.generation import chat_messages, chat_prompt_ids, sample
from antisd.model_loading import load_policy
from antisd.scoring import pack_sequences, teacher_scores, token_logprobs

# bf16 weights and activations (~3 significant digits); measured here: max 0.03, mean 0.0015
LOGP_TOLERANCE, MEAN_TOLERANCE = 0.1, 0.01
# Counted in forward itself: module hooks do not fire when checkpointing recomputes a layer.
MLP_CALLS, mlp_forward = [], Qwen3MLP.forward
Qwen3MLP.forward = lambda self, x: (MLP_CALLS.append(1), mlp_forward(self, x))[1]


def main():
    problems = []

    def check(ok: bool, what: str):
        if not ok:
            problems.append(what)
            print(f"rank {accelerator.process_index}: {what}")

    accelerator = make_accelerator("/tmp/antisd-bf16-check", bf16=True, report_to="none")
    rank = accelerator.process_index
    policy = accelerator.state.fsdp_plugin.mixed_precision_policy
    check(accelerator.is_fsdp2 and (policy.param_dtype, policy.reduce_dtype, policy.output_dtype)
          == (torch.bfloat16, torch.float32, None), f"policy {policy}")
    model, tokenizer = load_policy("tiny", gradient_checkpointing=True)
    reference = copy.deepcopy(model)  # unsharded fp32
    bf16_reference = copy.deepcopy(model)  # unsharded, parameters rounded as FSDP2 gathers them
    for param in bf16_reference.parameters():
        param.data = param.data.to(torch.bfloat16)
    sharded, _ = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.0))
    sharded.train()
    pushed, want = dict(full_parameters(sharded)), dict(reference.named_parameters())
    check(pushed.keys() == want.keys() and all(torch.equal(pushed[n], want[n]) for n in want),
          f"full_parameters differ from the unsharded weights: {sorted(pushed.keys() ^ want.keys())[:4]}")

    # generation: rank 0 samples 2 sequences of up to 20 tokens, rank 1 3 of up to 28
    rows = generate_split("eval", 6)[3 * rank: 3 * rank + 2 + rank]
    prompts = [chat_prompt_ids(tokenizer, chat_messages(r["problem"])) for r in rows]
    torch.manual_seed(100 + rank)
    with full_weights_for_generation(sharded):
        got = sample(sharded, tokenizer, prompts, max_new_tokens=20 + 8 * rank, batch_size=2)
    torch.manual_seed(100 + rank)
    want = sample(bf16_reference, tokenizer, prompts, max_new_tokens=20 + 8 * rank, batch_size=2)
    check(got.completion_ids == want.completion_ids, f"gathered generation differs: {got.completion_ids} vs {want.completion_ids}")
    check(sharded.training, "sample() did not restore training mode")

    # student scoring with grad: fp32, unrounded, close to fp32; every layer recomputed in backward
    responses = [c if c else [tokenizer.eos_token_id] for c in got.completion_ids]
    packed = pack_sequences(prompts, responses, tokenizer.pad_token_id, accelerator.device)
    layers = sharded.config.num_hidden_layers
    MLP_CALLS.clear()
    logp, _ = token_logprobs(sharded, *packed, chunk_rows=7)
    forward_calls = len(MLP_CALLS)
    logp.sum().backward()
    check(forward_calls == layers and len(MLP_CALLS) == 2 * layers,
          f"layer MLPs ran {forward_calls} times forward and {len(MLP_CALLS)} in all, want {layers} and {2 * layers}")
    mask = packed[-1].bool()
    with torch.no_grad():
        want_logp, _ = token_logprobs(reference, *packed, chunk_rows=7)
    check(logp.dtype == torch.float32, f"student log-probs are {logp.dtype}")
    check(bool((logp[mask] != logp[mask].to(torch.bfloat16).float()).any()), "student log-probs were rounded to bf16")
    error = (logp.detach() - want_logp)[mask].abs()
    check(error.max() < LOGP_TOLERANCE and error.mean() < MEAN_TOLERANCE, f"student log-probs off by up to {error.max():.4f}")
    print(f"rank {rank}: student |logp - fp32| max {error.max():.4f} mean {error.mean():.4f}")

    # teacher scoring (no grad, shared prefix KV cache, entropy): the same, on the sharded model
    prefixes = [p + p[-3:] for p in prompts]
    agree = lambda n: int(accelerator.gather(torch.tensor([n])).max())  # noqa: E731
    t_logp, t_entropy = teacher_scores(sharded, prefixes, responses, tokenizer.pad_token_id, "cpu", 2, 7, agree_calls=agree)
    w_logp, w_entropy = teacher_scores(reference, prefixes, responses, tokenizer.pad_token_id, "cpu", 2, 7)
    got_all, want_all = torch.cat(t_logp + t_entropy), torch.cat(w_logp + w_entropy)
    check(got_all.dtype == torch.float32 and bool((got_all != got_all.to(torch.bfloat16).float()).any()),
          f"teacher scores are {got_all.dtype} or rounded to bf16")
    error = (got_all - want_all).abs()
    check(error.max() < LOGP_TOLERANCE and error.mean() < MEAN_TOLERANCE,
          f"teacher log-probs/entropies off by up to {error.max():.4f}")
    print(f"rank {rank}: teacher |score - fp32| max {error.max():.4f} mean {error.mean():.4f}")
    if accelerator.is_main_process and not problems:
        print("BF16-CHECK OK")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
