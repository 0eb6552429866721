"""Arithmetic word problems: the embedded default task, seeded and verifiable.

Each problem is a short story (shopping, boxes, sharing, trains, ...) that starts from a number and
applies `num_steps` operations to it: add, subtract, multiply by a small factor, or divide exactly
(the divisor always divides the running value). Answers are non-negative integers. `digits` bounds
the size of the start value and the added/subtracted amounts; factors and divisors are 2..5, and a
product or quotient always pairs a `digits`-digit number with the factor (a times-table fact);
running values stay below 10**(digits+1).

The reference solution works step by step like a reasoning model: one equation per step, with
seeded deliberation ("Let me verify: ...", "Wait, let me check: ...", "Let me recompute: ...") and,
in a quarter of the solutions, a slip in one step that is caught and fixed ("Wait, that's not
right. 37 + 48 = 85, not 75."). Every solution ends with `So the answer is \\boxed{N}.` and N is
always the correct answer. `make_solution` renders another sample of the same problem's solution
(used for the teacher's privileged context in SFT).

`make_problem` also returns `steps`: the operations as `[["start", a], [op, x], ...]` with op in
`+ - * /`, applied left to right to the running value. It lets tests recompute the answer on an
independent path; `generate_split` leaves it out of the rows unless `include_steps=True`.

Train and eval use different derived seeds and a disjoint partition of the problem space (by a
stable hash of `steps`), so no eval computation ever appears in train, whatever `n` is.

Task `arith_checks` (`generate_split(..., task="arith_checks")`): the same problems and split, with
solutions in which deliberation changes the answer, and pays (`make_checked_solution`). With
`slip_prob` one step's written result is a slip (off by 1 or 10); after any step, with `check_prob`,
a check line recomputes it BY ANOTHER ROUTE and the solution goes on from the check's value:

    47 + 8 = 54.
    Wait, let me check: 47 + 8: units 7 + 8 = 15, tens 4 + 1 = 5, so 55, not 54.

A step is one jump (`a op x = r`: for a two-digit `a`, the carry or borrow and both digits in one go);
the check's route (`check_route`) is made of one-digit facts, each read off the numbers just before
it: `+` and `-` column by column with the carry or borrow ("units 13 - 8 = 5, tens 4 - 1 = 3"), `×`
by counting up in steps of the value ("7 × 4: 7, 14, 21, 28"), `÷` by the inverse product ("28 ÷ 4:
4 × 7 = 28"); it ends "so R." (R the right value), with ", not W" when the step wrote W. Why: a check
that restates the step ("47 + 8 = 55.") lets a small model copy the value above, slip included, and
a check in one jump is no better at arithmetic than the step; the first `tiny-checks` model's checks
caught 14 of 56 slips and a check lowered the reward within a problem. Here the check's value comes
from the parts just before it, never from the step's value, and every check in the SFT data is
exact while the steps slip at the student's rate, so a check is the more accurate of the two and
checking more often answers right more often. Only a check catches a slip: an unchecked one carries
on to a wrong answer. A row's `solution` (what a teacher may be shown) is a correct sample: no slip,
or a caught one, as a correct sibling rollout would be. `audit_checks` reads any response's checks:
which follow a wrong step and catch it, which turn a right step wrong.
"""

from __future__ import annotations

import hashlib
import json
import random
import re

NAMES = ["Ava", "Ben", "Chloe", "Dan", "Emma", "Finn", "Grace", "Hugo", "Ivy", "Jack", "Lena", "Omar", "Mia", "Noah"]

# theme: start sentence, per-op sentences, question. {n} = name, {x} = operand.
THEMES = [
    {
        "start": "{n} has {x} dollars.",
        "+": ["{n} earns {x} more dollars.", "A friend gives {n} {x} dollars."],
        "-": ["{n} spends {x} dollars on a book.", "{n} pays {x} dollars for lunch."],
        "*": ["Then the money grows to {x} times as much."],
        "/": ["{n} splits the money equally into {x} envelopes and keeps one envelope."],
        "q": "How many dollars does {n} have now?",
    },
    {
        "start": "A shop has {x} boxes of pens.",
        "+": ["A truck brings {x} more boxes.", "The shop orders {x} new boxes."],
        "-": ["Customers buy {x} boxes.", "The shop sends {x} boxes back."],
        "*": ["Next month the shop has {x} times as many boxes."],
        "/": ["The boxes are split equally among {x} shelves, and we look at one shelf."],
        "q": "How many boxes are there at the end?",
    },
    {
        "start": "{n} bakes {x} cookies.",
        "+": ["{n} bakes {x} more cookies.", "A neighbor brings {x} cookies."],
        "-": ["{n} eats {x} cookies.", "{n} gives {x} cookies away."],
        "*": ["Then {n} makes {x} times as many cookies."],
        "/": ["{n} shares the cookies equally among {x} friends and keeps one share."],
        "q": "How many cookies does {n} have at the end?",
    },
    {
        "start": "A train has {x} passengers.",
        "+": ["At the next stop {x} people get on.", "{x} more passengers board the train."],
        "-": ["At the next stop {x} people get off.", "{x} passengers leave the train."],
        "*": ["At the big station the number of passengers becomes {x} times as large."],
        "/": ["The passengers split equally into {x} cars, and we count one car."],
        "q": "How many passengers are there at the end?",
    },
    {
        "start": "{n} collects {x} stamps.",
        "+": ["{n} buys {x} more stamps.", "{n} finds {x} stamps in a drawer."],
        "-": ["{n} trades away {x} stamps.", "{n} loses {x} stamps."],
        "*": ["Later the collection grows to {x} times its size."],
        "/": ["{n} divides the stamps equally into {x} albums and keeps one album."],
        "q": "How many stamps does {n} have now?",
    },
]

TASKS = ("arith", "arith_checks")
SLIP_PROB, CHECK_PROB = 0.65, 0.4  # arith_checks: chance of a slip per solution, of a check after each step
STARTS = ("Start with {}.", "We begin with {}.", "At first there are {}.")
SYMBOL = {"+": "+", "-": "-", "*": "×", "/": "÷"}
INVERSE = {"+": "-", "-": "+", "*": "/", "/": "*"}
CHECK_OPENER = "Wait, let me check:"


def apply(op: str, value: int, x: int) -> int:
    if op == "+":
        return value + x
    if op == "-":
        return value - x
    if op == "*":
        return value * x
    if value % x:
        raise ValueError(f"{value} is not divisible by {x}")
    return value // x


def _number(rng: random.Random, digits: int) -> int:
    return rng.randint(max(2, 10 ** (digits - 1)), 10**digits - 1)


def _next_step(rng: random.Random, value: int, digits: int) -> tuple[str, int]:
    max_value = 10 ** (digits + 1) - 1  # running values stay at most one digit longer than the inputs
    while True:
        op = rng.choice("+-*/")
        if op == "+":
            x = _number(rng, digits)
        elif op == "-":
            x = _number(rng, digits)
            if x >= value:  # keep running values positive
                continue
        elif op == "*":  # products and quotients stay within a times table: a `digits`-digit number x 2..5
            x = rng.randint(2, 5)
            if value >= 10**digits:
                continue
        else:
            divisors = [d for d in range(2, 6) if value % d == 0 and d < value < d * 10**digits]
            if not divisors:
                continue
            x = rng.choice(divisors)
        if apply(op, value, x) <= max_value:
            return op, x


def _equation(a: int, op: str, x: int, result: int) -> str:
    return f"{a} {SYMBOL[op]} {x} = {result}"


def _slip(rng: random.Random, result: int) -> int:
    wrong = result + rng.choice([-10, -1, 1, 10] if result >= 10 else [-1, 1, 2])
    return wrong if wrong >= 0 and wrong != result else result + 1


def make_solution(steps: list, rng: random.Random, slip_prob: float = 0.25, check_prob: float = 0.3) -> str:
    """A step-by-step solution of `steps` with seeded deliberation and maybe one fixed slip."""
    value = steps[0][1]
    lines = [rng.choice(STARTS).format(value)]
    slip_at = rng.randrange(1, len(steps)) if rng.random() < slip_prob else None
    for i, (op, x) in enumerate(steps[1:], start=1):
        result = apply(op, value, x)
        eq = _equation(value, op, x, result)
        if i == slip_at:
            wrong = _slip(rng, result)
            lines.append(f"{_equation(value, op, x, wrong)}. Wait, that's not right. {eq}, not {wrong}.")
        else:
            lines.append(eq + ".")
            if rng.random() < check_prob:
                check = _equation(result, INVERSE[op], x, value)
                lines.append(rng.choice([f"Let me verify: {check}.", f"Wait, let me check: {check}. Yes.",
                                         f"Let me recompute: {eq}."]))
        value = result
    lines.append(f"So the answer is \\boxed{{{value}}}.")
    return "\n".join(lines)


def _carries_on(steps: list, at: int, value: int) -> bool:
    """Whether `value`, written as the result of step `at`, goes through the later steps (every
    division exact, no value negative)."""
    for op, x in steps[at + 1:]:
        if op == "/" and value % x:
            return False
        value = apply(op, value, x)
        if value < 0:
            return False
    return True


def check_route(a: int, op: str, x: int) -> str:
    """How a check recomputes `a op x` in small parts, each a one-digit fact (module docstring):
    `+`/`-` column by column with the carry or borrow ("units 7 + 8 = 15, tens 4 + 1 = 5",
    "units 13 - 8 = 5, tens 4 - 1 = 3"), `×` by counting up in steps of `a` ("7, 14, 21, 28"), `÷`
    by the inverse product ("4 × 7 = 28")."""
    tens, units = divmod(a, 10)
    if op == "+":
        carry = (units + x) // 10
        return f"units {units} + {x} = {units + x}, tens {tens} + {carry} = {tens + carry}"
    if op == "-":
        borrow = int(units < x)
        return f"units {units + 10 * borrow} - {x} = {units + 10 * borrow - x}, tens {tens} - {borrow} = {tens - borrow}"
    if op == "*":
        return ", ".join(str(a * k) for k in range(1, x + 1))
    return f"{x} {SYMBOL['*']} {apply('/', a, x)} = {a}"


def check_line(a: int, op: str, x: int, written: int) -> str:
    """The check of the step `a op x = written`: recomputes it by `check_route`, ends with the right
    value and, when `written` was a slip, names it: "Wait, let me check: 47 + 8: units 7 + 8 = 15,
    tens 4 + 1 = 5, so 55, not 54." """
    result = apply(op, a, x)
    return (f"{CHECK_OPENER} {a} {SYMBOL[op]} {x}: {check_route(a, op, x)}, so {result}"
            + (f", not {written}." if written != result else "."))


def make_checked_solution(steps: list, rng: random.Random, slip_prob: float = SLIP_PROB,
                          check_prob: float = CHECK_PROB, correct: bool = False) -> str:
    """An `arith_checks` solution of `steps`: maybe one slip, caught only by a check (module docstring).
    `correct`: drawn again until its answer is right (no slip, or a caught one)."""
    if correct and slip_prob >= 1 and check_prob <= 0:
        raise ValueError("every solution slips and none checks: no correct one to draw")
    values = [steps[0][1]]
    for op, x in steps[1:]:
        values.append(apply(op, values[-1], x))
    while True:
        value = steps[0][1]
        lines = [rng.choice(STARTS).format(value)]
        slip_at = wrong = None
        if rng.random() < slip_prob:  # at a step whose wrong result the later steps can carry on
            slips = [(i, w) for i in range(1, len(steps)) for w in [_slip(rng, values[i])] if _carries_on(steps, i, w)]
            slip_at, wrong = rng.choice(slips)  # never empty: a slip at the last step always carries on
        for i, (op, x) in enumerate(steps[1:], start=1):
            result = apply(op, value, x)
            written = wrong if i == slip_at else result
            lines.append(_equation(value, op, x, written) + ".")
            if rng.random() < check_prob:
                lines.append(check_line(value, op, x, written))
                written = result
            value = written
        lines.append(f"So the answer is \\boxed{{{value}}}.")
        if value == values[-1] or not correct:  # an uncaught slip changes every later value: a wrong answer
            return "\n".join(lines)


_WRITTEN_EQUATION = re.compile(r"(\d+) ([+\-×÷]) (\d+) = (\d+)")
_CHECK_HEAD = re.compile(r"(\d+) ([+\-×÷]) (\d+)")
_CHECK_VALUE = re.compile(r"\bso (\d+)")
_OPERATOR = {v: k for k, v in SYMBOL.items()}
AUDIT_KEYS = ("steps", "steps_right", "checks", "checks_right", "after_wrong_step", "caught", "after_right_step",
              "turned_right_wrong")


def _value(a: int, op: str, x: int) -> int | None:
    return None if op == "/" and (x == 0 or a % x) else apply(op, a, x)


def audit_checks(text: str) -> dict:
    """How the checks of an `arith_checks` response (a model's, not only ours) went, line by line.

    An equation line `a op x = w` is a step, right when w is the value of a op x (an inexact division
    never is). A line that starts with "Wait, let me check:" is a check; its value is the number after
    its last "so " (none: a garbled check, never right). A check is right when its value is that of the
    step above it (the equation of the line above; a check with no step right above, e.g. a second
    check, is judged by its own head `a op x`). Counts: `steps`, `steps_right`, `checks`, `checks_right`;
    `after_wrong_step` (checks right below a wrong step) and `caught` (of those, the ones with the right
    value: the slip is fixed); `after_right_step` and `turned_right_wrong` (of those, the ones with a
    wrong value: a right step "corrected" into a wrong one)."""
    counts = dict.fromkeys(AUDIT_KEYS, 0)
    above = None  # (value of the step right above, whether it was written right); None after a check
    for line in text.split("\n"):
        if line.startswith(CHECK_OPENER):
            head, values = _CHECK_HEAD.search(line), _CHECK_VALUE.findall(line)
            value = int(values[-1]) if values else None
            if above is not None:
                target = above[0]
            else:
                target = _value(int(head[1]), _OPERATOR[head[2]], int(head[3])) if head else None
            right = value is not None and value == target
            counts["checks"] += 1
            counts["checks_right"] += right
            if above is not None and above[1]:
                counts["after_right_step"] += 1
                counts["turned_right_wrong"] += not right
            elif above is not None:
                counts["after_wrong_step"] += 1
                counts["caught"] += right
            above = None
            continue
        m = _WRITTEN_EQUATION.search(line)
        if not m:
            continue
        target = _value(int(m[1]), _OPERATOR[m[2]], int(m[3]))
        right = target is not None and int(m[4]) == target
        counts["steps"] += 1
        counts["steps_right"] += right
        above = (target, right)
    return counts


def make_problem(rng: random.Random, num_steps: int, digits: int) -> dict:
    """One problem: {"problem", "answer", "solution", "steps"} (see the module docstring)."""
    theme, name = rng.choice(THEMES), rng.choice(NAMES)
    value = _number(rng, digits)
    steps = [["start", value]]
    sentences = [theme["start"].format(n=name, x=value)]
    for _ in range(num_steps):
        op, x = _next_step(rng, value, digits)
        steps.append([op, x])
        sentences.append(rng.choice(theme[op]).format(n=name, x=x))
        value = apply(op, value, x)
    sentences.append(theme["q"].format(n=name))
    return {"problem": " ".join(sentences), "answer": str(value), "solution": make_solution(steps, rng), "steps": steps}


def _is_eval(steps: list) -> bool:
    """Stable partition of the problem space: about 1 chain in 8 belongs to eval."""
    return hashlib.sha256(json.dumps(steps).encode()).digest()[0] % 8 == 0


def generate_split(split: str, n: int, *, num_steps: tuple[int, int] = (1, 3), digits: int = 1, seed: int = 0,
                   include_steps: bool = False, task: str = "arith") -> list[dict]:
    """`n` rows {"id": f"{task}-{split}-{i}", "problem", "answer", "solution"} (+ "steps" if asked).

    Deterministic in (split, n, num_steps, digits, seed, task). Eval rows are distinct computations.
    Every task has the same problems; `arith_checks` rows carry a correct `make_checked_solution`.
    """
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', not {split!r}")
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, not {task!r}")
    rng = random.Random(f"arith-{split}-{seed}")
    checks_rng = random.Random(f"arith_checks-{split}-{seed}")  # its own stream: the problems stay arith's
    rows, seen, attempts = [], set(), 0
    while len(rows) < n:
        attempts += 1
        if attempts > 1000 * n + 1000:
            raise ValueError(f"could not draw {n} distinct {split} problems with num_steps={num_steps}, digits={digits}")
        problem = make_problem(rng, rng.randint(*num_steps), digits)
        key = json.dumps(problem["steps"])
        if _is_eval(problem["steps"]) != (split == "eval") or (split == "eval" and key in seen):
            continue
        seen.add(key)
        row = {"id": f"{task}-{split}-{len(rows)}", **problem}
        if task == "arith_checks":
            row["solution"] = make_checked_solution(problem["steps"], checks_rng, correct=True)
        if not include_steps:
            del row["steps"]
        rows.append(row)
    return rows
