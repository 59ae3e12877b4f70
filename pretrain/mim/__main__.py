"""`python -m pretrain.mim train|evaluate|export|visualize ...` (see --help of each); also `beitv2 mim ...`."""
import sys

from engine.config.cli import run_cli
from pretrain.mim.evaluate import evaluate
from pretrain.mim.export import export
from pretrain.mim.train import train
from pretrain.mim.visualize import visualize

# The stage's commands; `beitv2 mim ...` (engine.main) reads this dict too, so a command added here shows up there.
COMMANDS = {"train": train, "evaluate": evaluate, "export": export, "visualize": visualize}

if __name__ == "__main__":
    sys.exit(run_cli(COMMANDS, name="python -m pretrain.mim"))
