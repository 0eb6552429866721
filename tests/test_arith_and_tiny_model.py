"""The embedded default task (data/arith.py) and model (models/build_tiny_model.py)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import random
import re

import pytest
import torch

from data.arith import generate_split, make_problem, make_solution
from models.build_tiny_model import DEFAULT_TINY_MODEL_DIR, ensure_tiny_model, main, train_tokenizer

EQUATION = re.compile(r"(\d+) ([+\-×÷]) (\d+) = (\d+)")


def evaluate_steps(steps):
    """Independent re-computation of a problem's answer from its `steps`."""
    (kind, value), *ops = steps
    assert kind == "start"
    for op, x in ops:
        if op == "/":
            assert value % x == 0, "division must be exact"
        value = {"+": value + x, "-": value - x, "*": value * x, "/": value // x}[op]
    return value


# --- data/arith.py ---------------------------------------------------------------------------

def test_rows_have_the_documented_fields_and_ids():
    rows = generate_split("train", 5)
    assert [r["id"] for r in rows] == [f"arith-train-{i}" for i in range(5)]
    assert all(set(r) == {"id", "problem", "answer", "solution"} for r in rows)
    assert set(make_problem(random.Random(0), 2, 1)) == {"problem", "answer", "solution", "steps"}
    with pytest.raises(ValueError):
        generate_split("test", 1)


def test_generator_is_deterministic_and_seeded():
    assert generate_split("train", 50) == generate_split("train", 50)
    assert generate_split("eval", 50, num_steps=(2, 4), digits=2, seed=3) == generate_split("eval", 50, num_steps=(2, 4), digits=2, seed=3)
    assert generate_split("train", 50, seed=1) != generate_split("train", 50, seed=0)
    assert generate_split("train", 20) == generate_split("train", 50)[:20]


@pytest.mark.parametrize("settings", [{}, {"num_steps": (2, 4), "digits": 2}])
def test_train_and_eval_are_disjoint(settings):
    train = generate_split("train", 3000, include_steps=True, **settings)
    evals = generate_split("eval", 300, include_steps=True, **settings)
    assert not {json.dumps(r["steps"]) for r in train} & {json.dumps(r["steps"]) for r in evals}
    assert not {r["problem"] for r in train} & {r["problem"] for r in evals}
    assert len({json.dumps(r["steps"]) for r in evals}) == len(evals)  # eval rows are distinct computations


@pytest.mark.parametrize("settings", [{}, {"num_steps": (3, 5), "digits": 2}, {"num_steps": (1, 1), "digits": 3}])
def test_answers_are_correct_and_solutions_end_boxed(settings):
    rows = generate_split("train", 300, include_steps=True, **settings) + generate_split("eval", 100, include_steps=True, **settings)
    for row in rows:
        answer = evaluate_steps(row["steps"])
        assert row["answer"] == str(answer) and answer >= 0
        # the numbers in the problem text are the operands, in order
        assert [int(n) for n in re.findall(r"\d+", row["problem"])] == [x for _, x in row["steps"]]
        assert row["solution"].endswith(f"\\boxed{{{answer}}}.")
        assert row["solution"].count("\\boxed") == 1


def test_answers_verify_with_the_project_reward():
    from verifiers.math import is_correct

    for row in generate_split("eval", 30):
        assert is_correct(row["solution"], row["answer"])
        assert not is_correct(row["solution"], str(int(row["answer"]) + 1))


def test_slips_are_caught_and_fixed_and_every_other_equation_holds():
    rows = generate_split("train", 400, include_steps=True)
    slipped = 0
    for row in rows:
        solution = row["solution"]
        for m in EQUATION.finditer(solution):
            a, op, b, c = int(m[1]), m[2], int(m[3]), int(m[4])
            true = {"+": a + b, "-": a - b, "×": a * b, "÷": a / b}[op]
            if solution[m.end():].startswith(". Wait, that's not right."):
                slipped += 1
                assert c != true
                fix = EQUATION.match(solution, m.end() + len(". Wait, that's not right. "))
                assert fix and fix.groups()[:3] == m.groups()[:3] and int(fix[4]) == true
                assert solution[fix.end():].startswith(f", not {c}.")
            else:
                assert c == true, (m[0], solution)
        assert "Wait, that's not right." not in solution.split("\n")[-1]
    assert 0.15 * len(rows) < slipped < 0.35 * len(rows)  # about a quarter of the solutions slip once
    deliberating = sum(bool(re.search(r"Let me (verify|recompute)|Wait, let me check", r["solution"])) for r in rows)
    assert deliberating > 0.3 * len(rows)


def test_make_solution_samples_differ_but_agree():
    steps = make_problem(random.Random(1), 4, 2)["steps"]
    rng = random.Random(0)
    solutions = {make_solution(steps, rng) for _ in range(20)}
    assert len(solutions) > 5
    assert all(s.endswith(f"\\boxed{{{evaluate_steps(steps)}}}.") for s in solutions)


def test_difficulty_parameters():
    for k in (1, 3, 5):
        rows = generate_split("train", 40, num_steps=(k, k), include_steps=True)
        assert all(len(r["steps"]) == k + 1 for r in rows)
    assert all(10 <= r["steps"][0][1] <= 99 for r in generate_split("train", 40, digits=2, include_steps=True))
    assert all(2 <= r["steps"][0][1] <= 9 for r in generate_split("train", 40, digits=1, include_steps=True))


# --- tokenizer -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    rows = generate_split("train", 300)
    path = tmp_path_factory.mktemp("tok")
    train_tokenizer([r["problem"] for r in rows] + [r["solution"] for r in rows], 512).save_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


def tokenizers_under_test(tokenizer):
    from transformers import AutoTokenizer

    found = [tokenizer]
    if (DEFAULT_TINY_MODEL_DIR / "tokenizer.json").exists():
        found.append(AutoTokenizer.from_pretrained(DEFAULT_TINY_MODEL_DIR))
    return found


def test_tokenizer_round_trips_any_text(tokenizer):
    from prompts import FEEDBACK_INCORRECT, teacher_user_message

    row = generate_split("eval", 1)[0]
    texts = [
        row["problem"], row["solution"], teacher_user_message(row["problem"], row["solution"], FEEDBACK_INCORRECT),
        "\\frac{1}{2} + \\sqrt{3} = x^2, 日本語, émoji 🙂, tabs\tand  spaces\n\n end ", "12345678901234567890",
    ]
    for tok in tokenizers_under_test(tokenizer):
        assert len(tok) <= 512
        for text in texts:
            assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
        assert len(tok("1234", add_special_tokens=False)["input_ids"]) == 4  # one token per digit


def test_chat_template_and_special_tokens(tokenizer):
    from antisd.generation import chat_messages, chat_prompt_ids

    for tok in tokenizers_under_test(tokenizer):
        assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
        assert tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
        text = tok.apply_chat_template(chat_messages("What is 2 + 3?", "Be brief."), tokenize=False, add_generation_prompt=True)
        assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"
        ids = chat_prompt_ids(tok, chat_messages("What is 2 + 3?"))
        assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")
        assert tok.decode(ids) == "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"
        assert tok.apply_chat_template(chat_messages("hi"), tokenize=False).endswith("<|im_end|>\n")


# --- the committed tiny model and the build script -------------------------------------------

def needs_tiny_model():
    if not (DEFAULT_TINY_MODEL_DIR / "model.safetensors").exists():
        pytest.skip("models/tiny-qwen3 not built (python -m models.build_tiny_model)")


def test_committed_tiny_model_loads_offline_and_generates():
    needs_tiny_model()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from antisd.generation import chat_messages, chat_prompt_ids, sample

    model = AutoModelForCausalLM.from_pretrained(DEFAULT_TINY_MODEL_DIR, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(DEFAULT_TINY_MODEL_DIR, local_files_only=True)
    assert model.config.model_type == "qwen3" and model.dtype == torch.float32
    assert 1.5e6 <= sum(p.numel() for p in model.parameters()) <= 3.5e6
    assert (DEFAULT_TINY_MODEL_DIR / "model.safetensors").stat().st_size <= 10 * 2**20
    assert model.generation_config.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    assert model.generation_config.pad_token_id == tok.convert_tokens_to_ids("<|endoftext|>")
    rows = generate_split("eval", 2)
    torch.manual_seed(0)
    out = sample(model, tok, [chat_prompt_ids(tok, chat_messages(r["problem"])) for r in rows], max_new_tokens=160)
    assert all(text.strip() for text in out.texts)
    assert not all(out.truncated)  # the warm-started model stops with <|im_end|>
    info = json.loads((DEFAULT_TINY_MODEL_DIR / "build_info.json").read_text())
    assert 0.10 <= info["eval_accuracy_t1"] <= 0.60
    assert ensure_tiny_model(DEFAULT_TINY_MODEL_DIR) == DEFAULT_TINY_MODEL_DIR  # present: no rebuild


def test_build_script_end_to_end_and_deterministic(tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tiny = ["--sft_steps", "4", "--batch_size", "4", "--train_n", "200", "--eval_n", "4", "--max_new_tokens", "16", "--num_threads", "1"]
    for name in ("a", "b"):
        main(["--output_dir", str(tmp_path / name), *tiny])
    printed = capsys.readouterr().out
    assert "parameters:" in printed and "eval accuracy" in printed
    info = json.loads((tmp_path / "a" / "build_info.json").read_text())
    assert {"parameters", "model_safetensors_bytes", "eval_accuracy_t1", "eval_accuracy_greedy"} <= set(info)
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    tok = AutoTokenizer.from_pretrained(tmp_path / "a")
    assert model.generation_config.eos_token_id == tok.eos_token_id
    assert ensure_tiny_model(tmp_path / "a") == tmp_path / "a"
