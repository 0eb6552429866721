"""`code_arith`: the embedded code task, seeded and tested in the sandbox (`--dataset code_arith`).

Each problem asks for a small Python function of one integer argument, described in words, and has
5 assert tests (`assert f(4) == 14`). Half the functions are one chain of 1-3 operations on x (add,
subtract, multiply by a small number, floor-divide); the other half are piecewise: a condition on x
(even, greater than c, less than c) picks one of two chains, and the tests cover both branches (at
least two each). A program with one branch right passes some of the tests, and a wrong constant
often still agrees at some inputs, so partial credit (`--reward_funcs code_tests`) is frequent.

    Write a Python function f(x). If x is even, it takes x, multiplies by 3, then adds 2.
    Otherwise, it takes x and subtracts 4.

The reference solution (`solution`, what a teacher may be shown when no rollout passes) is the
function in a ```python block, the format the tiny model `tiny-code` was fine-tuned to write:

    ```python
    def f(x):
        if x % 2 == 0:
            return x * 3 + 2
        return x - 4
    ```

Rows: `{"id", "problem", "answer": None, "solution", "tests", "entry_point": "f"}` (+ `spec`, the
function as data, with `include_steps=True`; `steps` is the same, under the name the tiny-model
builder reads). Train and eval are disjoint by a stable hash of the spec, as in data/arith.py.
"""

from __future__ import annotations

import hashlib
import json
import random

TASK = "code_arith"
ENTRY_POINT = "f"
OPS = ("+", "-", "*", "//")
WORDS = {"+": "adds {k}", "-": "subtracts {k}", "*": "multiplies by {k}", "//": "divides by {k}, rounding down"}
CONDITIONS = ("even", ">", "<")
NUM_TESTS = 5
TEST_RANGE = (0, 12)


def _chain(rng: random.Random, num_ops: int) -> list[list]:
    ops, last = [], None
    for _ in range(num_ops):
        op = rng.choice([o for o in OPS if o != last])  # no `x + 2 + 3`
        ops.append([op, rng.randint(2, 5) if op in ("*", "//") else rng.randint(1, 9)])
        last = op
    return ops


def expression(chain: list[list]) -> str:
    """The chain as one Python expression on x, parenthesized where precedence needs it."""
    expr, low = "x", False  # low: the expression's top operator is + or -
    for op, k in chain:
        if op in ("*", "//") and low:
            expr = f"({expr})"
        expr, low = f"{expr} {op} {k}", op in ("+", "-")
    return expr


def evaluate(chain: list[list], x: int) -> int:
    for op, k in chain:
        x = x + k if op == "+" else x - k if op == "-" else x * k if op == "*" else x // k
    return x


def _condition(cond: list, x: int) -> bool:
    return x % 2 == 0 if cond[0] == "even" else x > cond[1] if cond[0] == ">" else x < cond[1]


def call(spec: dict, x: int) -> int:
    """f(x) of a spec {"cond": [kind, c] | None, "then": chain, "else": chain | None}."""
    if spec["cond"] is None or _condition(spec["cond"], x):
        return evaluate(spec["then"], x)
    return evaluate(spec["else"], x)


def _describe(chain: list[list]) -> str:
    words = [WORDS[op].format(k=k) for op, k in chain]
    return f"takes x and {words[0]}" if len(words) == 1 else "takes x, " + ", then ".join(words)


def problem_text(spec: dict) -> str:
    if spec["cond"] is None:
        return f"Write a Python function f(x) that {_describe(spec['then'])}."
    kind, c = spec["cond"]
    when = "x is even" if kind == "even" else f"x is greater than {c}" if kind == ">" else f"x is less than {c}"
    return (f"Write a Python function f(x). If {when}, it {_describe(spec['then'])}. "
            f"Otherwise, it {_describe(spec['else'])}.")


def code(spec: dict) -> str:
    if spec["cond"] is None:
        return f"def f(x):\n    return {expression(spec['then'])}"
    kind, c = spec["cond"]
    test = "x % 2 == 0" if kind == "even" else f"x {kind} {c}"
    return f"def f(x):\n    if {test}:\n        return {expression(spec['then'])}\n    return {expression(spec['else'])}"


def make_solution(spec: dict, rng: random.Random | None = None) -> str:
    """The reference completion: the function in a ```python block (`rng` unused: one solution per spec)."""
    return f"```python\n{code(spec)}\n```"


def _test_inputs(spec: dict, rng: random.Random) -> list[int] | None:
    xs = list(range(TEST_RANGE[0], TEST_RANGE[1] + 1))
    rng.shuffle(xs)
    if spec["cond"] is None:
        return sorted(xs[:NUM_TESTS])
    yes = [x for x in xs if _condition(spec["cond"], x)]
    no = [x for x in xs if not _condition(spec["cond"], x)]
    if len(yes) < 2 or len(no) < 2:
        return None
    n_yes = rng.randint(2, NUM_TESTS - 2)
    return sorted(yes[:n_yes] + no[:NUM_TESTS - n_yes])


def make_problem(rng: random.Random) -> dict:
    """{"problem", "answer": None, "solution", "tests", "entry_point", "spec"}."""
    while True:
        if rng.random() < 0.5:
            spec = {"cond": None, "then": _chain(rng, rng.randint(1, 3)), "else": None}
        else:
            kind = rng.choice(CONDITIONS)
            spec = {"cond": [kind, None if kind == "even" else rng.randint(3, 9)],
                    "then": _chain(rng, rng.randint(1, 2)), "else": _chain(rng, rng.randint(1, 2))}
            if spec["then"] == spec["else"]:
                continue
        xs = _test_inputs(spec, rng)
        if xs is not None:
            break
    tests = [f"assert f({x}) == {call(spec, x)}" for x in xs]
    return {"problem": problem_text(spec), "answer": None, "solution": make_solution(spec), "tests": tests,
            "entry_point": ENTRY_POINT, "spec": spec}


def _is_eval(spec: dict) -> bool:
    """Stable partition of the function space: about 1 spec in 8 belongs to eval."""
    return hashlib.sha256(json.dumps(spec).encode()).digest()[0] % 8 == 0


def generate_split(split: str, n: int, *, seed: int = 0, include_steps: bool = False, task: str = TASK) -> list[dict]:
    """`n` rows of the train or eval split (deterministic in split, n and seed); eval specs distinct."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', not {split!r}")
    rng = random.Random(f"{TASK}-{split}-{seed}")
    rows, seen, attempts = [], set(), 0
    while len(rows) < n:
        attempts += 1
        if attempts > 1000 * n + 1000:
            raise ValueError(f"could not draw {n} distinct {split} problems")
        problem = make_problem(rng)
        key = json.dumps(problem["spec"])
        if _is_eval(problem["spec"]) != (split == "eval") or (split == "eval" and key in seen):
            continue
        seen.add(key)
        row = {"id": f"{TASK}-{split}-{len(rows)}", **problem}
        if include_steps:
            row["steps"] = row["spec"]
        else:
            del row["spec"]
        rows.append(row)
    return rows
