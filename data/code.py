"""Code datasets for training with the `code_tests` reward (verifiers/code_tests.py).

Every source becomes rows `{"id", "problem", "answer": None, "solution", "tests", "entry_point",
"test_setup"}`; `tests` is a list of assert lines or of `{"input", "output"}` pairs (stdin/stdout),
`solution` a reference program (may be None), `entry_point` the function's name (may be None).
Schemas read without any mapping:

- ours: `{problem, tests[, entry_point, solution, id]}` (problem as text or chat messages);
- MBPP (google-research, HF `mbpp`): `{task_id, text, code, test_list[, test_setup_code]}`;
- evalplus MBPP+/HumanEval+ (`MbppPlus-*.jsonl[.gz]`): `{task_id, prompt, entry_point,
  canonical_solution, assertion}`; the tests are its `assertion` lines (the base tests: the plus
  inputs have no expected outputs in the file, evaluate.py computes those for `--bench mbppplus`);
- Dolci-RL-Zero-Code (AllenAI, OLMo 3; `allenai/Dolci-RL-Zero-Code-7B`): `{id, prompt, solution,
  ground_truth}`. The columns are the dataset card's (huggingface.co/datasets/allenai/Dolci-RL-Zero-Code-7B,
  README.md `dataset_info`: id, solution, prompt: string; ground_truth: list of string). `ground_truth`
  holds one JSON string: an array of assert lines, or an array of `{"input", "output"}` dicts (the
  stdin/stdout suites), as AllenAI's open-instruct code verifier reads it (open_instruct/code_utils,
  `test["input"]`, `test["output"]`); some rows hold zlib+base64 pickled suites, which we never
  unpickle: such a row is a bad row (`--skip_bad_rows` drops them). The prompt's leading "user: " is dropped.

Other schemas map their columns: `columns={"problem": ..., "tests": ..., "entry_point": ...,
"solution": ...}` (training flags `--problem_column --tests_column --entry_point_column
--solution_column`). A row without a problem or usable tests stops loading with a `DataError` that
names the source, the row and the field, unless `skip_bad_rows`.
"""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

from data import code_arith
from data.loading import DataError, check_rows, dataset_name, deduplicate, last_user_turn, read_rows
from verifiers.code_tests import parse_tests


CODE_TASKS = (code_arith.TASK,)  # embedded code tasks
FIELDS = ("problem", "tests", "entry_point", "solution")
_ROLE_PREFIX = re.compile(r"^\s*user:\s*", re.I)


def _read(source: str, split: str, config_name: str | None) -> list[dict]:
    if source.endswith(".jsonl.gz"):  # evalplus ships its data gzipped; `datasets` reads it too, this keeps ids in order
        if not Path(source).is_file():
            raise DataError(f"{source}: no such file")
        with gzip.open(source, "rt", encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    return read_rows(source, split, config_name)


def _schema(raw: dict) -> dict[str, str | None]:
    """Our field -> the row's column for the schemas read without a mapping (module docstring)."""
    if "ground_truth" in raw and "prompt" in raw:  # Dolci-RL-Zero-Code
        return {"problem": "prompt", "tests": "ground_truth", "entry_point": None, "solution": "solution"}
    if "assertion" in raw and "canonical_solution" in raw:  # evalplus
        return {"problem": "prompt", "tests": "assertion", "entry_point": "entry_point", "solution": "canonical_solution"}
    if "test_list" in raw:  # MBPP
        return {"problem": "text" if "text" in raw else "prompt", "tests": "test_list", "entry_point": None, "solution": "code"}
    return {"problem": "problem" if "problem" in raw else "question" if "question" in raw else "prompt", "tests": "tests",
            "entry_point": "entry_point", "solution": "solution"}


def normalize_code_row(raw: dict, index: int, id_prefix: str, columns: dict[str, str] | None = None) -> dict:
    """One raw row -> a code row; `tests` left raw (parse_tests checks them in `code_row_defect`)."""
    names = _schema(raw)
    if columns:
        missing = [name for name in columns.values() if name not in raw]
        if missing:
            raise DataError(f"row {index}: no column {missing[0]!r} (columns: {sorted(raw)}); check --*_column")
        names.update(columns)
    value = {f: raw.get(c) if c else None for f, c in names.items()}
    problem = value["problem"]
    if isinstance(problem, list):  # chat messages
        problem = last_user_turn(problem)
    if isinstance(problem, str):
        problem = _ROLE_PREFIX.sub("", problem, count=1)
    entry = value["entry_point"] if isinstance(value["entry_point"], str) and value["entry_point"].strip() else None
    row_id = next((raw[k] for k in ("id", "task_id") if raw.get(k) is not None), None)
    return {"id": str(row_id) if row_id is not None else f"{id_prefix}-{index}", "problem": problem, "answer": None,
            "solution": value["solution"] if isinstance(value["solution"], str) else None, "tests": value["tests"],
            "entry_point": entry, "test_setup": raw.get("test_setup_code") or "", "_columns": names}


def code_row_defect(row: dict) -> str | None:
    """What is wrong with a normalized code row (naming the field and its column), or None; parses its tests."""
    columns = row.pop("_columns", {})
    if not isinstance(row["problem"], str) or not row["problem"].strip():
        return f"field 'problem' (column {columns.get('problem')!r}): missing or empty"
    if row["tests"] is None or row["tests"] == [] or row["tests"] == "":
        return f"field 'tests' (column {columns.get('tests')!r}): missing or empty"
    try:
        kind, cases = parse_tests(row["tests"])
    except ValueError as err:
        return f"field 'tests' (column {columns.get('tests')!r}): {err}"
    row["tests"] = cases
    if row["entry_point"] and f"{row['entry_point']}(" not in row["problem"]:
        row["problem"] += f"\nThe function should be called `{row['entry_point']}`."
    return None


def load_code_dataset(source: str, split: str = "train", *, skip_bad_rows: bool = False, embedded_size: int = 2000,
                      seed: int = 0, config_name: str | None = None, columns: dict[str, str] | None = None) -> list[dict]:
    """Code rows of an embedded code task, a local file or a hub dataset (module docstring)."""
    if source in CODE_TASKS:
        return code_arith.generate_split(split, embedded_size, seed=seed)
    id_prefix = dataset_name(source)
    try:
        rows = [normalize_code_row(raw, i, id_prefix, columns) for i, raw in enumerate(_read(source, split, config_name))]
    except DataError as err:
        raise DataError(f"{source}: {err}") from err
    return deduplicate(check_rows(rows, source, skip_bad_rows, code_row_defect,
                                  "Fix the row, map the column (--problem_column, --tests_column, ...) or pass --skip_bad_rows."))
