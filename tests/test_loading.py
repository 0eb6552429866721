"""Dataset loading: local files of both schemas, bad rows, dedupe, benchmark files beside the repo."""

import json
from pathlib import Path

import pytest

from data.loading import BENCHMARKS, DataError, load_benchmark, load_math_dataset

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is absent")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_local_jsonl_plain_schema_and_dedupe(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [
        {"problem": "1+1?", "answer": "2", "solution": "1+1=\\boxed{2}"},
        {"problem": "1+1?", "answer": "2"},                       # repeated problem: dropped
        {"id": "q-7", "question": "Half of 1?", "answer": "\\frac{1}{2}"},
    ])
    rows = load_math_dataset(str(path))
    assert [r["id"] for r in rows] == ["train-0", "q-7"]
    assert rows[0]["solution"] == "1+1=\\boxed{2}" and rows[1]["solution"] is None
    assert rows[1]["problem"] == "Half of 1?" and rows[1]["answer"] == "\\frac{1}{2}"


def test_dapo_schema_parquet(tmp_path):
    import datasets

    prompt = ("Solve the following math problem step by step. The last line of your response should be of the form "
              "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\nWhat is 6*7?\n\n"
              "Remember to put your answer on its own line after \"Answer:\".")
    raw = [{"prompt": [{"role": "user", "content": prompt}], "reward_model": {"ground_truth": "42", "style": "rule"},
            "data_source": "math_dapo"}] * 3
    datasets.Dataset.from_list(raw).to_parquet(str(tmp_path / "dapo.parquet"))
    rows = load_math_dataset(str(tmp_path / "dapo.parquet"))
    assert len(rows) == 1 and rows[0]["problem"] == "What is 6*7?" and rows[0]["answer"] == "42"


def test_bad_rows_fail_loudly_or_are_skipped(tmp_path, caplog):
    path = write_jsonl(tmp_path / "bad.jsonl", [
        {"problem": "ok", "answer": "3"},
        {"problem": "no answer here"},
        {"problem": "broken gold", "answer": "\\frac{"},
    ])
    with pytest.raises(DataError, match=r"bad.jsonl, row 1 .*field 'answer': missing"):
        load_math_dataset(str(path))
    path2 = write_jsonl(tmp_path / "bad2.jsonl", [{"problem": "p", "answer": "3"}, {"problem": "q", "answer": "\\frac{"}])
    with pytest.raises(DataError, match=r"bad2.jsonl, row 1 .*does not parse"):
        load_math_dataset(str(path2))
    rows = load_math_dataset(str(path), skip_bad_rows=True)
    assert [r["problem"] for r in rows] == ["ok"]
    assert "skipped 2 bad rows" in caplog.text
    with pytest.raises(DataError, match="no such file"):
        load_math_dataset(str(tmp_path / "missing.jsonl"))


def test_benchmark_errors(tmp_path):
    with pytest.raises(DataError, match="unknown benchmark 'aime1999'.*aime2024"):
        load_benchmark("aime1999")
    rows = load_benchmark("arith", embedded_size=5)
    assert len(rows) == 5 and all(r["id"].startswith("arith-eval-") for r in rows)


@needs_shared
@pytest.mark.parametrize("bench,file,n", [("aime2024", "aime_2024.jsonl", 30), ("aime2025", "aime_2025.jsonl", 30),
                                          ("aime2026", "aime_2026.jsonl", 30), ("hmmt2025", "hmmt_feb_2025.jsonl", 30),
                                          ("minerva", "minerva_math.jsonl", 268)])
def test_benchmark_files_beside_the_repo(bench, file, n):
    rows = load_benchmark(bench, str(SHARED_DATA / file), skip_bad_rows=(bench == "minerva"))
    assert len(rows) == n and all(r["problem"] and r["answer"] for r in rows)
    assert bench in BENCHMARKS


@needs_shared
def test_minerva_golds_that_are_not_math_are_named():
    # 4 of 272 golds parse only as raw strings (e.g. np.arcsin(10/13)): rejected unless skipped
    with pytest.raises(DataError, match=r"minerva_math.jsonl, row 5 .*np.arcsin"):
        load_benchmark("minerva", str(SHARED_DATA / "minerva_math.jsonl"))


@needs_shared
def test_original_dapo_parquet_beside_the_repo():
    rows = load_math_dataset(str(SHARED_DATA / "orig" / "dapo_eval_aime-2024.parquet"))
    assert len(rows) == 30  # 960 rows = 30 problems x 32 copies
    assert not rows[0]["problem"].startswith("Solve the following")
