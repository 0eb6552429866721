"""Build the embedded default model: a tiny Qwen3 warm-started on the arithmetic task.

1. Train a byte-level BPE tokenizer (digits split one per token, so any text round-trips) on task
   text, with the Qwen chat tokens and a Qwen-style chat template.
2. Build a small `Qwen3ForCausalLM` from transformers' own config.
3. Supervised fine-tuning on the train split of `data.arith`, loss on the assistant tokens only
   (incl. the final `<|im_end|>`), in two formats so that the RL self-teacher is in distribution:
   student (problem -> solution) and teacher (`teacher_user_message(problem, shown solution or
   None, random feedback)` -> a fresh solution).
4. Measure accuracy on the eval split (sampled at T=1.0 and greedy) with the project's verifier and
   save model + tokenizer + `build_info.json`.

`--task code_arith` builds `tiny-code` (models/tiny-qwen3-code) for the embedded code task
(data/code_arith.py): SFT on its functions in ```python blocks, teacher prompts with the code
feedback ("Your code passes N of M test cases."), accuracy by the sandboxed `code_tests` reward.
It trains 1000 SFT steps: right on 0.600 of the held-out problems at T=1 and 0.785 greedy, so RL
has the gap between them to close (600 steps gave 0.14 / 0.22, and RL barely moved it; 2500 gave
0.915 / 0.970).

`--task arith_checks` builds `tiny-checks` (models/tiny-qwen3-checks), for the task where only an
explicit check catches a slip and a check recomputes the step by a route of one-digit facts
(data/arith.py's module docstring: "Wait, let me check: 47 + 8: units 7 + 8 = 15, tens 4 + 1 = 5, so
55, not 54."). Its student solutions slip (`--slip_prob`, per solution) and check (`--check_prob`,
per step) at the student's rates, and every check in them is exact, so the model learns to slip in
the one-jump steps and to recompute in the checks; its teacher, when shown a solution, answers
without slips and checks at `--teacher_check_prob`, much less often: the paper's premise (a teacher
who has seen a verified solution takes shortcuts, so deliberation gets u = log pi_T - log pi_S < 0)
built in on purpose, to test whether AntiSD then does what the paper says. Without a shown solution
it answers as the student. It trains 4000 SFT steps (`TASK_SFT_STEPS`; `arith`: 1000) at the same
size as `tiny`: after 1000-2000 steps its checks still copied the step above or erred (half the
slips caught or fewer). Built so, on its own samples before any
training (`analysis.pmi --model tiny-checks --dataset arith_checks --num_problems 32`: 256 rollouts)
63 of the 64 checks right below a wrong step catch it, 2 of 123 turn a right step wrong, and within
a problem the rollouts with a check score 0.37 more than those without; held-out accuracy 0.605 at
T=1, 0.955 greedy (greedy never slips). build_info.json also holds `eval_checks_t1`, `audit_checks`
summed over the T=1 eval samples.

    python -m models.build_tiny_model [--output_dir models/tiny-qwen3] [--sft_steps N] [--seed S]
    python -m models.build_tiny_model --task arith_checks --output_dir models/tiny-qwen3-checks
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from functools import partial
from pathlib import Path

import torch
from tqdm.auto import tqdm

from data.arith import CHECK_PROB, SLIP_PROB, TASKS
from data.code_arith import TASK as CODE_TASK
from models import EMBEDDED_MODELS

DEFAULT_TINY_MODEL_DIR = EMBEDDED_MODELS["tiny"][0]
# arith_checks only: the student's slip and check rates, the shown-solution teacher's check rate
CHECKS_DEFAULTS = {"slip_prob": SLIP_PROB, "check_prob": CHECK_PROB, "teacher_check_prob": 0.05}
# SFT steps by task. 1000 teach arith; arith_checks' check routes are still noisy there (analysis.pmi on the
# model's own samples: checks caught 11 of 32 slips, turned 11 of 86 right steps wrong, a check lowered the
# reward within a problem by 0.08; at slip/check rates 0.5/0.4, 2000 steps into a 4000-step run: 26 / 52 caught,
# 8 / 62 turned wrong; at its end 39 / 46, 1 / 119, a check +0.36)
TASK_SFT_STEPS = {"arith": 1000, "arith_checks": 4000, CODE_TASK: 1000}
PAD, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
PRETOKENIZE_REGEX = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--output_dir", default=None, help="where model, tokenizer and build_info.json go; None: the embedded "
                   "model's folder for --task (models/tiny-qwen3, models/tiny-qwen3-checks)")
    p.add_argument("--task", default="arith", choices=(*TASKS, CODE_TASK),
                   help="the SFT task (data/arith.py); arith_checks: only an explicit check catches a slip")
    p.add_argument("--slip_prob", type=float, default=None,
                   help=f"arith_checks: chance that a student solution slips once; None: {CHECKS_DEFAULTS['slip_prob']}")
    p.add_argument("--check_prob", type=float, default=None,
                   help=f"arith_checks: the student's chance of a check after each step; None: {CHECKS_DEFAULTS['check_prob']}")
    p.add_argument("--teacher_check_prob", type=float, default=None,
                   help="arith_checks: the same for the teacher shown a solution, which never slips; "
                        f"None: {CHECKS_DEFAULTS['teacher_check_prob']}")
    p.add_argument("--seed", type=int, default=0, help="seed of everything (data, init, SFT, eval sampling)")
    p.add_argument("--sft_steps", type=int, default=None,
                   help=f"SFT optimizer steps; None: {TASK_SFT_STEPS['arith']} for arith, {TASK_SFT_STEPS['arith_checks']} "
                        f"for arith_checks (its checks are exact only after the longer SFT), {TASK_SFT_STEPS[CODE_TASK]} for "
                        f"{CODE_TASK} (room for RL: right at T=1 well below greedy)")
    p.add_argument("--batch_size", type=int, default=16, help="SFT sequences per step")
    p.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate (warm-up then cosine)")
    p.add_argument("--teacher_frac", type=float, default=0.4, help="fraction of SFT examples in the teacher format")
    p.add_argument("--train_n", type=int, default=4000, help="train problems (tokenizer text and SFT pool)")
    p.add_argument("--vocab_size", type=int, default=512, help="BPE vocabulary size incl. special tokens")
    p.add_argument("--hidden_size", type=int, default=160, help="model width")
    p.add_argument("--intermediate_size", type=int, default=640, help="MLP width")
    p.add_argument("--num_layers", type=int, default=4, help="transformer layers")
    p.add_argument("--num_heads", type=int, default=4, help="attention heads (head_dim = hidden_size / heads)")
    p.add_argument("--num_kv_heads", type=int, default=2, help="key/value heads (GQA)")
    p.add_argument("--eval_n", type=int, default=200, help="eval problems for the accuracy check")
    p.add_argument("--max_new_tokens", type=int, default=192, help="generation budget at evaluation")
    p.add_argument("--num_threads", type=int, default=min(2, os.cpu_count() or 1), help="torch CPU threads (1 is much faster than 2 on a busy 2-core machine)")
    args = p.parse_args(argv)
    if args.output_dir is None:
        args.output_dir = str(next(folder for folder, task in EMBEDDED_MODELS.values() if task == args.task))
    if args.sft_steps is None:
        args.sft_steps = TASK_SFT_STEPS[args.task]
    for name, default in CHECKS_DEFAULTS.items():
        if args.task == "arith" and getattr(args, name) is not None:
            p.error(f"--{name} is for --task arith_checks")
        if args.task == "arith_checks" and getattr(args, name) is None:
            setattr(args, name, default)
    return args


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([  # GPT-2 split with one digit per piece, then bytes
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, IM_START, IM_END],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=IM_END, pad_token=PAD,
                                   additional_special_tokens=[IM_START], chat_template=CHAT_TEMPLATE)


def build_model(tokenizer, args):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=args.hidden_size, intermediate_size=args.intermediate_size,
        num_hidden_layers=args.num_layers, num_attention_heads=args.num_heads, num_key_value_heads=args.num_kv_heads,
        head_dim=args.hidden_size // args.num_heads, max_position_embeddings=1024, tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
    )
    model = Qwen3ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = None
    return model


def solution_writers(args) -> dict:
    """How SFT writes a problem's solution (each `(steps, rng) -> text`): `student`, the one a teacher
    prompt shows (`shown`: correct, as the trainer shows a correct sibling or the dataset's solution),
    and the teacher's response when a solution is shown (`teacher`)."""
    from data.arith import make_checked_solution, make_solution

    if args.task == CODE_TASK:  # one solution per function: the teacher shown it writes it again
        from data.code_arith import NUM_TESTS, make_solution as code_solution
        from prompts import code_feedback

        return {"student": code_solution, "shown": code_solution, "teacher": code_solution,
                "feedback": lambda rng: code_feedback(rng.randint(0, NUM_TESTS), NUM_TESTS)}
    if args.task == "arith":
        return {"student": make_solution, "shown": make_solution, "teacher": make_solution}
    student = partial(make_checked_solution, slip_prob=args.slip_prob, check_prob=args.check_prob)
    return {"student": student, "shown": partial(student, correct=True),
            "teacher": partial(make_checked_solution, slip_prob=0.0, check_prob=args.teacher_check_prob)}


def sft_texts(rows: list[dict], n: int, teacher_frac: float, rng: random.Random, writers: dict) -> list[tuple[str, str]]:
    """`n` (user message, assistant response) pairs in the student and teacher formats; a teacher
    prompt without a shown solution gets a student response."""
    from prompts import FEEDBACK_CORRECT, FEEDBACK_INCORRECT, teacher_user_message
    from verifiers.math import last_boxed_span

    pairs = []
    for _ in range(n):
        row = rng.choice(rows)
        user, write = row["problem"], writers["student"]
        if rng.random() < teacher_frac:
            shown = writers["shown"](row["steps"], rng) if rng.random() < 0.85 else None
            if shown is not None:  # the trainer cuts a shown solution right after its graded \boxed{}
                span = last_boxed_span(shown)  # code solutions have none
                shown, write = shown[: span[1]] if span else shown, writers["teacher"]
            feedback = writers["feedback"](rng) if "feedback" in writers else rng.choice([FEEDBACK_CORRECT, FEEDBACK_INCORRECT])
            user = teacher_user_message(user, shown, feedback)
        pairs.append((user, write(row["steps"], rng)))
    return pairs


def encode(tokenizer, pairs: list[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    from antisd.generation import chat_messages, chat_prompt_ids

    responses = tokenizer([r for _, r in pairs], add_special_tokens=False)["input_ids"]
    return [(chat_prompt_ids(tokenizer, chat_messages(u)), r + [tokenizer.eos_token_id]) for (u, _), r in zip(pairs, responses)]


def batches(examples: list, batch_size: int, rng: random.Random) -> list[list]:
    """Batches of similar length (sorted within windows of 16 batches), in random order."""
    out = []
    for start in range(0, len(examples), 16 * batch_size):
        window = sorted(examples[start:start + 16 * batch_size], key=lambda e: len(e[0]) + len(e[1]))
        out += [window[i:i + batch_size] for i in range(0, len(window), batch_size)]
    rng.shuffle(out)
    return out


def sft(model, examples, args, pad_id: int) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = max(1, args.sft_steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warmup, 0.1 + 0.45 * (1 + math.cos(math.pi * s / args.sft_steps))))
    model.train()
    bar = tqdm(batches(examples, args.batch_size, random.Random(args.seed)), desc="sft")
    for batch in bar:
        width = max(len(p) + len(r) for p, r in batch)
        ids = torch.full((len(batch), width), pad_id)
        labels = torch.full((len(batch), width), -100)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, (p, r) in enumerate(batch):
            ids[i, :len(p) + len(r)] = torch.tensor(p + r)
            labels[i, len(p):len(p) + len(r)] = torch.tensor(r)
            mask[i, :len(p) + len(r)] = 1
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return loss.item()


def evaluate(model, tokenizer, rows: list[dict], temperature: float, max_new_tokens: int, seed: int):
    """(accuracy under the project's math reward, the samples) on `rows`; code rows: (share of programs that
    pass every test, the samples), the mean share of tests passed in `evaluate.code_fraction`."""
    from antisd.generation import chat_messages, chat_prompt_ids, sample
    from verifiers.math import MathVerifier

    torch.manual_seed(seed)
    prompts = [chat_prompt_ids(tokenizer, chat_messages(r["problem"])) for r in rows]
    samples = sample(model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=temperature, progress=True)
    if rows and "tests" in rows[0]:  # the embedded code task: the sandboxed code_tests reward
        from verifiers.code_tests import CodeTester, CodeTestsReward

        reward = CodeTestsReward(tester=CodeTester(num_workers=2))
        fractions = reward(samples.texts, [r["tests"] for r in rows])
        evaluate.code_fraction = sum(fractions) / len(fractions)
        return sum(p == t for p, t in reward.counts) / len(rows), samples
    with MathVerifier(num_workers=2, timeout_s=5.0) as verifier:
        scores = verifier.score(samples.texts, [r["answer"] for r in rows])
    return sum(scores) / len(scores), samples


def build(args) -> dict:
    from data.arith import generate_split

    if args.task == CODE_TASK:
        from data.code_arith import generate_split

    start, threads = time.time(), torch.get_num_threads()
    torch.set_num_threads(args.num_threads)
    try:
        torch.manual_seed(args.seed)
        rng = random.Random(args.seed)
        train = generate_split("train", args.train_n, seed=args.seed, include_steps=True, task=args.task)
        evals = generate_split("eval", args.eval_n, seed=args.seed, task=args.task)
        writers = solution_writers(args)
        print(f"training tokenizer (vocab {args.vocab_size}) on {len(train)} problems")
        tokenizer = train_tokenizer((t for pair in sft_texts(train, 2 * len(train), 0.5, random.Random(args.seed), writers)
                                     for t in pair), args.vocab_size)
        model = build_model(tokenizer, args)
        params = sum(p.numel() for p in model.parameters())
        print(f"model: Qwen3 {args.num_layers}x{args.hidden_size}, {params:,} parameters")
        examples = encode(tokenizer, sft_texts(train, args.sft_steps * args.batch_size, args.teacher_frac, rng, writers))
        loss = sft(model, examples, args, tokenizer.pad_token_id)
        acc_t1, samples = evaluate(model, tokenizer, evals, 1.0, args.max_new_tokens, args.seed)
        tests_passed_t1 = getattr(evaluate, "code_fraction", None)  # code_arith: the mean share of tests passed
        acc_greedy, _ = evaluate(model, tokenizer, evals, 0.0, args.max_new_tokens, args.seed)
    finally:
        torch.set_num_threads(threads)

    out = Path(args.output_dir)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    solution_tokens = [len(ids) + 1 for ids in tokenizer([r["solution"] for r in evals], add_special_tokens=False)["input_ids"]]
    info = {
        "parameters": params,
        "model_safetensors_bytes": (out / "model.safetensors").stat().st_size,
        "eval_n": len(evals),
        "eval_accuracy_t1": acc_t1,
        "eval_accuracy_greedy": acc_greedy,
        "mean_completion_tokens_t1": sum(map(len, samples.completion_ids)) / len(evals),
        "truncated_t1": sum(samples.truncated),
        "mean_reference_solution_tokens": sum(solution_tokens) / len(solution_tokens),
        "final_sft_loss": loss,
        "build_seconds": round(time.time() - start, 1),
        "task": ({"name": args.task, "tests_passed_t1": tests_passed_t1} if args.task == CODE_TASK else
                 {"name": args.task, "num_steps": generate_split.__kwdefaults__["num_steps"], "digits": generate_split.__kwdefaults__["digits"]}),
        "args": {k: v for k, v in vars(args).items() if k != "output_dir"},
        "example_eval_completion": samples.texts[0],
    }
    if args.task == "arith_checks":  # how the T=1 samples' checks went (data.arith.audit_checks, summed)
        from data.arith import AUDIT_KEYS, audit_checks

        audits = [audit_checks(text) for text in samples.texts]
        info["eval_checks_t1"] = {k: sum(a[k] for a in audits) for k in AUDIT_KEYS}
    (out / "build_info.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"parameters: {params:,}  model.safetensors: {info['model_safetensors_bytes'] / 2**20:.2f} MiB")
    print(f"eval accuracy on {len(evals)} problems: T=1.0 {acc_t1:.3f}  greedy {acc_greedy:.3f}  ({info['build_seconds']} s)")
    return info


def ensure_tiny_model(path: str | Path = DEFAULT_TINY_MODEL_DIR, task: str = "arith") -> Path:
    """Return `path` if it holds a model and its tokenizer, else build one for `task` there first."""
    path = Path(path)
    if not all((path / f).exists() for f in ("config.json", "model.safetensors", "tokenizer.json")):
        print(f"building the embedded tiny model for {task} into {path} (a few minutes on CPU)")
        build(parse_args(["--output_dir", str(path), "--task", task]))
    return path


def ensure_embedded_model(name: str) -> Path:
    """The folder of an embedded model (`models.EMBEDDED_MODELS`: 'tiny', 'tiny-checks'), built on first use."""
    return ensure_tiny_model(*EMBEDDED_MODELS[name])


def main(argv=None) -> None:
    build(parse_args(argv))


if __name__ == "__main__":
    main()
