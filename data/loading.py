"""Dataset loading for training and evaluation, in one place.

Every source becomes a list of rows `{"id", "problem", "answer", "solution"}` (solution may be None):
- `arith` / `arith_checks`: the embedded tasks (data/arith.py), built from a seed, no files;
- a local `.jsonl` / `.json` / `.parquet` file with `{problem, answer[, solution, id]}` or the
  DAPO/verl schema (chat `prompt`, `reward_model.ground_truth`);
- a Hugging Face hub dataset id with either schema, e.g. `BytedTsinghua-SIA/DAPO-Math-17k`;
- a benchmark name from `BENCHMARKS` (evaluation), from the hub or from `data_file`.
Other schemas map their columns (`columns={"problem": "question", "answer": "final", ...}`, the
training flags `--problem_column` etc.); a problem given as chat messages is read as its last user turn.

Rows are checked before any work starts: a row without a problem or answer, or whose gold does not
parse as math, raises `DataError` naming source, row and field, unless `skip_bad_rows` is set (then
they are counted and logged). Repeated problems are dropped (the hub DAPO-Math-17k repeats each
prompt ~100x).
"""

from __future__ import annotations

import logging
import random
import re
from pathlib import Path

from data import arith, code_arith
from prompts import BOXED_INSTRUCTION, CODE_INSTRUCTION

logger = logging.getLogger(__name__)

EMBEDDED_TASKS = (*arith.TASKS, code_arith.TASK)  # code_arith: the embedded code task (data/code_arith.py)
LOCAL_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}

# name -> (hub id, split); every one of them also loads from a local file via `data_file`.
BENCHMARKS = {
    "aime2024": ("HuggingFaceH4/aime_2024", "train"),
    "aime2025": ("math-ai/aime25", "test"),
    "aime2026": ("math-ai/aime26", "test"),
    "hmmt2025": ("MathArena/hmmt_feb_2025", "train"),
    "minerva": ("math-ai/minervamath", "test"),
    **{task: (None, "eval") for task in EMBEDDED_TASKS},
}

# The DAPO template asks for "Answer: ..." lines; strip it so every dataset gets one instruction.
DAPO_PREFIX = re.compile(r"^Solve the following math problem step by step\..*?\n\n", re.DOTALL)
DAPO_SUFFIX = re.compile(r"\n\nRemember to put your answer on its own line after \"Answer:\"\.\s*$")
PLAIN_NUMBER = re.compile(r"^-?\d+(\.\d+)?$")


class DataError(ValueError):
    """A dataset row that cannot be used; the message names source, row and field."""


def default_instruction(source: str, code: bool = False) -> str:
    """The embedded models were trained on bare problems; everything else gets the boxed instruction
    (`code`: the code instruction, prompts.CODE_INSTRUCTION)."""
    return "" if source in EMBEDDED_TASKS else CODE_INSTRUCTION if code else BOXED_INSTRUCTION


def is_local_file(source: str) -> bool:
    return Path(source).suffix in LOCAL_SUFFIXES or Path(source).is_file()


def dataset_name(source: str) -> str:
    """A short name of a dataset source: a local file's stem, a hub id's last part, an embedded task's name."""
    return Path(source).stem if is_local_file(source) else source.rstrip("/").split("/")[-1]


def read_rows(source: str, split: str, config_name: str | None = None) -> list[dict]:
    """Raw rows of a local file or hub dataset (its subset `config_name`), through `datasets.load_dataset`."""
    import datasets

    if is_local_file(source):
        path = Path(source)
        if not path.is_file():
            raise DataError(f"{source}: no such file")
        builder = LOCAL_SUFFIXES.get(path.suffix, "json")
        return datasets.load_dataset(builder, data_files=str(path), split="train").to_list()
    try:
        return datasets.load_dataset(source, config_name, split=split).to_list()
    except Exception as err:  # offline machines land here: say what to do instead
        raise DataError(
            f"could not load {source!r} (split {split!r}) from the Hugging Face hub: {err}\n"
            "Without hub access pass a local .jsonl/.parquet file with {problem, answer} fields instead."
        ) from err


def last_user_turn(messages: list[dict]) -> str | None:
    return next((m.get("content") for m in reversed(messages) if m.get("role") == "user"), None)


def normalize_row(raw: dict, index: int, id_prefix: str, columns: dict[str, str] | None = None) -> dict:
    """Map a row to {id, problem, answer, solution}: through `columns` (field -> the dataset's column
    name) when given, else from either supported schema. A problem given as chat messages becomes
    the text of its last user turn."""
    if columns:
        missing = [name for name in columns.values() if name not in raw]
        if missing:
            raise DataError(f"row {index}: no column {missing[0]!r} (columns: {sorted(raw)}); check --*_column")
        raw = {**raw, **{field: raw[name] for field, name in columns.items()}}
        if isinstance(raw.get("problem"), list):
            raw["problem"] = last_user_turn(raw["problem"])
    if isinstance(raw.get("prompt"), list) and isinstance(raw.get("reward_model"), dict) and not columns:  # DAPO / verl
        extra = raw.get("extra_info") or {}
        problem = extra.get("raw_problem") or last_user_turn(raw["prompt"])
        if problem:
            problem = DAPO_SUFFIX.sub("", DAPO_PREFIX.sub("", problem))
        answer = raw["reward_model"].get("ground_truth")
    else:
        problem, answer = raw.get("problem") or raw.get("question"), raw.get("answer")
        if isinstance(problem, list):  # chat messages
            problem = last_user_turn(problem)
    row_id = next((raw[k] for k in ("id", "task_id", "problem_idx") if raw.get(k) is not None), None)
    return {
        "id": str(row_id) if row_id is not None else f"{id_prefix}-{index}",
        "problem": problem,
        "answer": None if answer is None else str(answer).strip(),
        "solution": raw.get("solution"),
    }


def row_defect(row: dict) -> str | None:
    """What is wrong with a normalized row, or None."""
    from verifiers.math import gold_parses

    for field in ("problem", "answer"):
        if not isinstance(row[field], str) or not row[field].strip():
            return f"field {field!r}: missing or empty"
    if not PLAIN_NUMBER.match(row["answer"]) and not gold_parses(row["answer"]):
        return f"field 'answer': gold {row['answer']!r} does not parse as math"
    return None


def check_rows(rows: list[dict], source: str, skip_bad_rows: bool, defect_of=None,
               fix: str = "Fix the row or pass --skip_bad_rows to drop such rows.") -> list[dict]:
    """The rows without a defect (`defect_of(row)`, default: a math row's); a bad row stops loading, naming
    source, row and field, unless `skip_bad_rows` (then they are dropped and counted)."""
    good, skipped = [], []
    for index, row in enumerate(rows):
        defect = (defect_of or row_defect)(row)
        if defect is None:
            good.append(row)
        elif skip_bad_rows:
            skipped.append(f"row {index} ({row['id']}): {defect}")
        else:
            raise DataError(f"{source}, row {index} (id {row['id']}): {defect}. {fix}")
    if skipped:
        logger.warning("%s: skipped %d bad rows; first: %s", source, len(skipped), "; ".join(skipped[:5]))
    if not good:
        raise DataError(f"{source}: no usable rows")
    return good


def deduplicate(rows: list[dict]) -> list[dict]:
    seen, unique = set(), []
    for row in rows:
        if row["problem"] not in seen:
            seen.add(row["problem"])
            unique.append(row)
    return unique


def load_math_dataset(source: str, split: str = "train", *, skip_bad_rows: bool = False,
                      embedded_size: int = 2000, seed: int = 0, config_name: str | None = None,
                      columns: dict[str, str] | None = None) -> list[dict]:
    """Rows of a training or evaluation dataset (see module docstring for `source`); `config_name`
    is a hub subset, `columns` maps problem/answer/solution to the dataset's own column names."""
    if source == code_arith.TASK:  # code rows (data/code.py)
        return code_arith.generate_split(split, embedded_size, seed=seed)
    if source in EMBEDDED_TASKS:
        return arith.generate_split(split, embedded_size, seed=seed, task=source)
    id_prefix = dataset_name(source)
    try:
        rows = [normalize_row(raw, i, id_prefix, columns) for i, raw in enumerate(read_rows(source, split, config_name))]
    except DataError as err:
        raise DataError(f"{source}: {err}") from err
    return deduplicate(check_rows(rows, source, skip_bad_rows))


def load_benchmark(name: str, data_file: str | None = None, *, skip_bad_rows: bool = False,
                   embedded_size: int = 200) -> list[dict]:
    """Rows of a math benchmark from `BENCHMARKS`: from `data_file` if given, else from the hub."""
    if name not in BENCHMARKS:
        raise DataError(f"unknown benchmark {name!r}; choose one of: {', '.join(sorted(BENCHMARKS))}")
    hub_id, split = BENCHMARKS[name]
    if name in EMBEDDED_TASKS and data_file is None:
        return load_math_dataset(name, split, embedded_size=embedded_size)
    try:
        return load_math_dataset(data_file or hub_id, split, skip_bad_rows=skip_bad_rows)
    except DataError as err:
        if data_file:
            raise
        raise DataError(f"{err}\nFor {name} pass e.g. --data_file ../shared/data/<file>.jsonl.") from err


def step_rows(seed: int, prompts_per_step: int, step: int, rank: int, world: int, num_rows: int, orders: dict) -> list[int]:
    """This process's rows of training `step`: prompts [step*P, (step+1)*P) of a seeded order of the rows per
    epoch (orders cached in `orders`), split evenly over the `world` processes."""
    per_rank = prompts_per_step // world
    first = step * prompts_per_step + rank * per_rank
    for epoch in {i // num_rows for i in range(first, first + per_rank)} - orders.keys():
        orders[epoch] = list(range(num_rows))
        random.Random(seed * 1_000_003 + epoch).shuffle(orders[epoch])
    return [orders[i // num_rows][i % num_rows] for i in range(first, first + per_rank)]
