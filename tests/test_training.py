"""Real training steps of the embedded tiny model: every method, resume, config, 2-process paths."""

import json
import math
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train_antisd
from antisd import policy_reads
from antisd.checkpoints import latest_checkpoint
from train_antisd import Config, main, parse_config

REPO = Path(__file__).resolve().parents[1]
FAST = ["--prompts_per_step", "2", "--group_size", "4", "--max_new_tokens", "40", "--gate_warmup_steps", "1",
        "--report_to", "none", "--micro_batch_size", "4", "--verifier_workers", "1", "--learning_rate", "1e-4"]
SPEC_KEYS = {"step", "reward/mean", "gate/open", "gate/lambda", "teacher/entropy_median", "time/step_s"}


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def cpu_threads(processes: int) -> int:
    """What the script should use on CPU by default: this machine's physical cores shared among its processes."""
    import psutil

    return max(1, (psutil.cpu_count(logical=False) or os.cpu_count() or 1) // processes)


def run_script(args: list[str], env: dict | None = None, launcher: list[str] | None = None, timeout: int = 600):
    cmd = (launcher or [sys.executable]) + [str(REPO / "train_antisd.py"), *args]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


@pytest.mark.parametrize("method,preset", [("grpo", "paper"), ("sd", "paper"), ("sd_jsd", "paper"),
                                           ("antisd", "paper"), ("antisd", "release")])
def test_three_real_steps(tmp_path, method, preset):
    proc = run_script(FAST + ["--method", method, "--preset", preset, "--max_steps", "3", "--save_steps", "0",
                       "--output_dir", str(tmp_path)])
    assert f"{cpu_threads(processes=1)} torch threads per process" in proc.stderr  # not the OMP_NUM_THREADS=1 above
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(SPEC_KEYS <= r.keys() for r in rows)
    assert rows[0]["gate/lambda"] == 0.0  # warm-up step: pure GRPO
    if method == "grpo":
        assert all(r["u/mean"] is None and r["teacher/entropy_median"] is None for r in rows)
    else:
        assert all(r["teacher/entropy_median"] > 0 and r["u/mean"] is not None for r in rows)
    if preset == "paper" and method != "grpo":
        assert all(r["gate/lambda"] in (0.0, 0.5) for r in rows)
    from transformers import AutoModelForCausalLM

    trained = AutoModelForCausalLM.from_pretrained(tmp_path)  # final model + tokenizer in output_dir
    assert (tmp_path / "tokenizer.json").is_file() and (tmp_path / "metrics.png").is_file()
    initial = AutoModelForCausalLM.from_pretrained(REPO / "models" / "tiny-qwen3")
    moved = any(not torch.equal(a, b) for a, b in zip(trained.state_dict().values(), initial.state_dict().values()))
    assert moved == any(r["grad_norm"] for r in rows)


def test_gradient_checkpointing_and_shared_prompts_give_the_same_steps(tmp_path, monkeypatch):
    """main() trains in training mode, so --gradient_checkpointing really recomputes every layer in
    backward (each layer's MLP runs twice per grad-enabled pass); the numbers stay the same, the
    teacher's prefix KV cache still works (it scores in eval mode), and so do they when the update
    reads each prompt once for its group."""
    from transformers.models.qwen3.modeling_qwen3 import Qwen3MLP

    grad_calls, mlp_forward = [], Qwen3MLP.forward

    def counting_forward(self, x):
        grad_calls.append(torch.is_grad_enabled())
        return mlp_forward(self, x)

    monkeypatch.setattr(Qwen3MLP, "forward", counting_forward)
    args = FAST + ["--method", "antisd", "--gate", "none", "--max_steps", "2", "--save_steps", "0"]
    counts, shares = {}, policy_reads.shares_prompts
    # plain: prompts read once per group (scoring.SharedPromptScores); whole: every row read whole, as
    # checkpointing does (it refuses the prompts' KV cache)
    for name, extra in (("plain", []), ("whole", []), ("checkpointed", ["--gradient_checkpointing"])):
        monkeypatch.setattr(policy_reads, "shares_prompts", (lambda *_: False) if name == "whole" else shares)
        grad_calls.clear()
        main(parse_config(args + extra + ["--output_dir", str(tmp_path / name)]))
        counts[name] = sum(grad_calls)
    assert counts["whole"] > 0 and counts["checkpointed"] == 2 * counts["whole"]
    assert counts["plain"] != counts["whole"]  # the shared-prompt update did run
    plain = read_metrics(tmp_path / "plain")
    for name in ("whole", "checkpointed"):
        for key in ("reward/mean", "teacher/entropy_median", "u/mean", "loss", "grad_norm"):
            assert [r[key] for r in read_metrics(tmp_path / name)] == pytest.approx([r[key] for r in plain], rel=1e-4, abs=1e-6), key


def test_bf16_runs_and_saves_the_final_model_in_bf16(tmp_path):
    run_script(FAST + ["--method", "antisd", "--gate", "none", "--max_steps", "1", "--save_steps", "0", "--bf16",
                       "--output_dir", str(tmp_path)])
    assert all(math.isfinite(r["u/mean"]) and math.isfinite(r["grad_norm"]) for r in read_metrics(tmp_path))
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    assert {t.dtype for t in load_file(tmp_path / "model.safetensors").values()} == {torch.bfloat16}


@pytest.mark.parametrize("mode", ["mask", "wrong"])
def test_truncated_completions_flag(tmp_path, mode):
    # 3 new tokens truncate every completion; a constant lambda makes the token signal the only gradient
    run_script(FAST + ["--method", "sd", "--gate", "none", "--max_new_tokens", "3", "--max_steps", "2",
                       "--save_steps", "0", "--truncated_completions", mode, "--output_dir", str(tmp_path)])
    rows = read_metrics(tmp_path)
    assert all(r["length/truncated_frac"] == 1.0 and r["reward/mean"] == 0.0 for r in rows)
    if mode == "mask":  # no loss on any of them
        assert all(r["grad_norm"] == 0.0 and r["signal/bonus_mass"] == r["signal/penalty_mass"] == 0.0 for r in rows)
    else:  # scored 0 and trained on
        assert all(r["grad_norm"] > 0.0 for r in rows)


def straight_and_resumed_runs(tmp_path: Path, monkeypatch, args: list[str]) -> None:
    """The same run into tmp_path/straight, and into tmp_path/broken killed in the third step's reward
    (after checkpoint-2), then continued with --resume (its config read from the run)."""
    main(parse_config(args + ["--output_dir", str(tmp_path / "straight")]))

    from verifiers.math import MathVerifier

    calls, score = [], MathVerifier.score

    def dies_on_third_step(self, completions, golds):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("simulated crash")
        return score(self, completions, golds)

    monkeypatch.setattr(MathVerifier, "score", dies_on_third_step)
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(parse_config(args + ["--output_dir", str(tmp_path / "broken")]))
    assert latest_checkpoint(tmp_path / "broken").name == "checkpoint-2"
    monkeypatch.setattr(MathVerifier, "score", score)
    main(parse_config(["--resume", "--output_dir", str(tmp_path / "broken")]))


def test_resume_equals_uninterrupted_run(tmp_path, monkeypatch):
    # with both guards on: the gate's closed_by state and the group weights survive the resume too
    straight_and_resumed_runs(tmp_path, monkeypatch, FAST + ["--method", "antisd", "--max_steps", "4", "--save_steps", "2",
                                                             "--gate_close_above", "1.5", "--group_signal", "bernoulli"])
    straight, resumed = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "broken")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for a, b in zip(straight, resumed):
        for key in ("reward/mean", "gate/lambda", "gate/closed_by", "signal/group_weight_mean", "teacher/entropy_median",
                    "u/mean", "loss", "length/mean"):
            assert a[key] == b[key], (a["step"], key)
    weights_a = load_file(tmp_path / "straight" / "model.safetensors")
    weights_b = load_file(tmp_path / "broken" / "model.safetensors")
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    gate = json.loads((tmp_path / "broken" / "checkpoint-4" / "trainer_state.json").read_text())["controller"]
    assert gate["step"] == 4 and gate["h_warm"] is not None


def test_partial_checkpoint_is_never_picked(tmp_path):
    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / "checkpoint-2" / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-4.partial").mkdir()  # a save that was killed half-way
    (tmp_path / "checkpoint-6").mkdir()          # no trainer_state.json: not complete
    assert latest_checkpoint(tmp_path).name == "checkpoint-2"


def test_config_file_cli_overrides_and_validation(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("max_steps: 9\nmethod: sd\ngroup_size: 4\n")
    cfg = parse_config(["--config", str(recipe), "--max-steps", "7"])
    assert (cfg.max_steps, cfg.method, cfg.group_size) == (7, "sd", 4)
    recipe.write_text("max_stepz: 9\n")
    with pytest.raises(SystemExit, match="unknown config keys"):
        parse_config(["--config", str(recipe)])
    with pytest.raises(SystemExit, match="divisible"):
        Config(prompts_per_step=3).validate(num_processes=2)
    with pytest.raises(SystemExit, match="group_size"):
        Config(group_size=1).validate(num_processes=1)
    with pytest.raises(SystemExit, match="constant_with_warmup"):
        Config(lr_scheduler="constant", lr_warmup_steps=10).validate(num_processes=1)


def test_output_dir_follows_method_and_dataset_and_a_new_run_never_overwrites_one(tmp_path):
    assert parse_config([]).output_dir == "runs/antisd-arith"
    assert parse_config(["--method", "grpo", "--dataset", "data/my_problems.jsonl"]).output_dir == "runs/grpo-my_problems"
    assert parse_config(["--dataset", "BytedTsinghua-SIA/DAPO-Math-17k"]).output_dir == "runs/antisd-DAPO-Math-17k"
    assert parse_config(["--method", "sd", "--output_dir", "mine"]).output_dir == "mine"
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(SystemExit, match=r"already holds a run \(metrics.jsonl\): pass --resume"):
        main(parse_config(FAST + ["--output_dir", str(run)]))
    assert (run / "metrics.jsonl").read_text() == '{"step": 1}\n'


def test_release_preset_is_a_layer_of_defaults_under_recipes_and_flags(tmp_path):
    paper = parse_config([])
    assert (paper.gate_reopen_ratio, paper.dataset_solution_fallback, paper.group_signal, paper.gate_close_above) == (1.0, True, "all", 0)
    released = parse_config(["--preset", "release"])
    assert (released.gate, released.gate_reopen_ratio, released.dataset_solution_fallback) == ("release", 1.07, False)
    assert parse_config(["--gate", "release"]).gate_reopen_ratio == 1.07  # the released controller's re-open, preset or not
    assert parse_config(["--gate", "release", "--gate_reopen_ratio", "1.0"]).gate_reopen_ratio == 1.0
    assert parse_config(["--preset", "release", "--gate", "none"]).gate == "none"
    for flag in ("--gate_reopen_ratio", "--gate-reopen-ratio"):  # a flag always wins, in either spelling
        assert parse_config(["--preset", "release", flag, "1.02"]).gate_reopen_ratio == 1.02
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("preset: release\ngate_reopen_ratio: 1.03\n")
    assert parse_config(["--config", str(recipe)]).gate_reopen_ratio == 1.03  # the recipe wins over its preset
    recipe.write_text("gate_reopen_ratio: 1.04\n")
    assert parse_config(["--config", str(recipe), "--preset", "release"]).gate_reopen_ratio == 1.04
    recipe.write_text("preset: release\n")
    assert parse_config(["--config", str(recipe)]).gate_reopen_ratio == 1.07


def test_release_length_mask_follows_the_budget():
    """The released launcher drops the signal of responses >= 12000 of its 16384 tokens: on a 128-token
    budget that is >= 93.75, i.e. 94 tokens."""
    cfg = parse_config(["--preset", "release", "--max_new_tokens", "128"])
    assert cfg.release_max_response_tokens == 94
    assert parse_config(["--preset", "release"]).release_max_response_tokens == 94  # 128: the default budget
    assert parse_config(["--gate", "release", "--max_new_tokens", "16384"]).release_max_response_tokens == 12000
    assert parse_config(["--preset", "release", "--release_max_response_tokens", "50"]).release_max_response_tokens == 50
    gate = train_antisd.make_gate(cfg)
    gate.sigma_ref = 10.0
    u = torch.linspace(-1, 1, 94).repeat(2, 1)
    mask = torch.ones(2, 94)
    mask[1, 93] = 0  # 93 tokens
    out = gate.signal(u, mask, partial(train_antisd.token_signal, method="antisd"))
    assert out[0].abs().sum() == 0 and out[1].abs().sum() > 0


def test_release_preset_shows_feedback_only_without_another_correct_rollout():
    """Under the preset a sole correct rollout and an all-wrong group see no solution (the released code
    has no dataset fallback); the paper's default shows the dataset's solution there."""
    from antisd.generation import Samples
    from transformers import AutoTokenizer

    from models import EMBEDDED_MODELS

    tokenizer = AutoTokenizer.from_pretrained(EMBEDDED_MODELS["tiny"][0])
    rows = [{"problem": "P0", "solution": "REFERENCE-0"}, {"problem": "P1", "solution": "REFERENCE-1"}]
    texts = ["right \\boxed{1}", "wrong \\boxed{2}", "wrong \\boxed{3}", "wrong \\boxed{4}", "w", "w", "w", "w"]
    rollout = Samples([[1]] * 8, [[2]] * 8, [False] * 8, texts)
    rewards = [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]  # group 0: one correct rollout; group 1: all wrong

    def shown(preset: str) -> list[str]:
        cfg = parse_config(["--preset", preset, "--group_size", "4"])
        ids = train_antisd.teacher_prompts(cfg, tokenizer, 0, 0, rows, ["P0", "P1"], [0, 1], rollout, rewards)
        return [tokenizer.decode(i) for i in ids]

    released = shown("release")
    assert "previous attempt" not in released[0] and "Your answer is correct." in released[0]  # feedback only
    assert all("right" in t and "Your answer is incorrect." in t for t in released[1:4])   # the sole correct one
    assert all("previous attempt" not in t and "REFERENCE" not in t for t in released[4:])  # all wrong: feedback only
    paper = shown("paper")
    assert "REFERENCE-0" in paper[0] and all("REFERENCE-1" in t for t in paper[4:])


def test_group_signal_mixed_leaves_no_signal_when_every_rollout_scores_the_same(tmp_path):
    """A reward that is always 1 makes every group zero-std: under `mixed` the token signal is 0 there
    (no bonus, no penalty); under `all` (the paper) it all lands in zero-std groups."""
    (tmp_path / "always_right.py").write_text("def reward(completions, **kwargs):\n    return [1.0] * len(completions)\n")
    runs = {}
    for mode in ("mixed", "all"):
        main(parse_config(FAST + ["--method", "antisd", "--gate", "none", "--max_steps", "1", "--save_steps", "0",
                                  "--reward_funcs", f"{tmp_path / 'always_right.py'}:reward", "--group_signal", mode,
                                  "--truncated_completions", "mask",  # 'wrong' would score a truncated rollout 0
                                  "--output_dir", str(tmp_path / mode)]))
        runs[mode] = read_metrics(tmp_path / mode)
    for row in runs["mixed"]:
        assert row["reward/zero_std_groups"] == 1.0 and row["gate/lambda"] == 0.5 and row["signal/group_weight_mean"] == 0
        assert row["signal/bonus_mass"] == 0 and row["signal/penalty_mass"] == 0 and row["signal/zero_std_bonus_share"] is None
    for row in runs["all"]:
        assert row["signal/bonus_mass"] > 0 and row["signal/zero_std_bonus_share"] == 1.0


def test_help_lists_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert all(f"--{name}" in text for name in Config.__dataclass_fields__)


def test_init_from_starts_a_new_run_with_a_fresh_gate(tmp_path):
    run_script(FAST + ["--method", "grpo", "--max_steps", "1", "--output_dir", str(tmp_path / "grpo")])
    run_script(FAST + ["--method", "antisd", "--max_steps", "2", "--init_from", str(tmp_path / "grpo"),
                       "--output_dir", str(tmp_path / "continual")])
    rows = read_metrics(tmp_path / "continual")
    assert [r["step"] for r in rows] == [1, 2] and rows[0]["gate/lambda"] == 0.0  # warm-up re-run


CPU_FSDP2 = {"ACCELERATE_USE_CPU": "true", "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2",
             "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP", "PYTHONPATH": str(REPO)}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]


@pytest.mark.slow
def test_two_process_fsdp2_gradient_matches_one_process():
    proc = subprocess.run(TORCHRUN + [str(REPO / "tests" / "dist_grad_check.py"), "token-mean", "seq-mean-token-mean"],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **CPU_FSDP2})
    assert proc.returncode == 0 and "GRAD-CHECK OK" in proc.stdout and "TEACHER-CHECK OK" in proc.stdout, \
        proc.stdout[-2000:] + proc.stderr[-4000:]


@pytest.mark.slow
def test_two_process_fsdp2_bf16_policy_scores_checkpointing_and_generation():
    """The GPU recipe's precision policy on 2 gloo processes: fp32 unrounded scores within bf16
    tolerance of fp32, layers recomputed, gathered generation == unsharded (tests/fsdp2_bf16_check.py)."""
    proc = subprocess.run(TORCHRUN + [str(REPO / "tests" / "fsdp2_bf16_check.py")], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", **CPU_FSDP2})
    assert proc.returncode == 0 and "BF16-CHECK OK" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]


@pytest.mark.slow
def test_two_process_fsdp2_train_save_resume(tmp_path):
    """The GPU recipe's path (FSDP2, --bf16 --gradient_checkpointing) on 2 gloo processes: prepare ->
    generate from gathered weights -> update -> sharded checkpoint -> resume -> full bf16 save."""
    args = FAST + ["--prompts_per_step", "4", "--method", "antisd", "--bf16", "--gradient_checkpointing",
                   "--output_dir", str(tmp_path)]
    run_script(args + ["--max_steps", "2"], env=CPU_FSDP2, launcher=TORCHRUN)
    assert (tmp_path / "checkpoint-2" / "pytorch_model_fsdp_0").is_dir()  # really sharded
    rows = read_metrics(tmp_path)
    assert all(math.isfinite(r["u/mean"]) and r["teacher/entropy_median"] > 0 and math.isfinite(r["grad_norm"]) for r in rows)
    step_2 = load_file(tmp_path / "model.safetensors")
    assert {t.dtype for t in step_2.values()} == {torch.bfloat16}  # saved in the training dtype
    # continual run from the sharded checkpoint: its (fp32 master) weights are merged, then loaded
    run_script(FAST + ["--max_steps", "1", "--init_from", str(tmp_path / "checkpoint-2"), "--output_dir", str(tmp_path / "cont")])
    merged = load_file(tmp_path / "cont" / "init_model" / "model.safetensors")
    assert all(torch.equal(merged[name].to(torch.bfloat16), tensor) for name, tensor in step_2.items())
    run_script(args + ["--max_steps", "3", "--resume"], env=CPU_FSDP2, launcher=TORCHRUN)
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert sum(p.numel() for p in model.parameters()) == sum(
        p.numel() for p in AutoModelForCausalLM.from_pretrained(REPO / "models" / "tiny-qwen3").parameters())


@pytest.mark.slow
def test_two_process_ddp_on_cpu_and_its_checkpoint_loads_whole(tmp_path):
    proc = run_script(FAST + ["--prompts_per_step", "4", "--max_steps", "2", "--output_dir", str(tmp_path)],
                      env={"ACCELERATE_USE_CPU": "true", "PYTHONPATH": str(REPO)}, launcher=TORCHRUN)
    assert f"{cpu_threads(processes=2)} torch threads per process" in proc.stderr  # the cores shared out
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2]
    final = load_file(tmp_path / "model.safetensors")
    checkpoint = tmp_path / "checkpoint-2"
    # --init_from and evaluate.py read every weight of the DDP checkpoint folder (a partial load raises)
    from antisd.checkpoints import model_dir
    from antisd.model_loading import load_causal_lm

    loaded = load_causal_lm(model_dir(str(checkpoint), tmp_path / "scratch")).state_dict()
    assert all(torch.equal(loaded[k], final[k]) for k in final)
    run_script(FAST + ["--max_steps", "1", "--init_from", str(checkpoint), "--output_dir", str(tmp_path / "cont")])
    evaluation = subprocess.run([sys.executable, str(REPO / "evaluate.py"), "--bench", "arith", "--model", str(checkpoint),
                                 "--n", "1", "--limit", "2", "--output_dir", str(tmp_path / "eval")],
                                cwd=REPO, capture_output=True, text=True, timeout=300)
    assert evaluation.returncode == 0, evaluation.stdout[-2000:] + evaluation.stderr[-3000:]


def test_checkpoint_folders_load_whole_or_not_at_all(tmp_path):
    """Wrapper-prefixed weights (DDP's `module.`, torch.compile's `_orig_mod.`) are converted once into a
    model folder that loads whole; read as they are, or with a weight missing, loading is an error."""
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoTokenizer

    from antisd.checkpoints import model_dir
    from antisd.model_loading import CheckpointError, load_causal_lm

    tiny = REPO / "models" / "tiny-qwen3"
    weights = load_file(tiny / "model.safetensors")
    wrapped = tmp_path / "checkpoint-2"
    AutoConfig.from_pretrained(tiny).save_pretrained(wrapped)
    AutoTokenizer.from_pretrained(tiny).save_pretrained(wrapped)
    save_file({f"module.{k}": v for k, v in weights.items()}, wrapped / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="not every weight loaded"):  # prefixed keys, read as they are
        load_causal_lm(str(wrapped))
    converted = model_dir(str(wrapped), tmp_path / "converted")
    assert converted == str(tmp_path / "converted")
    loaded = load_causal_lm(converted).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in weights.items())
    save_file({k: v for k, v in weights.items() if "layers.0.mlp" not in k}, wrapped / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="layers.0.mlp"):
        load_causal_lm(str(wrapped))


@pytest.mark.parametrize("recipe", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_recipe_parses(recipe):
    cfg = parse_config(["--config", str(recipe)])
    cfg.validate(num_processes=1)
    assert cfg.method in train_antisd.METHODS


def test_recipes_hold_only_what_differs():
    """Each value a recipe sets differs from what it would get without it (dataclass default or included file);
    only the method a recipe is named for is always stated."""
    import yaml

    for recipe in sorted((REPO / "configs").glob("*.yaml")):
        values = yaml.safe_load(recipe.read_text())
        include = values.pop("include", None)
        below = yaml.safe_load((recipe.parent / include).read_text()) if include else {}
        for key, value in values.items():
            assert key == "method" or value != below.get(key, getattr(Config(), key)), f"{recipe.name}: {key}: {value!r} repeats a default"
