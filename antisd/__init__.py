"""What train_antisd.py and evaluate.py build on: the gates (gates.py), and the machinery both scripts
share: model loading, scoring and the update's policy reads, rollouts and generation, checkpoints and
adapters, distributed setup, config parsing, metrics, the model card and the evaluation core. The method
itself is train_antisd.py's (and the texts prompts.py's)."""
