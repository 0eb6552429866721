"""The rollout interface (antisd/rollouts.py): the transformers backend against a direct seeded `generate`,
the vLLM backend against a stand-in engine (tests/vllm_stand_in.py) inside real training steps,
and truncated importance sampling in the update."""

import importlib.util
import json
import math
import random
import sys

import pytest
import torch

import train_antisd
from antisd.generation import chat_messages, chat_prompt_ids, pad_batch
from antisd.policy_reads import truncated_is_weights
from antisd.rollouts import SamplingSettings, TransformersRollouts, VLLMRollouts, make_rollouts, rollout_seed
from tests import vllm_stand_in

importlib_find_spec = importlib.util.find_spec
FAST = ["--prompts_per_step", "2", "--group_size", "2", "--max_new_tokens", "12", "--gate_warmup_steps", "1",
        "--report_to", "none", "--micro_batch_size", "4", "--verifier_workers", "1", "--save_steps", "0"]


@pytest.fixture(scope="module")
def tiny():
    from antisd.model_loading import load_policy

    model, tokenizer = load_policy("tiny", gradient_checkpointing=False)
    prompts = [chat_prompt_ids(tokenizer, chat_messages(q)) for q in ("What is 2 + 3?", "Tom has 7 apples and eats 2.")]
    return model, tokenizer, [p for p in prompts for _ in range(2)]


@pytest.mark.parametrize("decoding", ["generate", "shrink"])
def test_transformers_backend_is_a_seeded_generate(tiny, decoding):
    """Both decodings sample what a direct seeded `generate` samples (`shrink`, the default, draws for
    finished rows too, so every row gets generate's random numbers)."""
    model, tokenizer, prompts = tiny[0], tiny[1], tiny[2] * 4
    got = TransformersRollouts(model, tokenizer, decoding=decoding).generate(prompts, SamplingSettings(24), seed=11)
    eos = model.generation_config.eos_token_id
    input_ids, attention_mask = pad_batch(prompts, tokenizer.pad_token_id)
    torch.manual_seed(11)
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=24, do_sample=True,
                         temperature=1.0, top_p=1.0, top_k=0, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
    want = [row[: row.index(eos) + 1] if eos in row else row for row in out[:, input_ids.shape[1]:].tolist()]
    assert got.completion_ids == want
    assert got.truncated == [eos not in row for row in want]
    assert got.texts == tokenizer.batch_decode(want, skip_special_tokens=True)
    assert got.sampler_logprobs is None
    assert len(set(map(tuple, got.completion_ids))) > 1  # sampled, not greedy
    assert len(set(map(len, want))) > 1  # rows ended at different steps (shrink: finished rows left the batch)


def test_static_cache_samples_what_generate_samples(tiny):
    model, tokenizer, prompts = tiny
    want = TransformersRollouts(model, tokenizer, decoding="generate").generate(prompts, SamplingSettings(24), seed=4)
    got = TransformersRollouts(model, tokenizer, decoding="static").generate(prompts, SamplingSettings(24), seed=4)
    assert got.completion_ids == want.completion_ids and got.truncated == want.truncated


def test_shrinking_decode(tiny):
    """Greedy, shared prompt prefill and finished rows leaving the batch change nothing; sampled, rows end at EOS or the budget."""
    model, tokenizer, prompts = tiny
    greedy = SamplingSettings(24, temperature=0)
    want = TransformersRollouts(model, tokenizer, decoding="generate").generate(prompts * 3, greedy, seed=0)
    shrink = TransformersRollouts(model, tokenizer, decoding="shrink")
    # a group's repeated prompt is prefilled once and its cache copied: the same greedy completions
    assert shrink.generate(prompts * 3, greedy, seed=0).completion_ids == want.completion_ids
    sampled = shrink.generate(prompts * 2, SamplingSettings(24), seed=1)
    eos = model.generation_config.eos_token_id
    assert all((row[-1] == eos) != cut and eos not in row[:-1] and len(row) <= 24
               for row, cut in zip(sampled.completion_ids, sampled.truncated))
    assert sampled.completion_ids == shrink.generate(prompts * 2, SamplingSettings(24), seed=1).completion_ids
    lengths = {len(row) for row in sampled.completion_ids}
    assert len(lengths) > 1  # rows did end at different lengths
    # the warpers are applied: sampling at a near-zero temperature (with top-p) is greedy decoding
    near_greedy = SamplingSettings(24, temperature=1e-3, top_p=0.9)
    assert shrink.generate(prompts * 3, near_greedy, seed=2).completion_ids == want.completion_ids


def test_rollout_seeds_differ_by_step_and_rank():
    seeds = {rollout_seed(0, step, rank) for step in range(200) for rank in range(8)}
    assert len(seeds) == 200 * 8
    assert rollout_seed(1, 0, 0) != rollout_seed(0, 0, 0)


def test_vllm_backend_without_vllm_names_the_package(tiny, monkeypatch):
    model, tokenizer, _ = tiny
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    with pytest.raises(ImportError, match=r"--rollout_backend vllm needs the `vllm` package.*pip install"):
        make_rollouts("vllm", model, tokenizer, "generate", 8, None, torch.float32, 0, 0.3, max_model_len=256)


def test_config_without_vllm_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "vllm" else importlib_find_spec(name, *a))
    with pytest.raises(SystemExit, match=r"--rollout_backend vllm needs the `vllm` package: pip install -r requirements-vllm.txt"):
        train_antisd.Config(rollout_backend="vllm").validate(1)
    train_antisd.Config(rollout_backend="transformers").validate(1)


def test_vllm_backend_returns_the_engines_tokens_and_logprobs(tiny, monkeypatch):
    """Token ids and log-probs as the engine returned them (cut after the first EOS), one seed per request."""
    model, tokenizer, prompts = tiny
    vllm_stand_in.install(monkeypatch)
    eos = [model.generation_config.eos_token_id]
    rollouts = VLLMRollouts(model.name_or_path, tokenizer, eos, dtype="float32", gpu_memory_utilization=0.5,
                            max_model_len=256, seed=0, colocate=False)
    out = rollouts.generate(prompts, SamplingSettings(20), seed=5)
    engine = vllm_stand_in.engines[0]
    assert len({p.seed for p in engine.requests}) == len(prompts)  # a seed per request
    again = rollouts.generate(prompts, SamplingSettings(20), seed=5)
    assert again.completion_ids == out.completion_ids  # the same seed, the same rollouts
    assert out.completion_ids == engine.returned[: len(prompts)]  # as the engine returned them
    for ids, logps, params in zip(out.completion_ids, out.sampler_logprobs, engine.requests):
        assert len(ids) == len(logps) and params.stop_token_ids == eos and params.max_tokens == 20
    with torch.no_grad():  # the engine's log-probs are its model's log-softmax of the returned ids
        full = torch.tensor([prompts[0] + out.completion_ids[0]])
        logp = torch.log_softmax(model(full).logits[0].float(), -1)
        want = [logp[len(prompts[0]) - 1 + t, tok].item() for t, tok in enumerate(out.completion_ids[0])]
    assert out.sampler_logprobs[0] == pytest.approx(want, abs=1e-4)
    assert out.truncated == [row[-1] not in eos for row in out.completion_ids]


def test_training_with_stand_in_vllm(tmp_path, monkeypatch):
    """Two real training steps with --rollout_backend vllm on the stand-in engine: sleep/wake order
    around teacher scoring and the update, the trained weights pushed, the engine's token ids
    trained on as returned, the rollouts seeded per (seed, step, rank), the IS ratio applied and capped."""
    vllm_stand_in.install(monkeypatch)
    events = vllm_stand_in.events
    monkeypatch.setattr(vllm_stand_in.LLM, "logprob_shift", staticmethod(lambda position: -2.0 if position % 3 == 0 else 0.0))
    trained_after, rollouts_seen = [], []
    teacher_scores, update_policy = train_antisd.teacher_scores, train_antisd.update_policy

    def scoring(*args, **kwargs):
        events.append(("teacher", None))
        return teacher_scores(*args, **kwargs)

    def update(cfg, accelerator, model, *args):
        events.append(("update", None))
        rollouts_seen.append(args[3])  # the Samples trained on
        result = update_policy(cfg, accelerator, model, *args)
        trained_after.append({n: p.detach().clone() for n, p in accelerator.unwrap_model(model).named_parameters()})
        return result

    monkeypatch.setattr(train_antisd, "teacher_scores", scoring)
    monkeypatch.setattr(train_antisd, "update_policy", update)
    train_antisd.main(train_antisd.parse_config(FAST + ["--rollout_backend", "vllm", "--max_steps", "2",
                                                        "--output_dir", str(tmp_path)]))
    engine = vllm_stand_in.engines[0]
    assert engine.kwargs["enable_sleep_mode"] and engine.kwargs["distributed_executor_backend"] == "external_launcher"
    assert engine.kwargs["dtype"] == "float32" and engine.kwargs["logprobs_mode"] == "processed_logprobs"
    calls = [name for name, _ in events if name != "load_weights"]
    step = ["wake_up", "reset_prefix_cache", "wake_up", "generate", "sleep", "teacher", "update"]
    assert calls == ["sleep"] + step + step  # starts asleep; scoring and update while it sleeps
    assert [detail for name, detail in events if name == "wake_up"] == [("weights",), ("kv_cache",)] * 2
    # the second rollout's weights are the first update's, every parameter pushed, one at a time
    pushed = engine.pushes[1]
    assert pushed.keys() == trained_after[0].keys()
    assert all(torch.equal(pushed[n], trained_after[0][n]) for n in pushed)
    assert {d for name, d in events if name == "load_weights"} == {1}
    # the engine's token ids are trained on as returned, seeded per (seed, step, rank 0)
    for s, samples in enumerate(rollouts_seen):
        rng = random.Random(rollout_seed(0, s, 0))
        requests = engine.requests[4 * s: 4 * s + 4]
        assert [p.seed for p in requests] == [rng.getrandbits(31) for _ in range(4)]
        assert samples.sampler_logprobs is not None and len(samples.completion_ids) == 4
    # IS: the engine reports log-probs 2 nats low at every third position: ratio e^2 there, capped at 3
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for row, samples in zip(rows, rollouts_seen):
        tokens = sum(len(c) for c in samples.completion_ids)
        shifted = sum(len(range(0, len(c), 3)) for c in samples.completion_ids)
        assert row["sampling/is_ratio_max"] == pytest.approx(math.exp(2), rel=1e-3)
        assert row["sampling/is_capped_frac"] == pytest.approx(shifted / tokens)
        assert row["sampling/is_ratio_mean"] == pytest.approx((tokens - shifted + shifted * math.exp(2)) / tokens, rel=1e-3)


def test_truncated_is_weights():
    trainer = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, 0.0]])
    sampler = torch.tensor([[-1.0, -2.0 - math.log(5), -3.0 + math.log(2)], [-0.5, -0.5, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    weights, ratio = truncated_is_weights(trainer, sampler, mask, cap=3.0)
    assert ratio.flatten().tolist() == pytest.approx([1.0, 5.0, 0.5, 1.0, 1.0, 1.0])
    assert weights.flatten().tolist() == pytest.approx([1.0, 3.0, 0.5, 1.0, 1.0, 1.0])
    assert truncated_is_weights(trainer, sampler, mask, cap=0)[0].tolist() == [[1.0] * 3] * 2


@pytest.mark.parametrize("log_ratio,factor", [(math.log(0.5), 0.5), (math.log(4.0), 3.0)])
def test_is_weights_scale_the_policy_gradient(tiny, log_ratio, factor):
    """A uniform sampler mismatch scales loss and gradient by the (capped) ratio; none leaves them as they were."""
    from accelerate import Accelerator
    from antisd.scoring import logit_chunk_rows, pack_sequences, token_logprobs
    from transformers import get_scheduler

    model, tokenizer, prompts = tiny
    cfg = train_antisd.Config(method="grpo", group_size=2, micro_batch_size=8)
    accelerator = Accelerator(cpu=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    scheduler = get_scheduler("constant", optimizer)
    samples = TransformersRollouts(model, tokenizer).generate(prompts, SamplingSettings(10), seed=3)
    chunk = logit_chunk_rows(model.config.vocab_size, 64)
    ids, attn, targets, pos, mask = pack_sequences(samples.prompt_ids, samples.completion_ids, tokenizer.pad_token_id, "cpu")
    with torch.no_grad():
        logp, _ = token_logprobs(model, ids, attn, targets, pos, mask, chunk)
    adv = torch.tensor([1.0, -0.7, 0.5, -0.2])  # a loss that is not 0 by symmetry (rows of equal length)

    def run(sampler_logprobs):
        rollout = train_antisd.Samples(samples.prompt_ids, samples.completion_ids, samples.truncated, samples.texts,
                                       sampler_logprobs)
        out = train_antisd.update_policy(cfg, accelerator, model, optimizer, scheduler, train_antisd.ConstantLambda(0.0),
                                         rollout, tokenizer.pad_token_id, [None] * 4, adv, torch.zeros(4), chunk)
        return out["loss"], out["grad_norm"].item(), out["is_values"]

    plain_loss, plain_norm, plain_values = run(None)
    assert plain_values is None
    shifted = [(logp[i, : len(c)] - log_ratio).tolist() for i, c in enumerate(samples.completion_ids)]
    loss, norm, (ratio, weight) = run(shifted)
    assert loss == pytest.approx(factor * plain_loss, rel=1e-4)
    assert norm == pytest.approx(factor * plain_norm, rel=1e-4)
    assert len(ratio) == sum(len(c) for c in samples.completion_ids)
    assert ratio.tolist() == pytest.approx([math.exp(log_ratio)] * len(ratio), rel=1e-4)
    assert weight.tolist() == pytest.approx([factor] * len(ratio), rel=1e-4)
