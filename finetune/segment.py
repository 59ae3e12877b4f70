"""`python -m finetune.segment train|evaluate ...` (see --help of each)."""
import sys

from engine.cli import run_cli
from finetune.seg_evaluate import evaluate
from finetune.seg_train import train

COMMANDS = {"train": train, "evaluate": evaluate}

if __name__ == "__main__":
    sys.exit(run_cli(COMMANDS))
