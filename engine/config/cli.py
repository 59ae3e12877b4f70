"""Entry-point wrapper: fire for the command line, one-line errors for bad input instead of tracebacks."""
from __future__ import annotations

import functools
import inspect
import math
import os
import sys
import typing
from typing import Any, Callable

import fire

from engine.config.run_plan import DRY_RUN_KEY, DryRun
from engine.config.schema import CONFIG_KEY, PREEMPT_SIGNALS, ConfigError
from engine.loop.guards import Preempted, TrainingDiverged, stop_on_signals
from engine.parallel.launch_env import fill_from_scheduler
from engine.storage.files import json_text

# Errors a user can fix from the message alone: print it on one line and exit non-zero.
USER_ERRORS = (ConfigError, FileNotFoundError, TrainingDiverged, ValueError)


def _print_result(result) -> None:
    if os.environ.get("RANK", "0") != "0":   # one summary per run, not one per rank
        return
    if isinstance(result, dict):
        print(json_text(result, indent=2, default=str))   # strict JSON: a NaN prints as null
    elif result is not None:
        print(result)


_BOOL_WORDS = {"true": "True", "false": "False", "1": "True", "0": "False", "yes": "True", "no": "False"}


def _str_literal(text: str) -> str:
    """`text` as a Python string literal, unless it already is one (fire's own way of passing a string)."""
    quoted = len(text) >= 2 and text[0] == text[-1] and text[0] in "'\""
    return text if quoted else repr(text)


def spell_flags(commands: dict | Callable, args: list[str]) -> list[str]:
    """The arguments of the command `args` call, spelled so that fire reads them as their parameters' types.

    Fire reads each argument's text as a Python literal: `--force=false` becomes the string 'false' (a true value),
    `--out=1e3` the float 1000.0 and a file named `True` a bool. Here `--flag=false` / `--flag false` for a bool
    parameter become the bool (anything but a yes/no word after `=` is a one-line ConfigError), and the text of a
    str parameter, given as a flag or by position, is passed quoted, so it arrives exactly as typed. `commands` may
    nest groups (`{"mim": {"train": fn}}`): the leading words of `args` pick the command.
    """
    head, fn = [], commands
    while isinstance(fn, dict) and len(head) < len(args) and args[len(head)] in fn:   # group words, then command
        fn = fn[args[len(head)]]
        head.append(args[len(head)])
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):   # no command named yet: a group's help
        return args
    bools = {name for name, p in params.items() if p.annotation in (bool, "bool")}
    strings = {name for name, p in params.items() if p.annotation in (str, "str")}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()) and CONFIG_KEY not in params:
        # a train command's `--config=FILE` (engine.config.schema.resolve) is a path, not a literal
        strings.add(CONFIG_KEY)
        bools.add(DRY_RUN_KEY)    # and `--dry_run` a yes/no (engine.config.run_plan)
    out, rest, positional, named = list(head), list(args[len(head):]), [], set()
    while rest:
        a = rest.pop(0)
        if a == "--":   # what follows is for fire itself (--help)
            out += [a, *rest]
            break
        if not a.startswith("--"):
            if not a.startswith("-"):
                positional.append(len(out))
            out.append(a)
            continue
        name, eq, value = a[2:].partition("=")
        key = name.replace("-", "_")
        next_is_value = not eq and bool(rest) and not rest[0].startswith("-")
        if key in bools:
            if not eq and rest and rest[0].lower() in _BOOL_WORDS:   # the value as the next word
                eq, value = "=", rest.pop(0)
            if eq:
                if value.lower() not in _BOOL_WORDS:
                    raise ConfigError(f"--{name} must be true or false, got {value!r}")
                a = f"--{name}={_BOOL_WORDS[value.lower()]}"
        elif next_is_value:   # `--key value`: the value is not a positional argument
            eq, value = "=", rest.pop(0)
            a = f"--{name}={value}"
        if key in strings and eq:
            a = f"--{name}={_str_literal(value)}"
        named.add(key)
        out.append(a)
    free = [n for n, p in params.items() if n not in named
            and p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    for slot, name in zip(positional, free):   # fire fills the parameters not given as flags, in order
        if name in strings:
            out[slot] = _str_literal(out[slot])
    return out


def check_counts(**counts) -> None:
    """Size flags (batch sizes, counts, iterations) are whole numbers >= 1; otherwise a one-line error naming the
    flag."""
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"--{name} must be a whole number >= 1 (got {value!r})")


def _checked_value(name: str, value: Any, hint: Any) -> Any:
    if hint is bool and not isinstance(value, bool):
        raise ConfigError(f"--{name} must be true or false, got {value!r}")
    if hint is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"--{name} must be an integer, got {value!r}")
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"--{name} must be a number, got {value!r}")
        if not math.isfinite(value):   # fire reads 1e999 as inf
            raise ConfigError(f"--{name} must be a finite number, got {value!r}")
        return float(value)
    if hint is str and not isinstance(value, str):   # `spell_flags` quotes str arguments; this is a backstop
        raise ConfigError(f"--{name} must be text, got {value!r}")
    return value


def typed_command(fn: Callable) -> Callable:
    """`fn` with its bool/int/float/str parameters checked before it runs. Fire passes whatever an argument's text
    parses to, so `--batch_size=abc` would otherwise fail deep inside as a traceback; now it is a one-line
    ConfigError naming the flag. Fire still sees `fn`'s own signature and docstring (help, flag names)."""
    try:
        signature, hints = inspect.signature(fn), typing.get_type_hints(fn)
    except (TypeError, ValueError, NameError):
        return fn

    @functools.wraps(fn)
    def checked(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        for name, value in bound.arguments.items():
            if signature.parameters[name].kind not in (inspect.Parameter.VAR_POSITIONAL,
                                                       inspect.Parameter.VAR_KEYWORD):
                bound.arguments[name] = _checked_value(name, value, hints.get(name))
        return fn(*bound.args, **bound.kwargs)
    return checked


def _typed(commands: dict | Callable) -> dict | Callable:
    return {k: _typed(v) for k, v in commands.items()} if isinstance(commands, dict) else typed_command(commands)


def _check_command(commands: dict | Callable, argv: list[str], name: str | None) -> list[str]:
    """`argv` when its leading words name a command of `commands`; a group's help when they stop at a group with
    nothing after them. Fire would print a whole usage page for a misspelt command and return a bare group as the
    result: here a misspelt or missing command is a one-line ConfigError listing the choices."""
    node, depth = commands, 0
    while isinstance(node, dict) and depth < len(argv) and argv[depth] in node:
        node, depth = node[argv[depth]], depth + 1
    if not isinstance(node, dict):
        return argv
    rest = argv[depth:]
    if not rest:
        return argv + ["--", "--help"]
    if rest[0] == "--":   # help asked for
        return argv
    what = f"unknown command '{rest[0]}'" if not rest[0].startswith("-") else f"{rest[0]}: name a command first"
    where = " ".join(([name] if name else []) + argv[:depth])
    choices = ", ".join(node)
    raise ConfigError(f"{what}; `{where}` takes one of: {choices} (`{where} --help` lists them)" if where
                      else f"{what}; choose one of: {choices} (--help lists them)")


def run_cli(commands: dict | Callable, argv: list[str] | None = None, *, name: str | None = None,
            errors: tuple[type[BaseException], ...] = ()) -> int:
    """Run `commands` (one function, a dict of sub-commands, or a dict of groups of them) with fire; return the exit
    status.

    Bad input (`USER_ERRORS`, and a stage's own `errors`) prints `error: <message>` on one line and returns 2; a dict
    result prints as JSON. `name` is the command as the user types it, for fire's help.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    # The deepspeed launcher passes --local_rank=N ahead of the sub-command; LOCAL_RANK in the environment
    # carries the same information, so drop it rather than let fire treat it as a command.
    argv = [a for a in argv if not a.startswith("--local_rank")]
    if any(a in ("--help", "-h") for a in argv) and "--" not in argv:
        # Stage commands take **overrides, which would swallow --help as a config key: ask fire for help instead.
        argv = [a for a in argv if a not in ("--help", "-h")] + ["--", "--help"]
    try:
        # under srun/mpirun: RANK before rank 0 alone prints the plan (engine.parallel.launch_env)
        fill_from_scheduler()
        argv = _check_command(commands, argv, name)
        argv = spell_flags(commands, argv)
        with stop_on_signals(PREEMPT_SIGNALS):   # outside a training loop they stop cleanly too (engine.loop.guards)
            result = fire.Fire(_typed(commands), command=argv, name=name, serialize=lambda r: None)
    except DryRun as e:   # --dry_run: the plan is printed, nothing was built
        result = e.result
    except Preempted as e:   # asked to stop: the checkpoint is written, nothing to fix
        print(f"stopped: {e}", file=sys.stderr)
        return 143
    except (*USER_ERRORS, *errors) as e:
        if os.environ.get("BEITV2_TRACEBACK"):   # for debugging: the whole stack instead of the one line
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:   # a launched rank: it exits next
            from engine.parallel import distributed as dist_utils
            dist_utils.shutdown()
    _print_result(result)
    return 0
