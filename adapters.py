"""LoRA / QLoRA through peft: wrapping the policy, saving its adapter, merging it into a full model.

- `add_lora`: the policy becomes a peft `PeftModel` whose LoRA weights are the only trainable ones; the
  student and the teacher are that same adapted model (the teacher scores in eval mode: no dropout).
- `quantization_config`: `--load_in_4bit` (QLoRA: NF4 base weights, bf16 compute) needs bitsandbytes and
  a CUDA GPU; without them it stops with an error that names what is missing.
- `save_adapter`: `adapter_model.safetensors` + `adapter_config.json` (peft's `save_pretrained`), the
  adapter weights gathered whole from FSDP2 shards first (a collective: every process calls it).
- `merge_adapter`: base model + adapter folder -> a full model folder (`merge_and_unload`), which is how
  `checkpoints.model_dir` hands a LoRA run to evaluate.py, vLLM and `--init_from`.
"""

from __future__ import annotations

from pathlib import Path

import torch

ADAPTER_CONFIG = "adapter_config.json"


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def is_peft_model(model) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def quantization_config():
    """BitsAndBytesConfig for a 4-bit (NF4, bf16 compute) base model, or a clear error why not here."""
    import importlib.util

    missing = [what for what, ok in (("the bitsandbytes package (pip install bitsandbytes)",
                                      importlib.util.find_spec("bitsandbytes") is not None),
                                     ("a CUDA GPU", torch.cuda.is_available())) if not ok]
    if missing:
        raise SystemExit(f"--load_in_4bit needs {' and '.join(missing)}: bitsandbytes quantizes on CUDA only. "
                         "Train LoRA on the unquantized model (--use_peft without --load_in_4bit) instead.")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
                              bnb_4bit_use_double_quant=True)


def add_lora(model, r: int, alpha: int, dropout: float, target_modules: list[str] | None, quantized: bool = False):
    """The model wrapped by peft with LoRA adapters on `target_modules` (None: peft's defaults for the
    architecture; ["all-linear"]: every linear layer but the LM head); only the adapters train."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if quantized:  # fp32 norms, no gradient checkpointing of its own (load_policy set ours up)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    targets = target_modules[0] if target_modules == ["all-linear"] else target_modules
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def adapter_state_dict(model) -> dict[str, torch.Tensor]:
    """The trainable (adapter) parameters by name, whole on CPU: FSDP2 shards are gathered, so every
    process must call this."""
    from torch.distributed.tensor import DTensor

    return {name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().cpu()
            for name, p in model.named_parameters() if p.requires_grad}


def save_adapter(accelerator, model, directory: str | Path) -> None:
    """adapter_model.safetensors + adapter_config.json in `directory` (main process writes)."""
    unwrapped = accelerator.unwrap_model(model)
    weights = adapter_state_dict(unwrapped)
    if accelerator.is_main_process:
        unwrapped.save_pretrained(str(directory), state_dict=weights, is_main_process=True)


def merge_adapter(adapter_dir: str | Path, target: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """The adapter in `adapter_dir` merged into its base model (read from the adapter config's
    `base_model_name_or_path`), saved as a full model folder in `target` with the adapter's tokenizer."""
    from peft import PeftConfig, PeftModel
    from transformers import AutoTokenizer

    from checkpoints import CheckpointError, load_causal_lm

    base = PeftConfig.from_pretrained(str(adapter_dir)).base_model_name_or_path
    if not base:
        raise CheckpointError(f"{adapter_dir}/{ADAPTER_CONFIG} names no base model (base_model_name_or_path)")
    merged = PeftModel.from_pretrained(load_causal_lm(base), str(adapter_dir)).merge_and_unload()  # merged in fp32
    merged.to(dtype).save_pretrained(str(target))
    tokenizer_source = adapter_dir if (Path(adapter_dir) / "tokenizer_config.json").is_file() else base
    AutoTokenizer.from_pretrained(str(tokenizer_source)).save_pretrained(str(target))
    return Path(target)
