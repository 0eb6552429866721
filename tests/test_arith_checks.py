"""The task where deliberation changes the answer (data/arith.py `arith_checks`) and its model
(`build_tiny_model --task arith_checks`, `--model tiny-checks`)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import hashlib
import json
import random
import re

import pytest

from data.arith import (AUDIT_KEYS, CHECK_PROB, SLIP_PROB, apply, audit_checks, check_line, check_route, generate_split,
                        make_checked_solution, make_problem)
from models.build_tiny_model import main as build_main
from models.build_tiny_model import parse_args, sft_texts, solution_writers

EQUATION = re.compile(r"(\d+) ([+\-×÷]) (\d+) = (\d+)\.")
CHECK = re.compile(r"Wait, let me check: (\d+) ([+\-×÷]) (\d+): (.+), so (\d+)(?:, not (\d+))?\.")
OPS = {"+": ("+", lambda a, b: a + b), "-": ("-", lambda a, b: a - b), "×": ("*", lambda a, b: a * b),
       "÷": ("/", lambda a, b: a / b)}
TEACHER_SHOWN = "\nYour previous attempt:\n"


def route_value(a: int, op: str, b: int, route: str, facts: bool = False) -> int:
    """Re-read a check's route on its own: every part follows from the numbers before it and the
    parts give the value of `a op b`. `facts`: also assert that every part is a one-digit fact (a sum
    or difference of digits, a carry or borrow of at most 1, the next multiple of a one-digit number,
    a times-table product), as for every step of a problem (a slip's wrong value may leave the range)."""
    tens, units = divmod(a, 10)
    if op in "+-":
        m = re.fullmatch(rf"units (\d+) \{op} (\d+) = (\d+), tens (\d+) \{op} ([01]) = (\d+)", route)
        assert m, route
        u, x, s, t, c, r = map(int, m.groups())
        assert x == b and t == tens and r == OPS[op][1](t, c) and r >= 0 and (r <= 9 or not facts)
        if op == "+":
            assert u == units and s == u + x and c == s // 10
            return 10 * r + s % 10
        assert u == units + 10 * c and c == (units < b) and s == u - x and 0 <= s <= 9
        return 10 * r + s
    if op == "×":
        multiples = [int(v) for v in route.split(", ")]
        assert len(multiples) == b and multiples[0] == a and all(n - m == a for m, n in zip(multiples, multiples[1:]))
        assert a <= 9 or not facts
        return multiples[-1]
    m = re.fullmatch(r"(\d+) × (\d+) = (\d+)", route)
    assert m and int(m[1]) == b and int(m[3]) == a and int(m[1]) * int(m[2]) == a and (int(m[2]) <= 9 or not facts), route
    return int(m[2])


def walk(solution: str, steps: list) -> dict:
    """Re-read a checked solution line by line against `steps`: every equation continues from the
    value the solution holds, every check recomputes the equation above it; returns what happened."""
    lines = solution.split("\n")
    assert re.fullmatch(rf"(Start with|We begin with|At first there are) {steps[0][1]}\.", lines[0])
    value, step, last, seen = steps[0][1], 1, None, {"slips": 0, "caught": 0, "checks": 0, "steps": len(steps) - 1}
    for line in lines[1:-1]:
        if check := CHECK.fullmatch(line):
            a, op, b, route, result, not_written = int(check[1]), check[2], int(check[3]), check[4], int(check[5]), check[6]
            assert last is not None and (a, op, b) == last[:3], (line, solution)  # recomputes the step above
            assert result == OPS[op][1](a, b) == route_value(a, op, b, route), line
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
    assert abs(slipped - SLIP_PROB) < 0.05 and abs(checks - CHECK_PROB) < 0.05  # per solution, per step
    assert abs(wrong - SLIP_PROB * (1 - CHECK_PROB)) < 0.06 and any(s["caught"] for s in seen)  # a slip left unchecked
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
    assert abs(check_rate("student") - CHECK_PROB) < 0.05 and check_rate("teacher") < 0.08  # --teacher_check_prob 0.05
    assert abs(check_rate("teacher, nothing shown") - CHECK_PROB) < 0.05  # without a shown solution it answers as the student
    assert all(s["slips"] == 0 and s["answer"] == s["gold"] for s in formats["teacher"])
    assert abs(sum(s["slips"] for s in formats["student"]) / len(formats["student"]) - SLIP_PROB) < 0.06


def test_build_flags():
    assert parse_args(["--task", "arith_checks"]).output_dir.endswith("models/tiny-qwen3-checks")
    assert parse_args([]).output_dir.endswith("models/tiny-qwen3")  # never overwritten by an arith_checks build
    args = parse_args(["--task", "arith_checks", "--teacher_check_prob", "0.1"])
    assert (args.slip_prob, args.check_prob, args.teacher_check_prob) == (SLIP_PROB, CHECK_PROB, 0.1) == (0.65, 0.4, 0.1)
    assert (args.sft_steps, parse_args([]).sft_steps, parse_args(["--sft_steps", "7"]).sft_steps) == (4000, 1000, 7)
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
    assert (info["args"]["slip_prob"], info["args"]["check_prob"], info["args"]["teacher_check_prob"]) == (SLIP_PROB, CHECK_PROB, 0.05)
    assert set(info["eval_checks_t1"]) == set(AUDIT_KEYS)
    tok = AutoTokenizer.from_pretrained(out)
    line = "Wait, let me check: 47 + 8: units 7 + 8 = 15, tens 4 + 1 = 5, so 55, not 54."
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

    tokens = ["4", "7", " +", " 8", " =", " 5", "4", ".", "\n", "Wait", ",", " let", " me", " check", ":", " 4", "7", " +",
              " 8", ":", " units", " 7", " +", " 8", " =", " 1", "5", ",", " tens", " 4", " +", " 1", " =", " 5", ",", " so",
              " 5", "5", ",", " not", " 5", "4", "."]
    classes = token_classes(tokens)
    assert [classes[i] for i in (9, 11, 12, 13, 20, 28, 39)] == ["deliberation"] * 7
    assert {classes[i] for i in (15, 16, 17, 18, 21, 22, 23, 25, 26, 36, 37, 40, 41)} == {"number/arithmetic"}


# --- the check route and the audit -------------------------------------------------------------

def test_check_routes_recompute_every_step_in_one_digit_facts():
    """Every step the task can write (and every value a slip can leave) has a check whose route is
    made of one-digit facts and gives the step's value; the line names a slip's wrong value."""
    cases = [(a, "+", x) for a in range(0, 91) for x in range(2, 10) if a + x <= 99]
    cases += [(a, "-", x) for a in range(2, 100) for x in range(2, 10) if x <= a]
    cases += [(a, "*", x) for a in range(0, 10) for x in range(2, 6)]
    cases += [(q * x, "/", x) for x in range(2, 6) for q in range(1, 10)]
    symbol = {"+": "+", "-": "-", "*": "×", "/": "÷"}
    for a, op, x in cases:
        assert route_value(a, symbol[op], x, check_route(a, op, x), facts=True) == apply(op, a, x), (a, op, x)
        line = check_line(a, op, x, apply(op, a, x) + 1)
        m = CHECK.fullmatch(line)
        assert m and int(m[5]) == apply(op, a, x) and int(m[6]) == apply(op, a, x) + 1
        assert CHECK.fullmatch(check_line(a, op, x, apply(op, a, x)))[6] is None
    assert check_line(47, "+", 8, 54) == "Wait, let me check: 47 + 8: units 7 + 8 = 15, tens 4 + 1 = 5, so 55, not 54."
    assert check_line(43, "-", 8, 35) == "Wait, let me check: 43 - 8: units 13 - 8 = 5, tens 4 - 1 = 3, so 35."
    assert check_line(7, "*", 4, 28) == "Wait, let me check: 7 × 4: 7, 14, 21, 28, so 28."
    assert check_line(28, "/", 4, 6) == "Wait, let me check: 28 ÷ 4: 4 × 7 = 28, so 7, not 6."


def test_audit_checks_reads_our_solutions_as_the_walk_does():
    rows = generate_split("train", 200, include_steps=True, task="arith_checks")
    rng = random.Random(1)
    for r in rows:
        solution = make_checked_solution(r["steps"], rng)
        seen, audit = walk(solution, r["steps"]), audit_checks(solution)
        assert audit["steps"] == seen["steps"] and audit["steps_right"] == seen["steps"] - seen["slips"]
        assert audit["checks"] == audit["checks_right"] == seen["checks"] and audit["caught"] == seen["caught"]
        assert audit["turned_right_wrong"] == 0 and audit["after_wrong_step"] == seen["caught"]
        assert audit["after_right_step"] == seen["checks"] - seen["caught"]


def test_audit_checks_on_hand_made_rollouts():
    """A caught slip, a missed slip (the check echoes it), a false alarm, a garbled check, no check."""
    start, end = "Start with 47.\n", "\nSo the answer is \\boxed{55}."
    caught = start + "47 + 8 = 54.\nWait, let me check: 47 + 8: units 7 + 8 = 15, tens 4 + 1 = 5, so 55, not 54." + end
    missed = start + "47 + 8 = 54.\nWait, let me check: 47 + 8: units 7 + 8 = 14, tens 4 + 1 = 5, so 54." + end
    alarm = start + "47 + 8 = 55.\nWait, let me check: 47 + 8: units 7 + 8 = 15, tens 4 + 1 = 5, so 56, not 55." + end
    fine = start + "47 + 8 = 55.\nWait, let me check: 47 + 8: units 7 + 8 = 15, tens 4 + 1 = 5, so 55." + end
    garbled = start + "47 + 8 = 55.\nWait, let me check: 47 + 8: units 7 + 8 = 15, tens" + end
    unchecked = start + "47 + 8 = 54." + end

    def audit(text):
        a = audit_checks(text)
        return {k: a[k] for k in ("steps_right", "checks", "checks_right", "after_wrong_step", "caught", "after_right_step",
                                  "turned_right_wrong")}

    assert audit(caught) == dict(steps_right=0, checks=1, checks_right=1, after_wrong_step=1, caught=1, after_right_step=0,
                                 turned_right_wrong=0)
    assert audit(missed) == dict(steps_right=0, checks=1, checks_right=0, after_wrong_step=1, caught=0, after_right_step=0,
                                 turned_right_wrong=0)
    assert audit(alarm) == dict(steps_right=1, checks=1, checks_right=0, after_wrong_step=0, caught=0, after_right_step=1,
                                turned_right_wrong=1)
    assert audit(fine) == dict(steps_right=1, checks=1, checks_right=1, after_wrong_step=0, caught=0, after_right_step=1,
                               turned_right_wrong=0)
    assert audit(garbled)["checks"] == 1 and audit(garbled)["turned_right_wrong"] == 1  # no value: never right
    assert audit(unchecked) == dict(steps_right=0, checks=0, checks_right=0, after_wrong_step=0, caught=0, after_right_step=0,
                                    turned_right_wrong=0)
    # judged against the step above, not its own head; a second check has no step above: its own head
    other = start + "47 + 8 = 54.\nWait, let me check: 47 + 9: units 7 + 9 = 16, tens 4 + 1 = 5, so 56." + end
    assert audit(other)["after_wrong_step"] == 1 and audit(other)["caught"] == 0
    second = fine.replace(end, "\nWait, let me check: 47 + 8: units 7 + 8 = 15, tens 4 + 1 = 5, so 55." + end)
    assert audit(second)["checks"] == audit(second)["checks_right"] == 2 and audit(second)["after_right_step"] == 1
    inexact = "Start with 7.\n7 ÷ 2 = 3.\nWait, let me check: 7 ÷ 2: 2 × 3 = 6, so 3.\nSo the answer is \\boxed{3}."
    assert audit(inexact)["steps_right"] == 0 and audit(inexact)["caught"] == 0  # an inexact division is never right


def test_the_verifier_grades_a_checked_solution_by_its_box():
    from verifiers.math import is_correct

    rows = generate_split("train", 100, include_steps=True, task="arith_checks")
    rng = random.Random(2)
    for r in rows:
        solution = make_checked_solution(r["steps"], rng, slip_prob=0.5, check_prob=0.5)
        right = walk(solution, r["steps"])["answer"] == int(r["answer"])
        assert is_correct(solution, r["answer"]) == right
        assert audit_checks(solution)["checks"] == solution.count("Wait, let me check:")
    caught = ("Start with 47.\n47 + 8 = 54.\nWait, let me check: 47 + 8: units 7 + 8 = 15, tens 4 + 1 = 5, so 55, not 54.\n"
              "So the answer is \\boxed{55}.")
    assert is_correct(caught, "55") and not is_correct(caught, "54")
    assert not is_correct(caught.replace("\\boxed{55}", "\\boxed{54}"), "55")  # the box counts, not the check's value


def test_pmi_check_stats_are_the_five_numbers_and_weigh_each_problem_the_same():
    from analysis.pmi import check_details, check_stats

    checked = "47 + 8 = 55.\nWait, let me check: 47 + 8: units 7 + 8 = 15, tens 4 + 1 = 5, so 55."
    caught = "47 + 8 = 54.\nWait, let me check: 47 + 8: units 7 + 8 = 15, tens 4 + 1 = 5, so 55, not 54."
    alarm = "47 + 8 = 55.\nWait, let me check: 47 + 8: units 7 + 8 = 15, tens 4 + 1 = 5, so 56, not 55."
    plain = "47 + 8 = 55."
    records = [{"problem_id": p, "tokens": [text], "reward": reward, "u": [-1.0]} for p, text, reward in
               [("a", caught, 1.0), ("a", plain, 0.0), ("a", plain, 0.0), ("a", plain, 0.0),
                ("b", checked, 0.0), ("b", alarm, 0.0), ("b", checked, 0.0), ("b", plain, 1.0),
                ("c", plain, 1.0)]]  # c has no checked rollout: left out of the payoff
    stats = check_stats(records)
    assert list(stats) == ["checks", "after_wrong_step", "caught", "turned_right_wrong", "payoff_with_minus_without"]
    assert (stats["checks"], stats["after_wrong_step"], stats["caught"], stats["turned_right_wrong"]) == (4, 1, 1, 1)
    assert stats["payoff_with_minus_without"] == pytest.approx(((1 - 0) + (0 - 1)) / 2)  # problem a +1, problem b -1
    records[1]["reward"] = 1.0  # a: with 1, without 1/3: +2/3; pooled over rollouts it would differ
    assert check_stats(records)["payoff_with_minus_without"] == pytest.approx((2 / 3 - 1) / 2)
    details = check_details(records)
    assert details["problems_with_and_without_check"] == 2 and details["rollouts_with_check"] == 4
    assert details["after_right_step"] == 3 and details["steps"] == 9
    assert details["u_check_lines"]["tokens"] == 4 and details["u_check_lines"]["frac_u_negative"] == 1.0
    assert check_stats(records[-1:])["payoff_with_minus_without"] is None


def test_pmi_writes_the_premise_of_a_fair_check_into_stats(tmp_path):
    from analysis.pmi import main as pmi_main

    out = tmp_path / "pmi"
    assert pmi_main(["--model", "tiny-checks", "--dataset", "arith_checks", "--num_problems", "2", "--group_size", "4",
                     "--max_new_tokens", "96", "--cpu_threads", "1", "--output_dir", str(out)]) == 0
    stats = json.loads((out / "stats.json").read_text())
    assert list(stats["checks"]) == ["checks", "after_wrong_step", "caught", "turned_right_wrong", "payoff_with_minus_without"]
    records = [json.loads(line) for line in (out / "pmi.jsonl").read_text().splitlines()]
    assert stats["checks"]["checks"] == sum("".join(r["tokens"]).count("Wait, let me check:") for r in records)
    assert {"after_right_step", "u_check_lines", "u_check_opener"} <= set(stats["check_details"])
    assert "Checks (" in (out / "stats.md").read_text()
