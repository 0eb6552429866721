"""The two tables of a study's results README that compare's report does not make (results/arith_checks, results/arith):

    python results/tables.py STUDY_DIR PMI_DIR [SEED ...]

Training metrics per arm (mean over seeds), then `analysis.pmi`'s numbers per model: on `arith_checks` how the
checks went (stats.json `check_details`), on other tasks u and the bonus by token class and the deliberation markers.
STUDY_DIR: the study's folder (runs/<arm>-seed<s>/metrics.jsonl); PMI_DIR: `analysis.pmi` output folders, `init`
(the untrained model) and one per finished run, named as the run; SEED: only these seeds (default: every finished run)."""
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


def pmi_stats() -> list[tuple[str, list[Path], list[dict]]]:
    """(model, its runs' analysis.pmi folders, their stats.json) for the untrained model and each arm."""
    named = [("untrained", [pmi / "init"])] + [(arm, [pmi / d.name for d in finished_runs(arm)]) for arm in ARMS]
    found = [(name, [f for f in folders if (f / "stats.json").exists()]) for name, folders in named]
    return [(name, folders, [json.loads((f / "stats.json").read_text()) for f in folders]) for name, folders in found if folders]


def checks_table(models: list[tuple[str, list[Path], list[dict]]]) -> None:
    print("\nChecks, `analysis.pmi` on 32 training problems x 8 rollouts at T=1 per model (sums over seeds for the counts):\n")
    print("| model | seeds | mean reward | checks per rollout (per seed) | rollouts with a check | slips caught by the check "
          "below them | right steps a check turned wrong | u on the check's first token ('Wait') | wrong steps per rollout |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, _, stats in models:
        details = [s["check_details"] for s in stats]
        per_rollout = [c["checks"] / c["rollouts"] for c in details]
        total = lambda key: sum(c[key] for c in details)  # noqa: E731
        u_open = mean(c["u_check_opener"]["mean_u"] if c["u_check_opener"]["tokens"] else None for c in details)
        print(f"| {name} | {len(stats)} | {mean(s['mean_reward'] for s in stats):.3f} | {np.mean(per_rollout):.2f} "
              f"({' / '.join(f'{x:.2f}' for x in per_rollout)}) | {mean(c['rollouts_with_check'] / c['rollouts'] for c in details):.2f} "
              f"| {total('caught')} of {total('after_wrong_step')} | {total('turned_right_wrong')} of {total('after_right_step')} "
              f"| {u_open:.2f} | {mean((c['steps'] - c['steps_right']) / c['rollouts'] for c in details):.2f} |")


def bonus_share_in_wrong_rollouts(folder: Path) -> float:
    """Of AntiSD's token bonus -phi(u) (u < 0) over pmi.jsonl's rollouts, the share on rollouts scored below 0.5."""
    total = wrong = 0.0
    for line in (folder / "pmi.jsonl").read_text().splitlines():
        record = json.loads(line)
        u = np.asarray(record["u"])
        bonus = float((-0.5 * (np.logaddexp(0.0, u[u < 0]) - np.log(2.0))).sum())
        total += bonus
        wrong += bonus if record["reward"] < 0.5 else 0.0
    return wrong / total if total else float("nan")


def deliberation_table(models: list[tuple[str, list[Path], list[dict]]]) -> None:
    print("\nu by token class, `analysis.pmi` on 32 training problems x 8 rollouts at T=1 per model (mean over seeds; "
          "bonus: AntiSD's -phi(u) where u < 0, its share by class):\n")
    print("| model | seeds | mean reward | tokens per rollout | deliberation tokens per rollout (per seed) | u on deliberation "
          "| u on 'wait' | u on numbers | bonus share on numbers | bonus share in wrong rollouts |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, folders, stats in models:
        per = lambda cls, key: mean(s["classes"][cls][key] for s in stats)  # noqa: E731
        delib = [s["classes"]["deliberation"]["count"] / s["rollouts"] for s in stats]
        wait = mean(s["markers"]["wait"]["mean_u"] if s["markers"].get("wait", {}).get("tokens") else None for s in stats)
        wrong = mean(bonus_share_in_wrong_rollouts(f) for f in folders)
        print(f"| {name} | {len(stats)} | {mean(s['mean_reward'] for s in stats):.3f} "
              f"| {mean(s['classes']['all']['count'] / s['rollouts'] for s in stats):.1f} "
              f"| {np.mean(delib):.2f} ({' / '.join(f'{x:.2f}' for x in delib)}) | {per('deliberation', 'mean_u'):+.3f} "
              f"| {wait:+.3f} | {per('number/arithmetic', 'mean_u'):+.3f} | {per('number/arithmetic', 'bonus_share'):.2f} "
              f"| {'-' if wrong != wrong else f'{wrong:.2f}'} |")


models = pmi_stats()
(checks_table if models and models[0][2][0].get("check_details") else deliberation_table)(models)
