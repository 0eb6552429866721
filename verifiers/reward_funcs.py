"""Reward functions with TRL's signature: `f(completions, **kwargs) -> list[float | None]`.

`kwargs` carry `prompts` (the user turn of each completion) and every column of its dataset row
(`answer`, `problem`, `solution`, `id`, ...), one list entry per completion. `--reward_funcs` names
them as `pkg.module:function` or `path/to/file.py:function`; the math verifier (`math_verify`) is
the default. The step's reward is the weighted sum (`--reward_weights`, 1 each by default) over the
functions that return a number for a completion (None: the function does not apply, as in TRL).
A function that raises is re-run one completion at a time so that the error names the function and
the first sample it fails on.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
from collections.abc import Callable
from pathlib import Path

MATH_VERIFY = "math_verify"
CODE_TESTS = "code_tests"  # the sandboxed tests of code rows (verifiers/code_tests.py)


class RewardError(RuntimeError):
    """A user reward function that cannot be loaded, raised, or returned the wrong thing."""


def load_reward_func(spec: str) -> Callable:
    """`pkg.module:function` or `path/to/file.py:function` -> the function."""
    module_name, _, func_name = spec.rpartition(":")
    if not module_name or not func_name:
        raise RewardError(f"--reward_funcs {spec!r}: expected pkg.module:function or path/to/file.py:function")
    try:
        if module_name.endswith(".py"):
            location = importlib.util.spec_from_file_location(Path(module_name).stem, module_name)
            if location is None or not Path(module_name).is_file():
                raise FileNotFoundError(module_name)
            module = importlib.util.module_from_spec(location)
            location.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
        return getattr(module, func_name)
    except (ImportError, FileNotFoundError, AttributeError, SyntaxError) as err:
        raise RewardError(f"--reward_funcs {spec!r}: cannot load it: {err!r}") from err


class MathVerifyReward:
    """The default reward: 1.0 when the last \\boxed{} answer matches the row's `answer`, else 0.0."""

    __name__ = MATH_VERIFY

    def __init__(self, verifier):
        self.verifier = verifier

    def __call__(self, completions: list[str], answer: list[str], **kwargs) -> list[float]:
        return self.verifier.score(completions, answer)


def load_reward_funcs(specs: list[str], verifier=None, code_reward: str = "fraction", code_workers: int = 2) -> dict[str, Callable]:
    """{function name: function} for `--reward_funcs` (the names become metrics reward/<name>);
    'math_verify' is the given math verifier, 'code_tests' the sandboxed tests (`code_reward`: fraction or binary)."""
    def load(spec):
        if spec == MATH_VERIFY:
            return MathVerifyReward(verifier)
        if spec == CODE_TESTS:
            from verifiers.code_tests import CodeTester, CodeTestsReward

            return CodeTestsReward(code_reward, CodeTester(num_workers=code_workers))
        return load_reward_func(spec)

    return {spec.rpartition(":")[2]: load(spec) for spec in specs}


def call_reward_func(name: str, func: Callable, completions: list[str], kwargs: dict) -> list[float]:
    """func's rewards (None -> NaN); an exception or a wrong return names `name` and the sample."""
    try:
        values = func(completions, **kwargs)
    except Exception as err:
        for i in range(len(completions)):  # find the first sample it fails on
            try:
                func(completions[i:i + 1], **{k: v[i:i + 1] for k, v in kwargs.items()})
            except Exception as single:
                raise RewardError(f"reward function {name} raised on sample {i} "
                                  f"(completion {completions[i][:80]!r}): {single!r}") from single
        raise RewardError(f"reward function {name} raised on the batch of {len(completions)}: {err!r}") from err
    if not isinstance(values, (list, tuple)) or len(values) != len(completions):
        raise RewardError(f"reward function {name} must return a list of {len(completions)} floats, got {values!r:.200}")
    rewards = []
    for i, value in enumerate(values):
        if value is not None and not isinstance(value, (int, float)):
            raise RewardError(f"reward function {name} returned {value!r} for sample {i}: want a float or None")
        rewards.append(math.nan if value is None else float(value))
    return rewards


def weighted_rewards(funcs: dict[str, Callable], weights: list[float], completions: list[str],
                     kwargs: dict) -> tuple[list[float], dict[str, list[float]]]:
    """(the weighted sum per completion over the functions that apply, each function's own rewards)."""
    each = {name: call_reward_func(name, func, completions, kwargs) for name, func in funcs.items()}
    totals = [sum(w * r[i] for w, r in zip(weights, each.values()) if not math.isnan(r[i])) for i in range(len(completions))]
    return totals, each
