"""What a run leaves on disk and reads back: atomic files, the run directory, DeepSpeed checkpoints, consolidated
weights, safe loading of checkpoint files and self-describing exports."""
