"""Math answer reward: last ``\\boxed{}`` answer vs. a gold answer, checked with math-verify.

Use it on its own::

    from verifiers.math import MathVerifier

    with MathVerifier(num_workers=2, timeout_s=5.0) as v:
        v.score(["... so the answer is \\boxed{1/2}", "\\boxed{3}"], ["0.5", "4"])  # -> [1.0, 0.0]
        v.score_one("<think>...</think> The answer is \\boxed{\\dfrac{3}{4}}.", "3/4")   # -> 1.0
        v.timeouts, v.errors                                                           # counters

Rules (see SPEC section 4):

* Answer region: the text after the LAST ``</think>`` if there is one (a ``\\boxed{}`` that only appears inside the
  thinking does not count), otherwise the whole completion (an unclosed ``<think>`` is not special). Cut to its
  last ``tail_chars`` characters.
* Prediction: the content of the LAST top-level ``\\boxed{...}`` (or ``\\fbox{...}``) in that region, braces matched
  with a stack (``\\{`` / ``\\}`` are literal, not structural). If that last box is never closed (truncated output)
  there is no answer. No box -> score 0.0: we deliberately do NOT fall back to parsing loose numbers in the text.
* Gold: ``"$" + gold + "$"`` before ``parse`` (a raw ``8\\sqrt{10}`` parses to ``8``); ``verify(gold, pred)`` in that order.
* Every pooled check runs in a long-lived worker process (spawn start method, no torch imported there) under a hard
  limit of ``timeout_s`` seconds of the worker's CPU time, enforced by the parent: a worker that overruns is SIGKILLed
  and replaced, the check scores 0.0 and ``timeouts`` is incremented; a worker that dies (or raises) scores 0.0 and
  increments ``errors``. Inside workers a soft limit of half that CPU time (``ITIMER_PROF``) ends most slow checks
  without a kill (also counted in ``timeouts``). The limits count CPU time, not wall time, because on a loaded machine
  a trivial check can wait seconds for a core: wall-clock limits (math-verify's own ``signal.alarm``, which is off in
  workers) then score right answers 0. A worker that uses no CPU for ``max_wall_s`` (default 30 x ``timeout_s``) is killed too.

Light on purpose: spawned workers import it, so only the standard library at top level (math_verify lazily).
"""

from __future__ import annotations

import collections
import functools
import logging
import multiprocessing
import multiprocessing.connection
import multiprocessing.spawn
import os
import signal
import sys
import threading
import time
import weakref

__all__ = ["MathVerifier", "extract_boxed", "answer_region", "last_boxed_span", "graded_answer", "is_correct",
           "gold_parses", "TAIL_CHARS", "DEFAULT_TIMEOUT_S"]

TAIL_CHARS = 2000  # only the last this-many characters of the answer region are searched
DEFAULT_TIMEOUT_S = 4.0  # hard limit per pooled check, in the worker's CPU seconds
GOLD_PARSE_TIMEOUT_S = 3  # int seconds: math-verify's own (signal.alarm) parsing timeout for gold_parses
WORKER_START_TIMEOUT_S = 120.0  # a worker that is not ready (math_verify imported) by then is replaced
_MAX_START_FAILURES = 3  # consecutive worker start failures before score() raises
_WORKER_NAME_PREFIX = "antisd-math-verifier-"
_START_METHOD = "spawn"

_BOX_CMDS = ("\\boxed", "\\fbox")


# --------------------------------------------------------------------------------------------
# Pure helpers (no math_verify needed)
# --------------------------------------------------------------------------------------------

def answer_region_start(text: str, tail_chars: int = TAIL_CHARS) -> int:
    """Where the answer region begins: after the last ``</think>`` (0 if none), and no earlier than
    ``tail_chars`` characters before the end."""
    idx = text.rfind("</think>")
    start = idx + len("</think>") if idx >= 0 else 0
    if tail_chars is not None and tail_chars > 0 and len(text) - start > tail_chars:
        start = len(text) - tail_chars
    return start


def answer_region(text: str, tail_chars: int = TAIL_CHARS) -> str:
    """Text after the last ``</think>`` (whole text if none), cut to its last ``tail_chars`` chars."""
    return text[answer_region_start(text, tail_chars):]


def _last_top_level_box(text: str) -> tuple[int, int] | None:
    """(start of the command, end after the closing brace) of the last top-level box in ``text``;
    None if there is none or it is never closed. See :func:`extract_boxed` for the rules."""
    if not text or ("\\boxed" not in text and "\\fbox" not in text):
        return None
    n = len(text)
    # Opening brace of each box command -> where the command starts.
    command_at: dict[int, int] = {}
    for cmd in _BOX_CMDS:
        start = text.find(cmd)
        while start >= 0:
            j = start + len(cmd)
            # \boxedx is another macro name, not \boxed; skip letters-after check via isalpha
            if j < n and not text[j].isalpha():
                while j < n and text[j] in " \t":
                    j += 1
                if j < n and text[j] == "{":
                    command_at[j] = start
            start = text.find(cmd, start + 1)
    if not command_at:
        return None
    opens = sorted(command_at)
    # Single pass matching of every structural brace.
    match: dict[int, int] = {}
    stack: list[int] = []
    i = 0
    while i < n:
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            stack.append(i)
        elif ch == "}" and stack:
            o = stack.pop()
            if o in command_at:
                match[o] = i
        i += 1
    # Top-level boxes: not inside the span of an earlier closed box.
    last_top: int | None = None
    covered_until = -1
    for o in opens:
        if o <= covered_until:
            continue
        last_top = o
        if o in match:
            covered_until = match[o]
    if last_top is None or last_top not in match:
        return None
    return command_at[last_top], match[last_top] + 1


def _box_content(box: str) -> str:
    """``\\boxed{x}`` -> ``x``."""
    return box[box.index("{") + 1:-1]


def extract_boxed(text: str) -> str | None:
    """Content of the last top-level ``\\boxed{...}`` / ``\\fbox{...}`` in ``text``, else None.

    Linear time. Braces are matched with a stack; a backslash escapes the next character, so
    ``\\{`` and ``\\}`` are literal. A box nested inside another (closed) box is not top-level.
    If the last top-level box is never closed, returns None (the final answer is truncated).
    ``\\boxed {x}`` (spaces before the brace) is accepted; ``\\boxed x`` is not.
    """
    span = _last_top_level_box(text)
    return None if span is None else _box_content(text[span[0]:span[1]])


def last_boxed_span(text: str, tail_chars: int = TAIL_CHARS) -> tuple[int, int] | None:
    """(start, end) in ``text`` of the box the verifier grades, e.g. ``text[start:end] ==
    "\\boxed{3}"``: the last top-level box of the answer region (:func:`answer_region`), found
    as :func:`extract_boxed` finds it. None when the verifier sees no answer. Cutting ``text`` at
    ``end`` keeps that box graded and the grade unchanged (what the teacher is shown)."""
    start = answer_region_start(text, tail_chars)
    span = _last_top_level_box(text[start:])
    return None if span is None else (start + span[0], start + span[1])


def graded_answer(completion: str, tail_chars: int = TAIL_CHARS) -> str | None:
    """The content of the box the verifier grades (:func:`last_boxed_span`), else None."""
    span = last_boxed_span(completion, tail_chars)
    return None if span is None else _box_content(completion[span[0]:span[1]])


# --------------------------------------------------------------------------------------------
# In-process checking (what workers run)
# --------------------------------------------------------------------------------------------

def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _mv_timeout(seconds: int | None) -> int | None:
    """math-verify timeouts use signal.alarm: only usable in the main thread."""
    return seconds if (seconds and _in_main_thread()) else None


@functools.lru_cache(maxsize=4096)
def _parse_gold(gold: str, timeout: int | None) -> list:
    from math_verify import parse

    return parse("$" + gold + "$", parsing_timeout=timeout)


@functools.lru_cache(maxsize=4096)
def _parse_pred(content: str, timeout: int | None) -> list:
    # Cached: in RL groups many samples box the same string; parsing (antlr) is most of the cost.
    from math_verify import parse

    return parse("$\\boxed{" + content + "}$", parsing_timeout=timeout)


def _verify_content(content: str, gold: str, timeout: int | None) -> bool:
    """Parse boxed ``content`` and ``gold`` and verify. May raise (callers decide what that means)."""
    from math_verify import verify

    gold_parsed = _parse_gold(gold, timeout)
    if not gold_parsed:
        return False
    pred_parsed = _parse_pred(content, timeout)
    if not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=timeout))


def is_correct(completion: str, gold: str, tail_chars: int = TAIL_CHARS) -> bool:
    """Single in-process check: extract the last boxed answer and verify it against ``gold``.

    No hard time limit: only math-verify's own signal.alarm timeouts (main thread only; none in
    other threads), which some inputs overrun. Use :class:`MathVerifier` for untrusted text.
    Never raises; any error counts as incorrect.
    """
    try:
        content = graded_answer(completion, tail_chars)
        if content is None:
            return False
        return _verify_content(content, str(gold), _mv_timeout(int(DEFAULT_TIMEOUT_S)))
    except Exception:
        return False


def gold_parses(gold: str) -> bool:
    """True if ``"$" + gold + "$"`` parses to at least one math object (not just a raw-string fallback).

    In-process, for data loaders rejecting bad rows. Bounded by math-verify's ``parsing_timeout``
    (signal.alarm, whole seconds) when called from the main thread; note that alarm cancels any
    alarm the caller had set. In other threads it runs without a timeout.
    """
    if not isinstance(gold, str) or not gold.strip():
        return False
    try:
        from math_verify import parse

        parsed = parse("$" + gold + "$", parsing_timeout=_mv_timeout(GOLD_PARSE_TIMEOUT_S))
    except Exception:
        return False
    return any(not isinstance(p, str) for p in parsed)


# --------------------------------------------------------------------------------------------
# Worker process
# --------------------------------------------------------------------------------------------

def _set_parent_death_signal(parent_pid: int) -> None:
    """Linux: SIGKILL this worker if the parent dies (even while we are stuck in C code)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except Exception:
        pass
    if os.getppid() != parent_pid:  # parent already gone before prctl took effect
        os._exit(0)


class _CpuTimeout(BaseException):
    """The soft per-check CPU limit. A BaseException, so that math-verify's broad ``except
    Exception`` clauses cannot turn it into a silent False."""


def _raise_cpu_timeout(signum, frame) -> None:
    raise _CpuTimeout


def _worker_main(conn, parent_pid: int, inner_timeout: float) -> None:
    """Worker loop. Messages in: ("check", content, gold) | ("_debug", kind, arg) | None.
    Messages out: ("ready", pid) | ("ok", bool) | ("err", str) | ("timeout",)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's business
    signal.signal(signal.SIGPROF, _raise_cpu_timeout)
    _set_parent_death_signal(parent_pid)
    logging.getLogger("math_verify").setLevel(logging.CRITICAL)
    try:
        _verify_content("1", "1", None)  # import math_verify + warm caches
    except Exception:
        pass
    conn.send(("ready", os.getpid()))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            break
        if msg is None:
            break
        try:
            signal.setitimer(signal.ITIMER_PROF, inner_timeout)  # counts this process's CPU time only
            if msg[0] == "check":
                out = ("ok", _verify_content(msg[1], msg[2], None))
            elif msg[0] == "_debug":  # test hook: ("_debug", "sleep" | "spin" | "spin_unstoppable", s) / ("_debug", "exit", code)
                if msg[1] in ("sleep", "spin", "spin_unstoppable"):
                    if msg[1] == "spin_unstoppable":  # as a long C call would: the soft limit cannot stop it
                        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGPROF})
                    end = time.monotonic() + float(msg[2])
                    while time.monotonic() < end:
                        if msg[1] == "sleep":
                            time.sleep(min(0.05, max(0.0, end - time.monotonic())))
                    out = ("ok", True)
                elif msg[1] == "exit":
                    os._exit(int(msg[2]))
                else:
                    out = ("err", f"unknown debug command {msg[1]!r}")
            else:
                out = ("err", f"unknown command {msg[0]!r}")
        except _CpuTimeout:
            out = ("timeout",)
        except Exception as e:  # noqa: BLE001 - reported to the parent, counted as an error
            out = ("err", f"{type(e).__name__}: {e}"[:500])
        finally:
            signal.setitimer(signal.ITIMER_PROF, 0)
        try:
            conn.send(out)
        except (EOFError, OSError):
            break
    try:
        conn.close()
    except OSError:
        pass


# spawn/forkserver children normally re-import the parent's __main__ script (which may import
# torch). Our workers only need this module, so drop the main-module entries from the
# preparation data of processes we start (identified by name); other processes are unaffected.
_patch_lock = threading.Lock()
_patched = False


def _install_spawn_patch() -> None:
    global _patched
    with _patch_lock:
        if _patched:
            return
        orig = multiprocessing.spawn.get_preparation_data

        @functools.wraps(orig)
        def get_preparation_data(name, *args, **kwargs):
            d = orig(name, *args, **kwargs)
            if isinstance(name, str) and name.startswith(_WORKER_NAME_PREFIX):
                d.pop("init_main_from_path", None)
                d.pop("init_main_from_name", None)
            return d

        multiprocessing.spawn.get_preparation_data = get_preparation_data
        _patched = True


def _cpu_seconds(pid: int) -> float | None:
    """CPU time (user + system) a process has used so far; None where it cannot be read."""
    try:
        import psutil

        times = psutil.Process(pid).cpu_times()
        return times.user + times.system
    except Exception:  # noqa: BLE001 - gone, or no psutil: the caller falls back to wall time
        return None


class _Worker:
    __slots__ = ("proc", "conn", "ready", "job", "deadline", "wall_deadline", "cpu_start", "start_deadline")

    def __init__(self, proc, conn, start_deadline: float):
        self.proc = proc
        self.conn = conn
        self.ready = False
        self.job: int | None = None  # index of the job in flight
        self.deadline = 0.0  # when to look at the job's CPU time next
        self.wall_deadline = 0.0  # killed then whatever its CPU time
        self.cpu_start: float | None = None  # the worker's CPU seconds when the job was sent
        self.start_deadline = start_deadline

    def kill(self) -> None:
        try:
            if self.proc.is_alive():
                self.proc.kill()
            self.proc.join(timeout=5)
        except Exception:
            pass
        try:
            self.conn.close()
        except Exception:
            pass


def _shutdown_workers(workers: list) -> None:
    """Finalizer (no reference to the verifier). Ask workers to exit, then kill stragglers."""
    for w in workers:
        if not w.ready or w.job is not None:
            continue  # starting or busy: cannot be asked politely
        try:
            w.conn.send(None)
        except Exception:
            pass
    t_end = time.monotonic() + 1.0
    for w in workers:
        try:
            if w.ready and w.job is None:
                w.proc.join(timeout=max(0.0, t_end - time.monotonic()))
        except Exception:
            pass
        w.kill()
    workers.clear()


# --------------------------------------------------------------------------------------------
# Pool
# --------------------------------------------------------------------------------------------

class MathVerifier:
    """Pool of math-verify worker processes with a hard per-check limit on CPU time (module docstring).

    ``score`` is a batch API: checks are dispatched one at a time per worker, all workers busy in
    parallel, results in input order. Workers start lazily (first ``score``) and are long-lived.
    Thread-safe (calls are serialized). Call ``close()`` or use as a context manager; workers are
    also cleaned up at interpreter exit / garbage collection, and die with the parent (Linux).
    """

    def __init__(self, num_workers: int = 2, timeout_s: float = DEFAULT_TIMEOUT_S,
                 tail_chars: int = TAIL_CHARS, max_wall_s: float | None = None):
        if num_workers < 1:
            raise ValueError("num_workers must be >= 1")
        if timeout_s <= 0:
            raise ValueError("timeout_s must be > 0")
        self.num_workers = int(num_workers)
        self.timeout_s = float(timeout_s)
        self.tail_chars = int(tail_chars)
        self.max_wall_s = 30 * self.timeout_s if max_wall_s is None else float(max_wall_s)
        self._inner_timeout = self.timeout_s / 2  # the workers' soft CPU limit, below the hard one
        self.timeouts = 0
        self.errors = 0
        self._ctx = multiprocessing.get_context(_START_METHOD)
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()
        self._closed = False
        self._serial = 0
        self._finalizer = weakref.finalize(self, _shutdown_workers, self._workers)

    # ---- lifecycle -------------------------------------------------------------------------
    def _spawn(self) -> _Worker:
        _install_spawn_patch()
        self._serial += 1
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        proc = self._ctx.Process(
            target=_worker_main,
            args=(child_conn, os.getpid(), self._inner_timeout),
            name=f"{_WORKER_NAME_PREFIX}{self._serial}",
            daemon=True,
        )
        proc.start()
        child_conn.close()
        return _Worker(proc, parent_conn, time.monotonic() + WORKER_START_TIMEOUT_S)

    def _replace(self, w: _Worker) -> None:
        w.kill()
        i = self._workers.index(w)
        self._workers[i] = self._spawn()

    def _ensure_started(self) -> None:
        if self._closed:
            raise RuntimeError("MathVerifier is closed")
        while len(self._workers) < self.num_workers:
            self._workers.append(self._spawn())

    def close(self) -> None:
        """Stop all workers (idempotent)."""
        with self._lock:
            self._closed = True
            self._finalizer()

    def __enter__(self) -> "MathVerifier":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- scoring ---------------------------------------------------------------------------
    def score(self, completions: list[str], golds: list[str]) -> list[float]:
        """1.0 if the last boxed answer of each completion matches its gold, else 0.0 (same order)."""
        if len(completions) != len(golds):
            raise ValueError(f"{len(completions)} completions but {len(golds)} golds")
        results = [0.0] * len(completions)
        jobs = []
        for i, (c, g) in enumerate(zip(completions, golds)):
            if not isinstance(c, str) or g is None:
                continue
            content = graded_answer(c, self.tail_chars)
            if content is None:  # no boxed answer: 0.0 without a round trip
                continue
            jobs.append((i, ("check", content, str(g))))
        if jobs:
            for i, r in self._run_jobs(jobs).items():
                results[i] = r
        return results

    def score_one(self, completion: str, gold: str) -> float:
        return self.score([completion], [gold])[0]

    def _debug_run(self, kind: str, arg) -> float:
        """Test hook: run ("_debug", kind, arg) in a worker under the normal deadline/kill logic.
        kind "sleep" sleeps arg seconds then scores 1.0, "spin" busy-waits arg seconds (CPU time),
        "spin_unstoppable" too with the soft limit's signal blocked; "exit" makes the worker os._exit(arg)."""
        return self._run_jobs([(0, ("_debug", kind, arg))])[0]

    def _run_jobs(self, jobs: list) -> dict:
        with self._lock:
            self._ensure_started()
            try:
                return self._run_jobs_locked(jobs)
            except BaseException:
                # Interrupted (e.g. KeyboardInterrupt): in-flight results would arrive later and be
                # mistaken for the next batch's, so kill busy workers (replaced lazily next time).
                for w in list(self._workers):
                    if w.job is not None:
                        w.kill()
                        self._workers.remove(w)
                raise

    def _run_jobs_locked(self, jobs: list) -> dict:
        results: dict[int, float] = {}
        pending = collections.deque(jobs)
        start_failures = 0
        while pending or any(w.job is not None for w in self._workers):
            # 1) dispatch to idle ready workers
            for w in list(self._workers):
                if pending and w.ready and w.job is None:
                    idx, msg = pending[0]
                    try:
                        w.conn.send(msg)
                    except (OSError, EOFError, ValueError):
                        self._replace(w)  # died while idle: not this job's fault, keep it queued
                        continue
                    pending.popleft()
                    w.job = idx
                    w.cpu_start = _cpu_seconds(w.proc.pid)
                    w.deadline = time.monotonic() + self.timeout_s
                    w.wall_deadline = time.monotonic() + max(self.max_wall_s, self.timeout_s)
            # 2) wait for a result, a death, or the nearest deadline
            now = time.monotonic()
            deadlines = [w.deadline if w.job is not None else w.start_deadline
                         for w in self._workers if w.job is not None or not w.ready]
            wait_s = max(0.0, min(deadlines) - now) if deadlines else None
            objs = []
            for w in self._workers:
                objs.append(w.conn)
                objs.append(w.proc.sentinel)
            ready = set(multiprocessing.connection.wait(objs, timeout=wait_s))
            # 3) handle messages / deaths
            for w in list(self._workers):
                if w.conn in ready:
                    try:
                        msg = w.conn.recv()
                    except (EOFError, OSError):
                        msg = None
                    if msg is None:  # pipe closed: worker died
                        start_failures += self._on_death(w, results)
                        continue
                    if msg[0] == "ready":
                        w.ready = True
                        start_failures = 0
                    elif w.job is not None:
                        if msg[0] == "ok":
                            results[w.job] = 1.0 if msg[1] else 0.0
                        elif msg[0] == "timeout":
                            results[w.job] = 0.0
                            self.timeouts += 1
                        else:
                            results[w.job] = 0.0
                            self.errors += 1
                        w.job = None
                elif w.proc.sentinel in ready:
                    start_failures += self._on_death(w, results)
            # 4) enforce deadlines
            now = time.monotonic()
            for w in list(self._workers):
                if w.job is not None and now >= w.deadline and now < w.wall_deadline:
                    cpu_now = _cpu_seconds(w.proc.pid)
                    if w.cpu_start is not None and cpu_now is not None and cpu_now - w.cpu_start < self.timeout_s:
                        w.deadline = now + max(0.05, self.timeout_s - (cpu_now - w.cpu_start))  # waited, not worked
                        continue
                if w.job is not None and now >= w.deadline:
                    results[w.job] = 0.0
                    self.timeouts += 1
                    w.job = None
                    self._replace(w)
                elif not w.ready and now >= w.start_deadline:
                    start_failures += 1
                    self._replace(w)
            if start_failures >= _MAX_START_FAILURES * self.num_workers:
                raise RuntimeError("math verifier workers repeatedly failed to start")
        return results

    def _on_death(self, w: _Worker, results: dict) -> int:
        """Worker process ended. Returns 1 if it died before becoming ready."""
        failed_start = 0 if w.ready else 1
        if w.job is not None:
            results[w.job] = 0.0
            self.errors += 1
            w.job = None
        self._replace(w)
        return failed_start
