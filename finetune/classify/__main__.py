"""`python -m finetune.classify train|evaluate|export|linear_probe|knn ...` (see --help of each); also
`beitv2 classify`."""
import sys

from engine.config.cli import run_cli
from finetune.classify.evaluate import evaluate
from finetune.classify.export import export
from finetune.classify.probe import knn, linear_probe
from finetune.classify.train import train

# `beitv2 classify ...` (engine.main) reads this dict too, so a command added here shows up there.
COMMANDS = {"train": train, "evaluate": evaluate, "export": export, "linear_probe": linear_probe, "knn": knn}

if __name__ == "__main__":
    sys.exit(run_cli(COMMANDS, name="python -m finetune.classify"))
