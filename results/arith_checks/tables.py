"""The two tables of results/arith_checks/README.md that compare's report does not make:

    python results/arith_checks/tables.py STUDY_DIR PMI_DIR [SEED ...]

STUDY_DIR: the study's folder (runs/<arm>-seed<s>/metrics.jsonl); PMI_DIR: `analysis.pmi` output folders, `init`
(the untrained model) and one per finished run, named as the run (their stats.json `check_details`); SEED: only
these seeds (default: every finished run)."""
import json
import sys
from pathlib import Path

import numpy as np

ARMS = ("grpo", "sd", "antisd", "antisd_release", "antisd_mixed")
study, pmi, seeds = Path(sys.argv[1]), Path(sys.argv[2]), {int(s) for s in sys.argv[3:]}


def mean(values) -> float:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else float("nan")


def finished_runs(arm: str) -> list[Path]:
    return sorted(d for d in study.glob(f"runs/{arm}-seed*") if (d / "model.safetensors").exists()
                  and (not seeds or int(d.name.rsplit("-seed", 1)[1]) in seeds))


print("Training, mean over seeds (all-equal groups: groups whose rollouts all got the same reward, steps 26-200; "
      "bonus share: of the token bonus, the part paid in those groups):\n")
print("| arm | seeds | reward, steps 1-25 / 26-50 / 51-200 | response tokens, first 10 -> last 10 steps | gate open "
      "| all-equal groups | bonus share in them |\n|---|---|---|---|---|---|---|")
for arm in ARMS:
    runs = [[json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()] for d in finished_runs(arm)]
    if not runs:
        continue
    cell = lambda f: mean(f(rows) for rows in runs)  # noqa: E731
    reward = " / ".join(f"{cell(lambda rows: mean(r['reward/mean'] for r in rows[a:b])):.3f}" for a, b in ((0, 25), (25, 50), (50, None)))
    length = f"{cell(lambda rows: mean(r['length/mean'] for r in rows[:10])):.0f} -> {cell(lambda rows: mean(r['length/mean'] for r in rows[-10:])):.0f}"
    signal = arm != "grpo"
    gate = f"{cell(lambda rows: mean(float(bool(r['gate/open'])) for r in rows)):.2f}" if signal else "-"
    equal = cell(lambda rows: mean(r["reward/zero_std_groups"] for r in rows[25:]))
    share = cell(lambda rows: mean(r.get("signal/zero_std_bonus_share") for r in rows[25:]))
    print(f"| {arm} | {len(runs)} | {reward} | {length} | {gate} | {equal:.2f} | {f'{share:.2f}' if signal and share == share else '-'} |")

print("\nChecks, `analysis.pmi` on 32 training problems x 8 rollouts at T=1 per model (sums over seeds for the counts):\n")
print("| model | seeds | mean reward | checks per rollout (per seed) | rollouts with a check | slips caught by the check "
      "below them | right steps a check turned wrong | u on the check's first token ('Wait') | wrong steps per rollout |")
print("|---|---|---|---|---|---|---|---|---|")
for name, folders in [("untrained", [pmi / "init"])] + [(arm, [pmi / d.name for d in finished_runs(arm)]) for arm in ARMS]:
    stats = [json.loads((f / "stats.json").read_text()) for f in folders if (f / "stats.json").exists()]
    if not stats:
        continue
    details = [s["check_details"] for s in stats]
    per_rollout = [c["checks"] / c["rollouts"] for c in details]
    total = lambda key: sum(c[key] for c in details)  # noqa: E731
    u_open = mean(c["u_check_opener"]["mean_u"] if c["u_check_opener"]["tokens"] else None for c in details)
    print(f"| {name} | {len(stats)} | {mean(s['mean_reward'] for s in stats):.3f} | {np.mean(per_rollout):.2f} "
          f"({' / '.join(f'{x:.2f}' for x in per_rollout)}) | {mean(c['rollouts_with_check'] / c['rollouts'] for c in details):.2f} "
          f"| {total('caught')} of {total('after_wrong_step')} | {total('turned_right_wrong')} of {total('after_right_step')} "
          f"| {u_open:.2f} | {mean((c['steps'] - c['steps_right']) / c['rollouts'] for c in details):.2f} |")
