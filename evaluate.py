"""Evaluate a model on a math or code benchmark: avg@n and unbiased pass@k.

    python evaluate.py --bench aime2025 --model Qwen/Qwen3-1.7B --n 16 --max_new_tokens 32768
    python evaluate.py --bench aime2025 --data_file ../shared/data/aime_2025.jsonl --model tiny --n 2
    python evaluate.py --bench arith --model tiny --n 4                 # the embedded task
    python evaluate.py --bench arith_checks --model tiny-checks --n 4   # the embedded task where checks matter
    python evaluate.py --bench mbppplus --data_file ../shared/data/mbpp_plus/MbppPlus-v0.2.0.jsonl.gz --model ...
    python evaluate.py --bench aime2025 --data_file ... --samples runs/x/samples.jsonl   # rescore, no model

Reading order: args -> load problems -> generate (resumable) -> score -> write results.
The code is antisd/evaluation.py (`run`), shared with train_antisd.py's --eval_steps; this file is its CLI.

- Prompts: the tokenizer's chat template over (optional system prompt, problem + instruction). Math
  benches append the boxed instruction (none for the embedded `arith` / `arith_checks` tasks, whose
  models were trained on bare problems); MBPP+ uses evalplus's instruction ("Please provide a
  self-contained Python script ... in a markdown code block:") around the task's prompt, without
  evalplus's assistant prefill so that thinking templates work unchanged.
- Generation is resumable: every finished batch is appended (and flushed) to
  `<output_dir>/samples.jsonl`; rerunning the same command generates only the samples that are
  missing (a killed run loses at most the batch in flight). Each batch is seeded from `--seed` and
  its first sample, so reruns reproduce it.
- Scoring: math answers by `verifiers.math.MathVerifier` (last `\\boxed{}` vs the gold, math-verify in
  killable worker processes); MBPP+ by `verifiers.mbpp.check_mbpp_sample` (evalplus sanitize, base and
  plus tests in a sandbox; a sample counts only if both pass). Garbage scores 0.
- `results.json`: `{"bench", "n", "num_problems", "avg", "pass_at_k": {"1": ..}, "problems": [{"id",
  "n", "correct", ...}], ...}`. `avg` = mean over problems of correct/n; pass@k is the unbiased
  estimator 1 - C(n-c, k)/C(n, k) averaged over the problems with n >= k (when problems have
  different n, `pass_at_k_num_problems` says how many entered each k; a k above every n is left out).
  `n` is the largest per-problem n (`n_min` the smallest).
"""

from __future__ import annotations

import sys

from antisd.cli import parse_layered
from antisd.evaluation import EvalConfig, EvalError, run, run_checkpoints
from data.loading import DataError


def parse_config(argv=None) -> EvalConfig:
    """Defaults < --config eval.yaml < CLI flags (cli.parse_layered); --help shows this file's docstring."""
    return parse_layered(EvalConfig, argv, __doc__)


def main(argv=None) -> int:
    args = parse_config(argv)
    try:
        run_checkpoints(args) if args.checkpoints else run(args)
    except (DataError, EvalError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
