"""`python -m pretrain.mim train|export ...` (see --help of each)."""
import sys

from engine.cli import run_cli
from pretrain.mim.train import export, train

if __name__ == "__main__":
    sys.exit(run_cli({"train": train, "export": export}))
