"""`python -m pretrain.tokenizer train|evaluate|encode ...` (see --help of each)."""
import sys

from engine.cli import run_cli
from pretrain.tokenizer.train import encode, evaluate, train

if __name__ == "__main__":
    sys.exit(run_cli({"train": train, "evaluate": evaluate, "encode": encode}))
