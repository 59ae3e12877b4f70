"""`python -m pretrain.mim train|evaluate|export ...` (see --help of each)."""
import sys

from engine.cli import run_cli
from pretrain.mim.evaluate import evaluate
from pretrain.mim.train import export, train

if __name__ == "__main__":
    sys.exit(run_cli({"train": train, "evaluate": evaluate, "export": export}))
