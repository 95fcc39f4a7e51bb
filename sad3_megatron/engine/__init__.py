"""Process groups, the DeepSpeed training loop, checkpoints, EMA and metrics."""
