"""Entry-point wrapper: fire for the command line, one-line errors for bad input instead of tracebacks."""
from __future__ import annotations

import inspect
import json
import os
import sys
from typing import Callable

import fire

from engine.config import ConfigError
from engine.guards import Preempted, TrainingDiverged

# Errors a user can fix from the message alone: print it on one line and exit non-zero.
USER_ERRORS = (ConfigError, FileNotFoundError, TrainingDiverged, ValueError)


def _print_result(result) -> None:
    if os.environ.get("RANK", "0") != "0":   # one summary per run, not one per rank
        return
    if isinstance(result, dict):
        print(json.dumps(result, indent=2, default=str))
    elif result is not None:
        print(result)


_BOOL_WORDS = {"true": "True", "false": "False", "1": "True", "0": "False", "yes": "True", "no": "False"}


def spell_bool_flags(commands: dict | Callable, args: list[str]) -> list[str]:
    """`--flag=false` or `--flag false` for a bool parameter of the command `args` call, as the bool fire
    understands (fire alone passes the string 'false', which is truthy); anything but a yes/no word after `=` is a
    one-line ConfigError."""
    fn = commands.get(args[0]) if isinstance(commands, dict) and args else commands
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return args
    flags = {name for name, p in params.items() if p.annotation in (bool, "bool")}
    out, rest = [], list(args)
    while rest:
        a = rest.pop(0)
        name, eq, value = a[2:].partition("=")
        if a.startswith("--") and name.replace("-", "_") in flags:
            if not eq and rest and rest[0].lower() in _BOOL_WORDS:   # the value as the next word
                eq, value = "=", rest.pop(0)
            if eq:
                if value.lower() not in _BOOL_WORDS:
                    raise ConfigError(f"--{name} must be true or false, got {value!r}")
                a = f"--{name}={_BOOL_WORDS[value.lower()]}"
        out.append(a)
    return out


def run_cli(commands: dict | Callable, argv: list[str] | None = None) -> int:
    """Run `commands` (a dict of sub-commands, or one function) with fire; return the exit status.

    Bad input (`USER_ERRORS`) prints `error: <message>` on one line and returns 2; a dict result prints as JSON.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    # The deepspeed launcher passes --local_rank=N ahead of the sub-command; LOCAL_RANK in the environment
    # carries the same information, so drop it rather than let fire treat it as a command.
    argv = [a for a in argv if not a.startswith("--local_rank")]
    if any(a in ("--help", "-h") for a in argv) and "--" not in argv:
        # Stage commands take **overrides, which would swallow --help as a config key: ask fire for help instead.
        argv = [a for a in argv if a not in ("--help", "-h")] + ["--", "--help"]
    try:
        argv = spell_bool_flags(commands, argv)
        result = fire.Fire(commands, command=argv, serialize=lambda r: None)
    except Preempted as e:   # asked to stop: the checkpoint is written, nothing to fix
        print(f"stopped: {e}", file=sys.stderr)
        return 143
    except USER_ERRORS as e:
        if os.environ.get("BEITV2_TRACEBACK"):   # for debugging: the whole stack instead of the one line
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    _print_result(result)
    return 0
