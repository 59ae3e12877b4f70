"""Typed run configuration: dataclasses that reject unknown keys and impossible values, with named recipes.

Every stage describes its run with a dataclass that nests `OptimConfig`, `ScheduleConfig` and `RunConfig`. Each key
is declared with `key(default, help, range or choices)`: `validate` checks every value against its declaration (and
a section's `rules` method checks what spans keys), and `describe` writes a train command's --help from them.
A recipe is a plain dict of overrides applied on top of the defaults, then an optional config file (`--config`, a
saved config.json or YAML), then the command-line flags (`resolve`).
The resolved config is written as JSON beside the run so that the run can be reproduced and resumed.
"""
from __future__ import annotations

import copy
import dataclasses
import inspect
import json
import math
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterator, Mapping

from engine.storage.files import write_text_atomically

if typing.TYPE_CHECKING:   # data_tools.config imports this module: below, DataConfig is imported where it is used
    from data_tools.config import DataConfig


class ConfigError(ValueError):
    """A bad configuration value or key; the message is one line naming the key and what to do."""


def key(default: Any, help: str, *, ge: float | None = None, gt: float | None = None, le: float | None = None,
        lt: float | None = None, choices: Any = None, note: str = "") -> Any:
    """A config key: its default, its one-line help and the values it takes (a range, each item's for a list, or
    `choices`), which `validate` checks (a None value, `T | None` left unset, is not) and --help shows. `note` ends
    the error: what a value means or what to use instead."""
    meta = {"help": help, "ge": ge, "gt": gt, "le": le, "lt": lt, "choices": choices, "note": note}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


def _num(x: float) -> str:
    return f"2**{x.bit_length() - 1}" if isinstance(x, int) and x > 2 ** 16 and not x & (x - 1) else str(x)


def _allowed(meta: Mapping[str, Any]) -> str:
    """What a key's declaration allows, as the errors and --help say it: `in (0, 1]`, `>= 1`, `one of a, b`."""
    if meta.get("choices") is not None:
        return "one of " + ", ".join(meta["choices"])
    lo = ("[", meta["ge"]) if meta.get("ge") is not None else ("(", meta["gt"]) if meta.get("gt") is not None else None
    hi = ("]", meta["le"]) if meta.get("le") is not None else (")", meta["lt"]) if meta.get("lt") is not None else None
    if lo and hi:
        return f"in {lo[0]}{_num(lo[1])}, {_num(hi[1])}{hi[0]}"
    if lo or hi:
        return {"[": ">=", "(": ">", "]": "<=", ")": "<"}[(lo or hi)[0]] + f" {_num((lo or hi)[1])}"
    return ""


def _fits(x: Any, m: Mapping[str, Any]) -> bool:
    return ((m.get("ge") is None or x >= m["ge"]) and (m.get("gt") is None or x > m["gt"])
            and (m.get("le") is None or x <= m["le"]) and (m.get("lt") is None or x < m["lt"]))


def _check_key(name: str, value: Any, meta: Mapping[str, Any]) -> None:
    if value is None or not _allowed(meta):
        return
    if meta.get("choices") is not None:
        ok = value in meta["choices"]
    else:
        ok = all(_fits(x, meta) for x in (value if isinstance(value, (tuple, list)) else [value]))
    _check(ok, name, value, f"must be {_allowed(meta)}" + (f" ({meta['note']})" if meta.get("note") else ""))


def _check(ok: bool, key: str, value: Any, what: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}' = {value!r} {what}")


@dataclass
class OptimConfig:
    """AdamW hyper-parameters."""
    # Adam moves every weight by about lr per step whatever the gradient's scale: above 1 no weight survives.
    lr: float = key(2e-4, "peak learning rate of AdamW", gt=0, le=1, note="e.g. 1.5e-3")
    min_lr: float = key(1e-5, "learning rate at the end of the decay (<= lr)", ge=0)
    betas: tuple[float, float] = key((0.9, 0.99), "AdamW's (beta1, beta2)", ge=0, lt=1, note="both")
    eps: float = key(1e-8, "AdamW's epsilon", gt=0)
    weight_decay: float = key(1e-4, "decoupled weight decay; none on 1-d weights, biases and token embeddings", ge=0)
    weight_decay_end: float | None = key(None, "cosine weight-decay schedule to this value; null keeps it constant",
                                         ge=0, note="or null for a constant weight decay")
    grad_clip: float = key(0.0, "clip the global gradient norm to this; 0 is off", ge=0, note="0 disables clipping")

    def rules(self, prefix: str) -> None:
        _check(self.min_lr <= self.lr, f"{prefix}.min_lr", self.min_lr, f"must be <= {prefix}.lr ({self.lr})")
        # Decoupled decay multiplies each weight by (1 - lr x weight_decay) per step: at >= 1 the weights flip sign
        # and grow without bound (a 1e6 decay turned most tensors non-finite within a few steps).
        decay = max(self.weight_decay, self.weight_decay_end or 0.0)
        _check(self.lr * decay < 1, f"{prefix}.weight_decay", decay,
               f"times optim.lr ({self.lr}) must be < 1: each step scales the weights by 1 - lr x weight_decay")


@dataclass
class ScheduleConfig:
    """Per-step schedule, measured in epochs or steps: linear warm-up, then `decay` to `optim.min_lr`."""
    epochs: float = key(1.0, "training length in epochs", gt=0)
    warmup_epochs: float = key(0.0, "linear warm-up in epochs", ge=0)
    total_steps: int | None = key(None, "training length in steps; overrides epochs when set", gt=0)
    warmup_steps: int | None = key(None, "warm-up in steps; overrides warmup_epochs when set", ge=0)
    # mmcv's iteration-based poly schedule runs from step 0 and the warm-up scales it.
    decay: str = key("cosine", "cosine after the warm-up (pretraining, classification) or poly from step 0 (the "
                     "segmentation recipes, as mmseg)", choices=("cosine", "poly"))


# `bf16`/`fp16`: DeepSpeed's 16-bit modes; `bf16_autocast`: fp32 weights, torch.autocast forward
# (engine.parallel.ds_setup).
# auto: resolved when the config is (engine.config.precision)
PRECISIONS = ("fp32", "bf16", "bf16_autocast", "fp16", "auto")
# torch.compile's modes; `reduce-overhead` replays the compiled graphs as CUDA graphs (one launch per graph).
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# Signals a run can take as "checkpoint and stop" (run.preempt_signal); not KILL/STOP (uncatchable) nor INT.
PREEMPT_SIGNALS = ("TERM", "USR1", "USR2", "HUP", "XCPU")
# Experiment trackers run.report_to may name; each is optional and imported only when named.
TRACKERS = ("wandb", "mlflow")


@dataclass
class RunConfig:
    """Engine settings shared by every stage."""
    output_dir: str = key("runs/default", "folder of the run: checkpoints, logs, config.json")
    ds_config: str = key("ds_configs/zero1.json", "DeepSpeed JSON: ZeRO and communication (batch, optimizer and "
                         "precision come from these keys)")
    precision: str = key("fp32", "fp32; bf16 or fp16 (DeepSpeed's); bf16_autocast (fp32 weights, autocast forward); "
                         "auto (what this machine computes natively)", choices=PRECISIONS)
    micro_batch_size: int = key(8, "images per rank per forward", ge=1)
    grad_accum_steps: int = key(1, "micro-batches per optimizer step", ge=1)
    seed: int = key(0, "seed of the weights, the data order and the random draws", ge=0, lt=2 ** 32,
                    note="numpy's seed range")
    log_interval: int = key(10, "steps between reading metrics off the device", ge=1)
    save_interval: int = key(500, "steps between checkpoints (and one at the end)", ge=1)
    keep_last: int = key(2, "checkpoints kept on disk", ge=1)
    save_final: bool = key(True, "checkpoint (and export the weights) when the run ends")
    resume: bool = key(True, "continue from the latest checkpoint in output_dir")
    # engine.storage.run_dir keeps the history of such changes in the run's folder.
    allow_config_change: bool = key(False, "let a resume change a key that changes what is trained (seed, arch, "
                                    "tokenizer, lr, batch...)")
    max_nonfinite_steps: int = key(5, "consecutive non-finite losses before the run stops", ge=1)
    grad_checkpointing: bool = key(False, "recompute the blocks' activations in the backward: less memory")
    shard_frozen: bool = key(True, "ZeRO-3 on more than one rank: partition the frozen tokenizer/teacher too")
    compile: bool = key(False, "torch.compile the model's forward")
    compile_mode: str = key("default", "torch.compile's mode (reduce-overhead: CUDA graphs)", choices=COMPILE_MODES)
    progress_bar: bool = key(True, "show a progress bar")
    report_to: str = key("", f"also send the metrics to these trackers where installed, comma-separated: "
                         f"{', '.join(TRACKERS)} (tensorboard's tb/ is always written)")
    profile_steps: int = key(0, "> 0: torch.profiler over this many steps after the 2nd log point", ge=0,
                             note="0 is off")
    # docs/launch.md: e.g. USR1 for `#SBATCH --signal=B:USR1@120`.
    preempt_signal: str = key("TERM", f"the signal that makes every rank checkpoint the same step and stop (exit "
                              f"143): {', '.join(PREEMPT_SIGNALS)}; SIGTERM always does too")
    requeue: bool = key(False, "after such a stop, rank 0 runs `scontrol requeue $SLURM_JOB_ID`")
    stop_before_end_s: int = key(0, "> 0: checkpoint and stop this many seconds (plus a log interval) before the "
                                 "job's end (SLURM_JOB_END_TIME, or time_limit_s)", ge=0, note="0 is off")
    time_limit_s: int = key(0, "the job's wall-clock limit from this process's start; 0: SLURM's", ge=0,
                            note="0 is off")

    def rules(self, prefix: str) -> None:
        _check(bool(self.output_dir.strip()), f"{prefix}.output_dir", self.output_dir,
               "must name a folder for the run's checkpoints and logs")
        unknown = sorted({t.strip() for t in self.report_to.split(",") if t.strip()} - set(TRACKERS))
        _check(not unknown, f"{prefix}.report_to", self.report_to,
               f"names unknown trackers {unknown}: use a comma-separated subset of {', '.join(TRACKERS)}, or ''")
        _check(self.preempt_signal.upper().removeprefix("SIG") in PREEMPT_SIGNALS, f"{prefix}.preempt_signal",
               self.preempt_signal, f"must be one of {', '.join(PREEMPT_SIGNALS)}")


def _data_section() -> DataConfig:
    from data_tools.config import DataConfig
    return DataConfig()


@dataclass
class StageConfig:
    """The sections every stage shares; a stage's config subclasses it and adds its model's sections.

    `harmless_on_resume`: the stage's own keys a resume may change without `run.allow_config_change` (they change
    how fast or what is evaluated, not what is trained); the engine's are `engine.storage.run_dir.HARMLESS`.
    `read_while_training`: the stage's keys naming files read at every step (beside the training .beton), whose
    content a resume checks against what the run began with (engine.storage.input_files).
    """
    harmless_on_resume: ClassVar[frozenset[str]] = frozenset()
    read_while_training: ClassVar[tuple[str, ...]] = ()
    data: DataConfig = field(default_factory=_data_section)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    run: RunConfig = field(default_factory=RunConfig)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Convert a JSON/CLI value to the annotated type, or raise a one-line ConfigError."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key '{key}' must be a mapping of {hint.__name__} fields, got {value!r}")
        return from_dict(hint, value, prefix=key)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        return _coerce(value, non_none[0], key)
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"config key '{key}' must be a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, key) for v, a in zip(value, args))
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        return [_coerce(v, args[0], key) for v in value]
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
        raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
        return int(value)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
        if not math.isfinite(value):   # 1e999 parses as inf: it would train on NaN weights without a word
            raise ConfigError(f"config key '{key}' must be a finite number, got {value!r}")
        return float(value)
    if hint is str:
        if isinstance(value, tuple) and value and all(isinstance(v, str) for v in value):
            return ",".join(value)   # fire reads `--run.report_to=wandb,mlflow` as a tuple: the text typed
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}' must be a string, got {value!r}")
        return value
    return value


def type_hints(cls: type) -> dict[str, Any]:
    """`typing.get_type_hints` of a config dataclass, whose `data` section (StageConfig's) names DataConfig, which
    this module imports only where it is used (data_tools.config imports this module)."""
    from data_tools.config import DataConfig
    return typing.get_type_hints(cls, localns={"DataConfig": DataConfig})


def from_dict(cls: type, values: Mapping[str, Any], prefix: str = "") -> Any:
    """Build dataclass `cls` from a (possibly nested) mapping; unknown keys are an error."""
    hints = type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        where = f"'{prefix}.{unknown[0]}'" if prefix else f"'{unknown[0]}'"
        raise ConfigError(f"unknown config key {where}; valid keys here: {', '.join(sorted(names))}")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in values.items()}
    return cls(**kwargs)


def merge(base: dict, overrides: Mapping[str, Any]) -> dict:
    """Deep-merge `overrides` into a copy of `base`. Dotted keys ('optim.lr') address nested fields."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        parts = key.split(".")
        node = out
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                node[p] = {} if p not in node else node[p]
                if not isinstance(node[p], dict):
                    raise ConfigError(f"config key '{key}': '{p}' is not a section")
            node = node[p]
        if isinstance(value, Mapping) and isinstance(node.get(parts[-1]), dict):
            node[parts[-1]] = merge(node[parts[-1]], value)
        else:
            node[parts[-1]] = value
    return out


def to_dict(cfg: Any) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def flat_keys(values: Mapping, prefix: str = "") -> dict:
    """A nested config dict as {"section.key": value}: the names flags, messages and trackers use."""
    out: dict = {}
    for name, value in values.items():
        if isinstance(value, Mapping):
            out.update(flat_keys(value, f"{prefix}{name}."))
        else:
            out[f"{prefix}{name}"] = value
    return out


# A train command's `--config=FILE`: `train(recipe, **overrides)` passes it on inside `overrides`, and `resolve` takes
# it out, so every stage reads config files without code of its own (no stage config has a field of this name).
CONFIG_KEY = "config"


def _check_keys(values: Any, path: str, prefix: str = "") -> None:
    """YAML allows keys that are numbers, lists or null; a config's keys are names."""
    if isinstance(values, Mapping):
        for key, value in values.items():
            if not isinstance(key, str):
                raise ConfigError(f"config file {path}: key {key!r} under '{prefix or '(top level)'}' is not a name")
            _check_keys(value, path, f"{prefix}.{key}" if prefix else key)


def _yaml_loader() -> type:
    """PyYAML's SafeLoader, which also reads `1e-3` and `5E4` as numbers, as JSON does (YAML 1.1 wants a dot in a
    float: `lr: 1e-3` would be the string '1e-3', and a one-line type error)."""
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        pass
    exponent = re.compile(r"^[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)[eE][-+]?[0-9]+$")
    Loader.add_implicit_resolver("tag:yaml.org,2002:float", exponent, list("-+0123456789."))
    return Loader


def load_config_file(path: str) -> dict:
    """The (nested or dotted) config keys in `path`: a run's saved config.json, or a JSON/YAML file with the same
    keys. `.yaml`/`.yml` files are read as YAML, everything else as JSON. Unknown keys are checked by `resolve`."""
    if not isinstance(path, str) or not path.strip():
        raise ConfigError(f"--config must name a config file (a run's config.json, or .yaml), got {path!r}")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a folder; pass the config.json inside it") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not text; pass a config.json or a .yaml file") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {path} ({e.strerror or e})") from None
    if path.lower().endswith((".yaml", ".yml")):
        import yaml   # PyYAML comes with timm; only YAML configs need it

        try:
            _refuse_yaml_aliases(text, path)   # an alias bomb (a few KB) expands to billions of values when walked
            values = yaml.load(text, Loader=_yaml_loader())   # safe_load, reading 1e-3 as a number
        except RecursionError:
            raise ConfigError(_too_deep(path)) from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            problem = getattr(e, "problem", None) or type(e).__name__
            raise ConfigError(f"config file {path} is not valid YAML ({problem}{where})") from None
        kind = "YAML"
    else:
        try:
            values = json.loads(text)
        except RecursionError:
            raise ConfigError(_too_deep(path)) from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"config file {path} is not valid JSON ({e.msg} at line {e.lineno}); YAML files "
                              f"must end in .yaml or .yml") from None
        kind = "JSON"
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a {kind} object of config keys (as a run's config.json "
                          f"does), got {type(values).__name__}")
    if _depth(values) > MAX_CONFIG_DEPTH:
        raise ConfigError(_too_deep(path))
    _check_keys(values, path)
    return values


MAX_CONFIG_DEPTH = 32   # levels of nesting a config file may hold (config keys have at most 3)


def _too_deep(path: str) -> str:
    return (f"config file {path} is nested more than {MAX_CONFIG_DEPTH} levels deep; config keys have a few levels "
            f"(run.lr or run: {{lr: ...}}): write it as a run's config.json is written")


def _depth(value: Any) -> int:
    """Levels of nesting of lists and mappings in `value` (iterative: no recursion limit to hit)."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, level = stack.pop()
        deepest = max(deepest, level)
        if level <= MAX_CONFIG_DEPTH and isinstance(item, (dict, list)):
            stack.extend((v, level + 1) for v in (item.values() if isinstance(item, dict) else item))
    return deepest


def _refuse_yaml_aliases(text: str, path: str) -> None:
    """A config file holds plain values: YAML anchors and aliases (`&a` / `*a`) are refused in one line, and so is
    nesting deeper than MAX_CONFIG_DEPTH, before anything is built (nine aliases of nine over eleven levels expand to
    9^11 values; PyYAML's Python scanner takes minutes over a few thousand nested brackets, libyaml's stops)."""
    import yaml
    depth = 0
    for event in yaml.parse(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
        if isinstance(event, yaml.AliasEvent):
            line = event.start_mark.line + 1 if event.start_mark is not None else "?"
            raise ConfigError(f"config file {path} uses a YAML alias (*{event.anchor} at line {line}); config "
                              f"files hold plain values: write each value out")
        depth += isinstance(event, yaml.CollectionStartEvent) - isinstance(event, yaml.CollectionEndEvent)
        if depth > MAX_CONFIG_DEPTH:
            raise ConfigError(_too_deep(path))


def _output_dir_of(values: Mapping[str, Any]) -> Any:
    """`run.output_dir` as set (nested or dotted) in `values`, else None."""
    run = merge({}, values).get("run")
    return run.get("output_dir") if isinstance(run, dict) else None


def _holds_run(output_dir: str) -> bool:
    return any(os.path.exists(os.path.join(output_dir, name)) for name in ("config.json", "checkpoints"))


def _leaves(values: Mapping[str, Any], prefix: str = "") -> set[str]:
    """The dotted names of the values a (nested or dotted) mapping of config keys sets."""
    out: set[str] = set()
    for key, value in (merge({}, values) if not prefix else values).items():
        if isinstance(value, Mapping):
            out |= _leaves(value, f"{prefix}{key}.")
        else:
            out.add(prefix + key)
    return out


def last_setter(layers: list[tuple[str, set[str]]], key: str) -> int:
    """Index of the last of `layers` (lowest priority first, the defaults at 0) that sets `key`."""
    return max((i for i, (_, keys) in enumerate(layers) if key in keys), default=0)


def resolve(cls: type, recipes: Mapping[str, Mapping[str, Any]], recipe: str | None,
            overrides: Mapping[str, Any], config_file: str | None = None) -> Any:
    """The run config: defaults of `cls` < the named recipe < `config_file` < `overrides` (the flags); validated
    before anything runs. `resolve_with_origins` also says where each key came from.

    `config_file` (a train command's `--config=FILE`, also accepted as the `config` key of `overrides`) is a saved
    `config.json` or a YAML/JSON file with the same keys; a key unknown to `cls` is a one-line error naming the file.
    A saved config.json sets every key, so the recipe then only fills keys added to the code since that run. Its
    `run.output_dir` names the old run: when that folder already holds a run and the flags do not set
    `run.output_dir`, this is an error asking for one (pass the old folder itself to continue that run).

    Data given by the user wins (`data_tools.config.settle_data`): `--data.train_path=my.beton` reads that file,
    whole.
    """
    return resolve_with_origins(cls, recipes, recipe, overrides, config_file)[0]


def resolve_with_origins(cls: type, recipes: Mapping[str, Mapping[str, Any]], recipe: str | None,
                         overrides: Mapping[str, Any], config_file: str | None = None) -> tuple[Any, dict[str, str]]:
    """`resolve`, and where each key that is not at its default came from: `recipe NAME`, `file PATH` or `flag`
    (and why, for a key `data_tools.config.settle_data` changed)."""
    from data_tools.config import DataConfig, settle_data
    overrides = dict(overrides)
    if CONFIG_KEY in overrides:
        if config_file is not None:
            raise ConfigError("give the config file once: either config_file or the 'config' override")
        config_file = overrides.pop(CONFIG_KEY)
    values = to_dict(cls())
    layers = [("the defaults", _leaves(values))]
    if recipe is not None:
        if recipe not in recipes:
            raise ConfigError(f"unknown recipe '{recipe}'; choose one of: {', '.join(sorted(recipes))}")
        values = merge(values, recipes[recipe])
        layers.append((f"recipe {recipe}", _leaves(recipes[recipe])))
    if config_file is not None:
        from_file = load_config_file(config_file)
        try:   # the file's keys and types on their own, so that an error names the file
            values = merge(values, from_file)
            from_dict(cls, values)
        except ConfigError as e:
            raise ConfigError(f"config file {config_file}: {e}") from None
        old_dir = _output_dir_of(from_file)
        if isinstance(old_dir, str) and old_dir.strip() and _output_dir_of(overrides) is None and _holds_run(old_dir):
            raise ConfigError(f"config file {config_file} sets run.output_dir={old_dir}, which already holds a run; "
                              f"pass --run.output_dir=NEW_DIR for a new run (or --run.output_dir={old_dir} to "
                              f"continue that one)")
        layers.append((f"file {config_file}", _leaves(from_file)))
    values = merge(values, overrides)
    layers.append(("flag", _leaves(overrides)))
    cfg = from_dict(cls, values)
    notes = {}
    if isinstance(getattr(cfg, "data", None), DataConfig):
        data_layers = [(name, {k[5:] for k in keys if k.startswith("data.")}) for name, keys in layers]
        notes = {f"data.{k}": why for k, why in settle_data(cfg.data, data_layers).items()}
    validate(cfg)
    run = getattr(cfg, "run", None)
    if isinstance(run, RunConfig) and run.precision == "auto":   # what this machine computes natively
        from engine.config.precision import auto_precision
        run.precision = auto_precision()
        notes["run.precision"] = f"auto on this machine ({layers[last_setter(layers, 'run.precision')][0]})"
    origins = {key: layers[last_setter(layers, key)][0] for key in _leaves(to_dict(cfg))
               if last_setter(layers, key) > 0}
    return cfg, {**origins, **notes}


def _keys(cfg: Any, prefix: str = "") -> Iterator[tuple[str, Any, dataclasses.Field]]:
    """(dotted name, value, declaration) of every key of `cfg`, its sections' keys in place."""
    for f in dataclasses.fields(cfg):
        name, value = f"{prefix}.{f.name}" if prefix else f.name, getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            yield from _keys(value, name)
        else:
            yield name, value, f


def validate(cfg: Any, prefix: str = "") -> None:
    """Check every key of `cfg` against its declaration (`key`), each section's after it its `rules(prefix)`: the
    checks that span keys."""
    for f in dataclasses.fields(cfg):
        name, value = f"{prefix}.{f.name}" if prefix else f.name, getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            validate(value, name)
        else:
            _check_key(name, value, f.metadata)
    if hasattr(cfg, "rules"):
        cfg.rules(prefix)


def _wrap(head: str, words: list[str], indent: int, width: int = 114) -> list[str]:
    """`head` and then `words`, packed into lines of `width` (fire indents a docstring by 4), later ones indented."""
    lines, line = [], head
    for word in words:
        if len(line) + 1 + len(word) > width and line.strip():
            lines.append(line.rstrip())
            line = " " * indent
        line += ("" if line.endswith(" ") else " ") + word
    return lines + [line.rstrip()]


def describe(cls: type, recipes: Mapping[str, Any], command: Callable) -> str:
    """A train command's help: each recipe's differences from the defaults, then every config key with its default,
    the value of the command's default recipe where it differs, its help and its allowed values."""
    recipe, defaults = inspect.signature(command).parameters["recipe"].default, cls()

    def changes(name: str) -> dict[str, Any]:
        cfg = from_dict(cls, merge(to_dict(defaults), recipes[name]))
        return {k: v for (k, d, _), (_, v, _) in zip(_keys(defaults), _keys(cfg)) if v != d}
    lines = [f"Recipes: the first word or --recipe (default {recipe}), each with the keys it changes:"]
    for name in recipes:
        lines += _wrap(f"  {name}:", [f"{k}={v!r}".replace(", ", ",") for k, v in changes(name).items()], 6)
    lines += ["", "--config=FILE starts from a saved config.json (or YAML with the same keys): defaults < recipe < "
              "FILE < flags.", "--dry_run prints what the run reads and its resolved config, then exits (nothing is "
              "built).", "", f"Config keys: --key=DEFAULT ('-> VALUE' where {recipe} differs), what it sets; allowed:"]
    ours = changes(recipe)
    for name, value, f in _keys(defaults):
        left = f"--{name}={value!r}" + (f" -> {ours[name]!r}" if name in ours else "")
        text = "; ".join(t for t in (f.metadata.get("help", ""), _allowed(f.metadata)) if t)
        lines += _wrap(f"  {left:<37} ", text.split(), 40)
    return "\n".join(lines)


def save_json(cfg: Any, path: str) -> None:
    """Write the resolved config atomically (temp file + rename)."""
    write_text_atomically(path, json.dumps(to_dict(cfg), indent=2, sort_keys=True))


def load_json(cls: type, path: str) -> Any:
    try:
        with open(path) as f:
            values = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"config file {path} is not valid JSON ({e.msg} at line {e.lineno})") from None
    cfg = from_dict(cls, values)
    validate(cfg)
    return cfg


def load_json_config(path: str, fix: str) -> dict:
    """A saved config.json; one that is not valid JSON is a one-line ConfigError ending with `fix`."""
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"config file {path} is not valid JSON ({e.msg} at line {e.lineno}); {fix}") from None


def saved_run_config(checkpoint: str) -> dict:
    """The config.json of the run that wrote `checkpoint` when it sits in that run's output directory, else {}."""
    path = os.path.join(os.path.dirname(os.path.abspath(checkpoint)), "config.json")
    if not os.path.exists(path):
        return {}
    return load_json_config(path, "fix or delete it and give the settings as flags")


def config_section(cls: type, saved: Mapping[str, Any], overrides: Any, flag: str) -> Any:
    """One config section of an evaluation command: its defaults, then what the run saved, then the command's
    `--flag` (a JSON object; unknown keys fail). A DataConfig's paths given in `--flag` are read, whole
    (`data_tools.config.settle_data`)."""
    from data_tools.config import DataConfig, settle_data
    if overrides is not None and not isinstance(overrides, Mapping):
        raise ConfigError(f"--{flag} must be a JSON object, e.g. --{flag}='{{\"key\": value}}', got {overrides!r}")
    defaults = to_dict(cls())
    cfg = from_dict(cls, merge(merge(defaults, saved), overrides or {}), prefix=flag)
    if isinstance(cfg, DataConfig):
        notes = settle_data(cfg, [("the defaults", _leaves(defaults)), ("the run's config.json", _leaves(saved)),
                                  (f"--{flag}", _leaves(overrides or {}))])
        for key, why in notes.items():
            _note(f"{flag}.{key} = {getattr(cfg, key)!r}: {why}")
    validate(cfg, flag)
    return cfg


def _note(msg: str) -> None:
    """A line on stderr from the first process only (engine.parallel.distributed is not imported here: no torch)."""
    if os.environ.get("RANK", "0") == "0":
        print(msg, file=sys.stderr, flush=True)


__all__ = ["CONFIG_KEY", "ConfigError", "load_config_file", "StageConfig", "config_section",
           "resolve_with_origins", "last_setter", "type_hints", "load_json_config",
           "describe", "saved_run_config", "OptimConfig", "ScheduleConfig", "RunConfig", "from_dict", "merge",
           "resolve", "to_dict", "flat_keys", "validate", "save_json", "load_json", "field", "key"]
