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


def make_accelerator(output_dir: str, bf16: bool, report_to: str):
    from accelerate import Accelerator, DistributedType, FullyShardedDataParallelPlugin
    from accelerate.state import PartialState
    from accelerate.utils import is_tensorboard_available
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
    accelerator = Accelerator(mixed_precision=precision, fsdp_plugin=fsdp_plugin, log_with=trackers or None,
                              project_dir=output_dir)
    if launcher_precision not in ("no", "bf16" if bf16 else "no") and accelerator.is_main_process:
        logger.warning("the launcher asks for mixed_precision=%s; precision follows --bf16 (%s) instead", launcher_precision, bf16)
    if fsdp_plugin is not None and accelerator.distributed_type == DistributedType.MULTI_CPU:
        # accelerate drops an FSDP config on CPU; torch FSDP2 runs there on gloo, so honour the request.
        accelerator.state.fsdp_plugin = fsdp_plugin
        accelerator.state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    return accelerator


def set_cpu_threads(accelerator, threads: int) -> int:
    """`threads` torch threads, or (0) the machine's physical cores shared among its processes:
    `accelerate launch` sets OMP_NUM_THREADS=1 and would leave cores idle."""
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
    cores = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    torch.set_num_threads(threads or max(1, cores // local_processes))
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
