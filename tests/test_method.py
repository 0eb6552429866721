"""The algorithm core of train_antisd.py against hand-computed values (SPEC §1-2)."""

import math
import random
from functools import partial

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from antisd import scoring
from train_antisd import GATES
from antisd.scoring import install_scoring_head, pack_sequences, teacher_scores, token_logprobs
from train_antisd import (
    ConstantLambda, EntropyGate, ReleaseController, TeacherStats, make_gate, pmi_signal, choose_shown_solutions, combine_advantages, cut_after_last_boxed,
    group_signal_weights, grpo_advantages, jsd_phi, loss_weights, ppo_clip_loss, teacher_user_message, token_signal,
    zero_std_groups,
)


LOG2 = math.log(2)


def test_jsd_phi_values():
    u = torch.tensor([0.0, 1.0, -1.0, 50.0, -50.0])
    expected = [0.0, 0.5 * (math.log1p(math.e) - LOG2), 0.5 * (math.log1p(math.exp(-1)) - LOG2),
                0.5 * (50 - LOG2), -0.5 * LOG2]
    assert jsd_phi(u).tolist() == pytest.approx(expected, abs=1e-6)
    # phi' = sigmoid(u) / 2
    x = torch.tensor([0.3, -2.0], requires_grad=True)
    jsd_phi(x).sum().backward()
    assert x.grad.tolist() == pytest.approx((torch.sigmoid(x.detach()) / 2).tolist())


def test_token_signal_per_method():
    u = torch.tensor([-2.0, 0.0, 3.0])
    assert token_signal(u, "grpo").tolist() == [0.0, 0.0, 0.0]
    assert token_signal(u, "sd").tolist() == [-2.0, 0.0, 3.0]
    assert token_signal(u, "sd_jsd").tolist() == pytest.approx(jsd_phi(u).tolist())
    anti = token_signal(u, "antisd")
    assert anti.tolist() == pytest.approx((-jsd_phi(u)).tolist())
    assert anti[0] > 0 and anti[2] < 0  # deliberation rewarded, shortcut penalized
    assert token_signal(torch.tensor([-1e4]), "antisd").item() == pytest.approx(0.5 * LOG2)  # the bonus cap
    with pytest.raises(ValueError):
        token_signal(u, "nope")


def test_grpo_and_combined_advantages():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    adv = grpo_advantages(rewards, 4)
    std = torch.tensor([1.0, 0, 0, 0]).std().item()
    assert adv[:4].tolist() == pytest.approx([0.75 / std, -0.25 / std, -0.25 / std, -0.25 / std], rel=1e-4)
    assert adv[4:].tolist() == [0.0] * 4  # zero-std group: no sequence signal
    signal = torch.tensor([[1.0, -2.0, 5.0], [0.5, 0.5, 0.5]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    seq_adv = torch.tensor([2.0, -1.0])
    out = combine_advantages(seq_adv, signal, 0.5, mask)
    assert out.tolist() == [[2.5, 1.0, 0.0], [-0.75, -0.75, -0.75]]
    per_seq = combine_advantages(seq_adv, signal, torch.tensor([0.0, 2.0]), mask)
    assert per_seq.tolist() == [[2.0, 2.0, 0.0], [0.0, 0.0, 0.0]]


def test_entropy_gate_transitions_and_state():
    gate = EntropyGate(warmup_steps=5, down_ratio=0.93, lambda_max=0.5)
    assert [gate.update(h) for h in [2.0, 1.0, 3.0, 2.5, 1.5]] == [0.0] * 5
    assert gate.h_warm == 2.0 and gate.open
    assert gate.update(1.9) == 0.5        # 1.9 >= 0.93 * 2 = 1.86: stays open
    assert gate.update(1.85) == 0.0       # below tau_down: closes on this very step
    assert gate.update(1.99) == 0.0       # hysteresis: needs H >= H_warm to re-open
    saved = gate.state_dict()
    assert gate.update(2.0) == 0.5        # re-opens at H_warm
    restored = EntropyGate(warmup_steps=5)
    restored.load_state_dict(saved)
    assert restored.update(2.0) == 0.5 and restored.state_dict() == gate.state_dict()


def test_release_controller():
    ctrl = ReleaseController(warmup_steps=2, down_ratio=0.93, reopen_ratio=1.07, lambda_max=0.5, max_response_tokens=3)
    stats = TeacherStats(entropy_median=None, seq_ppl=torch.tensor([1.5, 2.5, 4.0]))
    for avg in (2.0, 2.2):
        assert ctrl.lambdas(stats).tolist() == [0.0, 0.0, 0.0]
        ctrl.end_step(avg, u_std=1.0)
    assert ctrl.warm_median == pytest.approx(2.1) and ctrl.tau == pytest.approx(0.93 * 2.1)
    assert ctrl.sigma_ref == 1.0 and ctrl.open
    lam = ctrl.lambdas(stats)  # prev avg 2.2 >= tau: open
    expected = [min(max(0.2 * math.log(min(max(p / ctrl.tau, 0.5), 3)), 0), 0.5) for p in (1.5, 2.5)]
    assert lam.tolist() == pytest.approx(expected + [0.0])  # PPL > 3: no signal
    ctrl.end_step(1.5, 1.0)  # below tau: the next step's gate closes
    assert ctrl.lambdas(stats).tolist() == [0.0, 0.0, 0.0] and not ctrl.open
    ctrl.end_step(2.2, 1.0)  # 2.2 < 1.07 * 2.1 = 2.247: stays closed
    assert not ctrl.lambdas(stats).any()
    ctrl.end_step(2.3, 1.0)
    assert ctrl.lambdas(stats).any() and ctrl.open
    # signal processing as released: the outlier's u set to 0 (phi(0) = 0), which stays in the sequence's
    # mean and population std, so it gets z = (0 - mean) / std; padding 0; responses >= 3 tokens dropped
    u = torch.tensor([[0.1, -0.2, 3.0, 0.0], [0.5, -0.5, 0.0, 0.0], [0.5, -0.5, 0.2, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.0]])
    d = [-0.5 * (math.log1p(math.exp(x)) - LOG2) for x in (0.1, -0.2, 0.0)]  # -phi(u), the outlier's u read as 0
    mean = sum(d) / 3
    std = math.sqrt(sum((x - mean) ** 2 for x in d) / 3)
    ctrl.max_response_tokens = 4
    out = ctrl.signal(u, mask, partial(token_signal, method="antisd"))
    assert out[0, :3].tolist() == pytest.approx([(x - mean) / std for x in d], rel=1e-5)
    assert out[0, 2] != 0 and out[0, 3] == 0  # the outlier carries (0 - mean) / std; padding stays 0
    assert out[1].tolist() == pytest.approx([-1.0, 1.0, 0.0, 0.0], rel=1e-5)  # +-1: two tokens z-scored
    ctrl.max_response_tokens = 3  # the length mask is >= (as the released dp_actor): 3 tokens dropped, 2 kept
    out = ctrl.signal(u, mask, partial(token_signal, method="antisd"))
    assert out[0].abs().sum() == 0 and out[2].abs().sum() == 0 and out[1].abs().sum() > 0


def test_release_controller_reads_a_step_without_average_as_no_value():
    """A step where no sequence has teacher PPL < 3 has no average (None): the warm-up median skips it
    and, after warm-up, the gate stays as it was."""
    stats = TeacherStats(entropy_median=None, seq_ppl=torch.tensor([1.5, 2.5]))
    ctrl = ReleaseController(warmup_steps=3, down_ratio=0.93, reopen_ratio=1.07)
    for avg in (2.0, None, 2.4):
        assert not ctrl.lambdas(stats).any()
        ctrl.end_step(avg, u_std=1.0)
    assert ctrl.warm_median == pytest.approx(2.2) and ctrl.open  # median of 2.0 and 2.4, not of 0, 2.0, 2.4
    ctrl.end_step(None, 1.0)
    assert ctrl.lambdas(stats).any() and ctrl.open  # no value: still open
    ctrl.end_step(1.0, 1.0)
    assert not ctrl.lambdas(stats).any() and ctrl.closed_by == "below"
    ctrl.end_step(None, 1.0)
    assert not ctrl.lambdas(stats).any() and ctrl.closed_by == "below"  # no value: still closed
    late = ReleaseController(warmup_steps=2)  # no average in the whole warm-up: it goes on until there is one
    for avg in (None, None, 2.0):
        assert not late.lambdas(stats).any()
        late.end_step(avg, 1.0)
    assert late.warm_median == 2.0 and late.lambdas(stats).any()


def test_gate_close_above_closes_on_a_rise_and_reopens_inside_the_band():
    gate = EntropyGate(warmup_steps=1, down_ratio=0.93, lambda_max=0.5, reopen_ratio=1.0, close_above=2.0)
    assert gate.closed_by == "warmup" and gate.update(1.0) == 0.0 and gate.open  # H_warm = 1.0
    assert gate.update(1.9) == 0.5                          # inside [0.93, 2.0] x H_warm: open
    assert gate.update(2.1) == 0.0 and gate.closed_by == "above"  # a rise closes it (the paper's gate would not)
    assert gate.update(2.05) == 0.0                         # still above
    saved = gate.state_dict()
    restored = EntropyGate(warmup_steps=1, close_above=2.0)
    restored.load_state_dict(saved)                         # the state survives a resume
    assert restored.closed_by == "above" and restored.state_dict() == saved
    for g in (gate, restored):
        assert g.update(1.5) == 0.5 and g.closed_by is None  # back inside the band: the usual re-open rule
        assert g.update(0.9) == 0.0 and g.closed_by == "below"
    paper = EntropyGate(warmup_steps=1)
    assert [paper.update(h) for h in (1.0, 5.0, 50.0)] == [0.0, 0.5, 0.5]  # off by default: the paper's gate
    stats = TeacherStats(entropy_median=None, seq_ppl=torch.tensor([2.5]))  # above tau: lambda > 0 while open
    ctrl = ReleaseController(warmup_steps=1, close_above=1.5)
    ctrl.lambdas(stats)
    ctrl.end_step(2.0, 1.0)                                  # warm_median 2.0: closes above 3.0
    ctrl.end_step(3.2, 1.0)
    assert not ctrl.lambdas(stats).any() and ctrl.closed_by == "above"
    ctrl.end_step(2.2, 1.0)                                  # >= 1.07 x 2.0 and <= 3.0: re-opens
    assert ctrl.lambdas(stats).any() and ctrl.open
    restored = ReleaseController()
    restored.load_state_dict(ctrl.state_dict())
    assert restored.close_above == 1.5 and restored.state_dict() == ctrl.state_dict()


def test_group_signal_weights_per_mode():
    rewards = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    assert zero_std_groups(rewards, 4).tolist() == [True] * 8 + [False] * 8
    assert group_signal_weights(rewards, 4, "all").tolist() == [1.0] * 16
    assert group_signal_weights(rewards, 4, "mixed").tolist() == [0.0] * 8 + [1.0] * 8
    # 4 p (1 - p): p = 1, 0, 1/4, 1/2
    assert group_signal_weights(rewards, 4, "bernoulli").tolist() == pytest.approx([0.0] * 8 + [0.75] * 4 + [1.0] * 4)
    with pytest.raises(ValueError, match="group_signal"):
        group_signal_weights(rewards, 4, "some")


def test_every_gate_has_one_interface_and_make_gate_picks_it():
    from train_antisd import Config

    stats = TeacherStats(entropy_median=1.0, seq_ppl=torch.tensor([1.5, 2.5]))
    picked = {(m, g): type(make_gate(Config(method=m, gate=g))) for m in ("grpo", "antisd") for g in ("entropy", "none", "release")}
    assert picked == {("grpo", "entropy"): ConstantLambda, ("grpo", "none"): ConstantLambda, ("grpo", "release"): ConstantLambda,
                      ("antisd", "entropy"): EntropyGate, ("antisd", "none"): ConstantLambda,
                      ("antisd", "release"): ReleaseController}
    assert make_gate(Config(method="antisd", gate="none", lambda_max=0.3)).lambdas(stats).tolist() == pytest.approx([0.3, 0.3])
    assert make_gate(Config(method="grpo")).open is None
    for gate in (make_gate(Config(gate=g)) for g in GATES):
        lam = gate.lambdas(stats)
        assert lam.shape == (2,) and isinstance(gate.state_dict(), dict)
        gate.end_step(2.0, 1.0)
    # the one signal function: u = t - s on the mask (the student a constant), delta as the gate shapes it
    teacher, student = torch.tensor([[-1.0, -2.0, 0.0]]), torch.tensor([[-2.0, -1.0, -5.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    u, delta = pmi_signal(teacher, student, mask, "antisd", EntropyGate())
    assert u.tolist() == [[1.0, -1.0, 0.0]] and not u.requires_grad
    torch.testing.assert_close(delta, -jsd_phi(torch.tensor([[1.0, -1.0, 0.0]])) * mask)


def test_ppo_clip_loss_and_weights():
    logp = torch.log(torch.tensor([[1.5, 1.0], [0.5, 1.0]]))
    old = torch.zeros(2, 2)
    adv = torch.tensor([[1.0, 1.0], [-1.0, 2.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    weights = loss_weights(mask, "token-mean", total_tokens=3.0, total_seqs=2.0)
    loss, clipped = ppo_clip_loss(logp, old, adv, weights, 0.2, 0.28)
    # ratio 1.5 with A>0 clipped at 1.28; ratio 0.5 with A<0 clipped at 0.8
    assert loss.item() == pytest.approx(-(1.28 + 1.0 - 0.8) / 3)
    assert clipped.item() == 2
    seq = loss_weights(mask, "seq-mean-token-mean", 3.0, 2.0)
    assert seq.tolist() == [[0.25, 0.25], [0.5, 0.0]]


def test_privileged_context_choice_and_template():
    rewards = [1.0, 0.0, 1.0, 0.0, 0.0, 0.0]
    texts = ["a", "b", "c", "d", "e", "f"]
    shown = choose_shown_solutions(rewards, texts, 3, ["ref-0", None], random.Random(0))
    assert shown[0] == "c" and shown[2] == "a"   # never its own text
    assert shown[1] in ("a", "c")
    assert shown[3:] == [None, None, None]        # no correct sibling, no dataset solution
    assert choose_shown_solutions([0.0] * 3, texts[:3], 3, ["ref"], random.Random(0)) == ["ref"] * 3
    assert choose_shown_solutions([1.0, 0.0], ["x", "y"], 2, [None], random.Random(0)) == [None, "x"]
    for seed in range(20):  # one correct rollout is shown to the rest of its group, another one to it
        shown = choose_shown_solutions([1.0, 1.0, 0.0, 1.0], ["a", "b", "c", "d"], 4, [None], random.Random(seed))
        assert len(set(shown)) == 2 and set(shown) <= {"a", "b", "d"} and all(s != own for s, own in zip(shown, "abcd"))
    assert cut_after_last_boxed("so \\boxed{1} then \\boxed{\\frac{1}{2}} trailing") == "so \\boxed{1} then \\boxed{\\frac{1}{2}}"
    assert cut_after_last_boxed("no box") == "no box"
    msg = teacher_user_message("P?", "S", "Your answer is incorrect.")
    assert msg == "P?\nYour previous attempt:\n\nS\n\n\nPrevious assessment: Your answer is incorrect.\n\n\nNow solve this problem step by step.\n"
    assert "previous attempt" not in teacher_user_message("P?", None, "Your answer is correct.")
    from prompts import answer_feedback, code_feedback
    assert (answer_feedback(True), answer_feedback(False)) == ("Your answer is correct.", "Your answer is incorrect.")
    assert code_feedback(3, 5) == "Your code passes 3 of 5 test cases."


CUT_CASES = [  # (text, golds): the teacher is shown the text cut after the box the verifier grades
    ("first \\boxed{3}. Wait: \\fbox{4}.", ["3", "4"]),
    ("so \\boxed{1} then \\boxed{\\frac{1}{2}} trailing", ["1", "1/2", "0.5"]),
    ("nested \\boxed{\\boxed{5}} and {braces \\boxed{{6}}} end", ["5", "6"]),
    ("escaped \\boxed{\\{1,2\\}} and spaced \\boxed {7}. done", ["7", "\\{1,2\\}"]),
    ("<think>maybe \\boxed{1}</think> so \\boxed{2}.", ["1", "2"]),
    ("<think>\\boxed{7}</think> and no box after", ["7"]),
    ("a</think>b \\boxed{8}</think>c \\boxed{9} !", ["8", "9"]),
    ("no box, the answer is 5", ["5"]),
    ("\\boxed{3} and then \\boxed{\\frac{1}{2}", ["3", "1/2"]),  # last box truncated: no answer
    ("\\boxed\n{5} on the next line", ["5"]),
    ("\\boxed{9}" + " x" * 1500, ["9"]),  # the box lies before the tail the verifier reads
    ("y" * 3000 + " \\boxed{9} tail", ["9"]),
]


@pytest.mark.parametrize("text, golds", CUT_CASES)
def test_cut_after_graded_box_keeps_the_grade(text, golds):
    from verifiers.math import is_correct, last_boxed_span

    cut = cut_after_last_boxed(text)
    span = last_boxed_span(text)
    if span is None:
        assert cut == text
    else:
        assert cut == text[:span[1]] and cut.endswith(text[span[0]:span[1]])
        assert last_boxed_span(cut) == span  # the cut text's graded box is the same box
    for gold in golds:
        assert is_correct(cut, gold) == is_correct(text, gold), (text, gold)


def test_cut_example_from_the_issue():
    from verifiers.math import is_correct

    text = "first \\boxed{3}. Wait: \\fbox{4}."
    assert cut_after_last_boxed(text) == "first \\boxed{3}. Wait: \\fbox{4}"
    assert is_correct(text, "4") and is_correct(cut_after_last_boxed(text), "4")
    assert not is_correct(text, "3") and not is_correct(cut_after_last_boxed(text), "3")

@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128)
    model = Qwen3ForCausalLM(config).float()
    install_scoring_head(model)
    return model


def naive_logprobs(model, prompts, responses, temperature: float = 1.0):
    """Reference: one sequence at a time, full [length, vocab] log_softmax(logits / temperature)."""
    out, ent = [], []
    for p, r in zip(prompts, responses):
        logits = model(input_ids=torch.tensor([p + r])).logits[0, len(p) - 1:len(p) + len(r) - 1].float()
        logp = torch.log_softmax(logits / temperature, -1)
        out.append(logp.gather(1, torch.tensor(r)[:, None])[:, 0])
        ent.append(-(logp.exp() * logp).sum(-1))
    return out, ent


def test_chunked_scoring_equals_naive_and_aligns(small_model):
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10]]
    responses = [[11, 12, 13, 14], [15, 16], [17, 18, 19]]
    packed = pack_sequences(prompts, responses, pad_id=0, device="cpu")
    with torch.no_grad():
        logp, entropy = token_logprobs(small_model, *packed, chunk_rows=3, with_entropy=True)
        ref_logp, ref_ent = naive_logprobs(small_model, prompts, responses)
    for row, (lp, en) in enumerate(zip(ref_logp, ref_ent)):
        n = len(responses[row])
        torch.testing.assert_close(logp[row, :n], lp, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(entropy[row, :n], en, atol=1e-5, rtol=1e-5)
        assert logp[row, n:].abs().sum() == 0
    # gradients through the checkpointed chunks equal the naive ones
    small_model.zero_grad()
    chunked, _ = token_logprobs(small_model, *packed, chunk_rows=2)
    chunked.sum().backward()
    grads = [p.grad.clone() for p in small_model.parameters()]
    small_model.zero_grad()
    torch.stack([x.sum() for x in naive_logprobs(small_model, prompts, responses)[0]]).sum().backward()
    for g, p in zip(grads, small_model.parameters()):
        torch.testing.assert_close(g, p.grad, atol=1e-5, rtol=1e-4)


def test_teacher_and_student_align_token_by_token(small_model):
    """Same response ids after different prompts: position t scores the same token y_t."""
    response = [21, 22, 23, 24, 25]
    student_prompt, teacher_prompt = [1, 2, 3], [1, 2, 3, 30, 31, 32, 33, 34, 3]
    with torch.no_grad():
        s, _ = token_logprobs(small_model, *pack_sequences([student_prompt], [response], 0, "cpu"), chunk_rows=64)
        t, _ = token_logprobs(small_model, *pack_sequences([teacher_prompt], [response], 0, "cpu"), chunk_rows=64)
        ref_s, _ = naive_logprobs(small_model, [student_prompt], [response])
        ref_t, _ = naive_logprobs(small_model, [teacher_prompt], [response])
        same, _ = token_logprobs(small_model, *pack_sequences([student_prompt] * 2, [response] * 2, 0, "cpu"), chunk_rows=4)
    torch.testing.assert_close(s[0], ref_s[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(t[0], ref_t[0], atol=1e-5, rtol=1e-5)
    assert (t[0] - s[0]).abs().max() > 1e-4          # the context changes the scores...
    torch.testing.assert_close(same[0], same[1])     # ...and the same context gives u = 0


def test_scores_are_of_the_sampling_temperature(small_model):
    """Student (whole rows, shared prompts, eval mode) and teacher (log-prob and entropy) scores at T = 0.7
    are log_softmax(logits / 0.7) at the sampled tokens, not the untempered ones."""
    prompts, responses = [[1, 2, 3], [1, 2, 3], [4, 5]], [[11, 12, 13], [14], [15, 16]]
    packed = pack_sequences(prompts, responses, pad_id=0, device="cpu")
    with torch.no_grad():
        want, want_entropy = naive_logprobs(small_model, prompts, responses, temperature=0.7)
        untempered, _ = naive_logprobs(small_model, prompts, responses)
        whole, _ = token_logprobs(small_model, *packed, chunk_rows=2, temperature=0.7)
        shared = scoring.SharedPromptScores(small_model, prompts, 0, "cpu").logprobs([0, 1, 2], responses, 0, 2, 0.7)
        evaluated = scoring.eval_mode_logprobs(small_model, *packed, chunk_rows=2, temperature=0.7)
        teacher, entropy = teacher_scores(small_model, prompts, responses, 0, "cpu", 2, 2, temperature=0.7)
        at_one, _ = token_logprobs(small_model, *packed, chunk_rows=2, temperature=1.0)
    for i, r in enumerate(responses):
        for got in (whole[i, :len(r)], shared[i, :len(r)], evaluated[i, :len(r)], teacher[i]):
            torch.testing.assert_close(got, want[i], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(entropy[i], want_entropy[i], atol=1e-5, rtol=1e-5)
        assert (whole[i, :len(r)] - untempered[i]).abs().max() > 1e-3
        torch.testing.assert_close(at_one[i, :len(r)], untempered[i], atol=1e-5, rtol=1e-5)
    # the gradient path (checkpointed chunks, logits divided in place) gives the naive tempered gradient
    small_model.zero_grad()
    logp, _ = token_logprobs(small_model, *packed, chunk_rows=2, temperature=0.7)
    torch.testing.assert_close(logp[0, :3].detach(), want[0], atol=1e-5, rtol=1e-5)
    logp.sum().backward()
    grads = [p.grad.clone() for p in small_model.parameters()]
    small_model.zero_grad()
    torch.stack([x.sum() for x in naive_logprobs(small_model, prompts, responses, temperature=0.7)[0]]).sum().backward()
    for g, p in zip(grads, small_model.parameters()):
        torch.testing.assert_close(g, p.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("shared", [True, False])
def test_teacher_scores_with_shared_prefixes_equal_naive(small_model, monkeypatch, shared):
    """Prefix read once and its KV cache continued per response == each sequence scored whole."""
    assert scoring.caches_prefixes(small_model)
    windowed = Qwen3ForCausalLM(Qwen3Config(**{**small_model.config.to_dict(), "use_sliding_window": True, "sliding_window": 4,
                                               "layer_types": None}))
    assert not scoring.caches_prefixes(windowed)  # scored whole instead
    monkeypatch.setattr(scoring, "caches_prefixes", lambda model: shared)
    a, b, c = [1, 2, 3, 4, 5, 6], [1, 2, 3, 7], [8, 9, 10, 11, 12, 13, 14, 15, 16]
    prefixes = [a, b, a, c, b, a, c]
    responses = [[20, 21, 22], [23], [24, 25, 26, 27, 28], [29, 30], [31, 32, 33], [34], [35, 36, 37, 38]]
    calls = []
    hook = small_model.register_forward_hook(lambda *_: calls.append(1))
    try:
        logp, entropy = teacher_scores(small_model, prefixes, responses, pad_id=0, device="cpu", batch_size=2,
                                       chunk_rows=3, agree_calls=lambda n: n + 2)
    finally:
        hook.remove()
    with torch.no_grad():
        ref_logp, ref_ent = naive_logprobs(small_model, prefixes, responses)
    for i in range(len(responses)):
        torch.testing.assert_close(logp[i], ref_logp[i], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(entropy[i], ref_ent[i], atol=1e-5, rtol=1e-5)
    # shared: 3 distinct prefixes in 2 batches (+1 each) and 4 response batches; whole: 4 batches; +2 agreed
    assert len(calls) == (2 + 4 if shared else 4) + 2


def test_shared_prompt_scores_equal_whole_rows_with_gradient(small_model):
    """Each distinct prompt read once, its KV cache continued per micro-batch and its gradient sent
    back once == every row read whole: the same log-probs and the same parameter gradient."""
    a, b, c = [1, 2, 3, 4, 5, 6], [7, 8], [9, 10, 11, 12]
    prompts = [a, a, a, b, b, c, c, a]
    responses = [[20, 21, 22], [23], [24, 25, 26, 27, 28], [29, 30], [31, 32, 33], [34], [35, 36, 37, 38], [39, 40]]
    micro = [[1, 5, 3], [0, 4, 7], [2, 6]]
    weights = torch.linspace(0.5, 1.5, 8)

    def gradient(shared: bool):
        small_model.zero_grad()
        scores = scoring.SharedPromptScores(small_model, prompts, 0, "cpu") if shared else None
        rows = {}
        for idx in micro:
            batch = [responses[i] for i in idx]
            if shared:
                logp = scores.logprobs(idx, batch, 0, chunk_rows=3)
            else:
                logp, _ = token_logprobs(small_model, *pack_sequences([prompts[i] for i in idx], batch, 0, "cpu"), chunk_rows=3)
            (logp.sum(1) * weights[idx]).sum().backward()
            rows.update({i: logp[j, :len(responses[i])].detach() for j, i in enumerate(idx)})
        if shared:
            scores.backward()
        return rows, [p.grad.clone() for p in small_model.parameters()]

    whole_rows, whole_grads = gradient(False)
    shared_rows, shared_grads = gradient(True)
    for i in range(len(responses)):
        torch.testing.assert_close(shared_rows[i], whole_rows[i], atol=1e-5, rtol=1e-5)
    for g, w in zip(shared_grads, whole_grads):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)
    assert any(g.abs().sum() > 0 for g in shared_grads)
    assert scoring.shares_prompts(small_model, num_processes=1) and not scoring.shares_prompts(small_model, num_processes=2)


def test_token_mean_is_the_same_in_micro_steps(small_model):
    """Gradient of the full batch at once == sum of micro-step gradients (DAPO token-mean)."""
    prompts = [[1, 2], [3, 4, 5], [6], [7, 8]]
    responses = [[9, 10, 11], [12], [13, 14, 15, 16, 17], [18, 19]]
    adv_seq = torch.tensor([1.0, -0.5, 0.3, -1.0])

    def grads(groups):
        small_model.zero_grad()
        total = float(sum(len(r) for r in responses))
        for idx in groups:
            ids, attn, tgt, pos, mask = pack_sequences([prompts[i] for i in idx], [responses[i] for i in idx], 0, "cpu")
            logp, _ = token_logprobs(small_model, ids, attn, tgt, pos, mask, chunk_rows=3)
            signal = token_signal((tgt.float() % 3 - 1) * mask, "antisd")  # a fixed u per token
            adv = combine_advantages(adv_seq[list(idx)], signal, 0.5, mask)
            loss, _ = ppo_clip_loss(logp, logp.detach(), adv, loss_weights(mask, "token-mean", total, 4.0), 0.2, 0.2)
            loss.backward()
        return [p.grad.clone() for p in small_model.parameters()]

    whole, split = grads([range(4)]), grads([range(0, 1), range(1, 3), range(3, 4)])
    for a, b in zip(whole, split):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("config_kwargs", [
    {"model_type": "gemma2", "final_logit_softcapping": 30.0},
    {"model_type": "cohere", "logit_scale": 0.0625},
    {"model_type": "granite", "logits_scaling": 8.0},
])
def test_models_that_transform_logits_after_the_head_are_refused(config_kwargs):
    """Soft-capped or scaled logits would make the chunked scores silently wrong: refuse, naming the field."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, field = config_kwargs.pop("model_type"), next(iter(config_kwargs))
    config = AutoConfig.for_model(model_type, vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                  num_attention_heads=2, num_key_value_heads=1, head_dim=8, **config_kwargs)
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError, match=field):
        install_scoring_head(model)


def test_logit_chunks_are_sized_by_a_memory_budget():
    assert scoring.logit_chunk_rows(151_936, 512) == 512 * 2**20 // (151_936 * 12)  # 294 rows of the Qwen3 vocabulary
    assert scoring.logit_chunk_rows(512, 512) == 87_381
    assert scoring.logit_chunk_rows(10**9, 1) == 1  # never zero


def test_generate_calls_are_sized_by_a_kv_token_budget():
    from antisd.generation import token_budget_batches

    lengths = [10, 30, 20, 5, 50, 40]
    batches = token_budget_batches(lengths, max_new_tokens=50, batch_size=4, max_tokens=200)
    assert [lengths[b] for b in batches] == [[10, 30], [20, 5], [50, 40]]  # in order, (longest + 50) x count <= 200
    assert token_budget_batches([500], 50, 4, 200) == [slice(0, 1)]  # one sequence even when it alone is over
    assert token_budget_batches(lengths, 50, 4, None) == [slice(0, 4), slice(4, 6)]  # no budget: batch_size only
