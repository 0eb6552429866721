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

from analysis.compare import (Run, eval_dir, parse_args, parse_arm, run_state, second_half_steps, summarize_study,
                              training_command)
from analysis.study_report import paired_difference, report_markdown, sign_test_p, t_interval
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
    run = Run(parse_arm("antisd"), 1, tmp_path)
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


def test_paired_statistics_by_hand():
    grpo = dict(enumerate([0.30, 0.25, 0.28, 0.33, 0.27]))
    method = dict(enumerate([0.35, 0.24, 0.33, 0.40, 0.30]))
    d = paired_difference(method, grpo)
    # differences +0.05 -0.01 +0.05 +0.07 +0.03, mean 0.19 / 5 = 0.038
    assert [x["seed"] for x in d["per_seed"]] == [0, 1, 2, 3, 4]
    assert [x["value"] for x in d["per_seed"]] == pytest.approx([0.05, -0.01, 0.05, 0.07, 0.03])
    assert d["mean"] == pytest.approx(0.038)
    # deviations .012 -.048 .012 .032 -.008, squares sum 0.00368, sd = sqrt(0.00368 / 4) = 0.0303315,
    # half-width = t(0.975, 4 df) 2.776 * 0.0303315 / sqrt(5) = 0.0376555: [0.0003445, 0.0756555] (scipy's ttest_rel agrees)
    assert d["ci95"] == pytest.approx([0.0003445, 0.0756555], abs=1e-6)
    # 4 of 5 positive: p = 2 (C(5,0) + C(5,1)) / 2^5 = 12 / 32
    assert d["sign_test_p"] == pytest.approx(0.375)
    # ties dropped: +, +, +, 0 -> n = 3, p = 2 / 8; all tied or none -> 1
    assert sign_test_p([0.1, 0.2, 0.3, 0.0]) == pytest.approx(0.25)
    assert sign_test_p([0.0, 0.0]) == 1.0 and sign_test_p([]) == 1.0
    assert sign_test_p([-0.1] * 5) == pytest.approx(2 / 32)
    # only the seeds both have are paired; one pair: no interval
    one = paired_difference({0: 0.5, 7: 0.9}, {0: 0.25, 1: 0.1})
    assert one == {"per_seed": [{"seed": 0, "value": 0.25}], "mean": 0.25, "ci95": None, "sign_test_p": 1.0}
    assert paired_difference({0: 0.5}, {1: 0.5})["mean"] is None


def test_primary_metric_steps():
    assert second_half_steps([50, 100, 150, 200], 200) == [150, 200]  # step 100 is the first half's last
    assert second_half_steps([25, 50, 75, 100, 125, 150, 175, 200], 200) == [125, 150, 175, 200]
    assert second_half_steps([2, 4, 5], 5) == [4, 5] and second_half_steps([2, 4], 4) == [4]


def test_summary_pairs_arms_with_grpo_seed_by_seed(tmp_path):
    """summarize_study on written evaluations: per-arm metrics, the paired differences and how the report reads them."""
    grpo, antisd, release = parse_arm("grpo"), parse_arm("antisd"), parse_arm("rel=--method antisd --preset release")
    steps, temperatures = [1, 2, 3, 4], [1.0, 0.6]
    # avg@n at steps 0..4 by (arm, seed); the T0.6 curves are the T1 ones minus 0.1
    curves = {("grpo", 0): [0.1, 0.2, 0.3, 0.2, 0.4], ("grpo", 1): [0.1, 0.3, 0.2, 0.2, 0.3], ("grpo", 2): [0.2] * 5,
              ("antisd", 0): [0.1, 0.2, 0.5, 0.4, 0.4], ("antisd", 1): [0.1, 0.2, 0.3, 0.4, 0.4],
              ("antisd", 2): [0.2, 0.3, 0.3, 0.3, 0.5],
              ("rel", 0): [0.1, 0.5, 0.5, 0.1, 0.3], ("rel", 1): [0.1, 0.3, 0.2, 0.4, 0.3]}  # seed 2 not evaluated
    runs = [Run(arm, seed, tmp_path) for seed in (0, 1, 2) for arm in (grpo, antisd, release)]
    for run in runs:
        for t in temperatures:
            for step, avg in zip([0, *steps], curves.get((run.arm.name, run.seed), [])):
                folder = eval_dir(tmp_path, run, run.seed, step, t)
                folder.mkdir(parents=True, exist_ok=True)
                (folder / "results.json").write_text(json.dumps({"avg": avg - (t != 1.0) * 0.1, "pass_at_k": {}}))
    summary = summarize_study(tmp_path, runs, steps, temperatures)
    assert summary["metrics"]["primary"]["steps"] == [3, 4]
    c = summary["runs"]["antisd-seed0"]["eval"]["T1"]
    assert (c["primary"], c["final"], c["peak"], c["peak_step"]) == (pytest.approx(0.4), 0.4, 0.5, 2)
    assert "primary" not in summary["runs"]["rel-seed2"]["eval"]["T1"]  # incomplete runs are left out
    assert summary["methods"]["rel"]["T1"]["seeds"] == [0, 1]
    assert summary["differences"] is summary["differences_by_temperature"]["T1"]
    assert set(summary["differences"]) == {"antisd", "rel"} and set(summary["differences"]["antisd"]) == {"primary", "final", "peak"}
    # primary, antisd - grpo: seeds 0, 1, 2: (0.4 - 0.3), (0.4 - 0.25), (0.4 - 0.2) = 0.1, 0.15, 0.2; mean 0.15, sd 0.05,
    # half-width 4.303 * 0.05 / sqrt(3) = 0.124216; all positive: sign-test p = 2 / 8
    primary = summary["differences"]["antisd"]["primary"]
    assert [x["value"] for x in primary["per_seed"]] == pytest.approx([0.1, 0.15, 0.2])
    assert primary["ci95"] == pytest.approx([0.15 - 0.124216, 0.15 + 0.124216], abs=1e-6)
    assert primary["sign_test_p"] == pytest.approx(0.25)
    # the same differences at T0.6: both sides moved by 0.1
    assert summary["differences_by_temperature"]["T0.6"]["antisd"]["primary"]["mean"] == pytest.approx(0.15)
    # rel - grpo primary: seeds 0, 1 only: (0.2 - 0.3), (0.35 - 0.25) = -0.1, +0.1: interval covers 0
    rel = summary["differences"]["rel"]["primary"]
    assert [x["seed"] for x in rel["per_seed"]] == [0, 1] and rel["mean"] == pytest.approx(0.0, abs=1e-12)
    settings = {"methods": ["grpo", "antisd", "rel"], "arms": {"grpo": {"method": "grpo", "flags": []},
                "antisd": {"method": "antisd", "flags": []}, "rel": {"method": "antisd", "flags": ["--preset", "release"]}},
                "command": "x", "seeds": [0, 1, 2], "max_steps": 4, "eval_every": 1, "eval_bench": "arith", "eval_problems": 8,
                "eval_n": 1, "eval_max_new_tokens": 40, "training_flags": []}
    report = report_markdown(summary, settings, [])
    assert report.index("**primary**") < report.index("final (secondary)") and "declared before the numbers" in report
    assert "`rel` = `--method antisd --preset release`" in report and "n-1 degrees of freedom" in report
    assert "| antisd - grpo | **primary** | 3 | 0: +0.100, 1: +0.150, 2: +0.200 |" in report
    rows = {line.split(" | ")[0] + line.split(" | ")[1]: line for line in report.splitlines() if " - grpo | " in line}
    assert rows["| antisd - grpo**primary**"].endswith("| 0.25 | higher |")
    assert rows["| rel - grpo**primary**"].endswith("| no difference shown |")


def test_steps_to_grpo_peak_by_the_training_reward(tmp_path):
    """Every step counts: the first step whose trailing mean reward reaches the mean of GRPO's per-seed peaks."""
    grpo, antisd = parse_arm("grpo"), parse_arm("antisd")
    rewards = {("grpo", 0): [0.2, 0.4, 0.6, 0.4], ("grpo", 1): [0.2, 0.2, 0.4, 0.6],
               ("antisd", 0): [0.4, 0.6, 0.6, 0.6], ("antisd", 1): [0.2, 0.2, 0.2, 0.2], ("antisd", 2): [0.9, 0.9]}
    runs = [Run(arm, seed, tmp_path) for arm in (grpo, antisd) for seed in (0, 1, 2)]
    for run in runs:
        if (run.arm.name, run.seed) in rewards:
            run.dir.mkdir(parents=True)
            (run.dir / "metrics.jsonl").write_text("".join(json.dumps({"step": i + 1, "reward/mean": r}) + "\n"
                                                           for i, r in enumerate(rewards[run.arm.name, run.seed])))
    summary = summarize_study(tmp_path, runs, [2, 4], [1.0], window=2)
    train = summary["training_reward"]
    # trailing 2-step means: grpo seed 0 0.2, 0.3, 0.5, 0.5 (peak 0.5); seed 1 0.2, 0.2, 0.3, 0.5 (peak 0.5); target 0.5
    assert train["grpo_peak"] == pytest.approx(0.5)
    # antisd seed 0: 0.4, 0.5 -> step 2; seed 1 never; seed 2 stopped at step 2 of 4: left out
    assert train["steps_to_grpo_peak"] == {"grpo": {0: 3, 1: 4}, "antisd": {0: 2, 1: "never"}}
    settings = {"methods": ["grpo", "antisd"], "arms": {"grpo": {"method": "grpo", "flags": []},
                "antisd": {"method": "antisd", "flags": []}}, "command": "x", "seeds": [0, 1, 2], "max_steps": 4,
                "eval_every": 2, "eval_bench": "arith", "eval_problems": 8, "eval_n": 1, "eval_max_new_tokens": 40,
                "training_flags": []}
    assert "| antisd | 2 | 0: 2, 1: never |" in report_markdown(summary, settings, [])


def test_arms_parse_and_their_flags_reach_the_runs(tmp_path):
    import train_antisd

    opts, flags, cfg = parse_args(["--output_dir", str(tmp_path), "--seeds", "0", "--methods", "grpo", "antisd",
                                   "antisd_release=--method antisd --preset release",
                                   "nogate=--method=antisd --gate none --lambda_max 0.25", "--learning_rate", "1e-4"])
    assert [(a.name, a.method, a.flags) for a in opts.methods] == [
        ("grpo", "grpo", ()), ("antisd", "antisd", ()), ("antisd_release", "antisd", ("--preset", "release")),
        ("nogate", "antisd", ("--gate", "none", "--lambda_max", "0.25"))]
    run = Run(opts.methods[3], 0, tmp_path)
    command = training_command(run, "new", eval_every=50, max_steps=300, threads=1, training_flags=flags)
    assert run.dir == tmp_path / "runs" / "nogate-seed0" and command[2:4] == ["--method", "antisd"]
    assert command[-6:] == ["--learning_rate", "1e-4", "--gate", "none", "--lambda_max", "0.25"]
    run_cfg = train_antisd.parse_config(command[2:])  # what the run will read
    assert (run_cfg.method, run_cfg.gate, run_cfg.lambda_max, run_cfg.learning_rate) == ("antisd", "none", 0.25, 1e-4)
    release_cfg = train_antisd.parse_config(training_command(Run(opts.methods[2], 0, tmp_path), "new", 50, 300, 1, flags)[2:])
    assert (release_cfg.preset, release_cfg.gate, release_cfg.gate_reopen_ratio) == ("release", "release", 1.07)
    # refused before any work: no --method, a study flag, a shared setting, a bad value, a method's name, a name twice
    for bad in (["x=--preset release"], ["x=--method antisd --seed 3"], ["x=--method antisd --max_steps 7"],
                ["x=--method antisd --gate sometimes"], ["x=--method antisd --no_such_flag 1"], ["antisd=--method antisd"],
                ["a b=--method antisd"], ["x=--method antisd", "x=--method sd"]):
        with pytest.raises(SystemExit):
            parse_args(["--output_dir", str(tmp_path), "--methods", "grpo", *bad])
    with pytest.raises(SystemExit):  # a training --seed is not read as --seeds
        parse_args(["--output_dir", str(tmp_path), "--seed", "3"])
    assert not any(tmp_path.iterdir())


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
        for key in ("reward/mean", "teacher/entropy_median"):  # summary.json keeps 4 decimals
            assert entry["train"][key] == pytest.approx([r[key] for r in rows], abs=5e-5)
        for key in ("T1", "T0.6"):
            curve = entry["eval"][key]
            assert curve["step"] == [0, 2, 4]
            seed = entry["seed"]
            paths = [out / "eval" / f"init-seed{seed}" / key] + [out / "eval" / name / f"step{s}-{key}" for s in (2, 4)]
            results = [json.loads((p / "results.json").read_text()) for p in paths]
            assert curve["avg"] == pytest.approx([r["avg"] for r in results], abs=5e-5)
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
        for metric in ("primary", "final", "peak"):
            diff = summary["differences_by_temperature"][key]["antisd"][metric]
            assert diff["per_seed"] == [{"seed": s, "value": pytest.approx(summary["runs"][f"antisd-seed{s}"]["eval"][key][metric]
                                                                           - summary["runs"][f"grpo-seed{s}"]["eval"][key][metric])}
                                        for s in (0, 1)]
            assert diff["mean"] == pytest.approx(summary["methods"]["antisd"][key][metric]["mean"]
                                                 - summary["methods"]["grpo"][key][metric]["mean"])
            assert diff["ci95"][0] <= diff["mean"] <= diff["ci95"][1] and 0 < diff["sign_test_p"] <= 1
    assert summary["differences"] == summary["differences_by_temperature"]["T1"]
    assert summary["metrics"]["primary"]["steps"] == [4]  # of 4 steps evaluated at 2 and 4: step 4
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
    from antisd.model_loading import load_policy
    from antisd.distributed import make_accelerator
    from antisd.generation import Samples
    from antisd.scoring import logit_chunk_rows, teacher_scores

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
