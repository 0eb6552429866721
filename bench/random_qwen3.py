"""Random-weight Qwen3-shaped models with the real 151,936-token vocabulary, built offline.

    python bench/random_qwen3.py --shape qwen3-0.6b --output_dir /tmp/qwen3-0.6b-random
    python bench/random_qwen3.py --shape small --output_dir /tmp/small-random

Shapes: `qwen3-0.6b` is Qwen3-0.6B's (hidden 1024, 28 layers, 16 heads, 8 KV heads, head_dim 128,
MLP 3072, tied embeddings; 0.6B parameters, 0.16B of them the embedding); `small` is the embedded
tiny model's (hidden 160, 4 layers) with the big vocabulary, so the vocabulary projection dominates.

The tokenizer is the embedded one (models/tiny-qwen3, 512 tokens) and the special ids are its own
(eos `<|im_end|>` = 2, pad 0, no bos), so prompts render with the project's chat template. The model
samples from all 151,936 ids: ids >= 512 decode to nothing (the tokenizers backend skips unknown
ids), so a rollout's text is shorter than its token list, and the reward is ~0; the training loop
only ever appends the token ids themselves, so nothing else changes (`check_decoding` asserts it).
Weights are saved in bf16, as Qwen3 checkpoints are; the training script loads them as fp32.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
TOKENIZER_DIR = REPO / "models" / "tiny-qwen3"
VOCAB_SIZE = 151_936
SHAPES = {
    "qwen3-0.6b": dict(hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                       head_dim=128, intermediate_size=3072),
    "small": dict(hidden_size=160, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=40, intermediate_size=640),
}


def random_qwen3(shape: str, seed: int = 0, device: str | torch.device = "cpu"):
    """A randomly initialised Qwen3ForCausalLM of `shape` (fp32) and the embedded tokenizer."""
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    config = Qwen3Config(**SHAPES[shape], vocab_size=VOCAB_SIZE, tie_word_embeddings=True, max_position_embeddings=40_960,
                         rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0}, rms_norm_eps=1e-6,
                         bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    with torch.device(device):  # on a GPU, initialising the 0.6B model takes a moment instead of many seconds
        model = Qwen3ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = None
    return model, tokenizer


def check_decoding(tokenizer) -> None:
    """Generated ids beyond the tokenizer's 512 must decode (to nothing) rather than raise."""
    assert 0 <= tokenizer.eos_token_id < len(tokenizer) and 0 <= tokenizer.pad_token_id < len(tokenizer)
    text = tokenizer.batch_decode([[5, 6, 512, 100_000, VOCAB_SIZE - 1, tokenizer.eos_token_id]], skip_special_tokens=True)[0]
    assert text == tokenizer.decode([5, 6], skip_special_tokens=True), text


def build_random_qwen3(shape: str, output_dir: str | Path, seed: int = 0, device: str = "cpu") -> Path:
    """Write model (bf16 safetensors) + config + generation config + tokenizer into `output_dir`."""
    model, tokenizer = random_qwen3(shape, seed, device)
    check_decoding(tokenizer)
    output_dir = Path(output_dir)
    model.to(torch.bfloat16).save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return output_dir


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="small")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="where to initialise the weights (cuda is faster for 0.6b)")
    args = parser.parse_args()
    path = build_random_qwen3(args.shape, args.output_dir, args.seed, args.device)
    print(f"{args.shape}: {path}")
