"""LoRA adapters of a trained policy: saving its adapter, merging an adapter into a full model
(adding adapters to the policy and 4-bit bases are model loading: antisd/model_loading.py).

- `save_adapter`: `adapter_model.safetensors` + `adapter_config.json` (peft's `save_pretrained`), the
  adapter weights gathered whole from FSDP2 shards first (a collective: every process calls it).
- `merge_adapter`: base model + adapter folder -> a full model folder (`merge_and_unload`), which is how
  `checkpoints.model_dir` hands a LoRA run to evaluate.py, vLLM and `--init_from`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from antisd.model_loading import ADAPTER_CONFIG, CheckpointError, load_causal_lm

def is_peft_model(model) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


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

    base = PeftConfig.from_pretrained(str(adapter_dir)).base_model_name_or_path
    if not base:
        raise CheckpointError(f"{adapter_dir}/{ADAPTER_CONFIG} names no base model (base_model_name_or_path)")
    merged = PeftModel.from_pretrained(load_causal_lm(base), str(adapter_dir)).merge_and_unload()  # merged in fp32
    merged.to(dtype).save_pretrained(str(target))
    tokenizer_source = adapter_dir if (Path(adapter_dir) / "tokenizer_config.json").is_file() else base
    AutoTokenizer.from_pretrained(str(tokenizer_source)).save_pretrained(str(target))
    return Path(target)
