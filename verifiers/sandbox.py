"""Sandboxed execution of untrusted (model-generated) Python: :func:`run_sandboxed`.

Why our own: evalplus's ``reliability_guard`` is not a sandbox (network, ``os.open``, ctypes, signals to
other processes all remain). Every untrusted program runs through :func:`run_sandboxed`.

Protections (probed once per process by :func:`sandbox_capabilities`; the first working tier of ``ISOLATION_TIERS``):

* always: a fresh ``python -s -P`` subprocess (``-I`` minus ``-E``) in its own session/process group; its
  environment rebuilt from nothing (PATH, HOME, TMPDIR, LANG, PYTHONHASHSEED -- honoured --, thread caps; no
  inherited secrets); a throwaway working directory that is also HOME and TMPDIR, deleted afterwards; rlimits
  AS / CPU / NPROC / FSIZE / CORE / NOFILE set by a small trusted launcher (verifiers/sandbox_launcher.py)
  before ``execve`` (no ``preexec_fn``, safe in threaded parents); a wall-clock limit enforced by the parent,
  which then SIGKILLs the process group and every descendant it can find; stdout/stderr read with a byte cap
  (over the cap the program is killed); nothing is ever parsed from the child with ``pickle``.
* ``unshare`` available (util-linux): new network namespace (only a downed ``lo``: no network),
  PID namespace whose init is the launcher (when the program exits or is killed, the kernel kills
  every process left in the namespace: double-forked/setsid daemons cannot outlive the run, and the
  program cannot see or signal host processes), IPC and UTS namespaces, and a mount namespace in
  which every mount is remounted read-only except a size-capped private tmpfs at the working
  directory and a fresh small tmpfs at ``/dev/shm``; a fresh ``/proc``.
* identity: as root the program runs under a random unprivileged uid/gid (so RLIMIT_NPROC really
  applies -- the kernel exempts uid 0 -- and root-only files are unreadable); directories the
  interpreter needs that the unprivileged uid could not traverse (e.g. a pyenv under ``/root``) are
  exposed by bind mounts over a skeleton tmpfs, which also hides the rest of such directories.
  As an ordinary user the launcher runs in a user namespace (``unshare -r``) and the program in a
  nested user namespace as a non-root id with no capabilities (so it cannot undo the read-only
  mounts), and ``no_new_privs`` is set either way.

Fallback (no usable ``unshare``): rlimits + process group + env scrub + temp dir (+ uid drop when root and the
interpreter is reachable). There is then no network or file-system isolation, and escaped daemons are hunted
best-effort by an environment tag. Limits everywhere: memory is per process (RLIMIT_AS), so the aggregate is bounded
by ``max_procs * memory_mb``; no cgroups are used.

``python -m verifiers.sandbox`` prints the capabilities as JSON; ``ANTISD_SANDBOX_TIER=<name prefix>``
(e.g. ``fallback``) forces a tier for testing.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import random
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from verifiers.sandbox_tiers import Tier, available_tiers, find_unshare

__all__ = ["SandboxResult", "SandboxError", "run_sandboxed", "sandbox_capabilities"]

_TAG_VAR = "ANTISD_SANDBOX_TAG"  # environment tag by which escaped processes are found (no PID namespace)
_MAIN = "main.py"  # the program, in the working directory
_LAUNCHER = ".antisd_launcher.py"  # the launcher, beside it (hidden by the tmpfs once mounted)
_SHM_MB = 64
_DRAIN_S = 2.0  # after the program exits, how long its output may still arrive


class SandboxError(RuntimeError):
    """The sandbox itself could not be set up (never raised for misbehaving programs)."""


@dataclass
class SandboxResult:
    returncode: int  # exit status; negative = killed by that signal (like subprocess)
    stdout: str
    stderr: str
    timed_out: bool = False
    killed_reason: str | None = None  # "timeout" | "output_limit" | "cpu_limit" | "file_size_limit" | "signal"
    duration_s: float = 0.0
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    workdir: str = ""  # already deleted; unique per run (tests look for leftovers by it)

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out and self.killed_reason is None


@functools.lru_cache(maxsize=None)
def _program_text(filename: str) -> str:
    """A program shipped into the sandbox: the text of a .py file beside this one."""
    return Path(__file__).with_name(filename).read_text(encoding="utf-8")


def _pyflags() -> list[str]:
    # `-I` is `-E -P -s`; the environment is ours (built from scratch), so drop -E to honour PYTHONHASHSEED.
    return ["-s", "-P"] if sys.version_info >= (3, 11) else ["-I"]


# --------------------------------------------------------------------------------------------------
# Probing which tier works here (once per process)
# --------------------------------------------------------------------------------------------------
_PROBE_LOCK = threading.Lock()
_TIER: Tier | None = None
_CAPS: dict | None = None


def _capabilities(tier: Tier, info: dict, probe_failures: list[str]) -> dict:
    """What the probe program saw in `tier`, as the JSON `python -m verifiers.sandbox` prints."""
    readonly = tier.readonly_fs and info.get("outside_write") == errno.EROFS
    unprivileged = info["euid"] != 0 or tier.drop == "userns"
    return {
        "tier": tier.name,
        "unshare": find_unshare() if tier.command_prefix else None,
        "net_namespace": tier.net_namespace and info.get("net") != "connected" and (info.get("ifaces") or ["lo"]) == ["lo"],
        "pid_namespace": tier.pid_namespace and info["ppid"] == 1,
        "mount_namespace": tier.readonly_fs,
        "readonly_filesystem": bool(readonly),
        "private_tmpfs_workdir": tier.readonly_fs,
        "user_namespace": tier.user_namespace,
        "unprivileged_identity": bool(unprivileged),
        "identity": ("random uid/gid" if tier.drop == "uid" else
                     "nested user namespace (non-root, no capabilities)" if tier.drop == "userns" else
                     "same as parent"),
        "skeleton_binds": [t for t, _ in tier.skeleton],
        "rlimits": ["RLIMIT_AS", "RLIMIT_CPU", "RLIMIT_NPROC", "RLIMIT_FSIZE", "RLIMIT_CORE", "RLIMIT_NOFILE"],
        "nproc_limit_effective": bool(unprivileged) and (tier.drop is not None),
        "process_group_kill": True,
        "env_scrubbed": True,
        "temp_workdir": True,
        "wall_clock_kill": True,
        "output_capped": True,
        "no_new_privs": True,
        "escaped_process_cleanup": ("pid-namespace teardown" if tier.pid_namespace else
                                    "process group + environment-tag scan (best effort)"),
        "probe_failures": probe_failures,
    }


def _probe_tier(tier: Tier, failures: list[str]) -> dict | None:
    """Run the probe program in `tier`: what it reports, or None (the reason appended to failures)."""
    probe_path = os.path.join(tempfile.gettempdir(), f"antisd_probe_{uuid.uuid4().hex}")
    limits = _Limits(timeout_s=20.0, memory_mb=1024, max_procs=16, cpu_s=None, max_output_bytes=1 << 16)
    try:
        res = _run(tier, _program_text("sandbox_probe.py"), stdin=b"", limits=limits,
                   extra_env={"ANTISD_PROBE_PATH": probe_path})
        info = json.loads(res.stdout.strip().splitlines()[-1]) if res.returncode == 0 else None
    except Exception as e:  # noqa: BLE001
        failures.append(f"{tier.name}: {type(e).__name__}: {e}")
        return None
    finally:
        if os.path.exists(probe_path):
            os.unlink(probe_path)
    if info is None:
        failures.append(f"{tier.name}: rc={res.returncode} {res.stderr.strip()[-300:]}")
    return info


def _probe() -> tuple[Tier, dict]:
    global _TIER, _CAPS
    with _PROBE_LOCK:
        if _TIER is not None:
            return _TIER, _CAPS  # type: ignore[return-value]
        failures: list[str] = []
        forced = os.environ.get("ANTISD_SANDBOX_TIER")  # e.g. "fallback" (testing / debugging)
        tiers = [t for t in available_tiers() if not forced or t.name.startswith(forced)]
        if not tiers:
            raise SandboxError(f"ANTISD_SANDBOX_TIER={forced!r} names no available tier")
        for tier in tiers:
            info = _probe_tier(tier, failures)
            if info is not None:
                _TIER, _CAPS = tier, _capabilities(tier, info, failures)
                return _TIER, _CAPS
        raise SandboxError("no sandbox tier works here: " + "; ".join(failures))


def sandbox_capabilities() -> dict:
    """Which protections are active here (probed once, cached)."""
    return dict(_probe()[1])


# --------------------------------------------------------------------------------------------------
# Finding and killing what a program started
# --------------------------------------------------------------------------------------------------
def _proc_table() -> dict[int, int]:
    """pid -> ppid for all visible processes."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                data = f.read()
            out[int(name)] = int(data[data.rfind(b")") + 2:].split()[1])
        except (OSError, ValueError, IndexError):
            pass
    return out


def _descendants(pid: int) -> list[int]:
    kids: dict[int, list[int]] = {}
    for p, pp in _proc_table().items():
        kids.setdefault(pp, []).append(p)
    res, stack = [], [pid]
    while stack:
        for c in kids.get(stack.pop(), []):
            res.append(c)
            stack.append(c)
    return res


def _tagged_pids(tag: str) -> list[int]:
    needle = f"{_TAG_VAR}={tag}".encode()
    res = []
    me = os.getpid()
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    res.append(int(name))
        except OSError:
            pass
    return res


def _kill(pids) -> None:
    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _owned(pid: str) -> bool:
    try:
        return os.stat(f"/proc/{pid}").st_uid == os.getuid()
    except OSError:
        return False


# --------------------------------------------------------------------------------------------------
# One run, step by step: prepare the working dir -> launcher config -> start -> supervise (stdin,
# capped output, wall clock, kills) -> the program's exit status -> clean up
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Limits:
    timeout_s: float
    memory_mb: int
    max_procs: int
    cpu_s: int | None
    max_output_bytes: int
    max_stderr_bytes: int | None = None  # default: max_output_bytes
    disk_mb: int = 256


@dataclass(frozen=True)
class _RunDir:
    path: str  # working directory, also HOME and TMPDIR; becomes a private tmpfs in readonly_fs tiers
    tag: str  # in the program's environment (_TAG_VAR), to find escaped processes
    uid: int  # the random identity for drop == "uid"
    gid: int


def _prepare_run_dir(tier: Tier, source: str) -> _RunDir:
    uid = random.randrange(1_000_000_000, 2_000_000_000)
    run = _RunDir(path=tempfile.mkdtemp(prefix="antisd-sbx-"), tag=uuid.uuid4().hex, uid=uid, gid=uid)
    try:
        with open(os.path.join(run.path, _MAIN), "w", encoding="utf-8") as f:
            f.write(source)
        if tier.drop == "uid" and not tier.readonly_fs:
            os.chown(run.path, run.uid, run.gid)
            os.chmod(os.path.join(run.path, _MAIN), 0o644)
        with open(os.path.join(run.path, _LAUNCHER), "w", encoding="utf-8") as f:
            f.write(_program_text("sandbox_launcher.py"))
    except BaseException:
        shutil.rmtree(run.path, ignore_errors=True)
        raise
    return run


def _rlimits(tier: Tier, limits: _Limits) -> dict[str, list[int]]:
    cpu = int(limits.cpu_s) if limits.cpu_s else int(limits.timeout_s) + 1
    mem = int(limits.memory_mb) * 1024 * 1024
    disk = limits.disk_mb * 1024 * 1024
    nproc = int(limits.max_procs)
    if tier.drop is None and os.geteuid() != 0 and not tier.pid_namespace:
        # RLIMIT_NPROC counts all processes of the real uid: leave room for the ones the user already has.
        mine = sum(1 for p in os.listdir("/proc") if p.isdigit() and _owned(p))
        nproc += mine * 4
    return {
        "RLIMIT_AS": [mem, mem],
        "RLIMIT_CPU": [cpu, cpu + 1],
        "RLIMIT_NPROC": [nproc, nproc],
        "RLIMIT_FSIZE": [disk, disk],
        "RLIMIT_CORE": [0, 0],
        "RLIMIT_NOFILE": [1024, 1024],
    }


def _launcher_config(tier: Tier, run: _RunDir, limits: _Limits, status_fd: int) -> dict:
    """Everything sandbox_launcher.py needs, passed as JSON on its command line."""
    return {
        "status_fd": status_fd, "workdir": run.path, "main": _MAIN, "python": sys.executable, "pyflags": _pyflags(),
        "mounts": tier.readonly_fs, "skeleton": tier.skeleton, "drop": tier.drop, "uid": run.uid, "gid": run.gid,
        "tmpfs_mb": limits.disk_mb, "shm_mb": _SHM_MB, "rlimits": _rlimits(tier, limits),
        "can_raise": os.geteuid() == 0 and not tier.user_namespace,
    }


def _sandbox_env(workdir: str, tag: str, extra: dict | None) -> dict:
    bindir = os.path.dirname(sys.executable)
    env = {
        "PATH": f"{bindir}:/usr/local/bin:/usr/bin:/bin",
        "HOME": workdir,
        "TMPDIR": workdir,
        "TMP": workdir,
        "TEMP": workdir,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "PYTHONHASHSEED": "0",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONIOENCODING": "utf-8",
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "NUMEXPR_NUM_THREADS": "1",
        "MPLBACKEND": "Agg",
        _TAG_VAR: tag,
    }
    if extra:
        env.update(extra)
    return env


def _start(tier: Tier, run: _RunDir, limits: _Limits, status_fd: int, extra_env: dict | None) -> subprocess.Popen:
    """Start the launcher (under unshare when the tier has namespaces) in a new session."""
    config = _launcher_config(tier, run, limits, status_fd)
    cmd = [*tier.command_prefix, sys.executable, "-I", "-S", os.path.join(run.path, _LAUNCHER), json.dumps(config)]
    return subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            pass_fds=(status_fd,), start_new_session=True, env=_sandbox_env(run.path, run.tag, extra_env),
                            cwd=run.path, close_fds=True)


class _CappedBuffer:
    def __init__(self, cap: int):
        self.data, self.cap, self.truncated = bytearray(), cap, False

    def add(self, chunk: bytes) -> bool:
        """Keep what fits; True when the chunk overflowed the cap."""
        room = self.cap - len(self.data)
        if room > 0:
            self.data += chunk[:room]
        if len(chunk) > room:
            self.truncated = True
            return True
        return False

    def text(self) -> str:
        return bytes(self.data).decode("utf-8", errors="replace")


class _Supervisor:
    """Feeds stdin, reads stdout/stderr up to their caps, enforces the wall clock and kills
    everything the program started, until it has exited and its output is drained."""

    def __init__(self, proc: subprocess.Popen, tier: Tier, tag: str, limits: _Limits):
        self.proc, self.tier, self.tag = proc, tier, tag
        self.stdout = _CappedBuffer(limits.max_output_bytes)
        self.stderr = _CappedBuffer(limits.max_stderr_bytes if limits.max_stderr_bytes is not None
                                    else limits.max_output_bytes)
        self.timed_out = False
        self.killed_reason: str | None = None
        self.exited = False
        self._killed = False
        self._selector = selectors.DefaultSelector()
        self._pidfd = -1
        self._pending_stdin: memoryview | None = None

    def kill_all(self) -> None:
        # called while the process is still unreaped, so its pid/pgid cannot have been reused.
        # With a PID namespace, killing the launcher (its init) kills everything inside.
        victims = [] if self.tier.pid_namespace else _descendants(self.proc.pid)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        _kill(victims)
        if not self.tier.pid_namespace:
            _kill(_tagged_pids(self.tag))

    def _kill_for(self, reason: str) -> None:
        self.killed_reason, self._killed = reason, True
        self.kill_all()

    def _register(self, stdin: bytes) -> dict[int, _CappedBuffer]:
        proc, sel = self.proc, self._selector
        readers = {proc.stdout.fileno(): self.stdout, proc.stderr.fileno(): self.stderr}
        for fd in readers:
            os.set_blocking(fd, False)
            sel.register(fd, selectors.EVENT_READ, "r")
        self._pending_stdin = memoryview(stdin) if stdin else None
        if self._pending_stdin is not None and len(self._pending_stdin):
            os.set_blocking(proc.stdin.fileno(), False)
            sel.register(proc.stdin.fileno(), selectors.EVENT_WRITE, "w")
        else:
            proc.stdin.close()
        try:
            self._pidfd = os.pidfd_open(proc.pid)
            sel.register(self._pidfd, selectors.EVENT_READ, "x")
        except (AttributeError, OSError):
            self._pidfd = -1
        return readers

    def _read(self, fd: int, buf: _CappedBuffer) -> bool:
        """Read what is there; False at end of stream."""
        try:
            chunk = os.read(fd, 1 << 16)
        except BlockingIOError:
            return True
        except OSError:
            chunk = b""
        if not chunk:
            self._selector.unregister(fd)
            return False
        if buf.add(chunk) and not self._killed:
            self._kill_for("output_limit")
        return True

    def _write_stdin(self) -> None:
        win = self.proc.stdin.fileno()
        try:
            n = os.write(win, self._pending_stdin[:1 << 16])
            self._pending_stdin = self._pending_stdin[n:]
            done = not len(self._pending_stdin)
        except BlockingIOError:
            done = False
        except OSError:
            done = True
        if done:
            self._selector.unregister(win)
            self.proc.stdin.close()

    def supervise(self, stdin: bytes, deadline: float) -> None:
        open_readers = self._register(stdin)
        drain_deadline = None
        cleaned = False
        while True:
            now = time.monotonic()
            if self.exited and not open_readers:
                break
            if not self.exited and not self._killed and now >= deadline:
                self.timed_out = True
                self._kill_for("timeout")
            if self.exited:
                if drain_deadline is None:
                    drain_deadline = now + _DRAIN_S
                if now >= drain_deadline:
                    break
                wait = drain_deadline - now
            else:
                wait = max(0.0, deadline - now) if not self._killed else 0.05
            if self._pidfd < 0 and not self.exited:
                wait = min(wait, 0.02)
            for key, _ in self._selector.select(wait):
                if key.data == "r":
                    if not self._read(key.fd, open_readers[key.fd]):
                        del open_readers[key.fd]
                elif key.data == "w":
                    self._write_stdin()
                elif key.data == "x":
                    self._selector.unregister(self._pidfd)
                    self.exited = True
            if self._pidfd < 0 and not self.exited and self.proc.poll() is not None:
                self.exited = True
            if self.exited and not cleaned:
                cleaned = True
                self.kill_all()  # leftover members of the group / escaped descendants
        if not self.exited or open_readers:
            self.kill_all()

    def close(self) -> None:
        self._selector.close()
        if self._pidfd >= 0:
            os.close(self._pidfd)


def _read_launcher_status(fd: int) -> dict:
    """The JSON lines the launcher wrote on the status pipe, merged: exit / signal / setup_error."""
    status = b""
    os.set_blocking(fd, False)
    try:
        while True:
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            status += chunk
    except (BlockingIOError, OSError):
        pass
    info: dict = {}
    for line in status.decode(errors="replace").splitlines():
        try:
            info.update(json.loads(line))
        except ValueError:
            pass
    return info


def _program_exit(tier: Tier, launcher_rc: int, status: dict, supervisor: _Supervisor) -> tuple[int, str | None]:
    """(returncode, killed_reason) of the program from the launcher's report."""
    reason = supervisor.killed_reason
    if "setup_error" in status:
        raise SandboxError(f"sandbox setup failed ({tier.name}): {status['setup_error']}")
    if "exit" in status:
        rc = int(status["exit"])
    elif "signal" in status:
        rc = -int(status["signal"])
    elif launcher_rc >= 0 and reason is None:
        raise SandboxError(f"sandbox did not start ({tier.name}, rc={launcher_rc}): "
                           f"{bytes(supervisor.stderr.data[-500:]).decode(errors='replace')}")
    else:
        rc = launcher_rc if launcher_rc < 0 else -signal.SIGKILL
    if reason is None and rc < 0:
        reason = {signal.SIGXCPU: "cpu_limit", signal.SIGXFSZ: "file_size_limit"}.get(-rc, "signal")
    return rc, reason


def _reap(proc: subprocess.Popen | None) -> None:
    if proc is None:
        return
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()
    for s in (proc.stdin, proc.stdout, proc.stderr):
        try:
            if s is not None:
                s.close()
        except OSError:
            pass


def _run(tier: Tier, source: str, *, stdin: bytes, limits: _Limits, extra_env: dict | None = None) -> SandboxResult:
    started = time.monotonic()
    run = _prepare_run_dir(tier, source)
    status_r = -1
    proc = supervisor = None
    try:
        status_r, status_w = os.pipe()
        try:
            proc = _start(tier, run, limits, status_w, extra_env)
        finally:
            os.close(status_w)
        supervisor = _Supervisor(proc, tier, run.tag, limits)
        supervisor.supervise(stdin, deadline=started + limits.timeout_s)
        rc, reason = _program_exit(tier, proc.wait(), _read_launcher_status(status_r), supervisor)
        return SandboxResult(
            returncode=rc,
            stdout=supervisor.stdout.text(),
            stderr=supervisor.stderr.text(),
            timed_out=supervisor.timed_out,
            killed_reason=reason,
            duration_s=time.monotonic() - started,
            stdout_truncated=supervisor.stdout.truncated,
            stderr_truncated=supervisor.stderr.truncated,
            workdir=run.path,
        )
    finally:
        if supervisor is not None:
            supervisor.close()
        if status_r >= 0:
            os.close(status_r)
        _reap(proc)
        shutil.rmtree(run.path, ignore_errors=True)


def run_sandboxed(source: str, *, stdin: str | bytes = "", timeout_s: float = 10.0, memory_mb: int = 1024,
                  max_procs: int = 64, cpu_s: int | None = None, max_output_bytes: int = 1 << 20,
                  max_stderr_bytes: int | None = None, disk_mb: int = 256) -> SandboxResult:
    """Run untrusted Python `source` as a fresh interpreter in the best available sandbox.

    timeout_s: wall clock, enforced by this process (SIGKILL of everything). memory_mb: RLIMIT_AS per
    process. max_procs: RLIMIT_NPROC (threads count). cpu_s: RLIMIT_CPU (default timeout_s + 1).
    max_output_bytes / max_stderr_bytes: capture caps (exceeding one kills the program).
    disk_mb: size of the private tmpfs working dir and RLIMIT_FSIZE.
    Raises SandboxError only if the sandbox itself cannot be set up; program failures are results.
    """
    tier, _ = _probe()
    data = stdin.encode("utf-8") if isinstance(stdin, str) else bytes(stdin)
    limits = _Limits(timeout_s=float(timeout_s), memory_mb=memory_mb, max_procs=max_procs, cpu_s=cpu_s,
                     max_output_bytes=max_output_bytes, max_stderr_bytes=max_stderr_bytes, disk_mb=disk_mb)
    return _run(tier, source, stdin=data, limits=limits)


if __name__ == "__main__":
    print(json.dumps(sandbox_capabilities(), indent=2))
