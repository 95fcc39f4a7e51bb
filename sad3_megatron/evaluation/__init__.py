"""Evaluation above the engine: generative metrics of samples (Gen. PPL, entropy, NFEs), variance
reports and plots. The likelihood bound itself is `core/likelihood.py`."""
