"""The task where deliberation changes the answer (data/arith.py `arith_checks`) and its model
(`build_tiny_model --task arith_checks`, `--model tiny-checks`)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import hashlib
import json
import random
import re

import pytest

from data.arith import audit_checks, generate_split, make_checked_solution, make_problem
from models.build_tiny_model import main as build_main
from models.build_tiny_model import parse_args, sft_texts, solution_writers

EQUATION = re.compile(r"(\d+) ([+\-×÷]) (\d+) = (\d+)\.")
CHECK = re.compile(r"Wait, let me check: (\d+) ([+\-×÷]) (\d+) = (\d+)(?:, not (\d+))?\.")
OPS = {"+": ("+", lambda a, b: a + b), "-": ("-", lambda a, b: a - b), "×": ("*", lambda a, b: a * b),
       "÷": ("/", lambda a, b: a / b)}
TEACHER_SHOWN = "\nYour previous attempt:\n"


def walk(solution: str, steps: list) -> dict:
    """Re-read a checked solution line by line against `steps`: every equation continues from the
    value the solution holds, every check recomputes the equation above it; returns what happened."""
    lines = solution.split("\n")
    assert re.fullmatch(rf"(Start with|We begin with|At first there are) {steps[0][1]}\.", lines[0])
    value, step, last, seen = steps[0][1], 1, None, {"slips": 0, "caught": 0, "checks": 0, "steps": len(steps) - 1}
    for line in lines[1:-1]:
        if check := CHECK.fullmatch(line):
            a, op, b, result, not_written = int(check[1]), check[2], int(check[3]), int(check[4]), check[5]
            assert last is not None and (a, op, b) == last[:3], (line, solution)  # recomputes the step above
            assert result == OPS[op][1](a, b)
            assert not_written == (None if last[3] == result else str(last[3])), solution
            seen["checks"] += 1
            seen["caught"] += not_written is not None
            value, last = result, None  # goes on from the right value; one check per step
        else:
            eq = EQUATION.fullmatch(line)
            assert eq, (line, solution)
            a, op, b, written = int(eq[1]), eq[2], int(eq[3]), int(eq[4])
            assert a == value and [OPS[op][0], b] == steps[step], solution  # the next step, from the held value
            seen["slips"] += written != OPS[op][1](a, b)
            value, last, step = written, (a, op, b, written), step + 1
    assert step == len(steps)
    boxed = re.fullmatch(r"So the answer is \\boxed\{(\d+)\}\.", lines[-1])
    assert boxed and int(boxed[1]) == value
    return {**seen, "answer": value}


def fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj).encode()).hexdigest()


# --- data/arith.py -----------------------------------------------------------------------------

def test_default_arith_rows_and_sft_pairs_are_unchanged():
    """Values produced by main's code before arith_checks existed (same seed): the default task, and the
    SFT text of the default tiny model, draw exactly what they drew."""
    assert fingerprint(generate_split("train", 50)) == "444fe0bd5c02a064071d88449a3e67e3971a8c58c96c2be7ce63ac6e0ae5e019"
    assert fingerprint(generate_split("eval", 50)) == "9e35b889600b41e514316c0112fd2585b73dac5f025f41287104e5e527a75bec"
    rows = generate_split("train", 200, include_steps=True)
    pairs = sft_texts(rows, 300, 0.4, random.Random(0), solution_writers(parse_args([])))
    assert fingerprint(pairs) == "49890b00c718540daf81e607b34b339f655198f179e3a979bcd89f2aba58cd9d"


def test_only_a_check_catches_a_slip():
    rows = generate_split("train", 300, include_steps=True, task="arith_checks")
    rng = random.Random(0)
    seen = [walk(make_checked_solution(r["steps"], rng), r["steps"]) | {"gold": int(r["answer"])} for r in rows for _ in range(4)]
    for s in seen:
        assert s["slips"] <= 1 and s["caught"] <= s["slips"]
        assert (s["answer"] == s["gold"]) == (s["slips"] == s["caught"])  # an unchecked slip, and only that, is wrong
    slipped = sum(s["slips"] for s in seen) / len(seen)
    checks = sum(s["checks"] for s in seen) / sum(s["steps"] for s in seen)
    wrong = sum(s["answer"] != s["gold"] for s in seen) / len(seen)
    assert 0.30 < slipped < 0.40 and 0.25 < checks < 0.35  # SLIP_PROB 0.35 per solution, CHECK_PROB 0.3 per step
    assert 0.18 < wrong < 0.30 and any(s["caught"] for s in seen)  # ~0.35 x 0.7 slip unchecked
    # checking more often answers right more often: always checking is always right, never checking never right
    assert all(walk(make_checked_solution(r["steps"], rng, slip_prob=1, check_prob=1), r["steps"])["answer"] == int(r["answer"])
               for r in rows)
    assert all(walk(make_checked_solution(r["steps"], rng, slip_prob=1, check_prob=0), r["steps"])["answer"] != int(r["answer"])
               for r in rows)


def test_rows_share_arith_problems_and_carry_correct_reference_solutions():
    from verifiers.math import is_correct

    for split, n in (("train", 300), ("eval", 100)):
        rows = generate_split(split, n, include_steps=True, task="arith_checks")
        plain = generate_split(split, n, include_steps=True)
        assert [(r["problem"], r["answer"], r["steps"]) for r in rows] == [(r["problem"], r["answer"], r["steps"]) for r in plain]
        assert [r["id"] for r in rows] == [f"arith_checks-{split}-{i}" for i in range(n)]
        seen = [walk(r["solution"], r["steps"]) for r in rows]
        assert all(s["answer"] == int(r["answer"]) for s, r in zip(seen, rows))
        assert all(is_correct(r["solution"], r["answer"]) for r in rows)  # the project's verifier agrees
        if split == "train":
            assert sum(s["caught"] for s in seen) > 0.05 * n  # caught slips are shown too, not only clean solutions


def test_arith_checks_is_deterministic_in_the_seed():
    steps = make_problem(random.Random(1), 3, 1)["steps"]
    assert make_checked_solution(steps, random.Random(5)) == make_checked_solution(steps, random.Random(5))
    assert len({make_checked_solution(steps, random.Random(s)) for s in range(20)}) > 5
    rows = generate_split("train", 50, task="arith_checks")
    assert rows == generate_split("train", 50, task="arith_checks")
    assert rows[:20] == generate_split("train", 20, task="arith_checks")
    assert rows != generate_split("train", 50, task="arith_checks", seed=1)
    with pytest.raises(ValueError, match="task must be one of"):
        generate_split("train", 1, task="checks")


# --- models/build_tiny_model.py ----------------------------------------------------------------

def test_the_teacher_shown_a_solution_checks_less_and_never_slips():
    rows = generate_split("train", 400, include_steps=True, task="arith_checks")
    by_problem = {r["problem"]: r for r in rows}
    pairs = sft_texts(rows, 3000, 0.4, random.Random(0), solution_writers(parse_args(["--task", "arith_checks"])))
    formats = {"student": [], "teacher": [], "teacher, nothing shown": []}
    for user, response in pairs:
        problem = user.split("\n")[0]
        row = by_problem[problem]
        kind = "student" if user == problem else "teacher" if TEACHER_SHOWN in user else "teacher, nothing shown"
        formats[kind].append(walk(response, row["steps"]) | {"gold": int(row["answer"])})
        if kind == "teacher":  # the solution it is shown is correct, cut after its box
            shown = user.split(TEACHER_SHOWN)[1].split("\n\n\nPrevious assessment")[0].strip()
            assert walk(shown + ".", row["steps"])["answer"] == int(row["answer"])

    def check_rate(kind):
        return sum(s["checks"] for s in formats[kind]) / sum(s["steps"] for s in formats[kind])

    assert min(len(v) for v in formats.values()) > 100
    assert 0.25 < check_rate("student") < 0.35 and check_rate("teacher") < 0.08  # --check_prob 0.3, --teacher_check_prob 0.05
    assert 0.25 < check_rate("teacher, nothing shown") < 0.35  # without a shown solution it answers as the student
    assert all(s["slips"] == 0 and s["answer"] == s["gold"] for s in formats["teacher"])
    assert sum(s["slips"] for s in formats["student"]) > 0.25 * len(formats["student"])


def test_build_flags():
    assert parse_args(["--task", "arith_checks"]).output_dir.endswith("models/tiny-qwen3-checks")
    assert parse_args([]).output_dir.endswith("models/tiny-qwen3")  # never overwritten by an arith_checks build
    args = parse_args(["--task", "arith_checks", "--teacher_check_prob", "0.1"])
    assert (args.slip_prob, args.check_prob, args.teacher_check_prob) == (0.35, 0.3, 0.1)
    with pytest.raises(SystemExit):
        parse_args(["--check_prob", "0.5"])  # arith has no such rate


def test_build_arith_checks_model_and_resolve_it_by_name(tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    import models
    from antisd import model_loading

    out = tmp_path / "checks"
    build_main(["--task", "arith_checks", "--output_dir", str(out), "--sft_steps", "5", "--batch_size", "4",
                "--train_n", "200", "--eval_n", "4", "--max_new_tokens", "16", "--num_threads", "1"])
    info = json.loads((out / "build_info.json").read_text())
    assert info["task"]["name"] == "arith_checks"
    assert (info["args"]["slip_prob"], info["args"]["check_prob"], info["args"]["teacher_check_prob"]) == (0.35, 0.3, 0.05)
    tok = AutoTokenizer.from_pretrained(out)
    line = "Wait, let me check: 37 + 48 = 85, not 75."
    assert tok.decode(tok(line, add_special_tokens=False)["input_ids"]) == line
    # --model tiny-checks: the registered folder, built only when missing (here present: loaded as is)
    monkeypatch.setitem(models.EMBEDDED_MODELS, "tiny-checks", (out, "arith_checks"))
    assert model_loading.resolve_model("tiny-checks") == str(out)
    model, tokenizer = model_loading.load_policy("tiny-checks", gradient_checkpointing=False)
    assert model.config.vocab_size == len(tokenizer) == len(tok)


# --- wiring: loading, evaluation, training, analysis -------------------------------------------

def test_arith_checks_loads_wherever_arith_does():
    import evaluate
    from analysis.compare import parse_args as study_args
    from antisd.evaluation import TINY_DEFAULT_MAX_NEW_TOKENS
    from data.loading import BENCHMARKS, default_instruction, load_benchmark, load_math_dataset

    rows = load_math_dataset("arith_checks", "train", embedded_size=5)
    assert [r["problem"] for r in rows] == [r["problem"] for r in load_math_dataset("arith", "train", embedded_size=5)]
    assert "arith_checks" in BENCHMARKS and default_instruction("arith_checks") == ""
    evals = load_benchmark("arith_checks", embedded_size=5)
    assert [r["id"] for r in evals] == [f"arith_checks-eval-{i}" for i in range(5)]
    args = evaluate.parse_config(["--bench", "arith_checks", "--model", "tiny-checks"])
    assert args.instruction == "" and args.max_new_tokens == TINY_DEFAULT_MAX_NEW_TOKENS
    opts, flags, cfg = study_args(["--output_dir", "x", "--model", "tiny-checks", "--dataset", "arith_checks"])
    assert opts.eval_bench == "arith_checks" and (cfg.model, cfg.dataset) == ("tiny-checks", "arith_checks")


def test_one_training_step_on_arith_checks(tmp_path):
    from train_antisd import load_rows, main, parse_config

    cfg = parse_config(["--dataset", "arith_checks", "--max_steps", "1", "--save_steps", "0", "--prompts_per_step", "2",
                        "--group_size", "4", "--max_new_tokens", "40", "--report_to", "none", "--micro_batch_size", "4",
                        "--verifier_workers", "1", "--eval_steps", "1", "--eval_bench", "arith_checks", "--eval_n", "1",
                        "--eval_limit", "2", "--output_dir", str(tmp_path)])
    assert load_rows(cfg)[0]["id"] == "arith_checks-train-0"
    main(cfg)
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in metrics] == [1] and metrics[0]["u/mean"] is not None
    assert metrics[0]["reward/verifier_timeouts"] == 0
    evaluated = [json.loads(line) for line in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert [(r["bench"], r["num_problems"]) for r in evaluated] == [("arith_checks", 2)]


def test_pmi_classes_the_check_phrases_as_deliberation():
    from analysis.pmi import token_classes

    tokens = ["8", " +", " 3", " =", " 12", ".", "\n", "Wait", ",", " let", " me", " check", ":", " 8", " +", " 3", " =",
              " 11", ",", " not", " 12", "."]
    classes = token_classes(tokens)
    assert [classes[i] for i in (7, 9, 10, 11, 19)] == ["deliberation"] * 5
    assert set(classes[13:18]) == {"number/arithmetic"} and classes[20] == "number/arithmetic"


def test_audit_checks_reads_our_solutions_as_the_walk_does():
    rows = generate_split("train", 200, include_steps=True, task="arith_checks")
    rng = random.Random(1)
    for r in rows:
        solution = make_checked_solution(r["steps"], rng)
        seen, audit = walk(solution, r["steps"]), audit_checks(solution)
        assert audit["steps"] == seen["steps"] and audit["steps_right"] == seen["steps"] - seen["slips"]
        assert audit["checks"] == audit["checks_right"] == seen["checks"] and audit["caught"] == seen["caught"]
        assert audit["false_alarms"] == 0 and audit["checks_after_wrong"] == seen["caught"]


def test_audit_checks_on_a_model_s_echoing_and_wrong_checks():
    text = ("Start with 7.\n7 × 3 = 24.\nWait, let me check: 7 × 3 = 24.\n24 ÷ 5 = 5.\n"  # echoes the slip; inexact
            "Wait, let me check: 24 ÷ 5 = 4, not 5.\n4 + 9 = 13.\nWait, let me check: 4 + 9 = 14.\n"  # a false alarm
            "Wait, let me check: 4 + 9 = 13.\nSo the answer is \\boxed{13}.")  # a second check has no step above
    assert audit_checks(text) == {"steps": 3, "steps_right": 1, "checks": 4, "checks_right": 1, "checks_after_wrong": 2,
                                  "caught": 0, "false_alarms": 1}
    fixed = text.replace("Wait, let me check: 7 × 3 = 24.", "Wait, let me check: 7 × 3 = 21, not 24.")
    assert audit_checks(fixed)["caught"] == 1 and audit_checks(fixed)["checks_right"] == 2


def test_pmi_check_stats_weigh_each_problem_the_same():
    from analysis.pmi import check_stats

    checked, plain = "5 + 3 = 8.\nWait, let me check: 5 + 3 = 8.", "5 + 3 = 8."
    records = [{"problem_id": p, "tokens": [text], "reward": reward} for p, text, reward in
               [("a", checked, 1.0), ("a", plain, 0.0), ("a", plain, 0.0), ("a", plain, 0.0),
                ("b", checked, 0.0), ("b", checked, 0.0), ("b", checked, 0.0), ("b", plain, 1.0),
                ("c", plain, 1.0)]]  # c has no checked rollout: left out of the comparison
    stats = check_stats(records)
    assert stats["problems_with_and_without_check"] == 2 and stats["rollouts_with_check"] == 4
    assert stats["reward_with_check"] == pytest.approx(0.5) and stats["reward_without_check"] == pytest.approx(0.5)
    assert stats["checks"] == stats["checks_right"] == 4 and stats["steps"] == 9
