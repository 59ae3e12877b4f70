"""`python -m finetune.segment train|evaluate ...` (see --help of each); also `beitv2 segment ...`."""
import sys

from engine.config.cli import run_cli
from finetune.segment.evaluate import evaluate
from finetune.segment.train import train

# `beitv2 segment ...` (engine.main) reads this dict too, so a command added here shows up there.
COMMANDS = {"train": train, "evaluate": evaluate}

if __name__ == "__main__":
    sys.exit(run_cli(COMMANDS, name="python -m finetune.segment"))
