"""What researchers bring from TRL: their own reward functions, datasets with other column names,
readable rollouts (completions.jsonl)."""

import json
from pathlib import Path

import pytest

from data.loading import DataError, load_math_dataset
from test_training import FAST, read_metrics, run_script
from verifiers.reward_funcs import RewardError, call_reward_func, load_reward_func, weighted_rewards

USER_REWARDS = '''
def short(completions, answer, prompts, **kwargs):
    assert len(answer) == len(prompts) == len(completions) and "problem" in kwargs
    return [1.0 if len(c) < 60 else 0.0 for c in completions]


def fails_on_seven(completions, **kwargs):
    return [1.0 / (len(c) != 7) for c in completions]
'''


def test_user_reward_functions_weighted_into_the_reward_and_completions_logged(tmp_path):
    (tmp_path / "my_rewards.py").write_text(USER_REWARDS)
    out = tmp_path / "run"
    run_script(FAST + ["--method", "grpo", "--max_steps", "2", "--save_steps", "0", "--truncated_completions", "mask",
                       "--reward_funcs", "math_verify", f"{tmp_path / 'my_rewards.py'}:short", "--reward_weights", "1", "0.5",
                       "--log_completions", "3", "--output_dir", str(out)])
    for row in read_metrics(out):
        assert row["reward/mean"] == pytest.approx(row["reward/math_verify"] + 0.5 * row["reward/short"])
        assert 0 < row["reward/short"] <= 1
    logged = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [1, 1, 1, 2, 2, 2]
    assert set(logged[0]) == {"step", "prompt", "completion", "reward", "advantage", "u_mean", "lambda"}
    for record in logged:
        short = 1.0 if len(record["completion"]) < 60 else 0.0
        assert record["reward"] - 0.5 * short in (0.0, 1.0)  # the verifier's 0/1 plus the weighted user reward
        assert record["u_mean"] is None and record["lambda"] == 0.0  # grpo: no teacher


def test_a_raising_reward_function_is_named_with_its_sample(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(USER_REWARDS)
    monkeypatch.syspath_prepend(str(tmp_path))
    func = load_reward_func("my_rewards:fails_on_seven")
    with pytest.raises(RewardError, match=r"reward function fails_on_seven raised on sample 2 .*ZeroDivisionError"):
        call_reward_func("fails_on_seven", func, ["a", "bb", "7 chars", "x"], {"prompts": ["p"] * 4})
    with pytest.raises(RewardError, match="must return a list of 2 floats"):
        call_reward_func("bad", lambda completions, **kw: [1.0], ["a", "b"], {})
    with pytest.raises(RewardError, match="cannot load"):
        load_reward_func("my_rewards:no_such_function")
    totals, each = weighted_rewards({"a": lambda c, **kw: [1.0, None], "b": lambda c, **kw: [2.0, 3.0]}, [1.0, 0.5],
                                    ["x", "y"], {})
    assert totals == [2.0, 1.5]  # None: the function does not apply to that completion (TRL)


def test_a_dataset_with_other_column_names_trains_through_the_mapping(tmp_path):
    data = tmp_path / "mine.jsonl"
    rows = [{"q": "What is 2 + 3?", "gold": "5", "worked": "2 + 3 = 5. \\boxed{5}"},
            {"q": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 4 + 4?"}],
             "gold": "8", "worked": "4 + 4 = 8. \\boxed{8}"}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    columns = {"problem": "q", "answer": "gold", "solution": "worked"}
    loaded = load_math_dataset(str(data), columns=columns)
    assert [(r["problem"], r["answer"], r["solution"]) for r in loaded] == [
        ("What is 2 + 3?", "5", "2 + 3 = 5. \\boxed{5}"), ("What is 4 + 4?", "8", "4 + 4 = 8. \\boxed{8}")]
    with pytest.raises(DataError, match=r"mine\.jsonl: row 0: no column 'question'"):
        load_math_dataset(str(data), columns={"problem": "question", "answer": "gold"})
    run_script(FAST + ["--dataset", str(data), "--problem_column", "q", "--answer_column", "gold", "--solution_column",
                       "worked", "--max_steps", "1", "--save_steps", "0", "--output_dir", str(tmp_path / "run")])
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1]


def test_model_card_holds_the_runs_numbers_and_push_to_hub_uploads_the_output(tmp_path, monkeypatch):
    """Offline up to the upload call: HfApi's create_repo and upload_folder are recorded, not sent."""
    import statistics

    import huggingface_hub
    import yaml

    from train_antisd import main, parse_config

    calls = []
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(("create", repo_id)))
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder",
                        lambda self, **kw: calls.append(("upload", kw["repo_id"], sorted(p.name for p in Path(kw["folder_path"]).iterdir()),
                                                         kw["ignore_patterns"])))
    out = tmp_path / "run"
    main(parse_config(FAST + ["--method", "antisd", "--max_steps", "2", "--save_steps", "0", "--output_dir", str(out),
                              "--push_to_hub", "--hub_model_id", "me/tiny-antisd"]))
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert "antisd" in front["tags"] and front["library_name"] == "transformers"
    rows = read_metrics(out)
    assert f"| reward/mean | {statistics.fmean(r['reward/mean'] for r in rows):.4f} |" in card
    assert f"| u/mean | {statistics.fmean(r['u/mean'] for r in rows):.4f} |" in card
    assert "![metrics](metrics.png)" in card and "eprint        = {2605.11609}" in card
    assert calls[0] == ("create", "me/tiny-antisd")
    _, repo, files, ignored = calls[1]
    assert repo == "me/tiny-antisd" and {"README.md", "model.safetensors", "metrics.jsonl", "metrics.png"} <= set(files)
    assert "checkpoint-*" in ignored


def test_evaluate_scores_every_checkpoint_of_a_run(tmp_path):
    import subprocess
    import sys

    from test_training import REPO

    run = tmp_path / "run"
    run_script(FAST + ["--method", "grpo", "--max_steps", "2", "--save_steps", "1", "--output_dir", str(run)])
    out = tmp_path / "eval"
    proc = subprocess.run([sys.executable, str(REPO / "evaluate.py"), "--bench", "arith", "--model", str(run), "--checkpoints",
                           "--n", "2", "--limit", "3", "--output_dir", str(out)], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = json.loads((out / "checkpoints.json").read_text())
    assert [r["step"] for r in rows] == [1, 2] and (out / "checkpoints.png").is_file()
    for row in rows:  # each row is that checkpoint's own evaluation
        own = json.loads((out / f"checkpoint-{row['step']}" / "results.json").read_text())
        assert (row["avg"], row["pass_at_k"], row["num_problems"]) == (own["avg"], own["pass_at_k"], 3)
