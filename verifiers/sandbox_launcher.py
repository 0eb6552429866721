"""The sandbox's trusted launcher: a program of its own, never imported for its effects.

verifiers/sandbox.py copies this file's text into the run's working directory and starts it as
``python -I -S .antisd_launcher.py <json config>``, inside the namespaces when the tier has them.
It sets up the mounts (read-only file system, private tmpfs working directory, skeleton binds),
then forks: the child sets the rlimits, drops its identity and execs the untrusted program; the
launcher stays as the (PID-namespace) init and reports the program's exit status as a JSON line on
the status pipe. Standard library only, no site packages (``-S``).
"""

import ctypes
import json
import os
import resource
import signal
import sys

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_NOATIME, MS_NODIRATIME, MS_BIND = 32, 1024, 2048, 4096
MS_REC, MS_PRIVATE, MS_RELATIME, MS_STRICTATIME = 16384, 1 << 18, 1 << 21, 1 << 24
CLONE_NEWUSER = 0x10000000
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38
SETUP_FAILED = 125  # exit status when the sandbox could not be set up (the status pipe says why)

libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]


def report(cfg, obj):
    data = (json.dumps(obj) + "\n").encode()
    try:
        os.write(cfg["status_fd"], data)
    except OSError:
        pass


def _b(s):
    return None if s is None else os.fsencode(s)


def mount(src, tgt, fstype, flags, data=None):
    if libc.mount(_b(src), _b(tgt), _b(fstype), flags, _b(data)) != 0:
        e = ctypes.get_errno()
        raise OSError(e, "mount(%r, %r, %r, %#x, %r): %s" % (src, tgt, fstype, flags, data, os.strerror(e)))


def unescape(s):
    """Undo /proc/self/mountinfo's octal escapes (``\\040`` for a space)."""
    out, i = [], 0
    while i < len(s):
        if s[i] == "\\" and i + 3 < len(s) and s[i + 1:i + 4].isdigit():
            out.append(chr(int(s[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


def mountinfo():
    """[(mount point, options)] in mount order, each mount point once."""
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
    """The per-mount flags a read-only remount must repeat (the kernel refuses to drop them)."""
    fl = 0
    for name, bit in (("nosuid", MS_NOSUID), ("nodev", MS_NODEV), ("noexec", MS_NOEXEC),
                      ("noatime", MS_NOATIME), ("nodiratime", MS_NODIRATIME), ("relatime", MS_RELATIME)):
        if name in opts:
            fl |= bit
    if "noatime" not in opts and "relatime" not in opts:
        fl |= MS_STRICTATIME
    return fl


def bind_skeletons(skeleton):
    """Hide each blocked directory under a tmpfs, binding back only the paths the interpreter needs."""
    for top, needed in skeleton:
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


def set_up_mounts(cfg):
    """Read-only everything, except a private size-capped tmpfs at the working directory (holding a
    fresh copy of the program) and a fresh small /dev/shm."""
    if not cfg["mounts"]:
        return
    wd = cfg["workdir"]
    with open(os.path.join(wd, cfg["main"]), "rb") as f:
        src = f.read()
    os.umask(0o022)
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    bind_skeletons(cfg["skeleton"])
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


def set_rlimits(cfg):
    for name, val in cfg["rlimits"].items():
        res = getattr(resource, name)
        soft, hard = val
        cur_soft, cur_hard = resource.getrlimit(res)
        if cur_hard != resource.RLIM_INFINITY and not cfg["can_raise"]:
            hard = cur_hard if hard == -1 else min(hard, cur_hard)
            soft = hard if soft == -1 else min(soft, hard)
        resource.setrlimit(res, (soft, hard))


def drop_identity(cfg):
    """"uid": a random unprivileged uid/gid (we are root); "userns": a nested user namespace in
    which we are a non-root id with no capabilities; None: keep ours."""
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


def exec_program(cfg):
    """In the forked child: limits, identity, no_new_privs, then exec the untrusted program."""
    set_rlimits(cfg)
    drop_identity(cfg)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(NO_NEW_PRIVS)")
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != cfg["launcher_pid"]:
        os._exit(1)
    os.chdir(cfg["workdir"])
    os.umask(0o077)
    argv = [cfg["python"]] + cfg["pyflags"] + [os.path.join(cfg["workdir"], cfg["main"])]
    os.execve(cfg["python"], argv, dict(os.environ))


def wait_and_report(cfg, pid):
    """Reap every child (we may be PID 1) until the program ends; report its exit status."""
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
                report(cfg, {"signal": os.WTERMSIG(st)})
            else:
                report(cfg, {"exit": os.WEXITSTATUS(st)})
            break


def main():
    cfg = json.loads(sys.argv[1])
    os.set_inheritable(cfg["status_fd"], False)
    try:
        set_up_mounts(cfg)
    except BaseException as e:
        report(cfg, {"setup_error": "%s: %s" % (type(e).__name__, e)})
        os._exit(SETUP_FAILED)
    cfg["launcher_pid"] = os.getpid()
    pid = os.fork()
    if pid == 0:
        try:
            exec_program(cfg)
        except BaseException as e:
            report(cfg, {"setup_error": "child: %s: %s" % (type(e).__name__, e)})
        os._exit(SETUP_FAILED)
    wait_and_report(cfg, pid)
    os._exit(0)


if __name__ == "__main__":
    main()
