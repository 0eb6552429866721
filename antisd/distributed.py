"""Accelerator setup and the collectives the training loop needs, on CPU (gloo) and GPUs alike.

- `make_accelerator`: one precision policy on every device. With FSDP (`ACCELERATE_USE_FSDP=true`,
  which `configs/accelerate/fsdp2.yaml` sets, and which accelerate drops on CPU where we honour it)
  the model is sharded with torch FSDP2 under an explicit `MixedPrecisionPolicy`: `--bf16` means
  parameters bf16 in forward/backward, gradients reduce-scattered in fp32, outputs not cast (the
  fp32 log-probs the scoring head returns stay fp32), fp32 master weights in the optimizer.
  Without FSDP, `--bf16` is accelerate's bf16 autocast over fp32 weights (DDP reduces fp32 grads).
- `full_weights_for_generation`: a sharded model would all-gather every layer at every decoded
  token; this gathers each FSDP2 unit once, keeps it through `generate`, and frees it afterwards.
- `full_parameters`: the model's parameters as full tensors, one at a time (FSDP2: each gathered in
  turn), for pushing weights into a vLLM engine.
- `gather_floats`: every process's 1-D values, for step metrics.
- `launched_processes` / `check_process_count`: a launcher that starts N processes on a machine
  without a GPU (torchrun without `ACCELERATE_USE_CPU=true`) would leave accelerate setting each up
  as a run of its own, N copies training into one folder: `make_accelerator` sets them up on CPU
  (gloo) instead, and stops, before anything is written, on any other mismatch.
- `local_processes` / `set_cpu_threads`: torch threads from this machine's cores and the processes on
  this machine (several machines: not the global count). docs/several_machines.md: multi-node launches.
"""

from __future__ import annotations

import logging
import os
import resource
from contextlib import contextmanager

import psutil
import torch

logger = logging.getLogger("antisd")


def fsdp_requested() -> bool:
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def _env_int(names: tuple[str, ...]) -> int | None:
    for name in names:
        if os.environ.get(name, "").strip().isdigit():
            return int(os.environ[name])
    return None


# what accelerate's own CPU setup reads (accelerate.utils.get_cpu_distributed_information): torchrun /
# accelerate launch, then MPI launchers (Intel MPI, Open MPI, MVAPICH)
WORLD_SIZE_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
LOCAL_WORLD_SIZE_VARS = ("LOCAL_WORLD_SIZE", "MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE", "MV2_COMM_WORLD_LOCAL_SIZE")


def launched_processes() -> int:
    """How many processes the launcher started, on all machines together (1 without a launcher)."""
    return _env_int(WORLD_SIZE_VARS) or 1


def check_process_count(accelerator, launched: int) -> None:
    """Stop when the launcher started `launched` > 1 processes and accelerate set this one up as part
    of a different number: each would train alone, writing the same metrics rows and checkpoints into
    one --output_dir."""
    if launched > 1 and accelerator.num_processes != launched:
        raise SystemExit(
            f"The launcher started {launched} processes (WORLD_SIZE={launched}), but accelerate set this one up in a run "
            f"of {accelerator.num_processes} ({accelerator.distributed_type}, device {accelerator.device}): the "
            f"processes would train separate copies into the same --output_dir. "
            f"On CPU, launch with ACCELERATE_USE_CPU=true: `ACCELERATE_USE_CPU=true accelerate launch --multi_gpu "
            f"--num_processes {launched} train_antisd.py ...` or `ACCELERATE_USE_CPU=true torchrun --nproc_per_node "
            f"{launched} train_antisd.py ...`. On GPUs, one process per GPU, started by `accelerate launch` or "
            f"`torchrun` (they set LOCAL_RANK); several machines: docs/several_machines.md.")


def make_accelerator(output_dir: str, bf16: bool, report_to: str):
    from accelerate import Accelerator, DistributedType, FullyShardedDataParallelPlugin
    from accelerate.state import PartialState
    from accelerate.utils import is_tensorboard_available, parse_flag_from_env
    from torch.distributed.fsdp import MixedPrecisionPolicy

    trackers = [t for t in report_to.split(",") if t and t != "none"]
    if "tensorboard" in trackers and not is_tensorboard_available():
        trackers.remove("tensorboard")
    launcher_precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    fsdp_plugin = None
    if fsdp_requested():
        os.environ.setdefault("FSDP_VERSION", "2")
        policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16
                  else MixedPrecisionPolicy())
        fsdp_plugin = FullyShardedDataParallelPlugin(fsdp_version=2, mixed_precision_policy=policy)
    # FSDP2's policy does the casting; accelerate's autocast on top would cast the outputs to bf16.
    precision = "bf16" if bf16 and fsdp_plugin is None else "no"
    # N processes launched (torchrun) on a machine without a GPU: without ACCELERATE_USE_CPU=true
    # accelerate finds no distributed backend and makes each a run of its own; cpu=True makes them one
    # N-process gloo run, what ACCELERATE_USE_CPU=true asks for.
    launched = launched_processes()
    on_cpu = launched > 1 and not torch.accelerator.is_available()
    accelerator = Accelerator(mixed_precision=precision, fsdp_plugin=fsdp_plugin, log_with=trackers or None,
                              project_dir=output_dir, cpu=on_cpu)
    check_process_count(accelerator, launched)  # before the caller writes anything
    if on_cpu and accelerator.is_main_process and not parse_flag_from_env("ACCELERATE_USE_CPU"):
        logger.info("%d processes and no GPU: one %d-process run on CPU (gloo), as with ACCELERATE_USE_CPU=true", launched, launched)
    if launcher_precision not in ("no", "bf16" if bf16 else "no") and accelerator.is_main_process:
        logger.warning("the launcher asks for mixed_precision=%s; precision follows --bf16 (%s) instead", launcher_precision, bf16)
    if fsdp_plugin is not None and accelerator.distributed_type == DistributedType.MULTI_CPU:
        # accelerate drops an FSDP config on CPU; torch FSDP2 runs there on gloo, so honour the request.
        accelerator.state.fsdp_plugin = fsdp_plugin
        accelerator.state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    return accelerator


def local_processes(accelerator) -> int:
    """The processes on this machine: the launcher's local count (torchrun and `accelerate launch` set
    LOCAL_WORLD_SIZE, per node; accelerate's CPU setup copies an MPI launcher's into it), else all
    processes (one machine; on several this can only leave cores idle, never oversubscribe them)."""
    return _env_int(LOCAL_WORLD_SIZE_VARS) or accelerator.num_processes


def set_cpu_threads(accelerator, threads: int) -> int:
    """`threads` torch threads, or (0) this machine's physical cores shared among this machine's
    processes (`local_processes`; on several machines not the global count): `accelerate launch` sets
    OMP_NUM_THREADS=1 and would leave cores idle."""
    cores = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    torch.set_num_threads(threads or max(1, cores // local_processes(accelerator)))
    return torch.get_num_threads()


def fsdp_units(model) -> list:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextmanager
def full_weights_for_generation(model):
    """Inside, every FSDP2 unit holds its full (param-dtype) weights, gathered once on entry, so
    `generate` runs without a collective per token (and without synced_gpus); they are freed on exit,
    before the update. Models that are not FSDP2-sharded pass through untouched, and so does a nested
    entry (evaluation during training holds the weights around many rollout calls of the main process:
    an inner exit would free them there alone, and the next entry would gather without the others)."""
    units = [] if getattr(model, "_holds_full_weights", False) else fsdp_units(model)
    if units and units[0] is model:  # FSDP2 picks its root in the first forward; peft's generate calls the base
        model._get_fsdp_state()._lazy_init()  # model's forward, never the root's: decide it now (no-op after once)
    reshard_after = {unit: any(group.post_forward_mesh_info is not None  # each unit's setting, restored on exit
                               for group in unit._get_fsdp_state()._fsdp_param_groups) for unit in units}
    for unit in units:
        unit.unshard()
        unit.set_reshard_after_forward(False, recurse=False)
    if units:
        model._holds_full_weights = True
    try:
        yield model
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(reshard_after[unit], recurse=False)
        if units:
            model._holds_full_weights = False


def full_parameters(model):
    """(name, full tensor) of every parameter, in order, one gathered at a time: an FSDP2 shard is a
    DTensor whose `full_tensor()` all-gathers just that parameter (collective: every process iterates).
    Tied weights come once; names are the model's own (activation-checkpoint wrappers stripped)."""
    from torch.distributed.tensor import DTensor

    for name, param in model.named_parameters():
        tensor = param.detach()
        yield name.replace("_checkpoint_wrapped_module.", ""), tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def peak_memory_gib(device: torch.device) -> float:
    """Peak GPU memory allocated by this process, or its peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def gather_floats(accelerator, values: torch.Tensor) -> torch.Tensor:
    """All processes' 1-D float tensors, concatenated (lengths may differ)."""
    values = values.float().to(accelerator.device)
    padded = accelerator.pad_across_processes(values, dim=0, pad_index=float("nan"))
    everything = accelerator.gather(padded)
    return everything[~torch.isnan(everything)]
