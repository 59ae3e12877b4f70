"""`beitv2 GROUP COMMAND ...`: every stage's commands under one installed command (docs/cli.md).

The groups are the stages, registered as `beitv2.stages` entry points (setup.cfg; another package can add its own),
so this module names none of them. Each stage module exposes `COMMANDS` (a dict of its commands, or its one
command) and its `python -m` entry point runs the same dict, so a command added there shows up here too. Only
the stage that is asked for is imported, and `beitv2 --help` reads every command's help from the sources without
importing any (a stage imports torch and DeepSpeed: seconds).

Launchers run this module or the console script: `deepspeed --module engine.main mim train ...`,
`deepspeed $(which beitv2) mim train ...`, `torchrun --nproc_per_node=N -m engine.main mim train ...`.
"""
from __future__ import annotations

import ast
import configparser
import functools
import importlib
import importlib.metadata
import inspect
import os
import sys
from types import ModuleType

PROG = "beitv2"
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # where engine/, pretrain/, ... sit

ENTRY_POINTS = "beitv2.stages"   # group -> the module whose `COMMANDS` it runs (and, optionally, `CLI_ERRORS`)


@functools.cache   # one scan of the installed packages' metadata per process
def registered_stages() -> dict[str, str]:
    """The command groups registered as `beitv2.stages` entry points, in the order of this tree's setup.cfg (the
    pipeline's: convert ... segment) and any other package's after them; from a source tree that is not installed,
    its setup.cfg's list. Nothing is imported."""
    parser = configparser.ConfigParser()
    parser.read(os.path.join(_ROOT, "setup.cfg"), encoding="utf-8")
    lines = parser.get("options.entry_points", ENTRY_POINTS, fallback="").splitlines()
    listed = {name.strip(): value.strip() for name, _, value in (line.partition("=") for line in lines) if value}
    installed = {ep.name: ep.value for ep in importlib.metadata.entry_points(group=ENTRY_POINTS)}
    if not installed:
        return listed
    return {**{name: installed[name] for name in listed if name in installed}, **installed}


def _stage(group: str) -> ModuleType:
    return importlib.import_module(registered_stages()[group])


def _summary(doc: str | None) -> str:
    line = (doc or "").split("\n\n")[0].replace("\n", " ").strip()
    return line if len(line) <= 90 else line[:87] + "..."


def _parse(module: str) -> ast.Module:
    path = os.path.join(_ROOT, *module.split("."))
    path = path + ".py" if os.path.isfile(path + ".py") else os.path.join(path, "__init__.py")
    with open(path, encoding="utf-8") as f:
        return ast.parse(f.read(), path)


def _docstring(module: str, name: str) -> str | None:
    """The docstring of function `name` of `module`, following `from X import name` to where it is defined."""
    for node in _parse(module).body:
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return ast.get_docstring(node)   # cleaned as inspect.getdoc cleans it
        if isinstance(node, ast.ImportFrom) and node.level == 0:
            for alias in node.names:
                if (alias.asname or alias.name) == name:
                    return _docstring(node.module, alias.name)
    raise LookupError(f"{module}.{name}")


def _static_docs(group: str) -> list[tuple[str, str | None]]:
    """(command, docstring) of each of a group's commands, read from the sources: importing the stages would
    import torch and DeepSpeed (seconds) for a help text. Raises LookupError for a COMMANDS not written as a
    literal dict of (or one) function names."""
    module = registered_stages()[group]
    for node in _parse(module).body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["COMMANDS"]:
            value = node.value
            if isinstance(value, ast.Name):
                return [("", _docstring(module, value.id))]
            if isinstance(value, ast.Dict) and all(isinstance(k, ast.Constant) for k in value.keys) \
                    and all(isinstance(v, ast.Name) for v in value.values):
                return [(k.value, _docstring(module, v.id)) for k, v in zip(value.keys, value.values)]
    raise LookupError(f"{module}.COMMANDS")


def _docs(group: str) -> list[tuple[str, str | None]]:
    try:
        return _static_docs(group)
    except (LookupError, OSError, SyntaxError):   # a COMMANDS built at run time: import the stage to read it
        commands = _stage(group).COMMANDS
        items = commands.items() if isinstance(commands, dict) else [("", commands)]
        return [(name, inspect.getdoc(fn)) for name, fn in items]


def usage() -> str:
    """The command tree: every group's commands with the first sentence of their help."""
    lines = [f"usage: {PROG} GROUP COMMAND [ARGS] [--flags]", "",
             "BEiT v2 pretraining (VQ-KD tokenizer, MIM, transfer) on DeepSpeed. Commands:", ""]
    for group in registered_stages():
        for name, doc in _docs(group):
            lines.append(f"  {f'{group} {name}'.strip():<22} {_summary(doc)}")
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
    stages = registered_stages()
    if group not in stages:
        print(f"error: unknown command group '{group}'; choose one of: {', '.join(stages)} "
              f"(`{PROG} --help` lists their commands)", file=sys.stderr)
        return 2
    from engine.config.cli import run_cli   # imports torch: not before a stage is asked for
    stage = _stage(group)
    return run_cli({group: stage.COMMANDS}, argv, name=PROG, errors=tuple(getattr(stage, "CLI_ERRORS", ())))


if __name__ == "__main__":
    sys.exit(main())
