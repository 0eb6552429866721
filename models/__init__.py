"""The embedded default model (see build_tiny_model.py)."""
