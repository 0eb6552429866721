"""Checkpoints and model folders, shared by train_antisd.py and evaluate.py.

- `save_checkpoint` writes `checkpoint-<step>` atomically (a `.partial` folder renamed when complete);
  `latest_checkpoint` finds the newest complete one.
- `model_dir` turns whatever a user points at (a model folder, a hub id, a checkpoint of a DDP or
  FSDP run, a LoRA run or checkpoint) into a folder `from_pretrained` and vLLM read: FSDP shards are
  merged, wrapper prefixes (`module.` from DDP, `_orig_mod.` from torch.compile) stripped, a LoRA
  adapter merged into its base, once, into a scratch folder.
- `load_causal_lm` loads a model and refuses a partial load: a missing, unexpected or mis-shaped
  weight is an error, never a warning.
- `load_policy` loads the model to train (fp32 master weights, the scoring head installed,
  layers checkpointed when asked, LoRA adapters added by peft when asked) and its tokenizer.
- `save_final_model` writes the full model in the training dtype (bf16 after `--bf16`), or for a
  LoRA run the adapter (and, when asked, the merged model in `merged/`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch

from adapters import is_adapter_dir, is_peft_model, merge_adapter, save_adapter
from models import EMBEDDED_MODELS

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
FSDP_SHARDS = "pytorch_model_fsdp_0"
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


class CheckpointError(RuntimeError):
    """A model or checkpoint folder that cannot be loaded whole."""


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """The run's complete checkpoint-<step> folders, by step."""
    done = [p for p in Path(output_dir).glob("checkpoint-*")
            if CHECKPOINT_RE.match(p.name) and (p / "trainer_state.json").is_file()]
    return sorted(done, key=checkpoint_step)


def checkpoint_step(path: Path) -> int:
    return int(path.name.split("-")[1])


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    return (complete_checkpoints(output_dir) or [None])[-1]


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


def load_causal_lm(name_or_path: str, dtype: torch.dtype = torch.float32, **from_pretrained_kwargs):
    """`AutoModelForCausalLM.from_pretrained`, but a partial load (weights missing, unexpected or of
    the wrong shape: e.g. a checkpoint whose keys carry a wrapper prefix) raises CheckpointError."""
    from transformers import AutoModelForCausalLM

    if is_adapter_dir(name_or_path):
        raise CheckpointError(f"{name_or_path} holds a LoRA adapter, not a model: pass it through model_dir() "
                              "(which merges it into its base) first")
    model, info = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, output_loading_info=True,
                                                       **from_pretrained_kwargs)
    problems = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if problems:
        detail = "; ".join(f"{k}: {sorted(map(str, v))[:5]}{' ...' if len(v) > 5 else ''}" for k, v in problems.items())
        raise CheckpointError(f"{name_or_path}: not every weight loaded: {detail}")
    return model


def load_policy(name_or_path: str, gradient_checkpointing: bool, lora: dict | None = None, load_in_4bit: bool = False):
    """(model, tokenizer) to train: fp32 master weights (--bf16 casts in forward), the chunked scoring
    head installed, layers recomputed in backward when asked; with `lora` (adapters.add_lora's keyword
    arguments) a peft model whose adapters alone train, its base in 4 bits with `load_in_4bit`.
    'tiny' / 'tiny-checks' are the embedded models (models.EMBEDDED_MODELS)."""
    from transformers import AutoTokenizer

    from adapters import add_lora, quantization_config
    from scoring import install_scoring_head

    if name_or_path in EMBEDDED_MODELS:
        from models.build_tiny_model import ensure_embedded_model

        name_or_path = str(ensure_embedded_model(name_or_path))
    quantized = {"quantization_config": quantization_config(), "device_map": {"": torch.cuda.current_device()}} \
        if load_in_4bit else {}
    model = load_causal_lm(name_or_path, dtype=torch.float32, **quantized)
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    install_scoring_head(model)
    if gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if lora is not None:
        model = add_lora(model, **lora, quantized=load_in_4bit)
    return model, tokenizer


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
