"""Hostile programs must be contained and scored by verifiers.sandbox.run_sandboxed without harming
the machine. Assertions that depend on a protection the host lacks are skipped (see
sandbox_capabilities())."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from verifiers.sandbox import run_sandboxed, sandbox_capabilities

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def caps():
    return sandbox_capabilities()


def _pids_with_cmdline(needle: str) -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                if needle.encode() in f.read():
                    found.append(int(name))
        except OSError:
            pass
    return found


def _assert_no_leftovers(needle: str, grace_s: float = 1.0):
    deadline = time.monotonic() + grace_s
    while _pids_with_cmdline(needle) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _pids_with_cmdline(needle) == []


def test_capabilities_shape(caps):
    for key in ("tier", "net_namespace", "pid_namespace", "readonly_filesystem", "unprivileged_identity",
                "rlimits", "env_scrubbed", "temp_workdir", "process_group_kill", "wall_clock_kill"):
        assert key in caps
    assert caps["env_scrubbed"] and caps["temp_workdir"] and caps["wall_clock_kill"]


def test_normal_program_returns_stdout_and_stdin():
    r = run_sandboxed("import sys\nprint('hello', sys.stdin.read().strip())\nprint('err', file=sys.stderr)",
                      stdin="world\n", timeout_s=10)
    assert r.returncode == 0 and r.ok and not r.timed_out
    assert r.stdout == "hello world\n"
    assert r.stderr == "err\n"
    assert not os.path.exists(r.workdir)  # temp dir removed


def test_nonzero_exit_is_scored():
    r = run_sandboxed("import sys; sys.exit(3)")
    assert r.returncode == 3 and not r.timed_out and not r.ok


def test_workdir_is_home_and_tmp_and_writable():
    r = run_sandboxed("import os, tempfile\nopen('f.txt','w').write('x')\n"
                      "print(os.getcwd() == os.environ['HOME'] == os.environ['TMPDIR'] == tempfile.gettempdir())")
    assert r.returncode == 0 and r.stdout.strip() == "True"


def test_infinite_loop_times_out():
    t0 = time.monotonic()
    r = run_sandboxed("while True:\n    pass\n", timeout_s=1.5)
    assert time.monotonic() - t0 < 4.0
    assert r.timed_out and r.killed_reason == "timeout" and r.returncode < 0


def test_allocating_6gb_fails_fast():
    t0 = time.monotonic()
    r = run_sandboxed("x = bytearray(6 * 1024 ** 3)\nprint('allocated')", memory_mb=1024, timeout_s=20)
    assert time.monotonic() - t0 < 10
    assert r.returncode != 0 and "allocated" not in r.stdout
    assert "MemoryError" in r.stderr


def test_growing_memory_fails():
    r = run_sandboxed("chunks = []\nwhile True:\n    chunks.append(bytearray(50 * 1024 ** 2))", memory_mb=512,
                      timeout_s=20)
    assert r.returncode != 0 and not r.timed_out
    assert "MemoryError" in r.stderr


def test_fork_bomb_is_contained(caps):
    if not caps["nproc_limit_effective"] and not caps["pid_namespace"]:
        pytest.skip("neither RLIMIT_NPROC (unprivileged identity) nor a PID namespace here")
    before = len([p for p in os.listdir("/proc") if p.isdigit()])
    t0 = time.monotonic()
    r = run_sandboxed("import os, time\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n"
                      "        time.sleep(0.01)\n", timeout_s=3, max_procs=32)
    assert time.monotonic() - t0 < 8
    assert r.timed_out
    _assert_no_leftovers(r.workdir)
    after = len([p for p in os.listdir("/proc") if p.isdigit()])
    assert after < before + 20  # nothing of the bomb is left (other tests may run beside us)


def test_killing_the_parent_or_group_does_not_harm_the_evaluator(caps):
    if not (caps["pid_namespace"] or caps["unprivileged_identity"]):
        pytest.skip("program runs as our uid without a PID namespace: it could signal us")
    sentinel = subprocess.Popen(["sleep", "60"])
    try:
        src = (
            "import os, signal\n"
            "for f in (lambda: os.kill(os.getppid(), 9), lambda: os.kill(%d, 9), lambda: os.kill(%d, 9),\n"
            "          lambda: os.killpg(os.getpgid(0), 9), lambda: os.kill(-1, 9)):\n"
            "    try:\n        f()\n    except OSError as e:\n        print(type(e).__name__)\n"
            "print('survived')\n" % (os.getpid(), sentinel.pid)
        )
        r = run_sandboxed(src, timeout_s=10)
        assert not r.timed_out
        assert r.returncode != 0 or "survived" in r.stdout  # either it killed itself or nothing happened
        assert sentinel.poll() is None  # a process of ours outside the sandbox is untouched
        os.kill(os.getpid(), 0)  # and we are alive
        # the evaluator keeps working afterwards
        assert run_sandboxed("print(1)").stdout == "1\n"
    finally:
        sentinel.kill()
        sentinel.wait()


def test_killing_own_parent_is_scored():
    r = run_sandboxed("import os\nos.kill(os.getppid(), 9)\nimport time; time.sleep(30)", timeout_s=5)
    assert r.returncode != 0 or r.timed_out
    _assert_no_leftovers(r.workdir)


def test_files_outside_cannot_be_written_or_deleted(caps, tmp_path):
    if not caps["readonly_filesystem"]:
        pytest.skip("no read-only mount namespace here")
    victim_dir = tmp_path / "victim_dir"
    victim_dir.mkdir()
    (victim_dir / "keep.txt").write_text("keep")
    victim_file = tmp_path / "victim.txt"
    victim_file.write_text("keep")
    tag = uuid.uuid4().hex
    targets = [f"/tmp/escape_{tag}", str(REPO / f"escape_{tag}"), str(Path.home() / f"escape_{tag}")]
    src = (
        "import os, shutil\n"
        f"for p in {targets!r}:\n"
        "    try:\n        open(p, 'w').write('x'); print('WROTE', p)\n    except OSError as e:\n        print('no', e.errno)\n"
        f"for f in (lambda: shutil.rmtree({str(victim_dir)!r}), lambda: os.remove({str(victim_file)!r}),\n"
        f"          lambda: os.rename({str(victim_file)!r}, '/tmp/moved_{tag}')):\n"
        "    try:\n        f(); print('DELETED')\n    except OSError as e:\n        print('no', e.errno)\n"
    )
    r = run_sandboxed(src, timeout_s=10)
    assert r.returncode == 0, r.stderr
    assert "WROTE" not in r.stdout and "DELETED" not in r.stdout
    for p in targets + [f"/tmp/moved_{tag}"]:
        assert not os.path.exists(p)
    assert (victim_dir / "keep.txt").read_text() == "keep"
    assert victim_file.read_text() == "keep"


def test_disk_usage_is_capped():
    r = run_sandboxed("open('big', 'wb').write(b'x' * (64 * 1024 * 1024))\nprint('wrote')", disk_mb=16,
                      timeout_s=20)
    assert r.returncode != 0 and "wrote" not in r.stdout


def test_network_is_unreachable(caps):
    if not caps["net_namespace"]:
        pytest.skip("no network namespace here")
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen(5)
    srv.settimeout(0.2)
    port = srv.getsockname()[1]
    accepted = []
    stop = threading.Event()

    def accept_loop():
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
                accepted.append(conn)
            except (socket.timeout, OSError):
                pass

    th = threading.Thread(target=accept_loop, daemon=True)
    th.start()
    src = (
        "import socket\n"
        f"for host, port in (('127.0.0.1', {port}), ('1.1.1.1', 80), ('8.8.8.8', 53)):\n"
        "    try:\n        s = socket.create_connection((host, port), timeout=2); s.sendall(b'hi'); print('CONNECTED')\n"
        "    except OSError as e:\n        print('failed', e.errno)\n"
    )
    r = run_sandboxed(src, timeout_s=15)
    time.sleep(0.3)
    stop.set()
    th.join()
    srv.close()
    assert r.returncode == 0, r.stderr
    assert "CONNECTED" not in r.stdout and r.stdout.count("failed") == 3
    assert accepted == []


def test_environment_secrets_are_not_visible(caps, monkeypatch):
    secret = "s3cr3t-" + uuid.uuid4().hex
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("HF_TOKEN", secret)
    src = (
        "import os\n"
        "print('AWS' if 'AWS_SECRET_ACCESS_KEY' in os.environ else 'no-aws')\n"
        f"hits = [v for v in os.environ.values() if {secret!r} in v]\n"
        "for pid in os.listdir('/proc'):\n"
        "    try:\n"
        f"        if pid.isdigit() and {secret!r}.encode() in open(f'/proc/{{pid}}/environ', 'rb').read():\n"
        "            hits.append(pid)\n"
        "    except OSError:\n        pass\n"
        "print('hits', len(hits))\n"
    )
    r = run_sandboxed(src)
    assert r.returncode == 0, r.stderr
    assert "no-aws" in r.stdout
    if caps["pid_namespace"] or caps["unprivileged_identity"]:
        assert "hits 0" in r.stdout  # not even through /proc/<parent>/environ


def test_daemonized_grandchild_does_not_survive():
    tag = f"{time.time_ns() % 10**9}.{os.getpid()}"
    src = (
        "import os\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        f"        os.execv('/bin/sleep', ['sleep', '{tag}'])\n"
        "    os._exit(0)\n"
        "print('parent done')\n"
    )
    t0 = time.monotonic()
    r = run_sandboxed(src, timeout_s=20)
    assert time.monotonic() - t0 < 8  # did not wait for the daemon
    assert r.returncode == 0 and "parent done" in r.stdout
    _assert_no_leftovers(tag)


def test_output_flood_is_capped():
    t0 = time.monotonic()
    r = run_sandboxed("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n", timeout_s=20,
                      max_output_bytes=100_000)
    assert time.monotonic() - t0 < 10
    assert len(r.stdout) <= 100_000 and r.stdout_truncated
    assert r.killed_reason == "output_limit"


def test_concurrent_runs_are_independent():
    results = [None] * 4

    def go(i):
        results[i] = run_sandboxed(f"print({i} * 7)")

    threads = [threading.Thread(target=go, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.stdout.strip() for r in results] == [str(i * 7) for i in range(4)]


def test_interpreter_is_ours_and_isolated():
    r = run_sandboxed("import sys, os\nprint(sys.flags.no_user_site, os.environ.get('PYTHONHASHSEED'))\n"
                      f"print(sys.prefix == {sys.prefix!r})")
    assert r.stdout.split() == ["1", "0", "True"]


def test_value_codec_round_trips_and_untrusted_outputs():
    import json

    import numpy as np

    from verifiers.sandbox_harness import Opaque as _Opaque
    from verifiers.sandbox_harness import decode_output as _dec_result
    from verifiers.sandbox_harness import decode_value as _dec
    from verifiers.sandbox_harness import encode_value as _enc

    value = [1, (2.5, "x"), {3, 4}, frozenset({5}), {"k": b"\x00\xff"}, 1 + 2j, 7**5000, None, True]
    assert _dec(json.loads(json.dumps(_enc(value)))) == value
    with pytest.raises(TypeError):
        _enc(object())  # inputs we send must be plain values

    class MyInt(int):
        pass

    class MyList(list):
        pass

    out = _dec_result(json.loads(json.dumps(_enc([MyInt(3), MyList([1]), np.int64(4), np.arange(3), object()], untrusted=True))))
    assert out[:2] == [3, [1]] and type(out[0]) is int and type(out[1]) is list
    assert out[2] == 4 and isinstance(out[2], np.int64) and out[3].tolist() == [0, 1, 2]
    assert isinstance(out[4], _Opaque)
    deep = []
    for _ in range(300):
        deep = [deep]
    assert "too-deep" in json.dumps(_enc(deep, untrusted=True))
