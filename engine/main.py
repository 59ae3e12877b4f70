"""`beitv2 GROUP COMMAND ...`: every stage's commands under one installed command (docs/cli.md).

The groups are the stages; each stage module exposes `COMMANDS` (a dict of its commands, or its one command) and
its `python -m` entry point runs the same dict, so a command registered there shows up here without an edit. Only
the stage that is asked for is imported: `beitv2 mosaics` does not wait for torch.

Launchers run this module or the console script: `deepspeed --module engine.main mim train ...`,
`deepspeed $(which beitv2) mim train ...`, `torchrun --nproc_per_node=N -m engine.main mim train ...`.
"""
from __future__ import annotations

import importlib
import inspect
import sys
from types import ModuleType

from engine.cli import run_cli

PROG = "beitv2"

# Group -> the module whose `COMMANDS` it runs (and, optionally, `CLI_ERRORS`: more one-line user errors).
STAGES = {
    "convert": "data_tools.convert",
    "mosaics": "data_tools.mosaics",
    "tokenizer": "pretrain.tokenizer.__main__",
    "mim": "pretrain.mim.__main__",
    "classify": "finetune.classify",
    "segment": "finetune.segment",
}


def _stage(group: str) -> ModuleType:
    return importlib.import_module(STAGES[group])


def _summary(fn) -> str:
    doc = inspect.getdoc(fn) or ""
    line = doc.split("\n\n")[0].replace("\n", " ").strip()
    return line if len(line) <= 90 else line[:87] + "..."


def usage() -> str:
    """The command tree: every group's commands with the first sentence of their help."""
    lines = [f"usage: {PROG} GROUP COMMAND [ARGS] [--flags]", "",
             "BEiT v2 pretraining (VQ-KD tokenizer, MIM, transfer) on DeepSpeed. Commands:", ""]
    for group in STAGES:
        commands = _stage(group).COMMANDS
        items = commands.items() if isinstance(commands, dict) else [("", commands)]
        for name, fn in items:
            lines.append(f"  {f'{group} {name}'.strip():<22} {_summary(fn)}")
    lines += ["",
              f"`{PROG} GROUP --help` lists a group's commands; `{PROG} GROUP COMMAND --help` a command's flags (for",
              "train: the recipes and every config key). Train commands take --config=FILE (a run's config.json or",
              "YAML): defaults < recipe < FILE < flags. Launchers: `deepspeed --module engine.main ...`,",
              "`torchrun -m engine.main ...` (docs/cli.md)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run `beitv2 argv...`; returns the exit status (2 with a one-line `error: ...` for bad input)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    words = [a for a in argv if not a.startswith("--local_rank")]   # the deepspeed launcher's, before the group
    if not words or words[0] in ("--help", "-h", "help"):
        print(usage())
        return 0
    group = words[0]
    if group not in STAGES:
        print(f"error: unknown command group '{group}'; choose one of: {', '.join(STAGES)} "
              f"(`{PROG} --help` lists their commands)", file=sys.stderr)
        return 2
    stage = _stage(group)
    return run_cli({group: stage.COMMANDS}, argv, name=PROG, errors=tuple(getattr(stage, "CLI_ERRORS", ())))


if __name__ == "__main__":
    sys.exit(main())
