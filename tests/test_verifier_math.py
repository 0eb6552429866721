"""Tests for verifiers/math.py (math reward: last boxed answer vs gold, via a killable worker pool)."""

from __future__ import annotations

import json
import os
import multiprocessing
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from verifiers.math import (  # noqa: E402
    MathVerifier,
    answer_region,
    extract_boxed,
    gold_parses,
    is_correct,
)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
BENCH_FILES = ["aime_2024.jsonl", "aime_2025.jsonl", "aime_2026.jsonl", "hmmt_feb_2025.jsonl"]

TIMEOUT_S = 2.0
SLACK_S = 3.0  # scheduling / respawn slack on a loaded 2-core machine


@pytest.fixture(scope="module")
def verifier():
    v = MathVerifier(num_workers=2, timeout_s=TIMEOUT_S)
    yield v
    v.close()


# ---------------------------------------------------------------------------- extract_boxed
@pytest.mark.parametrize(
    "text, expected",
    [
        ("the answer is \\boxed{42}.", "42"),
        ("\\boxed{1} then \\boxed{2}", "2"),  # last box wins
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\fbox{7}", "7"),
        ("\\boxed {7}", "7"),
        ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),  # escaped braces are literal
        ("\\boxed{\\boxed{5}}", "\\boxed{5}"),  # nested box: outer one is the answer
        ("\\boxed{}", ""),
        ("no box here 42", None),
        ("\\boxed{3} and then \\boxed{\\frac{1}{2}", None),  # last box truncated -> no answer
        ("\\boxed{" + "{" * 5000, None),
        ("\\boxedx{3}", None),
        ("", None),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


def test_answer_region_think_and_tail():
    assert answer_region("<think>\\boxed{1}</think> after", 2000) == " after"
    assert answer_region("a</think>b</think>c", 2000) == "c"  # last </think>
    assert answer_region("x" * 5000 + "END", 10) == "x" * 7 + "END"
    assert answer_region("no think tags", 2000) == "no think tags"


def test_extract_boxed_2mb_is_fast():
    t = time.monotonic()
    assert extract_boxed("{ \\boxed{ " * 200_000 + "\\boxed{9}") == "9"
    assert time.monotonic() - t < 10


# ---------------------------------------------------------------------------- equivalences
EQUIV = [
    ("so \\boxed{\\frac{1}{2}}", "0.5"),
    ("so \\boxed{0.5}", "\\frac{1}{2}"),
    ("\\boxed{70}", "70.0"),
    ("\\boxed{70.0}", "70"),
    ("\\boxed{\\dfrac{3}{4}}", "3/4"),
    ("\\boxed{3/4}", "\\frac{3}{4}"),
    ("\\boxed{x = 5}", "5"),
    ("\\boxed{204}", "204"),
    ("\\boxed{033}", "33"),
    ("\\boxed{8\\sqrt{10}}", "8\\sqrt{10}"),
    ("\\boxed{\\frac{\\pi}{2}}", "\\pi/2"),
    ("\\fbox{12}", "12"),
]
WRONG = [
    ("\\boxed{\\frac{1}{3}}", "0.5"),
    ("\\boxed{71}", "70"),
    ("\\boxed{8}", "8\\sqrt{10}"),  # raw-LaTeX-gold trap: unwrapped gold parses to 8
    ("the answer is 70", "70"),  # no box -> 0 (no fallback to loose numbers)
    ("\\boxed{}", "0"),
]


def test_equivalences_pool(verifier):
    comps = [c for c, _ in EQUIV] + [c for c, _ in WRONG]
    golds = [g for _, g in EQUIV] + [g for _, g in WRONG]
    assert verifier.score(comps, golds) == [1.0] * len(EQUIV) + [0.0] * len(WRONG)


@pytest.mark.parametrize("completion, gold", EQUIV[:4])
def test_is_correct_in_process(completion, gold):
    assert is_correct(completion, gold) is True


@pytest.mark.parametrize("completion, gold", WRONG)
def test_is_correct_in_process_wrong(completion, gold):
    assert is_correct(completion, gold) is False


def test_raw_latex_gold_trap(verifier):
    assert verifier.score_one("\\boxed{8}", "8\\sqrt{10}") == 0.0
    assert verifier.score_one("\\boxed{8\\sqrt{10}}", "8\\sqrt{10}") == 1.0


def test_think_handling(verifier):
    # Box only inside the thinking, none after </think>: the text after </think> is used -> 0.
    assert verifier.score_one("<think>\\boxed{5}</think> The answer is five.", "5") == 0.0
    # Box after </think> is used, even if the thinking boxed something else.
    assert verifier.score_one("<think>\\boxed{4}</think> so \\boxed{5}", "5") == 1.0
    assert verifier.score_one("<think>\\boxed{5}</think> so \\boxed{4}", "5") == 0.0
    # No </think> at all: the whole completion is used.
    assert verifier.score_one("<think> hmm \\boxed{5}", "5") == 1.0


def test_last_box_wins(verifier):
    assert verifier.score_one("\\boxed{4} no wait \\boxed{5}", "5") == 1.0
    assert verifier.score_one("\\boxed{5} no wait \\boxed{4}", "5") == 0.0


def test_tail_truncation(verifier):
    # The box is further than tail_chars from the end: not seen.
    assert verifier.score_one("\\boxed{5}" + " filler" * 1000, "5") == 0.0
    assert verifier.score_one(" filler" * 1000 + "\\boxed{5}", "5") == 1.0


def test_bad_inputs(verifier):
    with pytest.raises(ValueError):
        verifier.score(["\\boxed{1}"], [])
    assert verifier.score([], []) == []
    assert verifier.score([None], ["1"]) == [0.0]  # type: ignore[list-item]
    assert verifier.score(["\\boxed{1}"], [1]) == [1.0]  # type: ignore[list-item]


# ---------------------------------------------------------------------------- gold_parses
@pytest.mark.parametrize("gold", ["5", "0.5", "\\frac{1}{2}", "8\\sqrt{10}", "(1,2)", "2^{25} \\cdot 26!"])
def test_gold_parses_good(gold):
    assert gold_parses(gold) is True


@pytest.mark.parametrize("gold", ["", "   ", "\\frac{", "}", "{"])
def test_gold_parses_bad(gold):
    assert gold_parses(gold) is False


# ---------------------------------------------------------------------------- pathological
PATHOLOGICAL = {
    "tower9": "\\boxed{9^{9^{9^{9^{9}}}}}",
    "tower2": "\\boxed{2^{2^{2^{2^{2^{2^{100}}}}}}}",
    "factorial": "\\boxed{(10^{100})!}",
    "2MB": "x" * 2_000_000 + " \\boxed{6}",
    "unbalanced": "\\boxed{\\frac{1}{2}",
    "deep_unbalanced": "\\boxed{" + "{" * 5000 + "5",
    "deep_in_tail": "\\boxed{" + "{" * 900 + "6" + "}" * 900 + "}",
    "empty": "\\boxed{}",
    "weird_chars": "\\boxed{\ud800\x00\uffff\U0001f600 7}\udcff",
}


def test_pathological_inputs_bounded(verifier):
    for name, text in PATHOLOGICAL.items():
        t = time.monotonic()
        r = verifier.score_one(text, "5")
        dt = time.monotonic() - t
        assert r == 0.0, name
        assert dt < TIMEOUT_S + SLACK_S, (name, dt)
    # The pool still works afterwards.
    assert verifier.score_one("\\boxed{\\frac{1}{2}}", "0.5") == 1.0


def test_pathological_batch_bounded(verifier):
    comps = list(PATHOLOGICAL.values()) + ["\\boxed{5}"] * 4
    t = time.monotonic()
    res = verifier.score(comps, ["5"] * len(comps))
    dt = time.monotonic() - t
    assert res == [0.0] * len(PATHOLOGICAL) + [1.0] * 4
    # at most ceil(len/2) rounds of timeout_s each on 2 workers, plus slack
    assert dt < ((len(comps) + 1) // 2) * TIMEOUT_S + SLACK_S


def test_hard_timeout_kills_and_replaces(verifier):
    before = verifier.timeouts
    pids = {w.proc.pid for w in verifier._workers}
    t = time.monotonic()
    assert verifier._debug_run("spin_unstoppable", 60) == 0.0  # burns CPU past the hard limit -> killed
    dt = time.monotonic() - t
    assert TIMEOUT_S - 0.1 <= dt < TIMEOUT_S + SLACK_S
    assert verifier.timeouts == before + 1
    assert {w.proc.pid for w in verifier._workers} != pids  # the hung one was replaced
    assert verifier._debug_run("sleep", 0.01) == 1.0  # the hook itself scores 1 when not killed
    assert verifier.score(["\\boxed{5}", "\\boxed{6}"], ["5", "6"]) == [1.0, 1.0]


def test_soft_cpu_limit_ends_a_check_without_a_kill(verifier):
    before, pids = verifier.timeouts, {w.proc.pid for w in verifier._workers}
    t = time.monotonic()
    assert verifier._debug_run("spin", 60) == 0.0
    assert time.monotonic() - t < TIMEOUT_S / 2 + SLACK_S and verifier.timeouts == before + 1
    assert {w.proc.pid for w in verifier._workers} == pids


def test_a_worker_that_waits_for_a_core_is_not_timed_out(verifier):
    """On a loaded machine a check can wait longer than timeout_s for CPU: only CPU time counts
    (the workers are stopped for twice the limit here, as a starved process would be)."""
    import signal
    import threading

    verifier.score_one("\\boxed{1}", "1")  # workers started and warm
    pids = [w.proc.pid for w in verifier._workers]
    stopped = threading.Event()

    def starve():
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        stopped.set()
        time.sleep(2 * TIMEOUT_S)
        for pid in pids:
            os.kill(pid, signal.SIGCONT)

    before = verifier.timeouts
    thread = threading.Thread(target=starve)
    thread.start()
    stopped.wait()
    t = time.monotonic()
    assert verifier.score(["\\boxed{\\frac{1}{2}}", "\\boxed{7}"], ["0.5", "7"]) == [1.0, 1.0]
    assert time.monotonic() - t >= 1.5 * TIMEOUT_S and verifier.timeouts == before
    thread.join()
    assert [w.proc.pid for w in verifier._workers] == pids


def test_a_worker_that_hangs_without_cpu_is_killed_at_max_wall_s():
    with MathVerifier(num_workers=1, timeout_s=TIMEOUT_S, max_wall_s=1.0) as v:
        v.score_one("\\boxed{1}", "1")
        t = time.monotonic()
        assert v._debug_run("sleep", 60) == 0.0
        assert time.monotonic() - t < 1.0 + SLACK_S and v.timeouts == 1
        assert v.score_one("\\boxed{2}", "2") == 1.0


def test_timeout_in_batch_does_not_block_others(verifier):
    before = verifier.timeouts
    # One worker hangs; the other keeps serving the rest of the batch.
    jobs = [(0, ("_debug", "spin_unstoppable", 60))] + [(i, ("check", "5", "5")) for i in range(1, 21)]
    t = time.monotonic()
    res = verifier._run_jobs(jobs)
    dt = time.monotonic() - t
    assert res[0] == 0.0 and all(res[i] == 1.0 for i in range(1, 21))
    assert dt < TIMEOUT_S + SLACK_S
    assert verifier.timeouts == before + 1


def test_worker_crash_counts_error(verifier):
    before = verifier.errors
    assert verifier._debug_run("exit", 3) == 0.0
    assert verifier.errors == before + 1
    assert verifier.score_one("\\boxed{5}", "5") == 1.0


# ---------------------------------------------------------------------------- benchmark golds
@pytest.mark.skipif(not DATA.is_dir(), reason=f"{DATA} absent")
def test_benchmark_golds_self_verify(verifier):
    golds, ids = [], []
    for name in BENCH_FILES:
        for line in (DATA / name).read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                golds.append(row["answer"])
                ids.append(row["id"])
    assert len(golds) == 120
    assert all(gold_parses(g) for g in golds)
    res = verifier.score(["\\boxed{" + g + "}" for g in golds], golds)
    failed = [(i, g) for i, g, r in zip(ids, golds, res) if r != 1.0]
    assert not failed, failed


# ---------------------------------------------------------------------------- lifecycle
def test_no_orphans_after_close():
    psutil = pytest.importorskip("psutil")
    v = MathVerifier(num_workers=2, timeout_s=TIMEOUT_S)
    assert v._workers == []  # lazy start
    with v:
        assert v.score_one("\\boxed{2}", "2") == 1.0
        pids = [w.proc.pid for w in v._workers]
        assert len(pids) == 2
    for pid in pids:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert not {p.pid for p in multiprocessing.active_children()} & set(pids)
    assert not {c.pid for c in psutil.Process().children(recursive=True)} & set(pids)
    v.close()  # idempotent
    with pytest.raises(RuntimeError):
        v.score_one("\\boxed{2}", "2")


def test_workers_do_not_reimport_main(tmp_path):
    """Workers are spawned without re-importing the parent's __main__ (which may import torch):
    the script below kills any process that imports it as a non-main module."""
    script = tmp_path / "main_with_sentinel.py"
    script.write_text(
        "import sys, os\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "if __name__ != '__main__':\n"
        "    raise SystemExit('main module re-imported in worker')\n"
        "from verifiers.math import MathVerifier\n"
        "with MathVerifier(num_workers=1) as v:\n"
        "    print(v.score_one('\\\\boxed{3}', '3'))\n"
    )
    import subprocess

    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1.0"]


@pytest.mark.parametrize("how", ["exit_without_close", "parent_sigkilled"])
def test_no_orphans_when_parent_exits(tmp_path, how):
    """Workers go away at interpreter exit without close(), and when the parent is SIGKILLed."""
    import os
    import signal
    import subprocess

    psutil = pytest.importorskip("psutil")
    script = tmp_path / "parent.py"
    script.write_text(
        "import sys, time\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "from verifiers.math import MathVerifier\n"
        "v = MathVerifier(num_workers=2, timeout_s=120)\n"
        "v.score_one('\\\\boxed{3}', '3')\n"
        "print(' '.join(str(w.proc.pid) for w in v._workers), flush=True)\n"
        f"if {how == 'parent_sigkilled'}:\n"
        "    v._run_jobs([(0, ('_debug', 'sleep', 100)), (1, ('_debug', 'sleep', 100))])\n"
    )
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    pids = [int(x) for x in proc.stdout.readline().split()]
    assert len(pids) == 2
    if how == "parent_sigkilled":  # both workers busy (sleeping 100 s): only PDEATHSIG ends them
        time.sleep(1.0)
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.monotonic() + 10
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        time.sleep(0.1)
    assert not alive


def test_interrupted_batch_leaves_pool_usable(verifier):
    """An exception (e.g. Ctrl-C) mid-batch kills in-flight workers so stale results can't leak."""
    import signal

    class _Interrupt(Exception):
        pass

    def _raise(*_):
        raise _Interrupt

    old = signal.signal(signal.SIGALRM, _raise)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.5)
        with pytest.raises(_Interrupt):
            verifier._run_jobs([(0, ("_debug", "sleep", 1.5)), (1, ("_debug", "sleep", 1.5))])
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    time.sleep(1.5)  # the old jobs would have finished by now if their workers were still alive
    assert verifier.score(["\\boxed{1}", "\\boxed{2}", "\\boxed{3}"], ["1", "0", "3"]) == [1.0, 0.0, 1.0]
