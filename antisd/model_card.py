"""What a finished run shares: a model card (`README.md` in the output directory, in the Hub's
model-card format, with the run's own numbers), metrics.png and the upload to the Hub (`--push_to_hub`)."""

from __future__ import annotations

import json
import logging
import statistics
from pathlib import Path

import yaml
from huggingface_hub import HfApi, ModelCard, ModelCardData

from antisd.metrics import plot_metrics

logger = logging.getLogger("antisd")

METHOD_NAMES = {"grpo": "GRPO (no self-teacher signal)", "sd": "self-distillation (+u, the paper's +SD)",
                "sd_jsd": "self-distillation with the JSD signal (+phi(u))", "antisd": "Anti-Self-Distillation (-phi(u))"}
CITATION = """@misc{shen2026antisd,
  title         = {Anti-Self-Distillation for Reasoning RL via Pointwise Mutual Information},
  author        = {Guobin Shen and Xiang Cheng and Chenxiao Zhao and Lei Huang and Jindong Li and Dongcheng Zhao and Xing Yu},
  year          = {2026},
  eprint        = {2605.11609},
  archivePrefix = {arXiv},
  url           = {https://arxiv.org/abs/2605.11609}
}"""
SUMMARY_KEYS = ("reward/mean", "length/mean", "length/truncated_frac", "teacher/entropy_median", "u/mean", "gate/lambda")
LAST_STEPS = 10


def is_hub_id(name: str) -> bool:
    return "/" in name and not Path(name).exists()


def final_metrics(rows: list[dict]) -> dict:
    """Mean over the last LAST_STEPS steps of each summary metric (None where the run has none)."""
    last = rows[-LAST_STEPS:]
    means = {}
    for key in SUMMARY_KEYS:
        values = [r[key] for r in last if r.get(key) is not None]
        means[key] = statistics.fmean(values) if values else None
    means["gate/open_steps"] = sum(bool(r.get("gate/open")) for r in rows)
    return means


def write_model_card(output_dir: str | Path, config: dict) -> Path:
    """README.md for the run in `output_dir` from its config and metrics.jsonl."""
    out = Path(output_dir)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    data = ModelCardData(base_model=config["model"] if is_hub_id(config["model"]) else None,
                         datasets=[config["dataset"]] if is_hub_id(config["dataset"]) else None,
                         library_name="peft" if config.get("use_peft") else "transformers", pipeline_tag="text-generation",
                         tags=["antisd", "reinforcement-learning", "rlvr", config["method"]])
    summary = final_metrics(rows)
    lora = (f"\n\nA LoRA adapter (peft; r={config['lora_r']}, alpha={config['lora_alpha']}) on `{config['model']}`"
            + (", merged into a full model in `merged/`." if config.get("merge_adapter") else ".")) if config.get("use_peft") else ""
    table = "\n".join(f"| {key} | {'n/a' if value is None else f'{value:.4f}' if isinstance(value, float) else value} |"
                      for key, value in summary.items())
    content = f"""---
{data.to_yaml()}
---

# {out.name}

Trained with `train_antisd.py` ([AntiSD](https://arxiv.org/abs/2605.11609)): {METHOD_NAMES[config["method"]]},
gate `{config["gate"]}`, from `{config["model"]}` on `{config["dataset"]}`, {len(rows)} steps of
{config["prompts_per_step"]} prompts x {config["group_size"]} rollouts, learning rate {config["learning_rate"]}.{lora}

## Final metrics (mean of the last {min(LAST_STEPS, len(rows))} steps; gate open steps over the whole run)

| metric | value |
|---|---|
{table}

![metrics](metrics.png)

## Config

```yaml
{yaml.safe_dump(config, sort_keys=False).strip()}
```

## Citation

```bibtex
{CITATION}
```
"""
    path = out / "README.md"
    ModelCard(content).save(path)
    return path


def finish_run(output_dir: Path, config: dict) -> None:
    """What a finished run adds to its folder (main process): metrics.png, the model card, and with
    config["push_to_hub"] the upload."""
    plot_metrics(output_dir / "metrics.jsonl", output_dir / "metrics.png")
    write_model_card(output_dir, config)
    logger.info("done: model and model card in %s, metrics in %s", output_dir, output_dir / "metrics.jsonl")
    if config["push_to_hub"]:
        logger.info("pushed to %s", push_to_hub(output_dir, config["hub_model_id"] or output_dir.resolve().name))


def push_to_hub(output_dir: str | Path, repo_id: str) -> str:
    """Upload the final model, tokenizer, model card, metrics and plot (no checkpoints) to `repo_id`."""
    api = HfApi()
    api.create_repo(repo_id, exist_ok=True)
    api.upload_folder(repo_id=repo_id, folder_path=str(output_dir), commit_message="AntiSD training run",
                      ignore_patterns=["checkpoint-*", "checkpoint-*/**", "init_model/**"])
    return f"https://huggingface.co/{repo_id}"
