"""What a run reads and with which settings, said before it starts; `--dry_run` says it and stops.

Every train command resolves its config through `start_run`, which prints (first process only, on stderr):

- each split the run reads: source, file (or the built-in data), images used of images in the file, classes (from
  the `<file>.json` record `python -m data_tools.convert` writes beside a .beton), and why a count is capped;
- the resolved config: every key, `*` where it differs from the defaults, and where it was set (recipe, file,
  flag, or why `data_tools.config.settle_data` changed it).

A classifier's `num_classes` comes from the data's record unless the user set it, and a label the data holds at or
above it is a one-line error naming the file and the label (`check_labels`, shared with the evaluation commands).
With `--dry_run` it raises `DryRun` after printing: the command exits 0 without building a model (engine.config.cli).
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from dataclasses import dataclass
from typing import Any, Mapping

from data_tools.config import DataConfig
from engine.config.schema import ConfigError, flat_keys, resolve_with_origins, to_dict

DRY_RUN_KEY = "dry_run"   # a train command's `--dry_run`, taken out of its overrides like `--config`
TASKS = ("images", "classify", "segment")   # what the stage does with the data: pretrain on images, or labels


class DryRun(Exception):
    """`--dry_run`: the plan is printed and nothing else happens; `engine.config.cli.run_cli` prints `result`, exits
    0."""

    def __init__(self, result: dict):
        super().__init__("dry run")
        self.result = result


@dataclass
class Split:
    """One split a run reads: where from, how many images of how many, which classes."""
    split: str                       # train | eval
    source: str                      # fashion_mnist | beton | synthetic
    where: str                       # the file, or what the built-in data is
    images: int | None               # images the run uses
    in_file: int | None              # images in the file (None: generated)
    class_names: list | None = None
    num_classes: int | None = None   # the data's class count, when it is known
    max_label: int | None = None     # the largest class label the data holds, when it is known
    note: str = ""                   # why fewer images are used than there are

    def line(self) -> str:
        count = (f"{self.images} images" if self.in_file is None else
                 f"{self.images} of {self.in_file} images" + (f" ({self.note})" if self.note else ""))
        classes = ""
        if self.num_classes:
            names = self.class_names or []
            shown = ", ".join(map(str, names[:12])) + (", ..." if len(names) > 12 else "")
            classes = f", {self.num_classes} classes" + (f" ({shown})" if shown else "")
        return f"data {self.split}: {self.source} {self.where}: {count}{classes}"


def beton_record(path: str) -> dict:
    """The `<path>.json` record `python -m data_tools.convert` wrote beside a .beton ({} when there is none)."""
    try:
        with open(path + ".json", encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def record_classes(record: Mapping) -> tuple[list | None, int | None, int | None]:
    """(class names, class count, largest label) a convert record gives; None where it does not say."""
    names = record.get("class_names")
    names = list(names) if isinstance(names, list) and names else None
    counts = record.get("counts") if isinstance(record.get("counts"), dict) else {}
    labels = [names.index(k) if names and k in names else int(k) for k in counts
              if (names and k in names) or str(k).lstrip("-").isdigit()]
    max_label = max(labels) if labels else None
    count = record.get("num_classes")
    if not isinstance(count, int) or isinstance(count, bool):
        count = len(names) if names else (max_label + 1 if max_label is not None else None)
    return names, count, max_label


def _beton_samples(path: str, key: str) -> int:
    """The sample count in a .beton's header (24 bytes read); a missing or short file is a one-line error."""
    import numpy as np

    from engine.config.extras import require
    HeaderType = require("ffcv.types", f"data.{key} = {path} (a .beton file)").HeaderType

    try:
        with open(path, "rb") as f:
            raw = f.read(HeaderType.itemsize)
    except FileNotFoundError:
        raise ConfigError(f"config key 'data.{key}' = {path!r}: no such file; write a .beton with "
                          f"`beitv2 convert`") from None
    except IsADirectoryError:
        raise ConfigError(f"config key 'data.{key}' = {path!r} is a folder; give the .beton file") from None
    except OSError as e:
        raise ConfigError(f"config key 'data.{key}' = {path!r}: cannot read it ({e.strerror or e})") from None
    if len(raw) < HeaderType.itemsize:
        raise ConfigError(f"{path} is not a .beton ({len(raw)} bytes); write one with `beitv2 convert`")
    return int(np.frombuffer(raw, HeaderType, count=1)[0]["num_samples"])


def _used(in_file: int, limit: int, key: str, origins: Mapping[str, str]) -> tuple[int, str]:
    used = min(limit, in_file) if limit else in_file
    note = f"data.{key}={limit}, {origins.get(f'data.{key}', 'the defaults')}" if used < in_file else ""
    return used, note


def data_split(data: DataConfig, split: str, task: str = "images", origins: Mapping[str, str] = {}) -> Split:
    """What `split` (train | eval) of `data` is, as the stage reads it (`data_tools.sources`), without reading
    any image: counts from the .beton's header or the built-in files, classes from convert's record."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    train = split == "train"
    limit_key = "limit" if train else "eval_images"
    limit = getattr(data, limit_key)
    if data.source == "beton":
        key = "train_path" if train else "eval_path"
        path = getattr(data, key)
        if not path:
            why = "" if train else "; the run evaluates on it at the end"
            raise ConfigError(f"config key 'data.{key}' is required with data.source=beton (a .beton from "
                              f"`beitv2 convert`){why}")
        in_file = _beton_samples(path, key)
        used, note = _used(in_file, limit, limit_key, origins)
        names, count, max_label = record_classes(beton_record(path))
        return Split(split, "beton", os.path.abspath(path), used, in_file, names, count, max_label, note)
    if task == "segment":   # in-memory mosaics (data_tools.sources.segmentation_arrays), or random label maps
        from data_tools.mosaics import CLASS_NAMES
        n = (limit or 2000) if train else (limit or 200)
        if data.source == "synthetic":
            return Split(split, "synthetic", "random pixels and label maps", n, None, None, 12, 11)
        return Split(split, "fashion_mnist", f"mosaics (built in, {'training' if train else 'validation'})", n,
                     None, list(CLASS_NAMES), len(CLASS_NAMES), len(CLASS_NAMES) - 1)
    if data.source == "synthetic":
        n = (limit or 2048) if train else (limit or 256)
        return Split(split, "synthetic", "random images", n, None, None, 10, min(n, 10) - 1)
    from data_tools.fashion_mnist import CLASS_NAMES, DATA_DIR, FILES, read_idx
    labels_file = os.path.join(DATA_DIR, FILES["train" if train else "test"][1])
    try:
        in_file = len(read_idx(labels_file))
    except (OSError, ValueError):   # not installed: the stage's own loader says how to install it
        in_file = 60000 if train else 10000
    used, note = _used(in_file, limit, limit_key, origins)
    return Split(split, "fashion_mnist", f"{'training' if train else 'test'} split (built in)", used, in_file,
                 list(CLASS_NAMES), len(CLASS_NAMES), len(CLASS_NAMES) - 1, note)


def check_labels(splits: list[Split], num_classes: int, where: str) -> None:
    """A label the data holds at or above `num_classes` is a one-line error naming the file and the label.
    `where`: what set num_classes (for the message)."""
    for s in splits:
        if s.max_label is not None and s.max_label >= num_classes:
            raise ConfigError(f"{s.where}: label {s.max_label} is outside num_classes={num_classes} ({where}); "
                              f"set num_classes to at least {s.max_label + 1} (the data's classes)")


def config_lines(cfg: Any, origins: Mapping[str, str]) -> list[str]:
    """Every key of `cfg`, `*` where its value differs from the defaults, and where it was set."""
    defaults = flat_keys(to_dict(type(cfg)()))
    values = flat_keys(to_dict(cfg))
    lines = ["config (* differs from the defaults; where it was set):"]
    for key, value in values.items():
        mark = "*" if value != defaults.get(key) else " "
        origin = f"   [{origins[key]}]" if key in origins else ""
        lines.append(f"  {mark} {key} = {json.dumps(value)}{origin}")
    return lines


def _log(lines: list[str]) -> None:
    if os.environ.get("RANK", "0") == "0":   # before the process group: the launcher's rank
        print("\n".join(lines), file=sys.stderr, flush=True)


def start_run(cls: type, recipes: Mapping[str, Mapping[str, Any]], recipe: str | None,
              overrides: Mapping[str, Any], task: str = "images") -> Any:
    """A train command's config (`engine.config.schema.resolve`), said before anything is built: the data each split
    reads and the resolved config (module doc). `task`: `images` (pretraining: the training split), `classify`
    (also the held-out split, and `num_classes` from the data unless set) or `segment` (both splits).

    Raises:
        DryRun: `--dry_run` was given; its `result` is the plan.
    """
    overrides = dict(overrides)
    dry_run = overrides.pop(DRY_RUN_KEY, False)
    if not isinstance(dry_run, bool):
        raise ConfigError(f"--{DRY_RUN_KEY} must be true or false, got {dry_run!r}")
    cfg, origins = resolve_with_origins(cls, recipes, recipe, overrides)
    splits = [data_split(cfg.data, s, task, origins) for s in (("train",) if task == "images" else ("train", "eval"))]
    if task == "classify":
        data_classes = splits[0].num_classes
        if "num_classes" not in origins or origins["num_classes"].startswith("recipe"):
            if data_classes and data_classes >= 2 and data_classes != cfg.num_classes:
                cfg.num_classes = data_classes
                origins["num_classes"] = f"the data: {splits[0].where}"
        check_labels(splits, cfg.num_classes, origins.get("num_classes", "the default"))
    _log([s.line() for s in splits] + config_lines(cfg, origins))
    from engine.loop.guards import requeue_on_signal   # imports torch, which the plan alone does not need
    requeue_on_signal(cfg.run.requeue)
    if dry_run:
        raise DryRun({"dry_run": True, "data": [dataclasses.asdict(s) for s in splits],
                      "config": to_dict(cfg), "origins": dict(sorted(origins.items()))})
    return cfg


__all__ = ["DRY_RUN_KEY", "DryRun", "Split", "beton_record", "check_labels", "config_lines", "data_split",
           "record_classes", "start_run"]
