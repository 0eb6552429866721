"""Code RL (issue 25): code rows from several schemas, the sandboxed `code_tests` reward, the teacher's
code context (a passing sibling + "Your code passes N of M test cases."), the embedded code task and
its tiny model in a short AntiSD run, and evaluate.py on that task."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from data import code_arith
from data.code import load_code_dataset
from data.loading import DataError
from verifiers.code_tests import CodeTester, CodeTestsReward, extract_program, parse_tests

REPO = Path(__file__).resolve().parents[1]
MBPP_PLUS = REPO.parent / "shared" / "data" / "mbpp_plus" / "MbppPlus-v0.2.0.jsonl.gz"
TESTS = ["assert f(0) == 2", "assert f(1) == 5", "assert f(2) == 8", "assert f(5) == 17"]


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# ------------------------------------------------------------------------------------------ loading
def test_code_rows_load_from_dolci_mbpp_and_our_schema(tmp_path):
    dolci = write_jsonl(tmp_path / "dolci.jsonl", [  # allenai/Dolci-RL-Zero-Code-7B: id, prompt, solution, ground_truth
        {"id": "d0", "prompt": "user: Write add(a, b).", "solution": "def add(a, b):\n    return a + b",
         "ground_truth": [json.dumps(["assert add(1, 2) == 3", "assert add(0, 0) == 0"])]},
        {"id": "d1", "prompt": "user: Read n, print 2n.", "solution": "print(2 * int(input()))",
         "ground_truth": [json.dumps([{"input": "3\n", "output": "6\n"}, {"input": "5\n", "output": "10\n"}])]},
    ])
    rows = load_code_dataset(dolci)
    assert rows[0]["problem"] == "Write add(a, b)." and rows[0]["tests"] == ["assert add(1, 2) == 3", "assert add(0, 0) == 0"]
    assert rows[0]["solution"].startswith("def add") and rows[0]["answer"] is None
    assert rows[1]["tests"] == [{"input": "3\n", "output": "6\n"}, {"input": "5\n", "output": "10\n"}]
    assert [p for p, _ in CodeTester(num_workers=1).run([r["solution"] for r in rows], [r["tests"] for r in rows])] == [2, 2]

    mbpp = write_jsonl(tmp_path / "mbpp.jsonl", [{"task_id": 7, "text": "Double a number.", "code": "def dbl(x): return 2*x",
                                                  "test_list": ["assert dbl(2) == 4", "assert dbl(0) == 0"]}])
    assert load_code_dataset(mbpp)[0] == {"id": "7", "problem": "Double a number.", "answer": None,
                                               "solution": "def dbl(x): return 2*x", "tests": ["assert dbl(2) == 4", "assert dbl(0) == 0"],
                                               "entry_point": None, "test_setup": ""}
    ours = write_jsonl(tmp_path / "ours.jsonl", [{"problem": [{"role": "user", "content": "Square x."}],
                                                  "tests": "assert sq(3) == 9\nassert sq(0) == 0", "entry_point": "sq"}])
    row = load_code_dataset(ours)[0]
    assert row["tests"] == ["assert sq(3) == 9", "assert sq(0) == 0"] and row["problem"].endswith("called `sq`.")
    mapped = write_jsonl(tmp_path / "mapped.jsonl", [{"q": "Cube x.", "checks": ["assert cube(2) == 8"], "fn": "cube"}])
    row = load_code_dataset(mapped, columns={"problem": "q", "tests": "checks", "entry_point": "fn"})[0]
    assert row["tests"] == ["assert cube(2) == 8"] and row["entry_point"] == "cube"


@pytest.mark.skipif(not MBPP_PLUS.is_file(), reason="needs ../shared/data (MBPP+ in evalplus format)")
def test_code_rows_load_from_evalplus_mbpp_plus():
    rows = load_code_dataset(str(MBPP_PLUS))
    assert len(rows) == 378 and rows[0]["id"] == "Mbpp/2" and rows[0]["entry_point"] == "similar_elements"
    assert all(r["tests"] and all("assert " in t for t in r["tests"]) for r in rows)
    sphere = next(r for r in rows if r["id"] == "Mbpp/82")  # `import math` before its asserts: run before each
    assert sphere["tests"][0].startswith("import math\nassert math.isclose(volume_sphere(10)")
    some = rows[:3] + [sphere]
    passed = CodeTester(num_workers=2).run([r["solution"] for r in some], [r["tests"] for r in some])
    assert all(p == t for p, t in passed)  # the canonical solutions pass their own base tests


def test_a_missing_field_names_file_row_and_field(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"problem": "ok", "tests": ["assert 1"]}, {"problem": "no tests"}])
    with pytest.raises(DataError, match=r"bad\.jsonl, row 1 \(id bad-1\): field 'tests' \(column 'tests'\): missing"):
        load_code_dataset(path)
    assert len(load_code_dataset(path, skip_bad_rows=True)) == 1
    pickled = write_jsonl(tmp_path / "dolci_pickled.jsonl", [{"id": "p", "prompt": "x", "solution": "", "ground_truth": ["eJzLSM3JyQcABiwCFQ=="]}])
    with pytest.raises(DataError, match=r"row 0 \(id p\): field 'tests' \(column 'ground_truth'\).*not read"):
        load_code_dataset(pickled)
    empty = write_jsonl(tmp_path / "empty.jsonl", [{"problem": "", "tests": ["assert 1"]}])
    with pytest.raises(DataError, match=r"row 0 .*field 'problem'"):
        load_code_dataset(empty)
    with pytest.raises(DataError, match=r"row 0: no column 'checks'"):
        load_code_dataset(empty, columns={"tests": "checks"})


def test_parse_tests_and_extract_program():
    assert parse_tests({"cases": TESTS}) == ("assert", TESTS)
    assert parse_tests('[{"input": "1", "output": "2"}]') == ("stdio", [{"input": "1", "output": "2"}])
    with pytest.raises(ValueError):
        parse_tests([1, 2])
    body = "def f(x):\n    return x"
    assert extract_program(f"Here:\n```python\n{body}\n```\nDone.") == body
    assert extract_program(f"```\nold\n```\n```python\n{body}\n```") == body  # the last python block
    assert extract_program(f"<think>```python\nwrong\n```</think>\n{body}") == body  # bare def after thinking
    assert extract_program(f"```python\n{body}") == body  # unclosed (truncated) fence
    assert extract_program("no code here") == ""


# ------------------------------------------------------------------------------------------ the reward
def test_code_tests_reward_on_hand_written_programs(tmp_path):
    marker = tmp_path / "escaped"
    programs = {
        "right": "```python\ndef f(x):\n    return x * 3 + 2\n```",
        "partly right": "def f(x):\n    return x * 3 + 2 if x < 2 else 0",  # bare def, passes f(0), f(1)
        "wrong": "```python\ndef f(x):\n    return x - 1\n```",
        "syntax error": "```python\ndef f(x) return\n```",
        "hanging": "```python\ndef f(x):\n    while True:\n        pass\n```",
        "hostile": ("```python\nimport os, signal, socket\n"
                    f"try:\n    open({str(marker)!r}, 'w').write('escaped')\nexcept OSError:\n    pass\n"
                    "try:\n    socket.create_connection(('1.1.1.1', 53), timeout=1)\nexcept OSError:\n    pass\n"
                    "def f(x):\n    os.kill(os.getppid(), signal.SIGKILL)\n```"),
    }
    reward = CodeTestsReward(tester=CodeTester(num_workers=2))
    scores = dict(zip(programs, reward(list(programs.values()), [TESTS] * len(programs))))
    assert scores == {"right": 1.0, "partly right": 0.5, "wrong": 0.0, "syntax error": 0.0, "hanging": 0.0, "hostile": 0.0}
    assert reward.counts == [(4, 4), (2, 4), (0, 4), (0, 4), (0, 4), (0, 4)]
    assert not marker.exists()  # nothing outside the sandbox changed
    binary = CodeTestsReward("binary", CodeTester(num_workers=2))
    assert binary(list(programs.values())[:3], [TESTS] * 3) == [1.0, 0.0, 0.0] and binary.counts[1] == (2, 4)
    stdio = [{"input": "3\n", "output": "6"}, {"input": "4\n", "output": "8\n"}, {"input": "1", "output": "3"}]
    assert CodeTester(num_workers=1).run_one("print(int(input()) * 2)", stdio)[:2] == (2, 3)


# ------------------------------------------------------------------------------------------ the teacher's context
def test_teacher_prompt_of_a_code_rollout_shows_a_passing_sibling_and_passes_n_of_m():
    from transformers import AutoTokenizer

    import train_antisd
    from antisd.generation import Samples
    from models import EMBEDDED_MODELS

    tokenizer = AutoTokenizer.from_pretrained(EMBEDDED_MODELS["tiny"][0])
    rows = [{"problem": "P0", "solution": "REFERENCE-0", "tests": TESTS}]
    texts = ["```python\nPASSING\n```", "```python\nHALF\n```", "```python\nNONE\n```", "```python\nALMOST\n```"]
    rollout = Samples([[1]] * 4, [[2]] * 4, [False] * 4, texts)
    counts = [(4, 4), (2, 4), (0, 4), (3, 4)]
    cfg = train_antisd.parse_config(["--group_size", "4", "--dataset", "code_arith"])
    assert cfg.reward_funcs == ["code_tests"]  # the embedded code task's default reward
    rewards = [p / t for p, t in counts]
    teacher = [tokenizer.decode(ids) for ids in
               train_antisd.teacher_prompts(cfg, tokenizer, 0, 0, rows, ["P0"], [0], rollout, rewards, counts)]
    for text, (passed, total) in zip(teacher[1:], counts[1:]):
        assert "PASSING" in text and f"Previous assessment: Your code passes {passed} of {total} test cases." in text
    assert "REFERENCE-0" in teacher[0] and "Your code passes 4 of 4 test cases." in teacher[0]  # no other passing one
    # 3 of 4 tests (reward 0.75 > 0.5) is not correct: only a program that passes every test is shown
    assert all("ALMOST" not in t.split("Previous assessment")[0].split("P0", 1)[1] for t in teacher[:3])


# ------------------------------------------------------------------------------------------ the embedded task
def test_code_arith_rows_have_partial_credit_structure():
    rows = code_arith.generate_split("train", 200)
    assert all(len(r["tests"]) == code_arith.NUM_TESTS and r["entry_point"] == "f" for r in rows)
    evals = code_arith.generate_split("eval", 50)
    assert not {r["problem"] for r in evals} & {r["problem"] for r in code_arith.generate_split("train", 2000)}
    piecewise = [r for r in rows if "Otherwise" in r["problem"]]
    assert 60 < len(piecewise) < 140
    programs = [extract_program(r["solution"]) for r in rows[:6]]
    assert all(p == t for p, t in CodeTester(num_workers=2).run(programs, [r["tests"] for r in rows[:6]]))
    row = next(r for r in code_arith.generate_split("train", 50, include_steps=True) if r["spec"]["cond"])
    half = code_arith.code({**row["spec"], "else": [["+", 100]]})  # one branch wrong: some tests pass, not all
    passed, total = CodeTester(num_workers=1).run([half], [row["tests"]])[0]
    assert 2 <= passed < total


def test_short_antisd_run_on_the_embedded_code_task_logs_code_tests(tmp_path):
    cmd = [sys.executable, str(REPO / "train_antisd.py"), "--model", "tiny-code", "--dataset", "code_arith",
           "--max_steps", "2", "--prompts_per_step", "2", "--group_size", "4", "--max_new_tokens", "48",
           "--gate_warmup_steps", "1", "--report_to", "none", "--save_steps", "0", "--cpu_threads", "1",
           "--verifier_workers", "2", "--log_completions", "2", "--output_dir", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all("reward/code_tests" in r and 0 <= r["reward/code_tests"] <= 1 for r in rows)
    assert rows[1]["gate/lambda"] in (0.0, 0.5) and rows[1]["teacher/entropy_median"] is not None


def test_evaluate_scores_the_embedded_code_task(tmp_path):
    rows = code_arith.generate_split("eval", 2)
    samples = tmp_path / "samples.jsonl"
    write_jsonl(samples, [{"id": rows[0]["id"], "completion": rows[0]["solution"]},
                          {"id": rows[0]["id"], "completion": "```python\ndef f(x):\n    return 0\n```"},
                          {"id": rows[1]["id"], "completion": rows[1]["solution"]}])
    proc = subprocess.run([sys.executable, str(REPO / "evaluate.py"), "--bench", "code_arith", "--samples", str(samples),
                           "--num_workers", "2"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["num_problems"] == 2 and results["avg"] == pytest.approx(0.75)
