"""LoRA through peft (the adapter trains, loads with peft, merges, resumes exactly; DDP and FSDP2 on CPU)
and evaluation during training (evaluate.py's code on the current weights, training unchanged by it)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from test_training import CPU_FSDP2, FAST, REPO, TORCHRUN, read_metrics, run_script, straight_and_resumed_runs
from evaluate import main as evaluate_main
from train_antisd import main, parse_config

TINY = REPO / "models" / "tiny-qwen3"
# --method sd with a constant lambda: the token signal moves the adapter even when every group has one reward
LORA = FAST + ["--use_peft", "--method", "sd", "--gate", "none", "--learning_rate", "1e-2"]


def logits_of(model) -> torch.Tensor:
    ids = torch.tensor([[3, 17, 42, 99, 5, 8]])
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_lora_run_saves_an_adapter_that_loads_with_peft_changes_outputs_and_merges(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from antisd.checkpoints import model_dir
    from antisd.model_loading import load_causal_lm

    run_script(LORA + ["--max_steps", "2", "--save_steps", "0", "--merge_adapter", "--output_dir", str(tmp_path)])
    assert all(r["grad_norm"] > 0 for r in read_metrics(tmp_path))
    adapter = load_file(tmp_path / "adapter_model.safetensors")
    assert adapter and all("lora_" in k for k in adapter)  # the adapter alone, no base weight
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (16, 32, 0.05)
    assert not (tmp_path / "model.safetensors").exists()

    base = AutoModelForCausalLM.from_pretrained(TINY).eval()
    base_logits = logits_of(base)
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(TINY), tmp_path).eval()
    adapted_logits = logits_of(adapted)
    assert (adapted_logits - base_logits).abs().max() > 1e-3  # the adapter changes the outputs
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(logits_of(merged), adapted_logits, rtol=1e-4, atol=1e-4)
    # evaluate.py, vLLM and --init_from get the run directory through model_dir: merged into a model folder
    converted = load_causal_lm(model_dir(str(tmp_path), tmp_path / "scratch")).eval()
    torch.testing.assert_close(logits_of(converted), adapted_logits, rtol=1e-4, atol=1e-4)
    # the frozen base really stayed frozen: the checkpoint's base weights are the tiny model's
    state = load_file(tmp_path / "checkpoint-2" / "model.safetensors")
    tiny = load_file(TINY / "model.safetensors")
    q_proj = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(state["base_model.model." + q_proj.replace(".weight", ".base_layer.weight")], tiny[q_proj])


def test_student_scores_for_u_come_from_a_dropout_free_pass(tmp_path):
    """With LoRA dropout, u = log pi_T - log pi_S uses the eval-mode student, not the noisy training pass."""
    from accelerate import Accelerator

    import train_antisd
    from antisd.model_loading import load_policy
    from antisd.generation import sample
    from antisd.scoring import eval_mode_logprobs, has_dropout, pack_sequences, token_logprobs

    lora = dict(r=4, alpha=8, dropout=0.5, target_modules=["q_proj", "v_proj"])
    model, tokenizer = load_policy("tiny", False, lora)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)  # a trained adapter: its dropout now moves the outputs
    assert has_dropout(model) and not has_dropout(load_policy("tiny", False)[0])
    torch.manual_seed(0)
    rollout = sample(model, tokenizer, [tokenizer("1 + 2 =")["input_ids"]] * 4, max_new_tokens=12)
    packed = pack_sequences(rollout.prompt_ids, rollout.completion_ids, tokenizer.pad_token_id, "cpu")
    model.train()
    clean = eval_mode_logprobs(model, *packed, chunk_rows=64)
    assert model.training
    noisy, _ = token_logprobs(model, *packed, chunk_rows=64)
    mask = packed[-1].bool()
    assert (noisy.detach() - clean)[mask].abs().max() > 1e-3  # the training pass is noisy

    accelerator = Accelerator(cpu=True)
    cfg = train_antisd.Config(method="sd", gate="none", micro_batch_size=16)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    teacher = [torch.zeros(len(c)) for c in rollout.completion_ids]
    update = train_antisd.update_policy(cfg, accelerator, model, optimizer, scheduler, train_antisd.make_gate(cfg), rollout,
                                        tokenizer.pad_token_id, teacher, torch.zeros(4), torch.full((4,), 0.5), 64)
    want = (-clean * mask).sum(1) / mask.sum(1)  # teacher 0 - the dropout-free student, per sequence
    torch.testing.assert_close(update["seq_u_mean"], want)


def test_lora_resume_equals_uninterrupted_run(tmp_path, monkeypatch):
    straight_and_resumed_runs(tmp_path, monkeypatch, LORA + ["--max_steps", "3", "--save_steps", "2"])  # LoRA config from the run
    assert (tmp_path / "broken" / "checkpoint-2" / "adapter_model.safetensors").is_file()
    straight, resumed = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "broken")
    assert [r["step"] for r in resumed] == [1, 2, 3]
    for a, b in zip(straight, resumed):
        for key in ("reward/mean", "u/mean", "loss", "grad_norm", "length/mean"):
            assert a[key] == b[key], (a["step"], key)
    adapter_a = load_file(tmp_path / "straight" / "adapter_model.safetensors")
    adapter_b = load_file(tmp_path / "broken" / "adapter_model.safetensors")
    assert adapter_a.keys() == adapter_b.keys() and all(torch.equal(adapter_a[k], adapter_b[k]) for k in adapter_a)


def test_evaluation_during_training_is_logged_and_leaves_training_unchanged(tmp_path):
    # LoRA dropout: an evaluation that left the policy in eval mode (or moved the RNG) would change the updates
    args = LORA + ["--max_steps", "2", "--save_steps", "0"]
    main(parse_config(args + ["--output_dir", str(tmp_path / "plain")]))
    main(parse_config(args + ["--eval_steps", "1", "--eval_bench", "arith", "--eval_n", "2", "--eval_limit", "3",
                              "--save_steps", "1", "--save_total_limit", "2", "--output_dir", str(tmp_path / "evaluated")]))
    plain, evaluated = read_metrics(tmp_path / "plain"), read_metrics(tmp_path / "evaluated")
    for a, b in zip(plain, evaluated, strict=True):
        for key in ("reward/mean", "u/mean", "loss", "grad_norm", "length/mean"):
            assert a[key] == b[key], (a["step"], key)
    rows = [json.loads(line) for line in (tmp_path / "evaluated" / "eval.jsonl").read_text().splitlines()]
    assert [(r["step"], r["bench"], r["n"], r["num_problems"]) for r in rows] == [(1, "arith", 2, 3), (2, "arith", 2, 3)]
    assert all(0 <= r["avg"] <= 1 and set(r["pass_at_k"]) == {"1", "2"} for r in rows)
    for row in rows:  # evaluate.py's own output, per step
        results = json.loads((tmp_path / "evaluated" / "eval" / f"step-{row['step']}" / "results.json").read_text())
        assert results["avg"] == row["avg"] and results["num_problems"] == 3
    # the step-1 evaluation saw step 1's weights: evaluate.py on checkpoint-1 samples the same completions
    evaluate_main(["--bench", "arith", "--model", str(tmp_path / "evaluated" / "checkpoint-1"), "--n", "2", "--limit", "3",
                   "--max_new_tokens", "40", "--seed", "0", "--output_dir", str(tmp_path / "standalone")])
    during = (tmp_path / "evaluated" / "eval" / "step-1" / "samples.jsonl").read_text().splitlines()
    standalone = (tmp_path / "standalone" / "samples.jsonl").read_text().splitlines()
    assert [json.loads(x)["completion"] for x in during] == [json.loads(x)["completion"] for x in standalone]


def test_4bit_without_bitsandbytes_or_gpu_says_what_is_missing():
    from antisd.model_loading import quantization_config

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(SystemExit, match="a CUDA GPU"):
        quantization_config()
    with pytest.raises(SystemExit, match="need --use_peft"):
        parse_config(["--load_in_4bit"]).validate(num_processes=1)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["ddp", "fsdp2"])
def test_two_process_lora_trains_checkpoints_resumes_and_saves_the_adapter(tmp_path, backend):
    """LoRA on 2 gloo processes: DDP, and FSDP2 (frozen base and adapter in the same sharded units) with
    the GPU recipe's --bf16 --gradient_checkpointing; the adapter is gathered whole and loads with peft;
    evaluation during training runs on the main process from the gathered weights."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    env = CPU_FSDP2 if backend == "fsdp2" else {"ACCELERATE_USE_CPU": "true", "PYTHONPATH": str(REPO)}
    extra = ["--bf16", "--gradient_checkpointing"] if backend == "fsdp2" else []
    args = LORA + ["--prompts_per_step", "4", "--output_dir", str(tmp_path), "--eval_steps", "2", "--eval_bench", "arith",
                   "--eval_n", "1", "--eval_limit", "33"] + extra  # 33 samples: two rollout calls of evaluate.py
    run_script(args + ["--max_steps", "2"], env=env, launcher=TORCHRUN)
    if backend == "fsdp2":
        assert (tmp_path / "checkpoint-2" / "pytorch_model_fsdp_0").is_dir()  # really sharded
    run_script(args + ["--max_steps", "3", "--resume"], env=env, launcher=TORCHRUN)
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["grad_norm"] > 0 for r in rows)
    evaluations = [json.loads(line) for line in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert [(r["step"], r["num_problems"]) for r in evaluations] == [(2, 33)]
    base = AutoModelForCausalLM.from_pretrained(TINY).eval()
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(TINY), tmp_path).eval()
    assert (logits_of(adapted) - logits_of(base)).abs().max() > 1e-3
    assert all(torch.isfinite(t).all() for t in load_file(tmp_path / "adapter_model.safetensors").values())
