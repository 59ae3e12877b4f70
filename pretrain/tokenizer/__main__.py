"""`python -m pretrain.tokenizer train|evaluate|encode ...` (see --help of each); also `beitv2 tokenizer ...`."""
import sys

from engine.config.cli import run_cli
from pretrain.tokenizer.train import encode, evaluate, train

# The stage's commands; `beitv2 tokenizer ...` (engine.main) reads this dict too, so a command added here shows up
# there.
COMMANDS = {"train": train, "evaluate": evaluate, "encode": encode}

if __name__ == "__main__":
    sys.exit(run_cli(COMMANDS, name="python -m pretrain.tokenizer"))
