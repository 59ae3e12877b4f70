"""Shared training machinery for every stage: typed configs, DeepSpeed setup, checkpoints, metrics, the loop."""
