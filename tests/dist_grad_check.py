"""Run with 2 processes (torchrun, gloo, FSDP2 on CPU): the gradient of the token-mean loss
split over processes and micro-steps equals the one-process gradient of the whole batch, and
teacher scoring with shared prefixes on the sharded model equals the one-process scores while
the processes need different numbers of forwards.
Prints GRAD-CHECK OK and TEACHER-CHECK OK on rank 0; exits non-zero on a mismatch. Used by
tests/test_training.py."""

import copy
import sys

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from antisd.distributed import make_accelerator
from antisd.scoring import install_scoring_head, pack_sequences, teacher_scores, token_logprobs
from train_antisd import combine_advantages, loss_weights, ppo_clip_loss, token_signal

PROMPTS = [[1, 2], [3, 4, 5], [6], [7, 8], [9, 1, 2], [3]]
RESPONSES = [[9, 10, 11], [12], [13, 14, 15, 16, 17], [18, 19], [20, 21, 22, 23], [24, 25]]
AGGREGATIONS = sys.argv[1:] or ["token-mean"]
SEQ_ADV = torch.tensor([1.0, -0.5, 0.3, -1.0, 0.7, 0.2])


def loss_of(model, idx, total_tokens, total_seqs, aggregation, scale=1.0):
    ids, attn, tgt, pos, mask = pack_sequences([PROMPTS[i] for i in idx], [RESPONSES[i] for i in idx], 0, "cpu")
    logp, _ = token_logprobs(model, ids, attn, tgt, pos, mask, chunk_rows=3)
    adv = combine_advantages(SEQ_ADV[list(idx)], token_signal((tgt.float() % 3 - 1) * mask, "antisd"), 0.5, mask)
    weights = loss_weights(mask, aggregation, total_tokens, total_seqs) * scale
    return ppo_clip_loss(logp, logp.detach(), adv, weights, 0.2, 0.2)[0]



def main():
    accelerator = make_accelerator("/tmp/antisd-grad-check", bf16=False, report_to="none")
    assert accelerator.is_fsdp2, accelerator.distributed_type
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=False)
    reference = Qwen3ForCausalLM(config)
    install_scoring_head(reference)
    model = copy.deepcopy(reference)
    total_tokens, total_seqs = float(sum(map(len, RESPONSES))), float(len(RESPONSES))
    ok = True
    for aggregation in AGGREGATIONS:
        reference.zero_grad()
        loss_of(reference, range(6), total_tokens, total_seqs, aggregation).backward()
        expected = {n: p.grad.clone() for n, p in reference.named_parameters()}
        fresh = copy.deepcopy(model)
        sharded, _ = accelerator.prepare(fresh, torch.optim.SGD(fresh.parameters(), lr=0.0))
        mine = range(3 * accelerator.process_index, 3 * accelerator.process_index + 3)
        micro = [mine[:1], mine[1:]]
        for k, idx in enumerate(micro):  # micro-steps, gradient sync only on the last one
            ctx = accelerator.no_sync(sharded) if k < len(micro) - 1 else torch.enable_grad()
            with ctx:
                accelerator.backward(loss_of(sharded, idx, total_tokens, total_seqs, aggregation, scale=accelerator.num_processes))
        for name, param in sharded.named_parameters():
            grad = param.grad.full_tensor() if hasattr(param.grad, "full_tensor") else param.grad
            if not torch.allclose(grad, expected[name], atol=1e-6, rtol=1e-4):
                ok = False
                print(f"rank {accelerator.process_index} {aggregation} {name}: max diff {(grad - expected[name]).abs().max()}")
    if accelerator.is_main_process and ok:
        print("GRAD-CHECK OK")

    # rank 0: three distinct prefixes, rank 1: one; with batch_size 1 they need 7 and 5 forwards
    prefixes = [[1, 2, 3], [1, 2, 3], [4, 5], [6, 7, 8, 9]] if accelerator.process_index == 0 else [[1, 2, 3]] * 4
    responses = [[10, 11], [12, 13, 14], [15], [16, 17]]
    with torch.no_grad():
        expected_logp, expected_entropy = teacher_scores(reference, prefixes, responses, 0, "cpu", 1, 4)
        logp, entropy = teacher_scores(sharded, prefixes, responses, 0, "cpu", 1, 4,
                                       agree_calls=lambda n: int(accelerator.gather(torch.tensor([n])).max()))
    for got, want in zip(logp + entropy, expected_logp + expected_entropy):
        if not torch.allclose(got, want, atol=1e-5, rtol=1e-5):
            ok = False
            print(f"rank {accelerator.process_index} teacher scores differ: {got} vs {want}")
    if accelerator.is_main_process and ok:
        print("TEACHER-CHECK OK")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
