"""MBPP+ checking through evalplus inside the sandbox (verifiers.mbpp), on a few real tasks."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
MBPP_FILE = DATA / "mbpp_plus" / "MbppPlus-v0.2.0.jsonl.gz"
REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not MBPP_FILE.exists(), reason=f"{MBPP_FILE} not present")

TASKS = ["Mbpp/2", "Mbpp/3", "Mbpp/4", "Mbpp/17"]


@pytest.fixture(scope="module")
def problems():
    from verifiers.mbpp import load_mbpp_plus

    allp = load_mbpp_plus(str(MBPP_FILE))
    assert len(allp) == 378
    return {k: allp[k] for k in TASKS}


@pytest.fixture(scope="module")
def gt_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("evalplus_cache")


@pytest.fixture(scope="module")
def expected(problems, gt_cache):
    from verifiers.mbpp import mbpp_groundtruth

    return mbpp_groundtruth(problems, str(gt_cache))


def test_groundtruth_shape_and_cache(problems, expected, gt_cache):
    from verifiers.mbpp import mbpp_groundtruth

    for tid, p in problems.items():
        e = expected[tid]
        assert len(e["base"]) == len(p["base_input"]) and len(e["plus"]) == len(p["plus_input"])
        assert len(e["base_time"]) == len(e["base"]) and all(t >= 0 for t in e["plus_time"])
    assert expected["Mbpp/17"]["base"][:1] == [40]  # square_perimeter(10)
    files = sorted(os.listdir(gt_cache / "mbpp_gt"))
    assert len(files) == len(TASKS)
    # a subset is served from the cache (keyed per task by a hash of its code and inputs)
    t0 = time.monotonic()
    sub = mbpp_groundtruth({"Mbpp/3": problems["Mbpp/3"]}, str(gt_cache))
    assert time.monotonic() - t0 < 2
    assert sub["Mbpp/3"]["plus"] == expected["Mbpp/3"]["plus"]
    assert sorted(os.listdir(gt_cache / "mbpp_gt")) == files


def test_default_cache_dir_is_outside_the_repo():
    from verifiers.mbpp import default_cache_dir

    d = Path(default_cache_dir()).resolve()
    assert REPO not in d.parents and d != REPO


@pytest.mark.parametrize("tid", TASKS)
def test_canonical_solution_passes(problems, expected, tid):
    from verifiers.mbpp import check_mbpp_sample

    p = problems[tid]
    r = check_mbpp_sample(p, p["prompt"] + p["canonical_solution"], expected)
    assert r["base"] and r["plus"] and r["passed"], r
    assert r["n_passed"] == r["n_total"] == len(p["base_input"]) + len(p["plus_input"])
    assert r["status"] == "pass"


FENCED = """Sure! Here is my solution.

```python
import math

def is_not_prime(n):
    if n == 1:
        return True
    for i in range(2, int(math.sqrt(n)) + 1):
        if n % i == 0:
            return True
    return False

print(is_not_prime(4))
```

It checks divisors up to the square root.
"""


@pytest.mark.parametrize(
    "name,completion,want_pass",
    [
        ("wrong_return", "def is_not_prime(n):\n    return False\n", False),
        ("syntax_error", "def is_not_prime(n)\n    return n > 1\n", False),
        ("raises", "def is_not_prime(n):\n    raise ValueError(n)\n", False),
        ("markdown_fenced_correct", FENCED, True),
        ("exits_early", "import sys\nsys.exit(0)\ndef is_not_prime(n):\n    return False\n", False),
    ],
)
def test_broken_solutions(problems, expected, name, completion, want_pass):
    from verifiers.mbpp import check_mbpp_sample

    r = check_mbpp_sample(problems["Mbpp/3"], completion, expected)
    assert r["passed"] is want_pass, r
    if not want_pass:
        assert r["n_passed"] < r["n_total"]


def test_partially_correct_counts_tests(problems, expected):
    from verifiers.mbpp import check_mbpp_sample

    r = check_mbpp_sample(problems["Mbpp/3"], "def is_not_prime(n):\n    return n % 2 == 0\n", expected)
    assert not r["passed"] and 0 < r["n_passed"] < r["n_total"]


def test_infinite_loop_is_a_bounded_failure(problems, expected):
    from verifiers.mbpp import check_mbpp_sample

    t0 = time.monotonic()
    r = check_mbpp_sample(problems["Mbpp/3"], "def is_not_prime(n):\n    while True:\n        pass\n", expected)
    assert time.monotonic() - t0 < 10  # 1 s per-input limit, then the split is abandoned
    assert not r["base"] and not r["plus"] and r["status"] == "timeout"


def test_forged_results_on_stdout_do_not_count(problems, expected):
    """The program cannot pass by printing fake result lines: outputs are compared in the parent
    against expected values the sandbox never sees."""
    from verifiers.mbpp import check_mbpp_sample

    forge = (
        "import os, json\n"
        "line = json.dumps({'split': 'base', 'results': [['ok', True]] * 5}) + '\\n'\n"
        "for fd in range(1, 20):\n"
        "    try:\n        os.write(fd, line.encode())\n    except OSError:\n        pass\n"
        "def is_not_prime(n):\n    return None\n"
    )
    r = check_mbpp_sample(problems["Mbpp/3"], forge, expected, sanitize=False)
    assert not r["base"] and not r["passed"]


def test_set_semantics_and_float_tolerance(problems, expected):
    from verifiers.mbpp import check_mbpp_sample

    # Mbpp/2 is compared as sets (evalplus special oracle): any order, list or generator passes
    r = check_mbpp_sample(problems["Mbpp/2"],
                          "def similar_elements(a, b):\n    return (x for x in sorted(set(a) & set(b), reverse=True))\n",
                          expected)
    assert r["passed"], r
    # Mbpp/17 expects ints: a float result equal in value passes (exact ==), off by 0.5 fails
    assert check_mbpp_sample(problems["Mbpp/17"], "def square_perimeter(a):\n    return 4.0 * a\n", expected)["passed"]
    assert not check_mbpp_sample(problems["Mbpp/17"], "def square_perimeter(a):\n    return 4 * a + 0.5\n",
                                 expected)["passed"]


def test_load_mbpp_plus_missing_file(tmp_path):
    from verifiers.mbpp import load_mbpp_plus

    with pytest.raises(FileNotFoundError):
        load_mbpp_plus(str(tmp_path / "nope.jsonl.gz"))
