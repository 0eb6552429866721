"""Sandboxed execution of untrusted (model-generated) Python, and MBPP+ checking via evalplus.

Why: evalplus's ``reliability_guard`` is not a sandbox (network, ``os.open``, ctypes, signals to other
processes all remain). Every untrusted program here runs through :func:`run_sandboxed`.

Protections (probed once per process, see :func:`sandbox_capabilities`; best tier that works wins):

* always: a fresh ``python -s -P`` subprocess (``-I`` minus ``-E``; the environment is built from
  scratch, so ``PYTHONHASHSEED`` is honoured), in its own session/process group
  (``start_new_session``); environment rebuilt from nothing (PATH, HOME, TMPDIR, LANG,
  PYTHONHASHSEED, thread caps; no inherited secrets); a throwaway working directory that is also
  HOME and TMPDIR, deleted afterwards; rlimits AS / CPU / NPROC / FSIZE / CORE / NOFILE set by a
  small trusted launcher before ``execve`` (no ``preexec_fn``, safe in threaded parents); a
  wall-clock limit enforced by the parent, which then SIGKILLs the process group and every
  descendant it can find; stdout/stderr read with a byte cap (over the cap the program is killed);
  nothing is ever parsed from the child with ``pickle``.
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

Fallback (no usable ``unshare``): rlimits + process group + env scrub + temp dir (+ uid drop when
root and the interpreter is reachable). There is then no network or file-system isolation, and
escaped daemons are hunted best-effort by an environment tag. Limits everywhere: memory is per
process (RLIMIT_AS), so the aggregate is bounded by ``max_procs * memory_mb``; no cgroups are used.

MBPP+: :func:`load_mbpp_plus`, :func:`mbpp_groundtruth` (canonical solutions run *in the sandbox*,
cached per task under a user cache dir, never in the repo), :func:`check_mbpp_sample` (evalplus
``sanitize`` + one sandboxed process per sample running all base and plus inputs with evalplus's
per-input time limits and ``reliability_guard``; the program only returns its outputs -- the
expected outputs never enter the untrusted process, and the comparison runs in the parent with
evalplus's semantics: special oracles, ``is_floats``, ``np.allclose``; an output whose pickle
exceeds 1 MiB, e.g. Mbpp/255's, is compared by a SHA-256 of its memo-free pickle, i.e. exactly),
:func:`count_passing_tests`. Completions longer than 100 lines are cut to their longest fenced code
block (else their tail) before ``sanitize``, whose cost is cubic in the line count.
``python -m verifiers.code`` prints the capabilities as JSON; ``ANTISD_SANDBOX_TIER=<name prefix>``
(e.g. ``fallback``) forces a tier for testing.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import json
import os
import random
import re
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

__all__ = [
    "SandboxResult",
    "SandboxError",
    "run_sandboxed",
    "sandbox_capabilities",
    "load_mbpp_plus",
    "mbpp_groundtruth",
    "check_mbpp_sample",
    "count_passing_tests",
    "extract_code",
]

_TAG_VAR = "ANTISD_SANDBOX_TAG"


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


# --------------------------------------------------------------------------------------------------
# The trusted launcher. Runs as `python -I -S <workdir>/.antisd_launcher.py <json>`, inside the namespaces when they
# exist: sets up mounts, forks, the child sets rlimits, drops identity and execs the untrusted
# program; the launcher stays as the (PID-namespace) init and reports the exit status on a pipe.
# --------------------------------------------------------------------------------------------------
_LAUNCHER = r'''
import os, sys, json, ctypes, resource, signal

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_NOATIME, MS_NODIRATIME, MS_BIND = 32, 1024, 2048, 4096
MS_REC, MS_PRIVATE, MS_RELATIME, MS_STRICTATIME = 16384, 1 << 18, 1 << 21, 1 << 24
CLONE_NEWUSER = 0x10000000
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38

cfg = json.loads(sys.argv[1])
sfd = cfg["status_fd"]
os.set_inheritable(sfd, False)
libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]


def report(obj):
    data = (json.dumps(obj) + "\n").encode()
    try:
        os.write(sfd, data)
    except OSError:
        pass


def _b(s):
    return None if s is None else os.fsencode(s)


def mount(src, tgt, fstype, flags, data=None):
    if libc.mount(_b(src), _b(tgt), _b(fstype), flags, _b(data)) != 0:
        e = ctypes.get_errno()
        raise OSError(e, "mount(%r, %r, %r, %#x, %r): %s" % (src, tgt, fstype, flags, data, os.strerror(e)))


def unescape(s):
    out, i = [], 0
    while i < len(s):
        if s[i] == "\\" and i + 3 < len(s) and s[i + 1:i + 4].isdigit():
            out.append(chr(int(s[i + 1:i + 4], 8))); i += 4
        else:
            out.append(s[i]); i += 1
    return "".join(out)


def mountinfo():
    seen, res = set(), []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            mp, opts = unescape(parts[4]), parts[5].split(",")
            if mp not in seen:
                seen.add(mp)
                res.append((mp, opts))
    return res


def keep_flags(opts):
    fl = 0
    for name, bit in (("nosuid", MS_NOSUID), ("nodev", MS_NODEV), ("noexec", MS_NOEXEC),
                      ("noatime", MS_NOATIME), ("nodiratime", MS_NODIRATIME), ("relatime", MS_RELATIME)):
        if name in opts:
            fl |= bit
    if "noatime" not in opts and "relatime" not in opts:
        fl |= MS_STRICTATIME
    return fl


def setup():
    if not cfg["mounts"]:
        return
    wd = cfg["workdir"]
    with open(os.path.join(wd, cfg["main"]), "rb") as f:
        src = f.read()
    os.umask(0o022)
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    for top, needed in cfg["skeleton"]:
        held = [(n, os.open(n, os.O_PATH | os.O_CLOEXEC), os.path.isdir(n)) for n in needed]
        mount("tmpfs", top, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
        for n, fd, isdir in held:
            os.makedirs(os.path.dirname(n), mode=0o755, exist_ok=True)
            if isdir:
                os.makedirs(n, mode=0o755, exist_ok=True)
            else:
                open(n, "ab").close()
            mount("/proc/self/fd/%d" % fd, n, None, MS_BIND | MS_REC)
            os.close(fd)
    own = ",uid=%d,gid=%d" % (cfg["uid"], cfg["gid"]) if cfg["drop"] == "uid" else ""
    mount("tmpfs", wd, "tmpfs", MS_NOSUID | MS_NODEV,
          "size=%dm,nr_inodes=65536,mode=0700%s" % (cfg["tmpfs_mb"], own))
    mp = os.path.join(wd, cfg["main"])
    with open(mp, "wb") as f:
        f.write(src)
    os.chmod(mp, 0o644)
    skip = {wd}
    if os.path.isdir("/dev/shm"):
        mount("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "size=%dm,mode=1777" % cfg["shm_mb"])
        skip.add("/dev/shm")
    for mpt, opts in mountinfo():
        if mpt in skip or mpt == "/proc" or mpt.startswith("/proc/"):
            continue
        try:
            mount(None, mpt, None, MS_REMOUNT | MS_BIND | MS_RDONLY | keep_flags(opts))
        except OSError as e:
            if e.errno != 2:  # a mount point that vanished is fine; anything else is fatal
                raise


def child():
    for name, val in cfg["rlimits"].items():
        res = getattr(resource, name)
        soft, hard = val
        cur_soft, cur_hard = resource.getrlimit(res)
        if cur_hard != resource.RLIM_INFINITY and not cfg["can_raise"]:
            hard = cur_hard if hard == -1 else min(hard, cur_hard)
            soft = hard if soft == -1 else min(soft, hard)
        resource.setrlimit(res, (soft, hard))
    if cfg["drop"] == "uid":
        os.setgroups([])
        os.setresgid(cfg["gid"], cfg["gid"], cfg["gid"])
        os.setresuid(cfg["uid"], cfg["uid"], cfg["uid"])
    elif cfg["drop"] == "userns":
        uid, gid = os.getuid(), os.getgid()
        if libc.unshare(CLONE_NEWUSER) != 0:
            e = ctypes.get_errno()
            raise OSError(e, "unshare(CLONE_NEWUSER): " + os.strerror(e))
        for fn, data in (("setgroups", "deny"), ("uid_map", "1000 %d 1" % uid), ("gid_map", "1000 %d 1" % gid)):
            with open("/proc/self/" + fn, "w") as f:
                f.write(data)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(NO_NEW_PRIVS)")
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != cfg["launcher_pid"]:
        os._exit(1)
    os.chdir(cfg["workdir"])
    os.umask(0o077)
    argv = [cfg["python"]] + cfg["pyflags"] + [os.path.join(cfg["workdir"], cfg["main"])]
    os.execve(cfg["python"], argv, dict(os.environ))


try:
    setup()
except BaseException as e:
    report({"setup_error": "%s: %s" % (type(e).__name__, e)})
    os._exit(125)
cfg["launcher_pid"] = os.getpid()
pid = os.fork()
if pid == 0:
    try:
        child()
    except BaseException as e:
        report({"setup_error": "child: %s: %s" % (type(e).__name__, e)})
    os._exit(125)
nul = os.open(os.devnull, os.O_RDWR)
for fd in (0, 1, 2):
    os.dup2(nul, fd)
while True:
    try:
        p, st = os.wait()
    except ChildProcessError:
        break
    except InterruptedError:
        continue
    if p == pid:
        if os.WIFSIGNALED(st):
            report({"signal": os.WTERMSIG(st)})
        else:
            report({"exit": os.WEXITSTATUS(st)})
        break
os._exit(0)
'''


# --------------------------------------------------------------------------------------------------
# Probing which isolation works here (once per process).
# --------------------------------------------------------------------------------------------------
_PROBE_LOCK = threading.Lock()
_TIER: dict | None = None
_CAPS: dict | None = None


def _find_unshare() -> str | None:
    p = shutil.which("unshare")
    if p:
        return p
    for c in ("/usr/bin/unshare", "/bin/unshare", "/usr/sbin/unshare", "/sbin/unshare"):
        if os.access(c, os.X_OK):
            return c
    return None


def _pyflags() -> list[str]:
    # `-I` is `-E -P -s`; the environment is ours (built from scratch), so drop -E to honour PYTHONHASHSEED.
    return ["-s", "-P"] if sys.version_info >= (3, 11) else ["-I"]


def _needed_paths() -> list[str]:
    paths = {sys.executable, os.path.realpath(sys.executable), sys.prefix, sys.base_prefix,
             sys.exec_prefix, sys.base_exec_prefix, tempfile.gettempdir()}
    for v in sysconfig.get_paths().values():
        paths.add(v)
    try:
        import site

        sp = site.getsitepackages()
    except Exception:
        sp = []
    for d in sp:
        paths.add(d)
        try:  # directories added by .pth files (editable installs)
            for name in os.listdir(d):
                if name.endswith(".pth"):
                    with open(os.path.join(d, name), errors="replace") as f:
                        for line in f:
                            line = line.strip()
                            if line and not line.startswith(("#", "import")) and os.path.isdir(line):
                                paths.add(line)
        except OSError:
            pass
    return sorted({os.path.realpath(p) for p in paths if p and os.path.exists(p)} |
                  {os.path.abspath(p) for p in paths if p and os.path.exists(p)})


def _skeleton_plan() -> list[list]:
    """For paths the interpreter needs whose ancestors are not world-traversable (e.g. /root 0700):
    [[blocked_dir, [needed paths under it]], ...] for the launcher to expose via bind mounts."""
    groups: dict[str, set[str]] = {}
    for n in _needed_paths():
        parts = n.split("/")[1:]
        cur = ""
        for comp in parts[:-1]:
            cur += "/" + comp
            try:
                st = os.stat(cur)
            except OSError:
                break
            if not (st.st_mode & stat.S_IXOTH):
                groups.setdefault(cur, set()).add(n)
                break
    plan = []
    for top in sorted(groups, key=len):
        if any(top.startswith(t + "/") for t, _ in plan):
            continue  # covered by an outer skeleton (its needed paths are bound whole)
        ns = sorted(groups[top], key=len)
        keep: list[str] = []
        for n in ns:
            if not any(n == k or n.startswith(k + "/") for k in keep):
                keep.append(n)
        plan.append([top, keep])
    # merge needed paths of inner groups into their outer group
    for top, ns in list(groups.items()):
        for ptop, keep in plan:
            if top != ptop and top.startswith(ptop + "/"):
                for n in ns:
                    if not any(n == k or n.startswith(k + "/") for k in keep):
                        keep.append(n)
    return plan


def _candidate_tiers() -> list[dict]:
    root = os.geteuid() == 0
    us = _find_unshare()
    drop = "uid" if root else None
    tiers = []
    if us:
        base = [us, "--net", "--pid", "--fork", "--kill-child", "--ipc", "--uts"] + ([] if root else ["--map-root-user"])
        nsdrop = "uid" if root else "userns"
        tiers.append(dict(name="namespaces+readonly-fs", cmd=base + ["--mount", "--mount-proc"], mounts=True,
                          drop=nsdrop, pidns=True, netns=True, userns=not root))
        tiers.append(dict(name="namespaces", cmd=base + ["--mount", "--mount-proc"], mounts=False,
                          drop=nsdrop, pidns=True, netns=True, userns=not root))
        if root:
            tiers.append(dict(name="namespaces(root)", cmd=base + ["--mount", "--mount-proc"], mounts=False,
                              drop=None, pidns=True, netns=True, userns=False))
        tiers.append(dict(name="namespaces(no-proc)", cmd=base, mounts=False,
                          drop=None if root else "userns", pidns=True, netns=True, userns=not root))
    tiers.append(dict(name="fallback", cmd=[], mounts=False, drop=drop, pidns=False, netns=False, userns=False))
    if root:
        tiers.append(dict(name="fallback(root)", cmd=[], mounts=False, drop=None, pidns=False, netns=False,
                          userns=False))
    for t in tiers:
        t["skeleton"] = _skeleton_plan() if (t["mounts"] and t["drop"] == "uid") else []
    return tiers


_PROBE_SRC = r'''
import os, sys, json, socket, errno
r = {"uid": os.getuid(), "euid": os.geteuid(), "pid": os.getpid(), "ppid": os.getppid()}
try:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM); s.settimeout(1.0)
    s.connect(("127.0.0.1", 9)); r["net"] = "connected"
except OSError as e:
    r["net"] = e.errno
try:
    r["ifaces"] = [n for _, n in socket.if_nameindex()]
except OSError:
    r["ifaces"] = None
try:
    with open(sys.argv[0] + ".probe_inside", "x"):
        pass
    r["workdir_write"] = 0
except OSError as e:
    r["workdir_write"] = e.errno
try:
    with open(os.environ["ANTISD_PROBE_PATH"], "x"):
        pass
    r["outside_write"] = 0
except OSError as e:
    r["outside_write"] = e.errno
r["env"] = sorted(os.environ)
print(json.dumps(r))
'''


def _probe() -> tuple[dict, dict]:
    global _TIER, _CAPS
    with _PROBE_LOCK:
        if _TIER is not None:
            return _TIER, _CAPS  # type: ignore[return-value]
        tried = []
        forced = os.environ.get("ANTISD_SANDBOX_TIER")  # e.g. "fallback" (testing / debugging)
        tiers = [t for t in _candidate_tiers() if not forced or t["name"].startswith(forced)]
        if not tiers:
            raise SandboxError(f"ANTISD_SANDBOX_TIER={forced!r} names no available tier")
        for tier in tiers:
            probe_path = os.path.join(tempfile.gettempdir(), f"antisd_probe_{uuid.uuid4().hex}")
            try:
                res = _run(tier, _PROBE_SRC, stdin=b"", timeout_s=20.0, memory_mb=1024, max_procs=16,
                           cpu_s=None, max_output_bytes=1 << 16, extra_env={"ANTISD_PROBE_PATH": probe_path})
                info = json.loads(res.stdout.strip().splitlines()[-1]) if res.returncode == 0 else None
            except Exception as e:  # noqa: BLE001
                res, info = None, None
                tried.append(f"{tier['name']}: {type(e).__name__}: {e}")
            finally:
                if os.path.exists(probe_path):
                    os.unlink(probe_path)
            if info is None:
                if res is not None:
                    tried.append(f"{tier['name']}: rc={res.returncode} {res.stderr.strip()[-300:]}")
                continue
            _TIER = tier
            ro = tier["mounts"] and info.get("outside_write") == errno.EROFS
            unpriv = info["euid"] != 0 or tier["drop"] == "userns"
            _CAPS = {
                "tier": tier["name"],
                "unshare": _find_unshare() if tier["cmd"] else None,
                "net_namespace": tier["netns"] and info.get("net") != "connected" and (info.get("ifaces") or ["lo"]) == ["lo"],
                "pid_namespace": tier["pidns"] and info["ppid"] == 1,
                "mount_namespace": tier["mounts"],
                "readonly_filesystem": bool(ro),
                "private_tmpfs_workdir": tier["mounts"],
                "user_namespace": tier["userns"],
                "unprivileged_identity": bool(unpriv),
                "identity": ("random uid/gid" if tier["drop"] == "uid" else
                             "nested user namespace (non-root, no capabilities)" if tier["drop"] == "userns" else
                             "same as parent"),
                "skeleton_binds": [t for t, _ in tier["skeleton"]],
                "rlimits": ["RLIMIT_AS", "RLIMIT_CPU", "RLIMIT_NPROC", "RLIMIT_FSIZE", "RLIMIT_CORE", "RLIMIT_NOFILE"],
                "nproc_limit_effective": bool(unpriv) and (tier["drop"] is not None),
                "process_group_kill": True,
                "env_scrubbed": True,
                "temp_workdir": True,
                "wall_clock_kill": True,
                "output_capped": True,
                "no_new_privs": True,
                "escaped_process_cleanup": ("pid-namespace teardown" if tier["pidns"] else
                                            "process group + environment-tag scan (best effort)"),
                "probe_failures": tried,
            }
            return _TIER, _CAPS
        raise SandboxError("no sandbox tier works here: " + "; ".join(tried))


def sandbox_capabilities() -> dict:
    """Which protections are active here (probed once, cached)."""
    return dict(_probe()[1])


# --------------------------------------------------------------------------------------------------
# Process plumbing
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
    table = _proc_table()
    kids: dict[int, list[int]] = {}
    for p, pp in table.items():
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


def _run(tier: dict, source: str, *, stdin: bytes, timeout_s: float, memory_mb: int, max_procs: int,
         cpu_s: int | None, max_output_bytes: int, max_stderr_bytes: int | None = None,
         disk_mb: int = 256, extra_env: dict | None = None) -> SandboxResult:
    t0 = time.monotonic()
    tag = uuid.uuid4().hex
    workdir = tempfile.mkdtemp(prefix="antisd-sbx-")
    uid = gid = random.randrange(1_000_000_000, 2_000_000_000)
    main = "main.py"
    with open(os.path.join(workdir, main), "w", encoding="utf-8") as f:
        f.write(source)
    if tier["drop"] == "uid" and not tier["mounts"]:
        os.chown(workdir, uid, gid)
        os.chmod(os.path.join(workdir, main), 0o644)
    cpu = int(cpu_s) if cpu_s else int(timeout_s) + 1
    mem = int(memory_mb) * 1024 * 1024
    rl = {
        "RLIMIT_AS": [mem, mem],
        "RLIMIT_CPU": [cpu, cpu + 1],
        "RLIMIT_NPROC": [int(max_procs), int(max_procs)],
        "RLIMIT_FSIZE": [disk_mb * 1024 * 1024, disk_mb * 1024 * 1024],
        "RLIMIT_CORE": [0, 0],
        "RLIMIT_NOFILE": [1024, 1024],
    }
    if tier["drop"] is None and os.geteuid() != 0 and not tier["pidns"]:
        # RLIMIT_NPROC counts all processes of the real uid: leave room for the ones the user already has.
        mine = sum(1 for p in os.listdir("/proc") if p.isdigit() and _owned(p))
        rl["RLIMIT_NPROC"] = [mine * 4 + int(max_procs), mine * 4 + int(max_procs)]
    sr, sw = os.pipe()
    cfg = {
        "status_fd": sw, "workdir": workdir, "main": main, "python": sys.executable, "pyflags": _pyflags(),
        "mounts": tier["mounts"], "skeleton": tier["skeleton"], "drop": tier["drop"], "uid": uid, "gid": gid,
        "tmpfs_mb": disk_mb, "shm_mb": 64, "rlimits": rl, "can_raise": os.geteuid() == 0 and not tier["userns"],
    }
    launcher = os.path.join(workdir, ".antisd_launcher.py")  # hidden by the tmpfs once mounted
    with open(launcher, "w", encoding="utf-8") as f:
        f.write(_LAUNCHER)
    cmd = list(tier["cmd"]) + [sys.executable, "-I", "-S", launcher, json.dumps(cfg)]
    env = _sandbox_env(workdir, tag, extra_env)
    out = bytearray()
    err = bytearray()
    cap_err = max_stderr_bytes if max_stderr_bytes is not None else max_output_bytes
    trunc = {"out": False, "err": False}
    timed_out = False
    reason = None
    proc = None
    pidfd = -1
    sel = selectors.DefaultSelector()
    try:
        try:
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    pass_fds=(sw,), start_new_session=True, env=env, cwd=workdir, close_fds=True)
        finally:
            os.close(sw)
        pgid = proc.pid
        deadline = t0 + timeout_s
        streams = {proc.stdout.fileno(): ("out", out, max_output_bytes),
                   proc.stderr.fileno(): ("err", err, cap_err)}
        for fd in streams:
            os.set_blocking(fd, False)
            sel.register(fd, selectors.EVENT_READ, "r")
        pending = memoryview(stdin) if stdin else None
        win = proc.stdin.fileno()
        if pending is not None and len(pending):
            os.set_blocking(win, False)
            sel.register(win, selectors.EVENT_WRITE, "w")
        else:
            proc.stdin.close()
        try:
            pidfd = os.pidfd_open(proc.pid)
            sel.register(pidfd, selectors.EVENT_READ, "x")
        except (AttributeError, OSError):
            pidfd = -1
        exited = False
        drain_deadline = None
        open_readers = set(streams)

        def kill_all():
            # called while the process is still unreaped, so its pid/pgid cannot have been reused.
            # With a PID namespace, killing the launcher (its init) kills everything inside.
            victims = [] if tier["pidns"] else _descendants(proc.pid)
            try:
                os.killpg(pgid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            _kill(victims)
            if not tier["pidns"]:
                _kill(_tagged_pids(tag))

        killed = cleaned = False
        while True:
            now = time.monotonic()
            if exited and not open_readers:
                break
            if not exited and not killed and now >= deadline:
                timed_out, reason, killed = True, "timeout", True
                kill_all()
            if exited:
                if drain_deadline is None:
                    drain_deadline = now + 2.0
                if now >= drain_deadline:
                    break
                wait = drain_deadline - now
            else:
                wait = max(0.0, deadline - now) if not killed else 0.05
            if pidfd < 0 and not exited:
                wait = min(wait, 0.02)
            for key, _ in sel.select(wait):
                if key.data == "r":
                    name, buf, cap = streams[key.fd]
                    try:
                        chunk = os.read(key.fd, 1 << 16)
                    except BlockingIOError:
                        continue
                    except OSError:
                        chunk = b""
                    if not chunk:
                        sel.unregister(key.fd)
                        open_readers.discard(key.fd)
                        continue
                    room = cap - len(buf)
                    if room > 0:
                        buf += chunk[:room]
                    if len(chunk) > room:
                        trunc[name] = True
                        if not killed:
                            reason, killed = "output_limit", True
                            kill_all()
                elif key.data == "w":
                    try:
                        n = os.write(win, pending[:1 << 16])
                        pending = pending[n:]
                        done = not len(pending)
                    except BlockingIOError:
                        done = False
                    except OSError:
                        done = True
                    if done:
                        sel.unregister(win)
                        proc.stdin.close()
                elif key.data == "x":
                    sel.unregister(pidfd)
                    exited = True
            if pidfd < 0 and not exited and proc.poll() is not None:
                exited = True
            if exited and not cleaned:
                cleaned = True
                kill_all()  # leftover members of the group / escaped descendants
        if not exited or open_readers:
            kill_all()
        rc_outer = proc.wait()
        status = b""
        os.set_blocking(sr, False)
        try:
            while True:
                chunk = os.read(sr, 4096)
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
        if "setup_error" in info:
            raise SandboxError(f"sandbox setup failed ({tier['name']}): {info['setup_error']}")
        if "exit" in info:
            rc = int(info["exit"])
        elif "signal" in info:
            rc = -int(info["signal"])
        elif rc_outer >= 0 and reason is None:
            raise SandboxError(f"sandbox did not start ({tier['name']}, rc={rc_outer}): "
                               f"{bytes(err[-500:]).decode(errors='replace')}")
        else:
            rc = rc_outer if rc_outer < 0 else -signal.SIGKILL
        if reason is None and rc < 0:
            reason = {signal.SIGXCPU: "cpu_limit", signal.SIGXFSZ: "file_size_limit"}.get(-rc, "signal")
        return SandboxResult(
            returncode=rc,
            stdout=bytes(out).decode("utf-8", errors="replace"),
            stderr=bytes(err).decode("utf-8", errors="replace"),
            timed_out=timed_out,
            killed_reason=reason,
            duration_s=time.monotonic() - t0,
            stdout_truncated=trunc["out"],
            stderr_truncated=trunc["err"],
            workdir=workdir,
        )
    finally:
        sel.close()
        if pidfd >= 0:
            os.close(pidfd)
        os.close(sr)
        if proc is not None:
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
        shutil.rmtree(workdir, ignore_errors=True)


def _owned(pid: str) -> bool:
    try:
        return os.stat(f"/proc/{pid}").st_uid == os.getuid()
    except OSError:
        return False


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
    return _run(tier, source, stdin=data, timeout_s=float(timeout_s), memory_mb=memory_mb, max_procs=max_procs,
                cpu_s=cpu_s, max_output_bytes=max_output_bytes, max_stderr_bytes=max_stderr_bytes, disk_mb=disk_mb)


# --------------------------------------------------------------------------------------------------
# Value codec shared by parent and harness: JSON with tagged containers (never pickle).
# Scalars None/bool/int/float/str are raw JSON; containers are [tag, payload] lists.
# --------------------------------------------------------------------------------------------------
_CODEC_SRC = r'''
def _enc(x, _d=0, untrusted=False):
    """Strict for inputs we send; with untrusted=True (values returned by the program) builtin
    subclasses become their base type, numpy values stay numpy, anything else becomes an opaque
    marker that compares unequal."""
    t = type(x)
    if t is int and x.bit_length() > 4000:
        return ["I", format(x, "x")]
    if x is None or t is bool or t is int or t is float or t is str:
        return x
    if _d > 200:
        if untrusted:
            return ["U", "too-deep"]
        raise ValueError("nesting too deep")
    tag = {list: "L", tuple: "T", set: "S", frozenset: "F"}.get(t)
    if tag:
        return [tag, [_enc(i, _d + 1, untrusted) for i in x]]
    if t is dict:
        return ["D", [[_enc(k, _d + 1, untrusted), _enc(v, _d + 1, untrusted)] for k, v in x.items()]]
    if t is complex:
        return ["C", x.real, x.imag]
    if t is bytes:
        return ["B", x.hex()]
    if not untrusted:
        raise TypeError("unsupported type " + t.__name__)
    np = __import__("sys").modules.get("numpy")
    if np is not None:
        if isinstance(x, np.ndarray):
            if x.dtype.kind in "biufcU":
                return ["A", x.dtype.str, _enc(x.tolist(), _d + 1, True)]
            return ["U", "numpy.ndarray[%s]" % x.dtype]
        if isinstance(x, np.generic):
            return ["G", x.dtype.str, _enc(x.item(), _d + 1, True)]
    for base in (bool, int, float, str, complex, bytes):
        if isinstance(x, base):
            return _enc(base(x), _d + 1, True)
    for base, tag in ((list, "L"), (tuple, "T"), (set, "S"), (frozenset, "F")):
        if isinstance(x, base):
            return [tag, [_enc(i, _d + 1, True) for i in base.__iter__(x)]]
    if isinstance(x, dict):
        return ["D", [[_enc(k, _d + 1, True), _enc(v, _d + 1, True)] for k, v in dict.items(x)]]
    return ["U", t.__module__ + "." + t.__qualname__]


def _dec(x, _extra=None):
    """Inverse of _enc; `_extra(x, decode)` decodes the tags only results carry (host side)."""
    if type(x) is not list:
        return x
    tag = x[0]
    if tag == "L":
        return [_dec(i, _extra) for i in x[1]]
    if tag == "T":
        return tuple(_dec(i, _extra) for i in x[1])
    if tag == "S":
        return {_dec(i, _extra) for i in x[1]}
    if tag == "F":
        return frozenset(_dec(i, _extra) for i in x[1])
    if tag == "D":
        return {_dec(k, _extra): _dec(v, _extra) for k, v in x[1]}
    if tag == "C":
        return complex(x[1], x[2])
    if tag == "B":
        return bytes.fromhex(x[1])
    if tag == "I":
        return int(x[1], 16)
    if _extra is not None:
        return _extra(x, lambda v: _dec(v, _extra))
    raise ValueError(f"bad tag {tag!r}")
'''
exec(_CODEC_SRC)  # defines _enc, _dec in this module (the same text is shipped to the harness)


class _Opaque:
    """A value the program returned that cannot be transported; equal to nothing but itself."""

    __slots__ = ("type_name",)

    def __init__(self, type_name: str):
        self.type_name = type_name

    def __repr__(self):
        return f"<opaque {self.type_name}>"


class _NotNone:
    """For MBPP_OUTPUT_NOT_NONE_TASKS: the program returned a non-bool; carries `out is not None`."""

    __slots__ = ("flag",)

    def __init__(self, flag: bool):
        self.flag = bool(flag)

    def __repr__(self):
        return f"<not-None={self.flag}>"


class _Digest:
    """A huge output, transported as a hash of its canonical (memo-free) pickle."""

    __slots__ = ("hexdigest", "kind")

    def __init__(self, hexdigest: str, kind: str):
        self.hexdigest, self.kind = str(hexdigest), str(kind)

    def __eq__(self, other):
        return isinstance(other, _Digest) and (self.hexdigest, self.kind) == (other.hexdigest, other.kind)

    def __hash__(self):
        return hash(self.hexdigest)

    def __repr__(self):
        return f"<digest {self.kind} {self.hexdigest[:12]}>"


def _dec_result_tag(x, decode):
    tag = x[0]
    if tag == "H":
        return _Digest(x[1], x[2])
    if tag in ("A", "G"):
        import numpy as np

        val = decode(x[2])
        return np.array(val, dtype=np.dtype(x[1])) if tag == "A" else np.dtype(x[1]).type(val)
    if tag == "NN":
        return _NotNone(x[1])
    if tag == "U":
        return _Opaque(str(x[1]))
    raise ValueError(f"bad tag {tag!r}")


def _dec_result(x):
    return _dec(x, _dec_result_tag)


def _safe_dec(x):
    try:
        return _dec_result(x)
    except Exception:  # noqa: BLE001 - malformed output from the program: never equal to anything
        return _Opaque("undecodable")


# --------------------------------------------------------------------------------------------------
# The harness shipped into the sandbox for MBPP+ checks, ground truth and assert tests.
# It reads its job as JSON on stdin, moves stdout/stderr to /dev/null (so the program cannot write
# into the result stream by accident) and streams one JSON line per finished split/test on a
# private dup of the original stdout.
# --------------------------------------------------------------------------------------------------
_HARNESS_SRC = _CODEC_SRC + r'''
import sys, os, json, time


def _load_utils(path):
    if path:
        try:
            import importlib.util
            spec = importlib.util.spec_from_file_location("_antisd_evalplus_eval_utils", path)
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            return mod
        except Exception:
            pass
    import contextlib, io, signal

    class TimeoutException(Exception):
        pass

    @contextlib.contextmanager
    def time_limit(seconds):
        def handler(signum, frame):
            raise TimeoutException("Timed out!")
        signal.setitimer(signal.ITIMER_REAL, seconds)
        signal.signal(signal.SIGALRM, handler)
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)

    @contextlib.contextmanager
    def swallow_io():
        s = io.StringIO()
        with contextlib.redirect_stdout(s), contextlib.redirect_stderr(s):
            yield

    class M:
        pass
    m = M()
    m.TimeoutException, m.time_limit, m.swallow_io, m.reliability_guard = TimeoutException, time_limit, swallow_io, None
    return m


_CONTAINERS = (str, bytes, list, tuple, set, frozenset, dict)
_BIG = 1 << 20


def _pfast(x):
    import io, pickle
    b = io.BytesIO()
    p = pickle.Pickler(b, protocol=4)
    p.fast = True  # no memo: equal acyclic values give equal bytes whatever objects they share
    p.dump(x)
    return b.getvalue()


def _enc_result(out, set_eq=False):
    """Outputs are sent as tagged JSON; an output whose (memo-free) pickle exceeds 1 MiB is sent as
    a SHA-256 of that pickle instead (exact structural equality; for set-compared tasks, of the
    sorted distinct element pickles): transporting e.g. Mbpp/255's 1.7M-tuple lists is infeasible."""
    import hashlib
    try:
        if set_eq:
            parts = sorted({_pfast(e) for e in out})
            data = b"".join(len(x).to_bytes(8, "little") + x for x in parts)
        else:
            data = _pfast(out)
    except Exception:
        data = None
    if data is not None and len(data) > _BIG:
        return ["H", hashlib.sha256(data).hexdigest(), "set" if set_eq else "value"]
    return _enc(out, untrusted=True)


def _main():
    job = json.loads(sys.stdin.buffer.read())
    out_fd = os.dup(1)
    nul = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(nul, fd)
    _write = os.write

    def emit(obj):
        data = (json.dumps(obj) + "\n").encode()
        while data:
            n = _write(out_fd, data)
            data = data[n:]

    U = _load_utils(job.get("evalplus_utils"))
    mode = job["mode"]
    if job.get("guard") and U.reliability_guard is not None:
        U.reliability_guard()
    g = {}
    try:
        with U.swallow_io():
            exec(job["code"], g)
            fn = g[job["entry_point"]] if mode != "tests" else None
    except BaseException as e:
        emit({"exec_error": "%s: %s" % (type(e).__name__, str(e)[:300])})
        return
    emit({"ready": True})
    if mode == "tests":
        for i, t in enumerate(job["tests"]):
            try:
                with U.time_limit(job["per_test_s"]):
                    with U.swallow_io():
                        exec(t, g)
                ok = True
            except BaseException:
                ok = False
            emit({"test": i, "ok": ok})
        return
    not_none, set_eq = job.get("not_none"), job.get("set_eq")
    for split in job["splits"]:
        res = []
        start = time.monotonic()
        tls = split.get("time_limits")
        aborted = False
        for i, raw in enumerate(split["inputs"]):
            if aborted or (split.get("timeout") and time.monotonic() - start > split["timeout"]):
                res.append(["timeout"])
                aborted = True
                continue
            inp = _dec(raw)
            try:
                if mode == "gt":
                    t0 = time.time()
                    out = fn(*inp)
                    dt = time.time() - t0
                    enc = (out is not None) if not_none else _enc_result(out, set_eq)
                    res.append(["ok", enc, dt])
                    continue
                with U.time_limit(tls[i]):
                    with U.swallow_io():
                        out = fn(*inp)
                        if set_eq and not not_none and not isinstance(out, _CONTAINERS):
                            try:  # evalplus does set(out): iterate generators/maps under the limit
                                out = list(out)
                            except TypeError:
                                pass
                # encoding is not the program's time (the reference times exclude it)
                if not_none:
                    enc = bool(out) if isinstance(out, bool) else ["NN", out is not None]
                else:
                    enc = _enc_result(out, set_eq)
                res.append(["ok", enc])
            except U.TimeoutException:
                res.append(["timeout"])
                aborted = True
            except BaseException as e:
                if mode == "gt":
                    emit({"gt_error": "%s on input %d of %s: %s" % (type(e).__name__, i, split["name"], str(e)[:200])})
                    return
                res.append(["err", type(e).__name__])
        emit({"split": split["name"], "results": res})


_main()
'''


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
    res = run_sandboxed(_HARNESS_SRC, stdin=json.dumps(job), timeout_s=timeout_s, memory_mb=memory_mb,
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
    h.update(b"\0" + json.dumps([_enc(problem["base_input"]), _enc(problem["plus_input"])]).encode())
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
        "splits": [{"name": "base", "inputs": [_enc(i) for i in problem["base_input"]]},
                   {"name": "plus", "inputs": [_enc(i) for i in problem["plus_input"]]}],
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
    return {"base": [_dec_result(v) for v in entry["base"]], "base_time": list(entry["base_time"]),
            "plus": [_dec_result(v) for v in entry["plus"]], "plus_time": list(entry["plus_time"])}


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
        if isinstance(out, _NotNone) and entry_point not in MBPP_OUTPUT_NOT_NONE_TASKS:
            return False
        if isinstance(out, _Digest) or isinstance(exp, _Digest):
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
                exact_match = exp == (out.flag if isinstance(out, _NotNone) else out is not None)
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
        splits.append({"name": name, "inputs": [_enc(i) for i in problem[f"{name}_input"]], "time_limits": tls,
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
                  and _mbpp_match(entry_point, inp, _safe_dec(r[1]), e, atol_box))
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


def count_passing_tests(code: str, tests: list[str], *, timeout_s: float = 10.0,
                        per_test_timeout_s: float | None = None, memory_mb: int = 1024,
                        guard: bool = True) -> tuple[int, int]:
    """(passed, total) for assert-style test statements run against `code` in one sandboxed process.
    A test passes if it executes without exception within its time limit (default
    max(0.5, timeout_s / (len(tests) + 1))); if `code` itself fails, none pass. `code` is run as is
    (use extract_code() on raw completions). Verdicts come from inside the sandbox, so this is fit
    for feedback text, not as a hack-proof reward."""
    total = len(tests)
    if total == 0:
        return 0, 0
    per = per_test_timeout_s or max(0.5, float(timeout_s) / (total + 1))
    job = {"mode": "tests", "code": code, "entry_point": None, "tests": list(tests), "per_test_s": per,
           "guard": guard}
    lines, _ = _run_harness(job, timeout_s=timeout_s, memory_mb=memory_mb, max_procs=32,
                            max_output_bytes=1 << 20)
    ready = False
    passed: dict[int, bool] = {}
    for obj in lines:
        if obj.get("ready") is True:
            ready = True
        elif ready and isinstance(obj.get("test"), int) and 0 <= obj["test"] < total and obj["test"] not in passed:
            passed[obj["test"]] = obj.get("ok") is True
    return sum(passed.values()), total


if __name__ == "__main__":
    print(json.dumps(sandbox_capabilities(), indent=2))
