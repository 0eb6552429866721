"""Per-phase seconds of a training step, GRPO vs AntiSD, on the embedded default (CPU is fine).

    python bench/step_time.py                 # 8 steps of each on the default settings
    python bench/step_time.py --steps 12 --repeats 3   # three GRPO/AntiSD pairs: the ratio's spread
    python bench/step_time.py --steps 12 -- --max_new_tokens 96   # extra flags go to train_antisd.py
    python bench/step_time.py -- --cpu_threads 1                  # one torch thread (default: all cores)

Prints the mean seconds per phase over the steps after the first (which warms caches), and the
AntiSD / GRPO step-time ratio (the target is <= 1.15). Step times move by a few percent from run to
run on a shared CPU, so repeat before reading much into the third digit. The same-run figure,
AntiSD's step over its step less the teacher phase, has no run-to-run drift in it: with the same
seed both methods sample the same rollouts until the gate first opens, so the rest of the step is
GRPO's work.
"""

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train_antisd import main, parse_config  # noqa: E402

PHASES = ("generate", "reward", "teacher", "update", "step")


def measure(method: str, steps: int, extra: list[str]) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as out:
        main(parse_config(["--method", method, "--max_steps", str(steps), "--save_steps", "0",
                           "--report_to", "none", "--output_dir", out, *extra]))
        rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()][1:]
    result = {phase: statistics.fmean(r[f"time/{phase}_s"] for r in rows) for phase in PHASES}
    result["without_teacher"] = statistics.fmean(r["time/step_s"] - r["time/teacher_s"] for r in rows)
    result["tokens_per_s"] = statistics.fmean(r["tokens_per_s"] for r in rows)
    result["length"] = statistics.fmean(r["length/mean"] for r in rows)
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1, help="GRPO/AntiSD pairs to run; each pair gives one ratio")
    parser.add_argument("extra", nargs="*", help="flags passed on to train_antisd.py (after --)")
    args = parser.parse_args()
    ratios, same_run = [], []
    for _ in range(args.repeats):
        results = {method: measure(method, args.steps, args.extra) for method in ("grpo", "antisd")}
        print(f"\nmean seconds per step over steps 2..{args.steps}")
        print(f"| method | {' | '.join(PHASES)} | tokens/s | mean length |")
        print("|---" * (len(PHASES) + 3) + "|")
        for method, r in results.items():
            print(f"| {method} | " + " | ".join(f"{r[p]:.2f}" for p in PHASES) + f" | {r['tokens_per_s']:.0f} | {r['length']:.1f} |")
        ratios.append(results["antisd"]["step"] / results["grpo"]["step"])
        same_run.append(results["antisd"]["step"] / results["antisd"]["without_teacher"])
        print(f"\nAntiSD / GRPO step time: {ratios[-1]:.3f} (target <= 1.15)")
        print(f"AntiSD step / AntiSD step less its teacher phase (same run): {same_run[-1]:.3f}")
    if len(ratios) > 1:
        for name, values in (("AntiSD / GRPO", ratios), ("same-run", same_run)):
            print(f"{name} over {len(values)} pairs: mean {statistics.fmean(values):.3f}, "
                  f"min {min(values):.3f}, max {max(values):.3f}")
