"""evaluate.py: pass@k, scoring saved samples (math and MBPP+), errors, resumable generation with the tiny model."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from antisd.evaluation import EvalConfig, pass_at_k, summarize
from evaluate import main, parse_config
from prompts import BOXED_INSTRUCTION

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
MBPP_FILE = DATA / "mbpp_plus" / "MbppPlus-v0.2.0.jsonl.gz"
AIME_2025 = DATA / "aime_2025.jsonl"


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def results_of(out_dir: Path) -> dict:
    return json.loads((out_dir / "results.json").read_text())


# ---------------------------------------------------------------------------------------------- pass@k
@pytest.mark.parametrize("n,c,k,expected", [
    (4, 1, 1, 0.25), (4, 1, 2, 0.5), (4, 0, 1, 0.0), (4, 0, 4, 0.0), (4, 4, 1, 1.0), (4, 4, 4, 1.0),
    (4, 1, 4, 1.0), (10, 3, 5, 1 - 21 / 252), (10, 3, 1, 0.3), (1, 1, 1, 1.0), (1, 0, 1, 0.0),
])
def test_pass_at_k_hand_computed(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_matches_binomials_and_is_stable():
    for n in range(1, 12):
        for c in range(n + 1):
            for k in range(1, n + 1):
                exact = 1 - math.comb(n - c, k) / math.comb(n, k)
                assert pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12)
    assert 0.0 <= pass_at_k(1024, 1, 512) <= 1.0 and pass_at_k(1024, 1, 512) == pytest.approx(0.5)
    for bad in [(4, 1, 5), (4, 5, 1), (4, 1, 0)]:
        with pytest.raises(ValueError):
            pass_at_k(*bad)


def test_summarize_uneven_n():
    probs = [{"id": "a", "n": 4, "correct": 2}, {"id": "b", "n": 2, "correct": 1}, {"id": "c", "n": 1, "correct": 0}]
    res = summarize("x", probs, [1, 2, 4, 8])
    assert res["bench"] == "x" and res["n"] == 4 and res["n_min"] == 1 and res["num_problems"] == 3
    assert res["avg"] == pytest.approx(1 / 3)
    assert res["pass_at_k"] == pytest.approx({"1": 1 / 3, "2": (5 / 6 + 1) / 2, "4": 1.0})
    assert res["pass_at_k_num_problems"] == {"1": 3, "2": 2, "4": 1}  # k=8: above every n, left out
    assert res["problems"] == probs


# ---------------------------------------------------------------------------------------------- --samples (math)
BENCH_ROWS = [
    {"id": "half", "problem": "What is 1/2 as a decimal?", "answer": "0.5"},
    {"id": "answer", "problem": "What is 6 times 7?", "answer": "42"},
    {"id": "seven", "problem": "What is 3 + 4?", "answer": "7"},
    {"id": "unused", "problem": "What is 1 + 1?", "answer": "2"},
]
SAMPLES = [
    {"id": "half", "completion": "So the answer is \\boxed{\\frac{1}{2}}."},  # equivalent form: right
    {"id": "half", "completion": "\\boxed{0.5}"},  # right
    {"id": "half", "completion": "\\boxed{3}"},  # wrong
    {"id": "half", "completion": ""},  # empty
    {"id": "answer", "completion": "<think>\\boxed{41}</think> The answer is \\boxed{42}."},  # right
    {"id": "answer", "completion": "I think it is 42."},  # no box: wrong
    {"id": "seven", "completion": "\\boxed{8} \x00 }}}{{{ garbage \\boxed{"},  # garbage: wrong
]


def test_score_samples_file(tmp_path, capsys):
    bench = write_jsonl(tmp_path / "bench.jsonl", BENCH_ROWS)
    samples = write_jsonl(tmp_path / "samples.jsonl", SAMPLES)
    out = tmp_path / "out"
    rc = main(["--bench", "aime2025", "--data_file", str(bench), "--samples", str(samples), "--k", "1", "2", "4",
               "--output_dir", str(out), "--num_workers", "1"])
    assert rc == 0, capsys.readouterr().err
    res = results_of(out)
    assert res["bench"] == "aime2025" and res["num_problems"] == 3 and res["n"] == 4
    assert [(p["id"], p["n"], p["correct"]) for p in res["problems"]] == [("half", 4, 2), ("answer", 2, 1), ("seven", 1, 0)]
    assert res["problems"][0]["scores"] == [1.0, 1.0, 0.0, 0.0]
    assert res["avg"] == pytest.approx((2 / 4 + 1 / 2 + 0) / 3)
    assert res["pass_at_k"] == pytest.approx({"1": 1 / 3, "2": (5 / 6 + 1) / 2, "4": 1.0})
    assert res["pass_at_k_num_problems"] == {"1": 3, "2": 2, "4": 1}
    printed = capsys.readouterr().out
    assert "| bench | problems | n | avg@1-4 | pass@1 | pass@2 | pass@4 |" in printed
    assert "n >= k only" in printed
    settings = json.loads((out / "settings.json").read_text())
    assert settings["mode"] == "score_samples" and settings["samples"] == str(samples)


def test_score_samples_default_ks_and_output_dir(tmp_path, capsys):
    bench = write_jsonl(tmp_path / "bench.jsonl", BENCH_ROWS)
    (tmp_path / "run").mkdir()
    samples = write_jsonl(tmp_path / "run" / "samples.jsonl", [s for s in SAMPLES if s["id"] == "half"])
    assert main(["--bench", "aime2024", "--data_file", str(bench), "--samples", str(samples), "--num_workers", "1"]) == 0
    res = results_of(tmp_path / "run")  # default: next to the samples file
    assert res["n"] == 4 and res["pass_at_k"] == pytest.approx({"1": 0.5, "4": 1.0})


def test_unknown_ids_are_named(tmp_path, capsys):
    bench = write_jsonl(tmp_path / "bench.jsonl", BENCH_ROWS)
    samples = write_jsonl(tmp_path / "samples.jsonl", SAMPLES + [{"id": "nope", "completion": "x"},
                                                                 {"id": "aime-99", "completion": "y"}])
    rc = main(["--bench", "aime2025", "--data_file", str(bench), "--samples", str(samples), "--output_dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and "2 id(s) not in aime2025" in err and "nope, aime-99" in err and "Traceback" not in err


def test_samples_line_without_completion(tmp_path, capsys):
    bench = write_jsonl(tmp_path / "bench.jsonl", BENCH_ROWS)
    samples = write_jsonl(tmp_path / "samples.jsonl", [SAMPLES[0], {"id": "half"}])
    rc = main(["--bench", "aime2025", "--data_file", str(bench), "--samples", str(samples), "--output_dir", str(tmp_path)])
    assert rc == 2 and "line 2" in capsys.readouterr().err


def test_data_file_missing_field_names_row_and_field(tmp_path, capsys):
    bench = write_jsonl(tmp_path / "bench.jsonl", [BENCH_ROWS[0], {"id": "broken", "problem": "What?"}])
    samples = write_jsonl(tmp_path / "samples.jsonl", SAMPLES[:1])
    rc = main(["--bench", "hmmt2025", "--data_file", str(bench), "--samples", str(samples), "--output_dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and "row 1" in err and "'answer'" in err and "broken" in err and "Traceback" not in err


def test_unknown_bench_lists_choices(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--bench", "gsm8k", "--model", "tiny"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "invalid choice" in err
    assert all(name in err for name in ["aime2024", "aime2025", "aime2026", "hmmt2025", "minerva", "mbppplus", "arith"])


def test_config_file_then_cli_flags(tmp_path, capsys):
    config = tmp_path / "eval.yaml"
    config.write_text("bench: aime2025\nmodel: tiny\nn: 3\nk: [1, 2]\nenable_thinking: true\ntemperature: 1.0\n")
    cfg = parse_config(["--config", str(config), "--n", "5", "--no-enable_thinking", "--max-new-tokens", "7"])
    assert (cfg.bench, cfg.model, cfg.n, cfg.k, cfg.enable_thinking, cfg.temperature, cfg.max_new_tokens) == \
           ("aime2025", "tiny", 5, [1, 2], False, 1.0, 7)
    assert cfg.instruction == BOXED_INSTRUCTION and cfg.output_dir == str(Path("outputs/eval/aime2025-tiny"))
    assert parse_config(["--config", str(config), "--bench", "arith", "--enable_thinking"]).enable_thinking is True
    assert parse_config(["--bench", "arith", "--model", "tiny"]).enable_thinking is None

    config.write_text("bench: aime2025\nmodel: tiny\nnum_sample: 3\ntemprature: 1.0\n")
    with pytest.raises(SystemExit, match=r"eval\.yaml: unknown config keys \['num_sample', 'temprature'\]"):
        parse_config(["--config", str(config)])
    config.write_text("bench: gsm8k\nmodel: tiny\n")
    with pytest.raises(SystemExit, match="bench must be one of"):
        parse_config(["--config", str(config)])

    for argv, message in [(["--bench", "arith"], "--model is required unless --samples is given"),
                          (["--bench", "arith", "--model", "tiny", "--k", "0"], "--n, --k and --limit must be >= 1")]:
        with pytest.raises(SystemExit) as exc:
            parse_config(argv)
        assert exc.value.code == 2 and message in capsys.readouterr().err


def test_help_shows_docstring_and_every_default(capsys):
    import evaluate

    with pytest.raises(SystemExit) as exc:
        parse_config(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert evaluate.__doc__.split("\n\n")[1] in text  # the usage examples, indented as written
    blocks = {}  # first option string -> its help entry
    for entry in text.split("options:")[1].split("\n  -")[1:]:
        blocks[entry.split()[0].rstrip(",")] = " ".join(entry.split())
    for name in EvalConfig.__dataclass_fields__:
        assert "(default: " in blocks[f"-{name}"], name


def test_no_hub_no_data_file_says_how(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    env["HF_ENDPOINT"] = "http://127.0.0.1:9"  # no hub here: must fail at once, not after retries
    start = time.time()
    proc = subprocess.run([sys.executable, str(REPO / "evaluate.py"), "--bench", "aime2025", "--model", "tiny",
                           "--output_dir", str(tmp_path)], cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "--data_file" in proc.stderr and "Traceback" not in proc.stderr
    assert time.time() - start < 20


# ---------------------------------------------------------------------------------------------- MBPP+
@pytest.mark.skipif(not MBPP_FILE.is_file(), reason="../shared/data/mbpp_plus not present")
def test_mbpp_plus_samples(tmp_path, capsys):
    from verifiers.mbpp import load_mbpp_plus

    tasks = load_mbpp_plus(str(MBPP_FILE))
    good = {tid: f"Here you go:\n```python\n{tasks[tid]['canonical_solution'].strip()}\n```\n"
            for tid in ("Mbpp/2", "Mbpp/3", "Mbpp/4")}
    broken = good["Mbpp/3"].replace("int(math.sqrt(n))+1", "int(math.sqrt(n))")  # misses squares: 4, 9, ...
    assert broken != good["Mbpp/3"]
    samples = write_jsonl(tmp_path / "samples.jsonl", [
        {"id": "Mbpp/2", "completion": good["Mbpp/2"]},
        {"id": "Mbpp/3", "completion": broken},
        {"id": "Mbpp/4", "completion": good["Mbpp/4"]},
        {"id": "Mbpp/4", "completion": "import os\nos.system('echo hi') # no function here"},
    ])
    out = tmp_path / "out"
    rc = main(["--bench", "mbppplus", "--data_file", str(MBPP_FILE), "--samples", str(samples),
               "--output_dir", str(out), "--cache_dir", str(tmp_path / "cache"), "--k", "1", "2"])
    assert rc == 0, capsys.readouterr().err
    res = results_of(out)
    assert [(p["id"], p["n"], p["correct"]) for p in res["problems"]] == [("Mbpp/2", 1, 1), ("Mbpp/3", 1, 0), ("Mbpp/4", 2, 1)]
    assert res["avg"] == pytest.approx((1 + 0 + 0.5) / 3)
    assert res["pass_at_k"] == pytest.approx({"1": 0.5, "2": 1.0})
    assert len(list((tmp_path / "cache" / "mbpp_gt").iterdir())) == 3  # ground truth only for the tasks scored


# ---------------------------------------------------------------------------------------------- generation (tiny model)
TINY = ["--model", "tiny", "--bench", "arith", "--limit", "4", "--n", "2", "--max_new_tokens", "32", "--batch_size", "8",
        "--num_workers", "1"]


def test_resume_generates_only_missing_samples(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(TINY + ["--output_dir", str(out)]) == 0
    lines = (out / "samples.jsonl").read_text().splitlines()
    assert len(lines) == 8 and results_of(out)["generated"] == 8
    first = [json.loads(line) for line in lines]
    assert all(set(s) >= {"id", "completion", "sample_index", "truncated"} for s in first)

    # a kill in the middle of the second batch: 5 whole lines and a torn one survive
    (out / "samples.jsonl").write_text("\n".join(lines[:5]) + "\n" + lines[5][:20])
    capsys.readouterr()
    assert main(TINY + ["--output_dir", str(out)]) == 0
    assert "5 samples already in" in capsys.readouterr().out
    res = results_of(out)
    assert res["generated"] == 3 and res["num_problems"] == 4 and res["n"] == 2
    after = read_jsonl(out / "samples.jsonl")
    assert after[:5] == first[:5] and len(after) == 8
    assert sorted((s["id"], s["sample_index"]) for s in after) == sorted((s["id"], s["sample_index"]) for s in first)
    assert [p["n"] for p in res["problems"]] == [2, 2, 2, 2]
    assert set(res["pass_at_k"]) == {"1", "2"} and 0.0 <= res["avg"] <= 1.0

    assert main(TINY + ["--output_dir", str(out)]) == 0  # complete: nothing generated, same results
    again = results_of(out)
    assert again["generated"] == 0 and again["problems"] == res["problems"]

    # asking for more samples tops the problems up (the decoding does not shape what is sampled: the top-up
    # decodes with `shrink`); other sampling settings are refused
    assert main(TINY[:-6] + ["--n", "3", "--max_new_tokens", "32", "--transformers_decoding", "shrink",
                             "--output_dir", str(out)]) == 0
    assert results_of(out)["generated"] == 4 and len(read_jsonl(out / "samples.jsonl")) == 12
    capsys.readouterr()
    assert main(TINY + ["--temperature", "1.0", "--output_dir", str(out)]) == 2
    assert "temperature" in capsys.readouterr().err


@pytest.mark.skipif(not AIME_2025.is_file(), reason="../shared/data not present")
def test_aime2025_end_to_end_with_tiny_model(tmp_path):
    out = tmp_path / "aime"
    proc = subprocess.run([sys.executable, str(REPO / "evaluate.py"), "--bench", "aime2025", "--data_file", str(AIME_2025),
                           "--model", "tiny", "--n", "2", "--max_new_tokens", "64", "--limit", "3",
                           "--output_dir", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    res = results_of(out)
    assert res["num_problems"] == 3 and res["n"] == 2 and set(res["pass_at_k"]) == {"1", "2"}
    assert [p["id"] for p in res["problems"]] == ["aime2025-I-1", "aime2025-I-2", "aime2025-I-3"]
    assert len(read_jsonl(out / "samples.jsonl")) == 6
    assert "| aime2025 | 3 | 2 |" in proc.stdout
    settings = json.loads((out / "settings.json").read_text())
    assert settings["instruction"] == BOXED_INSTRUCTION and settings["mode"] == "generate"
