"""Loading models, shared by train_antisd.py, evaluate.py and the tools beside them.

- `resolve_model`: the embedded names ('tiny', 'tiny-checks': models.EMBEDDED_MODELS) -> their folders,
  built on first use; any other name (a folder, a hub id) as it is.
- `load_causal_lm` loads a model and refuses a partial load: a missing, unexpected or mis-shaped
  weight is an error, never a warning.
- `load_policy` loads the model to train (fp32 master weights, the scoring head installed, layers
  checkpointed when asked, LoRA adapters added by peft when asked, on a 4-bit base) and its tokenizer.
- `add_lora`: the policy becomes a peft `PeftModel` whose LoRA weights are the only trainable ones; the
  student and the teacher are that same adapted model (the teacher scores in eval mode: no dropout).
- `quantization_config`: `--load_in_4bit` (QLoRA: NF4 base weights, bf16 compute) needs bitsandbytes and
  a CUDA GPU; without them it stops with an error that names what is missing.
"""

from __future__ import annotations

from pathlib import Path

import torch

from models import EMBEDDED_MODELS

ADAPTER_CONFIG = "adapter_config.json"


class CheckpointError(RuntimeError):
    """A model or checkpoint folder that cannot be loaded whole."""


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def resolve_model(name: str) -> str:
    """The folder of an embedded model ('tiny', 'tiny-checks'), built on first use; other names unchanged."""
    if name in EMBEDDED_MODELS:
        from models.build_tiny_model import ensure_embedded_model

        return str(ensure_embedded_model(name))
    return name


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
    head installed, layers recomputed in backward when asked; with `lora` (add_lora's keyword
    arguments) a peft model whose adapters alone train, its base in 4 bits with `load_in_4bit`.
    'tiny' / 'tiny-checks' are the embedded models (models.EMBEDDED_MODELS)."""
    from transformers import AutoTokenizer

    from antisd.scoring import install_scoring_head

    name_or_path = resolve_model(name_or_path)
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
