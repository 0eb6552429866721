"""Checkpoints and model folders, shared by train_antisd.py and evaluate.py (loading: model_loading.py).

- `save_checkpoint` writes `checkpoint-<step>` atomically (a `.partial` folder renamed when complete);
  `latest_checkpoint` finds the newest complete one.
- `model_dir` turns whatever a user points at (a model folder, a hub id, a checkpoint of a DDP or
  FSDP run, a LoRA run or checkpoint) into a folder `from_pretrained` and vLLM read: FSDP shards are
  merged, wrapper prefixes (`module.` from DDP, `_orig_mod.` from torch.compile) stripped, a LoRA
  adapter merged into its base, once, into a scratch folder.
- `save_final_model` writes the full model in the training dtype (bf16 after `--bf16`), or for a
  LoRA run the adapter (and, when asked, the merged model in `merged/`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

import torch
import yaml

from antisd.adapters import is_peft_model, merge_adapter, save_adapter
from antisd.model_loading import is_adapter_dir

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
FSDP_SHARDS = "pytorch_model_fsdp_0"
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
logger = logging.getLogger("antisd")


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """The run's complete checkpoint-<step> folders, by step."""
    done = [p for p in Path(output_dir).glob("checkpoint-*")
            if CHECKPOINT_RE.match(p.name) and (p / "trainer_state.json").is_file()]
    return sorted(done, key=checkpoint_step)


def checkpoint_step(path: Path) -> int:
    return int(path.name.split("-")[1])


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    return (complete_checkpoints(output_dir) or [None])[-1]


def prepare_output_dir(accelerator, output_dir: Path, config: dict, resume: bool) -> Path | None:
    """The checkpoint a --resume continues from (None: a fresh start); the main process creates the
    folder and writes the run's config.yaml (without `resume`, so the saved config can be resumed).
    A fresh start refuses a folder that holds a run's metrics or checkpoints: it would overwrite them."""
    metrics, checkpoint = output_dir / "metrics.jsonl", latest_checkpoint(output_dir)
    held = [checkpoint.name] if checkpoint else []
    if metrics.is_file() and metrics.stat().st_size:
        held.insert(0, metrics.name)
    if held and not resume:
        raise SystemExit(f"{output_dir} already holds a run ({', '.join(held)}): pass --resume to continue it, "
                         f"or another --output_dir (delete the folder to start it over)")
    resume_from = checkpoint if resume else None
    if resume and resume_from is None:
        logger.warning("--resume: no complete checkpoint in %s, starting from scratch", output_dir)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.yaml").write_text(yaml.safe_dump({k: v for k, v in config.items() if k != "resume"},
                                                               sort_keys=False))
        logger.info("config:\n%s", yaml.safe_dump(config, sort_keys=False))
    return resume_from


def load_checkpoint(accelerator, folder: Path, gate) -> int:
    """accelerate state (model, optimizer, scheduler, RNG) and the gate's state restored from `folder`;
    returns its step."""
    accelerator.load_state(str(folder))
    state = json.loads((folder / "trainer_state.json").read_text())
    gate.load_state_dict(state["controller"])
    logger.info("resumed from %s at step %d", folder, state["step"])
    return state["step"]


def save_checkpoint(accelerator, model, tokenizer, output_dir: str, step: int, trainer_state: dict, keep: int) -> None:
    """accelerate state (model, optimizer, scheduler, RNG) + tokenizer + config + `trainer_state`."""
    final = Path(output_dir) / f"checkpoint-{step}"
    partial = final.with_name(final.name + ".partial")
    if accelerator.is_main_process and partial.exists():
        shutil.rmtree(partial)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))  # a LoRA model's whole state: base, adapter, the adapter's optimizer
    if is_peft_model(accelerator.unwrap_model(model)):  # the adapter alone too, so the folder merges into a model
        save_adapter(accelerator, model, partial)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        tokenizer.save_pretrained(partial)  # with config.json below, `model_dir` can turn the folder into a model
        accelerator.unwrap_model(model).config.save_pretrained(partial)
        (partial / "trainer_state.json").write_text(json.dumps({"step": step, **trainer_state}, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)  # the commit point
        for old in sorted((p for p in Path(output_dir).glob("checkpoint-*") if CHECKPOINT_RE.match(p.name)),
                          key=checkpoint_step)[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


def _wrapped_weights(path: Path) -> Path | None:
    """The safetensors file of an accelerate checkpoint whose keys carry a wrapper prefix (DDP), if any."""
    from safetensors import safe_open

    file = path / "model.safetensors"
    if not file.is_file():
        return None
    with safe_open(str(file), "pt") as f:
        keys = list(f.keys())
    return file if keys and all(k.startswith(WRAPPER_PREFIXES) for k in keys) else None


def needs_conversion(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and (is_adapter_dir(path) or (path / FSDP_SHARDS).is_dir() or _wrapped_weights(path) is not None)


def strip_wrapper_prefix(name: str) -> str:
    for prefix in WRAPPER_PREFIXES:
        while name.startswith(prefix):
            name = name[len(prefix):]
    return name


def convert_checkpoint(path: str | Path, target: str | Path) -> Path:
    """Write `path`'s weights (FSDP shards merged, wrapper prefixes stripped, a LoRA adapter merged into
    its base) + config + tokenizer to `target`."""
    from accelerate.utils import merge_fsdp_weights
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig, AutoTokenizer

    path, target = Path(path), Path(target)
    if is_adapter_dir(path):
        return merge_adapter(path, target)
    if (path / FSDP_SHARDS).is_dir():
        merge_fsdp_weights(str(path / FSDP_SHARDS), str(target))
    else:
        weights = load_file(_wrapped_weights(path))
        target.mkdir(parents=True, exist_ok=True)
        save_file({strip_wrapper_prefix(k): v.contiguous() for k, v in weights.items()}, target / "model.safetensors",
                  metadata={"format": "pt"})
    AutoConfig.from_pretrained(path).save_pretrained(target)
    AutoTokenizer.from_pretrained(path).save_pretrained(target)
    return target


def model_dir(path: str, scratch: str | Path, accelerator=None) -> str:
    """A folder from_pretrained reads whole for `path`: converted into `scratch` when it is a DDP/FSDP
    checkpoint, else `path` itself (a model folder or hub id). With an `accelerator`, the main process
    converts and the others wait."""
    if not needs_conversion(path):
        return path
    if accelerator is None or accelerator.is_main_process:
        convert_checkpoint(path, scratch)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return str(scratch)


def save_final_model(accelerator, model, tokenizer, output_dir: str, dtype: torch.dtype, merge: bool = False) -> None:
    """Full weights + tokenizer via save_pretrained, cast to the training dtype (config `dtype` set).
    A LoRA model saves its adapter + tokenizer instead and, with `merge`, the merged model in `merged/`."""
    if is_peft_model(accelerator.unwrap_model(model)):
        save_adapter(accelerator, model, output_dir)
        if accelerator.is_main_process:
            tokenizer.save_pretrained(output_dir)
            if merge:
                merge_adapter(output_dir, Path(output_dir) / "merged", dtype)
        accelerator.wait_for_everyone()
        return
    state_dict = accelerator.get_state_dict(model)  # gathers full tensors from FSDP shards
    if accelerator.is_main_process:
        state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
        config = accelerator.unwrap_model(model).config
        accelerator.unwrap_model(model).save_pretrained(output_dir, state_dict=state_dict)
        config.dtype = dtype  # save_pretrained wrote the (fp32) parameters' dtype
        config.save_pretrained(output_dir)
        tokenizer.save_pretrained(output_dir)
    accelerator.wait_for_everyone()
