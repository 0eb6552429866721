"""The `code_tests` reward: the share of a row's tests a completion's program passes, in the sandbox.

    --reward_funcs code_tests [--code_reward binary]

`extract_program` takes the program out of a completion (after any `</think>`: the last fenced
code block, preferring ```python ones; an unclosed fence to the end; else a bare program from its
first `def`/`import`/`class` line). `CodeTester.run` runs each program against its tests, one
`verifiers.sandbox.run_sandboxed` process per program (network, file system and processes isolated,
memory and process limits, a wall clock), `num_workers` at a time from a thread pool, as evaluate.py
checks MBPP+ (up to `batch_size` programs share a sandbox when it has a PID namespace); inside it,
verifiers/code_tests_harness.py forks one child per test under a CPU limit, so a program never runs
in the process that reports the results. Tests are assert lines (`assert
f(2) == 7`, run after the program) or stdin/stdout pairs (`{"input", "output"}`).

`CodeTestsReward` is the TRL-signature reward (`f(completions, tests, **kwargs)`): passed / total
(`binary`: 1.0 only when every test passes). It keeps each call's `(passed, total)` per completion in
`.counts`, which the trainer reads for the teacher's privileged context: `prompts.code_feedback`
("Your code passes N of M test cases.") and which rollouts count as correct (all tests passed).
"""

from __future__ import annotations

import ast
import functools
import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from verifiers.reward_funcs import CODE_TESTS
from verifiers.sandbox import run_sandboxed

REWARD_MODES = ("fraction", "binary")
_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.S)
_CODE_START = re.compile(r"^(def |class |import |from \S+ import |async def |@)", re.M)
MAX_PROGRAM_CHARS = 50_000


@functools.lru_cache(maxsize=1)
def _harness_source() -> str:
    return Path(__file__).with_name("code_tests_harness.py").read_text(encoding="utf-8")


def extract_program(completion: str) -> str:
    """The program in a completion ('' when there is none); see the module docstring."""
    text = completion.rsplit("</think>", 1)[-1]
    blocks = [(m.group(1).lower(), m.group(2)) for m in _FENCE.finditer(text)]
    if blocks:
        python = [code for lang, code in blocks if lang in ("python", "py", "python3")]
        return (python or [code for _, code in blocks])[-1].strip("\n")[:MAX_PROGRAM_CHARS]
    start = _CODE_START.search(text)
    return text[start.start():].strip("\n")[:MAX_PROGRAM_CHARS] if start else ""


def parse_tests(tests) -> tuple[str, list]:
    """(kind, cases) of a row's tests: a list of assert lines, a list of {"input", "output"} dicts,
    a JSON string of either, a one-element list holding such a JSON string (Dolci-RL-Zero-Code's
    `ground_truth`), or {"kind", "cases"}. Raises ValueError for anything else."""
    if isinstance(tests, dict) and "cases" in tests:
        return parse_tests(tests["cases"])
    if isinstance(tests, str):
        stripped = tests.strip()
        if stripped.startswith("["):
            try:
                return parse_tests(json.loads(stripped))
            except json.JSONDecodeError as err:
                raise ValueError(f"tests are not valid JSON: {err}") from None
        asserts = _assert_block(stripped)  # a block of asserts (after imports, as evalplus's `assertion`)
        if asserts:
            return "assert", asserts
        raise ValueError("tests must be assert lines, {input, output} pairs or JSON of either; got a string "
                         f"starting {stripped[:60]!r} (compressed/pickled test suites are not read)")
    if isinstance(tests, (list, tuple)):
        if len(tests) == 1 and isinstance(tests[0], str) and tests[0].lstrip().startswith("["):
            return parse_tests(tests[0])
        if tests and all(isinstance(t, str) for t in tests):
            blocks = [_assert_block(t.strip()) for t in tests if t.strip()]
            if blocks and all(blocks):
                return "assert", [case for block in blocks for case in block]
            raise ValueError(f"a test is not an assert statement: {next(t for t, b in zip(tests, blocks) if not b)[:60]!r} "
                             "(compressed/pickled test suites are not read)")
        if tests and all(isinstance(t, dict) and "input" in t and "output" in t for t in tests):
            return "stdio", [{"input": str(t["input"]), "output": str(t["output"])} for t in tests]
    raise ValueError(f"tests must be a non-empty list of assert lines or of {{input, output}} pairs, got {str(tests)[:80]!r}")


def _assert_block(source: str) -> list[str] | None:
    """The assert statements of a block of code, each prefixed by the block's other statements
    (imports, helpers) when it has some; None when it does not parse or has no assert."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError, RecursionError):
        return None
    asserts = [ast.get_source_segment(source, n) for n in tree.body if isinstance(n, ast.Assert)]
    setup = "\n".join(ast.get_source_segment(source, n) for n in tree.body if not isinstance(n, ast.Assert))
    return [f"{setup}\n{a}" if setup else a for a in asserts] or None


class CodeTester:
    """Runs programs against tests in the sandbox, `num_workers` sandboxes at a time.

    test_timeout_s: CPU seconds a test may take (whole seconds, at least 1; SDPO's code prompt
    states a 1-second limit). memory_mb / max_procs: the sandbox's per-process limits.
    batch_size: programs per sandbox run where the sandbox has a PID namespace (a fresh sandbox costs
    ~0.1 s; inside it each test still runs in its own forked child, every process is killed between
    tests, and a program that kills the runner has the rest of its batch re-run one program a sandbox)."""

    def __init__(self, num_workers: int = 2, test_timeout_s: float = 1.0, memory_mb: int = 1024, max_procs: int = 32,
                 batch_size: int = 8):
        self.num_workers, self.test_timeout_s = max(1, num_workers), test_timeout_s
        self.memory_mb, self.max_procs, self.batch_size = memory_mb, max_procs, max(1, batch_size)

    def _run_batch(self, jobs: list[tuple[str, str, list]], sweep: bool) -> list[list[str] | None]:
        """Why per test of each (program, kind, cases) job; None for a program whose run did not finish."""
        programs = [{"code": code, "setup": "", "kind": kind, "tests": cases} for code, kind, cases in jobs]
        n_tests = sum(len(cases) for _, _, cases in jobs)
        job = {"programs": programs, "test_timeout_s": self.test_timeout_s, "sweep": sweep}
        res = run_sandboxed(_harness_source(), stdin=json.dumps(job), memory_mb=self.memory_mb, max_procs=self.max_procs,
                            timeout_s=10.0 + n_tests * (4 * self.test_timeout_s + 1.0), max_output_bytes=1 << 20)
        why = [["no result"] * len(cases) for _, _, cases in jobs]
        done = [False] * len(jobs)
        for line in res.stdout.splitlines():
            try:
                obj = json.loads(line)
            except (ValueError, RecursionError):
                continue
            p = obj.get("p") if isinstance(obj, dict) else None
            if not isinstance(p, int) or not 0 <= p < len(jobs) or done[p]:
                continue
            if obj.get("done") is True:
                done[p] = True
            elif isinstance(obj.get("i"), int) and 0 <= obj["i"] < len(why[p]):
                why[p][obj["i"]] = "passed" if obj.get("ok") is True else str(obj.get("why", "failed"))
        return [w if d else None for w, d in zip(why, done)]

    def run_one(self, program: str, tests, setup: str = "") -> tuple[int, int, list[str]]:
        """(passed, total, why per test) of one program, alone in its sandbox."""
        kind, cases = parse_tests(tests)
        if not program.strip():
            return 0, len(cases), ["no program"] * len(cases)
        why = self._run_batch([((setup or "") + "\n" + program if setup else program, kind, cases)], sweep=False)[0]
        why = why or ["no result"] * len(cases)
        return sum(w == "passed" for w in why), len(cases), why

    def run(self, programs: list[str], tests: list, setups: list[str] | None = None) -> list[tuple[int, int]]:
        """(passed, total) per program."""
        from verifiers.sandbox import sandbox_capabilities

        setups = setups or [""] * len(programs)
        parsed = [parse_tests(t) for t in tests]
        jobs = [((s + "\n" + p) if s else p, kind, cases) for p, s, (kind, cases) in zip(programs, setups, parsed)]
        results: list[tuple[int, int] | None] = [(0, len(cases)) if not code.strip() else None for code, _, cases in jobs]
        todo = [i for i, r in enumerate(results) if r is None]
        size = self.batch_size if sandbox_capabilities()["pid_namespace"] else 1
        batches = [todo[k:k + size] for k in range(0, len(todo), size)]

        def work(batch):
            return batch, self._run_batch([jobs[i] for i in batch], sweep=size > 1)

        with ThreadPoolExecutor(max_workers=max(1, min(self.num_workers, len(batches)))) as pool:
            for batch, whys in pool.map(work, batches):
                for i, why in zip(batch, whys):
                    if why is None and size > 1:  # the batch's runner was killed: this program alone
                        why = self.run_one(jobs[i][0], jobs[i][2])[2]
                    why = why or ["no result"] * len(jobs[i][2])
                    results[i] = (sum(w == "passed" for w in why), len(why))
        return results


class CodeTestsReward:
    """TRL-signature reward: the share of its row's `tests` each completion's program passes
    (`binary`: all or nothing). `.counts` holds the last call's (passed, total) per completion."""

    __name__ = CODE_TESTS

    def __init__(self, mode: str = "fraction", tester: CodeTester | None = None):
        if mode not in REWARD_MODES:
            raise ValueError(f"--code_reward must be one of {REWARD_MODES}, got {mode!r}")
        self.mode, self.tester, self.counts = mode, tester or CodeTester(), []

    def __call__(self, completions: list[str], tests: list, test_setup: list | None = None, **kwargs) -> list[float]:
        if not tests or any(t is None for t in tests):
            raise ValueError("code_tests needs each row's `tests` (a code dataset; see data/code.py)")
        self.counts = self.tester.run([extract_program(c) for c in completions], tests, test_setup)
        if self.mode == "binary":
            return [float(total > 0 and passed == total) for passed, total in self.counts]
        return [passed / total if total else 0.0 for passed, total in self.counts]


@functools.lru_cache(maxsize=1)
def _default_reward() -> CodeTestsReward:
    return CodeTestsReward()


def code_tests(completions: list[str], tests: list, **kwargs) -> list[float]:
    """`--reward_funcs verifiers.code_tests:code_tests`: CodeTestsReward with its defaults."""
    return _default_reward()(completions, tests, **kwargs)


def feedback_counts(reward_funcs: dict, truncated: list[bool], truncated_is_wrong: bool) -> list[tuple[int, int]] | None:
    """The code_tests reward's (passed, total) per rollout of the last call, for the teacher's feedback (None
    when it is not among `reward_funcs`); a truncated completion scored 0 (`truncated_is_wrong`) passes none."""
    counts = getattr(reward_funcs.get("code_tests"), "counts", None)
    if counts is None:
        return None
    return [(0, t) if truncated_is_wrong and cut else (p, t) for (p, t), cut in zip(counts, truncated)]
