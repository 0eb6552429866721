"""The test runner that runs inside the sandbox for the `code_tests` reward (verifiers/code_tests.py).

Shipped as text and run by ``run_sandboxed`` as the sandbox's main program: it reads a job as JSON
on stdin, ``{"programs": [{"code", "setup", "kind": "assert" | "stdio", "tests"}, ...],
"test_timeout_s", "sweep"}``, and for each test of each program forks a child that runs the
untrusted program and that one test:

* ``assert``: ``exec(setup + code)`` then ``exec(test)`` (a line such as ``assert f(2) == 7``); the
  test passes when the child exits cleanly.
* ``stdio``: the program runs as ``__main__`` with ``{"input"}`` on stdin; the test passes when
  what it printed equals ``{"output"}`` line by line (trailing whitespace and blank edges ignored).

The untrusted code never runs in this process: each child closes the result stream before it runs
anything, starts its own process group, and gets a CPU limit of ``ceil(test_timeout_s)`` seconds
(a wall-clock backstop of 4x that + 1 s catches programs that sleep); whatever it leaves running is
killed with its group. After a test that timed out, the remaining tests are not run (as evalplus).
With ``sweep`` (the sandbox has a PID namespace, whose init is the launcher) every other process in
the namespace is killed after each test, so nothing a program started outlives its test and touches
the next program's. One JSON line per test on a private dup of the original stdout, ``{"p", "i",
"ok", "why"}`` (program p, test i), and ``{"p", "done": true}`` after each program: the host re-runs
alone any program of a batch without its "done" (a program that killed this process).
Standard library only.
"""

import io
import json
import math
import os
import resource
import select
import signal
import sys
import time

_MAX_STDOUT = 1 << 20


def _normalize(text):
    return [line.rstrip() for line in text.strip().splitlines()]


def _sweep():
    """Kill every process of the PID namespace but the launcher (pid 1) and this one."""
    me = os.getpid()
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) not in (1, me):
            try:
                os.kill(int(name), signal.SIGKILL)
            except OSError:
                pass
    try:
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        pass


def _child(job, test, result_fd, write_fd):
    """Run in the forked child: the program and one test; exits 0 when the test passed."""
    os.close(result_fd)
    os.setpgid(0, 0)
    cpu = max(1, math.ceil(job["test_timeout_s"]))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    source = (job.get("setup") or "") + "\n" + job["code"]
    if job["kind"] == "assert":
        try:
            env = {"__name__": "__antisd_solution__"}
            exec(compile(source, "<solution>", "exec"), env)
            exec(compile(test, "<test>", "exec"), env)
        except BaseException:
            os._exit(1)
        os._exit(0)
    sys.stdin = io.TextIOWrapper(io.BytesIO(str(test.get("input", "")).encode()), encoding="utf-8")
    out = io.StringIO()
    sys.stdout = out
    status = 0
    try:
        exec(compile(source, "<solution>", "exec"), {"__name__": "__main__"})
    except SystemExit as e:
        status = 0 if e.code in (None, 0) else 1
    except BaseException:
        status = 1
    data = out.getvalue().encode("utf-8", errors="replace")[:_MAX_STDOUT]
    try:
        while data:
            n = os.write(write_fd, data)
            data = data[n:]
    except OSError:
        status = 1
    os._exit(status)


def _kill_group(pid):
    for target in (lambda: os.killpg(pid, signal.SIGKILL), lambda: os.kill(pid, signal.SIGKILL)):
        try:
            target()
        except OSError:
            pass


def _run_one(job, test, result_fd):
    """(ok, why) of one test."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        try:
            _child(job, test, result_fd, write_fd)
        finally:
            os._exit(1)
    os.close(write_fd)
    deadline = time.monotonic() + 4 * job["test_timeout_s"] + 1.0
    chunks, size, status, open_read = [], 0, None, True
    while status is None:
        if open_read:
            ready, _, _ = select.select([read_fd], [], [], 0.005)
            if ready:
                chunk = os.read(read_fd, 1 << 16)
                if not chunk:
                    open_read = False
                elif size < _MAX_STDOUT:
                    chunks.append(chunk)
                    size += len(chunk)
        else:
            time.sleep(0.002)
        done, wstatus = os.waitpid(pid, os.WNOHANG)
        if done:
            status = wstatus
        elif time.monotonic() > deadline:
            _kill_group(pid)
            os.waitpid(pid, 0)
            os.close(read_fd)
            return False, "timeout"
    while open_read:  # what the child wrote before it exited
        ready, _, _ = select.select([read_fd], [], [], 0.2)
        chunk = os.read(read_fd, 1 << 16) if ready else b""
        if not chunk:
            break
        if size < _MAX_STDOUT:
            chunks.append(chunk)
            size += len(chunk)
    os.close(read_fd)
    _kill_group(pid)  # anything the program left running
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        return False, "timeout" if sig in (signal.SIGXCPU, signal.SIGKILL) else "signal %d" % sig
    if os.WEXITSTATUS(status) != 0:
        return False, "failed"
    if job["kind"] == "assert":
        return True, "passed"
    got = b"".join(chunks).decode("utf-8", errors="replace")
    return (True, "passed") if _normalize(got) == _normalize(str(test.get("output", ""))) else (False, "wrong output")


def main():
    job = json.loads(sys.stdin.buffer.read())
    result_fd = os.dup(1)
    nul = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(nul, fd)

    def emit(obj):
        data = (json.dumps(obj) + "\n").encode()
        while data:
            data = data[os.write(result_fd, data):]

    for p, program in enumerate(job["programs"]):
        program = dict(program, test_timeout_s=job["test_timeout_s"])
        timed_out = False
        for i, test in enumerate(program["tests"]):
            if timed_out:
                emit({"p": p, "i": i, "ok": False, "why": "not run (an earlier test timed out)"})
                continue
            ok, why = _run_one(program, test, result_fd)
            if job.get("sweep"):
                _sweep()
            timed_out = why == "timeout"
            emit({"p": p, "i": i, "ok": ok, "why": why})
        emit({"p": p, "done": True})


if __name__ == "__main__":
    main()
