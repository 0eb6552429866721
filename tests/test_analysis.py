"""analysis.compare (a real --quick study: its numbers are the runs' own) and analysis.pmi (u token by token,
equal to the training code's u on the same rollouts)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from analysis.compare import Run, bootstrap_difference, run_state, t_interval, training_command
from analysis.pmi import token_classes

REPO = Path(__file__).resolve().parents[1]


def run_module(module: str, args: list[str], timeout: int = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------- analysis.compare
def test_run_state_and_the_study_command(tmp_path):
    """The layout and command the study's runs use; finished runs are adopted, others resumed."""
    run = Run("antisd", 1, tmp_path)
    assert run_state(run.dir, 4) == "new"
    run.dir.mkdir(parents=True)
    (run.dir / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, 5)))
    assert run_state(run.dir, 4) == "resume"  # metrics complete, no final model: killed while saving
    (run.dir / "model.safetensors").write_bytes(b"")
    assert run_state(run.dir, 4) == "finished"
    assert run_state(run.dir, 6) == "resume"  # a longer study continues it
    command = training_command(run, "resume", eval_every=50, max_steps=300, threads=1, training_flags=["--lr_warmup_steps", "3"])
    assert command[1:] == [str(REPO / "train_antisd.py"), "--method", "antisd", "--seed", "1", "--output_dir",
                           str(tmp_path / "runs" / "antisd-seed1"), "--cpu_threads", "1", "--save_steps", "50",
                           "--save_total_limit", "7", "--report_to", "none", "--resume", "--lr_warmup_steps", "3"]


def test_intervals():
    assert t_interval([1.0]) is None
    lo, hi = t_interval([0.2, 0.4, 0.6])
    assert math.isclose(hi - 0.4, 4.303 * 0.2 / math.sqrt(3), rel_tol=1e-9) and math.isclose(0.4 - lo, hi - 0.4)
    rng = np.random.default_rng(0)
    a = [rng.integers(0, 2, (3, 50)).astype(float) for _ in range(3)]
    same = bootstrap_difference(a, a, np.max, 200, np.random.default_rng(1))
    assert same[0] < 0 < same[1] or same == [0.0, 0.0]
    lo, hi = bootstrap_difference([x + 0.5 for x in a], a, lambda c: c[-1], 200, np.random.default_rng(1))
    assert 0.3 < lo <= 0.5 <= hi < 0.7


@pytest.fixture(scope="module")
def quick_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    proc = run_module("analysis.compare", ["--quick", "--output_dir", str(out)])
    return out, proc


def test_quick_study_reports_the_runs_own_numbers(quick_study):
    out, _ = quick_study
    for name in ("summary.json", "report.md", "reward.png", "heldout.png", "teacher_gate.png", "length.png"):
        assert (out / name).stat().st_size > 0, name
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["runs"]) == {"grpo-seed0", "antisd-seed0", "grpo-seed1", "antisd-seed1"}
    assert summary["settings"]["eval_steps"] == [2, 4] and summary["settings"]["failures"] == []
    for name, entry in summary["runs"].items():
        rows = jsonl(out / "runs" / name / "metrics.jsonl")
        assert entry["train"]["step"] == [1, 2, 3, 4]
        assert entry["train"]["reward/mean"] == [r["reward/mean"] for r in rows]
        assert entry["train"]["teacher/entropy_median"] == [r["teacher/entropy_median"] for r in rows]
        for key in ("T1", "T0.6"):
            curve = entry["eval"][key]
            assert curve["step"] == [0, 2, 4]
            seed = entry["seed"]
            paths = [out / "eval" / f"init-seed{seed}" / key] + [out / "eval" / name / f"step{s}-{key}" for s in (2, 4)]
            results = [json.loads((p / "results.json").read_text()) for p in paths]
            assert curve["avg"] == [r["avg"] for r in results]
            assert all(r["num_problems"] == 8 and r["n"] == 1 for r in results)
            assert curve["peak"] == max(curve["avg"]) and curve["final"] == curve["avg"][-1]
            settings = json.loads((paths[1] / "settings.json").read_text())
            assert settings["temperature"] == float(key[1:]) and settings["model"] == str(out / "runs" / name / "checkpoint-2")
    # the step-0 evaluation is shared by the methods of a seed
    assert summary["runs"]["grpo-seed1"]["eval"]["T1"]["avg"][0] == summary["runs"]["antisd-seed1"]["eval"]["T1"]["avg"][0]
    for key in ("T1", "T0.6"):
        grpo_peaks = [summary["runs"][f"grpo-seed{s}"]["eval"][key]["peak"] for s in (0, 1)]
        assert summary["grpo_peak"][key] == pytest.approx(np.mean(grpo_peaks))
        for method in ("grpo", "antisd"):
            stats = summary["methods"][method][key]
            curves = [summary["runs"][f"{method}-seed{s}"]["eval"][key] for s in (0, 1)]
            assert stats["final"]["per_seed"] == [c["final"] for c in curves]
            assert stats["final"]["mean"] == pytest.approx(np.mean(stats["final"]["per_seed"]))
            lo, hi = stats["peak"]["ci95"]
            assert lo <= stats["peak"]["mean"] <= hi
            for c, reached in zip(curves, stats["steps_to_grpo_peak"]):
                first = next((s for s, a in zip(c["step"], c["avg"]) if a >= summary["grpo_peak"][key]), "never")
                assert reached == first
        diff = summary["differences"]["antisd - grpo"][key]["final"]
        assert diff["mean"] == pytest.approx(summary["methods"]["antisd"][key]["final"]["mean"]
                                             - summary["methods"]["grpo"][key]["final"]["mean"])
        assert diff["ci95"][0] <= diff["ci95"][1]
    report = (out / "report.md").read_text()
    assert "antisd - grpo" in report and "![heldout.png](heldout.png)" in report


def test_quick_study_resumes_without_redoing(quick_study):
    out, _ = quick_study
    results = sorted((out / "eval").rglob("results.json"))
    before = {p: p.stat().st_mtime_ns for p in results}
    models = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/model.safetensors")}
    proc = run_module("analysis.compare", ["--quick", "--output_dir", str(out)])
    assert proc.stdout.count("finished, adopted") == 4 and "training" not in proc.stdout and "done: evaluate" not in proc.stdout
    assert {p: p.stat().st_mtime_ns for p in results} == before
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/model.safetensors")} == models


# ---------------------------------------------------------------- analysis.pmi
def test_token_classes():
    tokens = ["3", " +", " 4", " =", " 7", ".", "\n", "Wait", ",", " let", " me", " check", ".", " So", " the", " answer",
              " is", " \\", "boxed", "{", "7", "}", ".", " Hello"]
    classes = token_classes(tokens)
    assert classes[:5] == ["number/arithmetic"] * 5
    assert classes[7:12] == ["deliberation", "rest", "deliberation", "deliberation", "deliberation"]
    assert set(classes[13:22]) == {"answer/box"}  # the box's number belongs to the answer
    assert classes[-1] == "rest"


def test_pmi_on_the_tiny_model_matches_training(tmp_path):
    import train_antisd
    from checkpoints import load_policy
    from distributed import make_accelerator
    from generation import Samples
    from scoring import logit_chunk_rows, teacher_scores

    out = tmp_path / "pmi"
    run_module("analysis.pmi", ["--model", "tiny", "--dataset", "arith", "--num_problems", "4", "--output_dir", str(out),
                                "--cpu_threads", "1"])
    for name in ("pmi.jsonl", "pmi.html", "stats.json", "stats.md", "u_hist.png", "density.png"):
        assert (out / name).stat().st_size > 0, name
    records = jsonl(out / "pmi.jsonl")
    assert len(records) == 4 * 8
    for r in records:
        n = len(r["completion_ids"])
        assert n and all(len(r[k]) == n for k in ("tokens", "classes", "student_logp", "teacher_logp", "u"))
        s, t = torch.tensor(r["student_logp"]), torch.tensor(r["teacher_logp"])
        assert torch.equal(torch.tensor(r["u"]), t - s)  # fp32 values, fp32 difference
        assert (s <= 0).all() and (t <= 0).all()
    html = (out / "pmi.html").read_text()
    assert html.count("<span style=") - 2 == sum(len(r["u"]) for r in records)  # 2 in the legend
    stats = json.loads((out / "stats.json").read_text())
    assert sum(stats["classes"][c]["count"] for c in ("deliberation", "number/arithmetic", "answer/box", "rest")) \
        == stats["classes"]["all"]["count"] == sum(len(r["u"]) for r in records)
    assert stats["classes"]["all"]["mean_u"] == pytest.approx(np.mean([u for r in records for u in r["u"]]))

    # the training code on the same rollouts: the same teacher prompts, teacher scores and u
    cfg = train_antisd.parse_config(["--output_dir", str(tmp_path / "train"), "--report_to", "none"])
    rows = train_antisd.load_rows(cfg)[:4]
    model, tokenizer = load_policy("tiny", gradient_checkpointing=False)
    prompts, prompt_ids = train_antisd.render_prompts(cfg, tokenizer, rows)
    assert [r["prompt_ids"] for r in records] == [prompt_ids[i // 8] for i in range(32)]
    rollout = Samples([r["prompt_ids"] for r in records], [r["completion_ids"] for r in records],
                      [r["truncated"] for r in records], [tokenizer.decode(r["completion_ids"], skip_special_tokens=True)
                                                          for r in records])
    rewards = [r["reward"] for r in records]
    teacher_ids = train_antisd.teacher_prompts(cfg, tokenizer, 0, 0, rows, prompts, list(range(4)), rollout, rewards)
    assert teacher_ids == [r["teacher_prompt_ids"] for r in records]
    chunk_rows = logit_chunk_rows(model.config.vocab_size, cfg.logit_chunk_mb)
    accelerator = make_accelerator(str(tmp_path / "train"), bf16=False, report_to="none")
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate)
    scheduler = train_antisd.get_scheduler("constant", optimizer)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    teacher_logp, _ = teacher_scores(model, teacher_ids, rollout.completion_ids, tokenizer.pad_token_id, accelerator.device,
                                     cfg.score_batch_size, chunk_rows)
    for r, tl in zip(records, teacher_logp):
        assert torch.allclose(tl, torch.tensor(r["teacher_logp"]), atol=1e-5)
    update = train_antisd.update_policy(cfg, accelerator, model, optimizer, scheduler, train_antisd.ConstantLambda(0.5),
                                        rollout, tokenizer.pad_token_id, teacher_logp, torch.zeros(32),
                                        torch.full((32,), 0.5), chunk_rows)
    mean_u = torch.tensor([np.mean(r["u"]) for r in records], dtype=torch.float)
    assert torch.allclose(update["seq_u_mean"], mean_u, atol=1e-5)
    assert update["u"].numel() == sum(len(r["u"]) for r in records)
