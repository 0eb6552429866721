"""Study tools beside the training script: `python -m analysis.compare` (GRPO / SD / AntiSD over seeds,
held-out evaluation, report) and `python -m analysis.pmi` (the per-token signal u of a model's rollouts)."""
