"""The machinery train_antisd.py and evaluate.py share: model loading, scoring, rollouts, checkpoints,
distributed setup, config parsing, metrics, the model card and the evaluation core. Method edits go in
train_antisd.py (and the texts in prompts.py), not here."""
