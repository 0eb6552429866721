"""MBPP+ checks with evalplus semantics, every program run in the sandbox (verifiers/sandbox.py).

:func:`load_mbpp_plus`, :func:`mbpp_groundtruth` (canonical solutions run *in the sandbox*, cached
per task under a user cache dir, never in the repo), :func:`check_mbpp_sample` (evalplus
``sanitize`` + one sandboxed process per sample running all base and plus inputs with evalplus's
per-input time limits and ``reliability_guard``; the program only returns its outputs -- the
expected outputs never enter the untrusted process, and the comparison runs in the parent with
evalplus's semantics: special oracles, ``is_floats``, ``np.allclose``; an output whose pickle
exceeds 1 MiB, e.g. Mbpp/255's, is compared by a SHA-256 of its memo-free pickle, i.e. exactly).
Completions longer than 100 lines are cut to their longest fenced code block (else their tail)
before ``sanitize``, whose cost is cubic in the line count.

The program that runs in the sandbox is verifiers/sandbox_harness.py, shipped as text; its value
codec is imported here, so both ends share one format.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import os
import re
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from verifiers import sandbox_harness
from verifiers.sandbox import SandboxResult, run_sandboxed
from verifiers.sandbox_harness import Digest, NotNone, decode_output, decode_output_or_opaque, encode_value

__all__ = ["load_mbpp_plus", "mbpp_groundtruth", "check_mbpp_sample", "extract_code", "default_cache_dir"]


# --------------------------------------------------------------------------------------------------
# Running the harness
# --------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _harness_source() -> str:
    return Path(sandbox_harness.__file__).read_text(encoding="utf-8")


def _evalplus_utils_path() -> str | None:
    try:
        import importlib.util

        spec = importlib.util.find_spec("evalplus")
        if spec and spec.origin:
            p = os.path.join(os.path.dirname(spec.origin), "eval", "utils.py")
            return p if os.path.exists(p) else None
    except Exception:  # noqa: BLE001
        pass
    return None


def _run_harness(job: dict, *, timeout_s: float, memory_mb: int, max_procs: int,
                 max_output_bytes: int) -> tuple[list[dict], SandboxResult]:
    job = dict(job)
    job["evalplus_utils"] = _evalplus_utils_path()
    res = run_sandboxed(_harness_source(), stdin=json.dumps(job), timeout_s=timeout_s, memory_mb=memory_mb,
                        max_procs=max_procs, max_output_bytes=max_output_bytes, max_stderr_bytes=1 << 14)
    lines = []
    for line in res.stdout.splitlines():
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if isinstance(obj, dict):
            lines.append(obj)
    return lines, res


# --------------------------------------------------------------------------------------------------
# Sanitizing completions (evalplus.sanitize, with a bound on its cubic cost)
# --------------------------------------------------------------------------------------------------
_FENCE_RE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.S)
_SANITIZE_MAX_LINES = 100
_SANITIZE_MAX_CHARS = 20_000


def _bound_for_sanitize(text: str) -> str:
    """evalplus's code_extract tries every (i, j) line range with ast.parse: ~cubic in the length
    (300 lines ~ 7 s). Long texts are first reduced to their longest fenced code block (what
    code_extract would pick in practice), else to their tail."""
    lines = text.split("\n")
    if len(lines) <= _SANITIZE_MAX_LINES and len(text) <= _SANITIZE_MAX_CHARS:
        return text
    blocks = [m.group(2) for m in _FENCE_RE.finditer(text)]
    if blocks:
        best = max(blocks, key=lambda b: sum(1 for ln in b.split("\n") if ln.strip()))
        text = best
        lines = text.split("\n")
    if len(lines) > _SANITIZE_MAX_LINES:
        lines = lines[-_SANITIZE_MAX_LINES:]
    text = "\n".join(lines)
    return text[-_SANITIZE_MAX_CHARS:]


def extract_code(completion: str, entry_point: str | None = None) -> str:
    """evalplus.sanitize(completion, entry_point) on a length-bounded completion."""
    from evalplus.sanitize import sanitize

    return sanitize(_bound_for_sanitize(completion), entry_point)


# --------------------------------------------------------------------------------------------------
# MBPP+
# --------------------------------------------------------------------------------------------------
def load_mbpp_plus(path: str | None = None) -> dict[str, dict]:
    """task_id -> problem (evalplus `get_mbpp_plus`, inputs deserialized). `path` (or the
    MBPP_OVERRIDE_PATH environment variable) names an evalplus-format `.jsonl[.gz]`; without one
    evalplus downloads the release (needs network)."""
    path = path or os.environ.get("MBPP_OVERRIDE_PATH")
    if path:
        path = os.path.abspath(os.path.expanduser(str(path)))
        if not os.path.isfile(path):
            raise FileNotFoundError(f"MBPP+ data file not found: {path}")
        os.environ["MBPP_OVERRIDE_PATH"] = path  # evalplus reads it at import time ...
    import evalplus.data.mbpp as _m  # noqa: E402

    if path:
        _m.MBPP_OVERRIDE_PATH = path  # ... so patch it in case evalplus was imported earlier
    try:
        return _m.get_mbpp_plus()
    except Exception as e:  # noqa: BLE001
        if path:
            raise
        raise RuntimeError(
            "MBPP+ data unavailable: pass an evalplus-format MbppPlus .jsonl[.gz] (e.g. "
            "--data_file ../shared/data/mbpp_plus/MbppPlus-v0.2.0.jsonl.gz) or set MBPP_OVERRIDE_PATH; "
            f"downloading the evalplus release failed: {type(e).__name__}: {e}") from e


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "antisd", "evalplus")


_GT_VERSION = "antisd-mbpp-gt-v2"


def _task_key(problem: dict) -> str:
    h = hashlib.sha256()
    h.update(_GT_VERSION.encode())
    h.update(sys.version.split()[0].encode())
    for k in ("task_id", "entry_point", "prompt", "canonical_solution"):
        h.update(b"\0" + str(problem.get(k, "")).encode())
    h.update(b"\0" + json.dumps([encode_value(problem["base_input"]), encode_value(problem["plus_input"])]).encode())
    return h.hexdigest()[:24]


def _special_sets():
    from evalplus.eval._special_oracle import MBPP_OUTPUT_NOT_NONE_TASKS, MBPP_OUTPUT_SET_EQ_TASKS

    return MBPP_OUTPUT_NOT_NONE_TASKS, MBPP_OUTPUT_SET_EQ_TASKS


def _gt_one(problem: dict, timeout_s: float, memory_mb: int) -> dict:
    not_none_tasks, set_eq_tasks = _special_sets()
    job = {
        "mode": "gt",
        "code": problem["prompt"] + problem["canonical_solution"],
        "entry_point": problem["entry_point"],
        "not_none": problem["entry_point"] in not_none_tasks,
        "set_eq": problem["entry_point"] in set_eq_tasks,
        "splits": [{"name": "base", "inputs": [encode_value(i) for i in problem["base_input"]]},
                   {"name": "plus", "inputs": [encode_value(i) for i in problem["plus_input"]]}],
    }
    lines, res = _run_harness(job, timeout_s=timeout_s, memory_mb=memory_mb, max_procs=64,
                              max_output_bytes=1 << 30)
    entry: dict = {}
    for obj in lines:
        if "exec_error" in obj or "gt_error" in obj:
            raise RuntimeError(f"{problem['task_id']}: canonical solution failed: "
                               f"{obj.get('exec_error') or obj.get('gt_error')}")
        if "split" in obj:
            entry[obj["split"]] = [r[1] for r in obj["results"]]
            entry[obj["split"] + "_time"] = [r[2] for r in obj["results"]]
    if "base" not in entry or "plus" not in entry:
        raise RuntimeError(f"{problem['task_id']}: canonical solution did not finish "
                           f"(rc={res.returncode}, timed_out={res.timed_out}, stderr={res.stderr[-300:]!r})")
    return entry


def _decode_gt(entry: dict) -> dict:
    return {"base": [decode_output(v) for v in entry["base"]], "base_time": list(entry["base_time"]),
            "plus": [decode_output(v) for v in entry["plus"]], "plus_time": list(entry["plus_time"])}


def mbpp_groundtruth(problems: dict, cache_dir: str | None = None, *, workers: int | None = None,
                     timeout_s: float = 600.0, memory_mb: int = 4096, progress: bool = False) -> dict:
    """Expected outputs and reference times for `problems` (task_id -> problem), like evalplus's
    `get_groundtruth`, but the canonical solutions run in the sandbox. Cached per task (key = hash of
    the task's code and inputs) as gzip JSON under `cache_dir` (default
    $XDG_CACHE_HOME/antisd/evalplus or ~/.cache/antisd/evalplus), so any subset reuses what
    was computed. Returns task_id -> {"base", "base_time", "plus", "plus_time"}."""
    cache_dir = os.path.abspath(os.path.expanduser(cache_dir or default_cache_dir()))
    gt_dir = os.path.join(cache_dir, "mbpp_gt")
    os.makedirs(gt_dir, exist_ok=True)
    result: dict = {}
    todo = []
    for tid, prob in problems.items():
        path = os.path.join(gt_dir, f"{tid.replace('/', '_')}-{_task_key(prob)}.json.gz")
        if os.path.exists(path):
            try:
                with gzip.open(path, "rt", encoding="utf-8") as f:
                    result[tid] = _decode_gt(json.load(f))
                continue
            except (OSError, ValueError, KeyError):
                pass
        todo.append((tid, prob, path))

    def work(item):
        tid, prob, path = item
        entry = _gt_one(prob, timeout_s, memory_mb)
        tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
        with gzip.open(tmp, "wt", encoding="utf-8", compresslevel=6) as f:
            json.dump(entry, f)
        os.replace(tmp, path)
        return tid, _decode_gt(entry)

    if todo:
        n = workers or max(1, min(len(todo), os.cpu_count() or 1))
        t0 = time.monotonic()
        with ThreadPoolExecutor(max_workers=n) as ex:
            for i, (tid, entry) in enumerate(ex.map(work, todo)):
                result[tid] = entry
                if progress and (i + 1) % 20 == 0:
                    print(f"[mbpp ground truth] {i + 1}/{len(todo)} tasks, {time.monotonic() - t0:.0f}s",
                          file=sys.stderr, flush=True)
    return {tid: result[tid] for tid in problems}


def _mbpp_match(entry_point: str, inp, out, exp, atol_box: list) -> bool:
    """evalplus.eval.unsafe_execute's per-input comparison (dataset "mbpp"), on transported values.
    atol_box[0] is the split's atol, mutated like evalplus does (sticky 1e-6 once a float is seen)."""
    import numpy as np
    from evalplus.eval import is_floats
    from evalplus.eval._special_oracle import (
        MBPP_OUTPUT_NOT_NONE_TASKS,
        MBPP_OUTPUT_SET_EQ_TASKS,
        _digit_distance_nums,
        _surface_Area,
    )

    try:
        if isinstance(out, NotNone) and entry_point not in MBPP_OUTPUT_NOT_NONE_TASKS:
            return False
        if isinstance(out, Digest) or isinstance(exp, Digest):
            return entry_point == "are_equivalent" or out == exp
        exact_match = out == exp
        atol = atol_box[0]
        if "are_equivalent" == entry_point:
            exact_match = exact_match or True
        elif "sum_div" == entry_point:
            exact_match = exact_match or out == 0
        elif "surface_Area" == entry_point:
            exact_match = exact_match or abs(out - _surface_Area(*inp)) <= atol
        elif "digit_distance_nums" == entry_point:
            exact_match = exact_match or out == _digit_distance_nums(*inp)
        elif entry_point in MBPP_OUTPUT_SET_EQ_TASKS:
            exact_match = set(out) == set(exp)
        elif entry_point in MBPP_OUTPUT_NOT_NONE_TASKS:
            if isinstance(out, bool):
                exact_match = out == exp
            else:
                exact_match = exp == (out.flag if isinstance(out, NotNone) else out is not None)
        if atol == 0 and is_floats(exp):
            atol = atol_box[0] = 1e-6
        if not exact_match and atol != 0:
            assert type(out) == type(exp)
            if isinstance(exp, (list, tuple)):
                assert len(out) == len(exp)
            assert np.allclose(out, exp, rtol=1e-07, atol=atol)
        else:
            assert exact_match
        return True
    except BaseException:  # noqa: BLE001 - evalplus counts any exception as a failed input
        return False


def check_mbpp_sample(problem: dict, completion: str, expected: dict, *, timeout_s: float | None = None,
                      per_split_timeout_s: float = 60.0, min_time_limit: float = 1.0,
                      gt_time_limit_factor: float = 4.0, memory_mb: int = 4096, max_procs: int = 64,
                      sanitize: bool = True) -> dict:
    """Score one completion on one MBPP+ task with evalplus semantics, in one sandboxed process.

    expected: mbpp_groundtruth()'s entry for this task (or the whole mapping). Per-input limit
    max(min_time_limit, gt_time_limit_factor * reference time); per split min(per_split_timeout_s,
    sum of limits) + 1 s (evalplus's untrusted_check); inputs after a timeout are not run.
    timeout_s: overall wall limit (default: both split budgets + 5 s for start-up).
    Returns {"base", "plus", "passed", "n_passed", "n_total", "status", "error", "duration_s"}."""
    tid = problem.get("task_id")
    if "base" not in expected and tid in expected:
        expected = expected[tid]
    entry_point = problem["entry_point"]
    not_none_tasks, set_eq_tasks = _special_sets()
    t0 = time.monotonic()
    code = completion
    if sanitize:
        try:
            code = extract_code(completion, entry_point)
        except Exception:  # noqa: BLE001 - evalplus would have written the raw text
            code = completion
    splits, budgets = [], []
    for name in ("base", "plus"):
        tls = [max(min_time_limit, gt_time_limit_factor * t) for t in expected[f"{name}_time"]]
        budget = min(per_split_timeout_s, sum(tls)) + 1
        budgets.append(budget)
        splits.append({"name": name, "inputs": [encode_value(i) for i in problem[f"{name}_input"]], "time_limits": tls,
                       "timeout": budget})
    wall = timeout_s if timeout_s is not None else sum(budgets) + 5.0
    job = {"mode": "check", "code": code, "entry_point": entry_point, "guard": True,
           "not_none": entry_point in not_none_tasks, "set_eq": entry_point in set_eq_tasks, "splits": splits}
    lines, res = _run_harness(job, timeout_s=wall, memory_mb=memory_mb, max_procs=max_procs,
                              max_output_bytes=1 << 28)
    got: dict[str, list] = {}
    error = None
    ready = False
    for obj in lines:
        if "exec_error" in obj and not ready:
            error = str(obj["exec_error"])
            break
        if obj.get("ready") is True:
            ready = True
        elif "split" in obj and obj["split"] in ("base", "plus") and obj["split"] not in got and ready:
            got[obj["split"]] = obj.get("results") if isinstance(obj.get("results"), list) else []
    out = {}
    n_passed = n_total = 0
    for name in ("base", "plus"):
        inputs, exp = problem[f"{name}_input"], expected[name]
        n_total += len(inputs)
        results = got.get(name)
        if results is None or len(results) != len(inputs):
            out[name] = False
            continue
        atol_box = [problem.get("atol", 0) or 0]
        ok_all = True
        for inp, r, e in zip(inputs, results, exp):
            ok = (isinstance(r, list) and len(r) == 2 and r[0] == "ok"
                  and _mbpp_match(entry_point, inp, decode_output_or_opaque(r[1]), e, atol_box))
            n_passed += ok
            ok_all &= ok
        out[name] = ok_all
    if error is None and not ready:
        error = "timeout" if res.timed_out else f"harness failed (rc={res.returncode}, {res.killed_reason})"
    passed = out["base"] and out["plus"]
    any_timeout = res.timed_out or any(isinstance(r, list) and r[:1] == ["timeout"] for rs in got.values() for r in rs)
    status = "pass" if passed else ("timeout" if any_timeout else ("error" if error else "fail"))
    return {"base": out["base"], "plus": out["plus"], "passed": passed, "n_passed": int(n_passed),
            "n_total": int(n_total), "status": status, "error": error,
            "duration_s": round(time.monotonic() - t0, 4)}
