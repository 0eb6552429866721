"""The table of results/guards/README.md from each run's metrics.jsonl: python results/guards/table.py STUDY_DIR."""
import json
import sys
from pathlib import Path

root = Path(sys.argv[1] if len(sys.argv) > 1 else "studies/guards")
for name in ("paper", "release", "mixed", "close_above2"):
    rows = [json.loads(line) for line in (root / name / "metrics.jsonl").read_text().splitlines()]
    blocks = [rows[a:a + 50] for a in range(0, len(rows), 50)]
    cells = [f"{sum(r['reward/mean'] for r in b) / len(b):.3f} / {sum(r['length/mean'] for r in b) / len(b):.0f}" for b in blocks]
    after_warmup = rows[5:]
    shares = [r["signal/zero_std_bonus_share"] for r in rows if r["signal/zero_std_bonus_share"] is not None]
    print(f"| {name} | " + " | ".join(cells)
          + f" | {sum(bool(r['gate/open']) for r in after_warmup) / len(after_warmup):.2f}"
          + f" | {sum(r['gate/closed_by'] == 'above' for r in rows)} | {sum(shares) / len(shares):.2f}"
          + f" | {sum(r['reward/mean'] for r in rows[:10]) / 10:.3f} -> {sum(r['reward/mean'] for r in rows[-10:]) / 10:.3f} |")
