"""Process counts across launchers and machines (issue 25): torchrun without ACCELERATE_USE_CPU on a
machine without a GPU, two nodes simulated on this machine, CPU threads per node."""

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from antisd import distributed
from antisd.rollouts import free_port
from test_training import FAST, REPO, TORCHRUN, read_metrics, run_script

TINY = FAST + ["--group_size", "2", "--max_new_tokens", "24", "--cpu_threads", "1", "--method", "antisd"]
CPU = {"ACCELERATE_USE_CPU": "true", "PYTHONPATH": str(REPO)}
TIMING = ("time/", "tokens_per_s", "memory/")


def torchrun_2() -> list[str]:
    """TORCHRUN on a free port: 29500, its default, may be taken by another run on this machine."""
    return TORCHRUN + ["--master_port", str(free_port())]


def same_steps(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if not k.startswith(TIMING)} for row in rows]


# ---- 1. N processes launched, accelerate sets up another number

def fake_accelerator(num_processes: int):
    return SimpleNamespace(num_processes=num_processes, distributed_type="NO", device=torch.device("cpu"),
                           is_main_process=True)


def test_process_count_mismatch_stops_before_writing_anything(tmp_path, monkeypatch):
    """WORLD_SIZE=2 but accelerate makes a run of 1 (a GPU-less launch it does not see as CPU, an MPI
    launch without LOCAL_RANK on GPUs...): main stops in make_accelerator, the output folder untouched."""
    import accelerate
    from train_antisd import main, parse_config

    monkeypatch.setenv("WORLD_SIZE", "2")
    made = []
    monkeypatch.setattr(accelerate, "Accelerator", lambda **kwargs: made.append(kwargs) or fake_accelerator(1))
    with pytest.raises(SystemExit, match="ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2"):
        main(parse_config(TINY + ["--max_steps", "1", "--output_dir", str(tmp_path / "run")]))
    assert made and made[0]["cpu"] == (not torch.accelerator.is_available())  # no GPU: asked for the 2 processes on CPU
    assert not (tmp_path / "run").exists()
    distributed.check_process_count(fake_accelerator(2), 2)  # agreeing counts pass
    distributed.check_process_count(fake_accelerator(1), 1)


@pytest.mark.slow
@pytest.mark.skipif(torch.accelerator.is_available(), reason="without a GPU only: on GPUs torchrun gives each process one")
def test_torchrun_without_accelerate_use_cpu_is_one_two_process_run(tmp_path):
    """`torchrun --nproc_per_node 2` on CPU without ACCELERATE_USE_CPU=true: accelerate alone would make
    two runs of 1 (every metrics row twice, two writers per checkpoint); it is one run of 2."""
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    proc = subprocess.run(torchrun_2() + [str(REPO / "train_antisd.py"), *TINY, "--max_steps", "2", "--output_dir", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "one 2-process run on CPU (gloo)" in proc.stderr
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2"]


# ---- 2. two nodes simulated on this machine

def two_nodes(args: list[str], timeout: int = 300) -> None:
    """The script on 2 "machines" of 1 process each: two torchrun agents, node ranks 0 and 1, meeting
    at 127.0.0.1 (static rendezvous), gloo; both write into the same --output_dir (shared storage)."""
    port = str(free_port())
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(rank),
                               "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", port,
                               str(REPO / "train_antisd.py"), *args],
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1", **CPU}) for rank in (0, 1)]
    try:
        outputs = [node.communicate(timeout=timeout)[0] for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
                node.wait()
    for rank, (node, output) in enumerate(zip(nodes, outputs)):
        assert node.returncode == 0, f"node {rank}:\n{output[-6000:]}"


@pytest.mark.slow
def test_two_nodes_train_checkpoint_resume_like_one_node_of_two_processes(tmp_path):
    nodes_dir, one_node_dir = tmp_path / "two_nodes", tmp_path / "one_node"
    two_nodes(TINY + ["--max_steps", "3", "--save_steps", "0", "--output_dir", str(nodes_dir)])
    assert [r["step"] for r in read_metrics(nodes_dir)] == [1, 2, 3]
    assert sorted(p.name for p in nodes_dir.glob("checkpoint-*")) == ["checkpoint-3"]
    assert {p.name for p in (nodes_dir / "checkpoint-3").glob("random_states_*.pkl")} == \
        {"random_states_0.pkl", "random_states_1.pkl"}  # each node's process wrote its own RNG state there
    two_nodes(["--resume", "--max_steps", "5", "--output_dir", str(nodes_dir)])
    run_script(TINY + ["--max_steps", "5", "--save_steps", "0", "--output_dir", str(one_node_dir)], env=CPU, launcher=torchrun_2())

    nodes, one_node = read_metrics(nodes_dir), read_metrics(one_node_dir)
    assert [r["step"] for r in nodes] == [1, 2, 3, 4, 5]  # one row per step: only the global main process writes
    assert sorted(p.name for p in nodes_dir.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-5"]
    assert not list(nodes_dir.glob("*.partial"))
    assert same_steps(nodes) == same_steps(one_node)


# ---- 3. CPU threads: this machine's cores among this machine's processes

@pytest.mark.parametrize("env,expected", [
    ({"LOCAL_WORLD_SIZE": "1", "WORLD_SIZE": "2"}, 8),  # torchrun, 2 nodes of 1 process: all 8 cores
    ({"LOCAL_WORLD_SIZE": "2", "WORLD_SIZE": "4"}, 4),  # 2 nodes of 2
    ({"OMPI_COMM_WORLD_LOCAL_SIZE": "4", "OMPI_COMM_WORLD_SIZE": "8"}, 2),  # Open MPI
    ({}, 2),  # no launcher count: all processes (4), fewer threads rather than oversubscribed cores
])
def test_cpu_threads_split_by_the_processes_on_this_machine(monkeypatch, env, expected):
    for name in distributed.LOCAL_WORLD_SIZE_VARS + distributed.WORLD_SIZE_VARS:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(distributed.psutil, "cpu_count", lambda logical=True: 8)
    threads = []
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads[-1])
    accelerator = SimpleNamespace(num_processes=4)
    assert distributed.set_cpu_threads(accelerator, 0) == expected
    assert distributed.set_cpu_threads(accelerator, 3) == 3  # --cpu_threads wins
