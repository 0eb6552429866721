"""The sandbox's isolation tiers as data: what each tier turns on (:data:`ISOLATION_TIERS`, best
first), and :func:`available_tiers`, the rows that can exist on this host for this user, made
concrete (the unshare command, the identity drop, the skeleton of bind mounts). Which of them
actually works is probed by verifiers/sandbox.py.
"""

from __future__ import annotations

import os
import shutil
import stat
import sys
import sysconfig
import tempfile
from dataclasses import dataclass

__all__ = ["TierSpec", "ISOLATION_TIERS", "Tier", "available_tiers", "find_unshare"]


@dataclass(frozen=True)
class TierSpec:
    """What one tier turns on. Identity drops: "uid" (a random unprivileged uid/gid; needs root),
    "userns" (a nested user namespace; needs `namespaces`), None (the program runs as we do)."""

    name: str
    namespaces: bool  # unshare: network, PID (launcher = init), IPC, UTS; plus a user namespace unless root
    fresh_proc: bool  # unshare --mount --mount-proc: a private mount namespace with a fresh /proc
    readonly_fs: bool  # every mount read-only but a private tmpfs working dir and /dev/shm (needs fresh_proc)
    identity_as_root: str | None
    identity_as_user: str | None
    root_only: bool = False


# Best first; a tier is tried only where it can exist (unshare found, root for root_only rows).
ISOLATION_TIERS = (
    TierSpec("namespaces+readonly-fs", namespaces=True, fresh_proc=True, readonly_fs=True,
             identity_as_root="uid", identity_as_user="userns"),
    TierSpec("namespaces", namespaces=True, fresh_proc=True, readonly_fs=False,
             identity_as_root="uid", identity_as_user="userns"),
    TierSpec("namespaces(root)", namespaces=True, fresh_proc=True, readonly_fs=False,
             identity_as_root=None, identity_as_user=None, root_only=True),
    TierSpec("namespaces(no-proc)", namespaces=True, fresh_proc=False, readonly_fs=False,
             identity_as_root=None, identity_as_user="userns"),
    TierSpec("fallback", namespaces=False, fresh_proc=False, readonly_fs=False,
             identity_as_root="uid", identity_as_user=None),
    TierSpec("fallback(root)", namespaces=False, fresh_proc=False, readonly_fs=False,
             identity_as_root=None, identity_as_user=None, root_only=True),
)


@dataclass(frozen=True)
class Tier:
    """A TierSpec made concrete for this host and user."""

    name: str
    command_prefix: tuple[str, ...]  # the unshare command the launcher runs under (empty: none)
    readonly_fs: bool
    drop: str | None  # "uid" | "userns" | None
    pid_namespace: bool
    net_namespace: bool
    user_namespace: bool
    skeleton: tuple = ()  # ((blocked dir, (paths to bind back, ...)), ...) for the launcher


def find_unshare() -> str | None:
    p = shutil.which("unshare")
    if p:
        return p
    for c in ("/usr/bin/unshare", "/bin/unshare", "/usr/sbin/unshare", "/sbin/unshare"):
        if os.access(c, os.X_OK):
            return c
    return None


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


def _skeleton_plan() -> tuple:
    """For paths the interpreter needs whose ancestors are not world-traversable (e.g. /root 0700):
    ((blocked_dir, (needed paths under it, ...)), ...) for the launcher to expose via bind mounts."""
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
    plan: list[tuple[str, list[str]]] = []
    for top in sorted(groups, key=len):
        if any(top.startswith(t + "/") for t, _ in plan):
            continue  # covered by an outer skeleton (its needed paths are bound whole)
        keep: list[str] = []
        for n in sorted(groups[top], key=len):
            if not any(n == k or n.startswith(k + "/") for k in keep):
                keep.append(n)
        plan.append((top, keep))
    # merge needed paths of inner groups into their outer group
    for top, ns in list(groups.items()):
        for ptop, keep in plan:
            if top != ptop and top.startswith(ptop + "/"):
                for n in ns:
                    if not any(n == k or n.startswith(k + "/") for k in keep):
                        keep.append(n)
    return tuple((top, tuple(keep)) for top, keep in plan)


def available_tiers() -> list[Tier]:
    root = os.geteuid() == 0
    unshare = find_unshare()
    skeleton = None
    tiers = []
    for spec in ISOLATION_TIERS:
        if (spec.root_only and not root) or (spec.namespaces and not unshare):
            continue
        prefix: tuple[str, ...] = ()
        if spec.namespaces:
            prefix = (unshare, "--net", "--pid", "--fork", "--kill-child", "--ipc", "--uts")
            prefix += () if root else ("--map-root-user",)
            prefix += ("--mount", "--mount-proc") if spec.fresh_proc else ()
        drop = spec.identity_as_root if root else spec.identity_as_user
        if spec.readonly_fs and drop == "uid" and skeleton is None:
            skeleton = _skeleton_plan()
        tiers.append(Tier(name=spec.name, command_prefix=prefix, readonly_fs=spec.readonly_fs, drop=drop,
                          pid_namespace=spec.namespaces, net_namespace=spec.namespaces,
                          user_namespace=spec.namespaces and not root,
                          skeleton=skeleton if (spec.readonly_fs and drop == "uid") else ()))
    return tiers
