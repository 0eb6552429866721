"""The embedded models (see build_tiny_model.py): their `--model` names, folders and tasks."""

from pathlib import Path

MODELS_DIR = Path(__file__).resolve().parent
# --model name -> (folder, the `build_tiny_model --task` that builds it there on first use)
EMBEDDED_MODELS = {
    "tiny": (MODELS_DIR / "tiny-qwen3", "arith"),
    "tiny-checks": (MODELS_DIR / "tiny-qwen3-checks", "arith_checks"),
    "tiny-code": (MODELS_DIR / "tiny-qwen3-code", "code_arith"),  # the embedded code task (data/code_arith.py)
}
