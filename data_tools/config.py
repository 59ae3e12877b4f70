"""The data section of every stage's config (`data.*`, an evaluation command's `--data_cfg`): where the images come
from, and `settle_data`, which makes the data the user names the data a run reads (engine.config.schema.resolve and
config_section apply it)."""
from __future__ import annotations

from dataclasses import dataclass

from engine.config.schema import ConfigError, key, last_setter


@dataclass
class DataConfig:
    """Where images come from. A path given by the user (a flag, a --config file, --data_cfg) over a recipe's source
    switches the source to beton, and `limit`/`eval_images` cap a .beton only when set with its path or after it (a
    recipe's are for the built-in data): `settle_data`. Decoded batches are always checked for all-black images
    (data_tools.beton_check), which damaged JPEGs turn into."""
    source: str = key("fashion_mnist", "where images come from: Fashion-MNIST in memory (Debian's "
                      "dataset-fashion-mnist), an FFCV file, or random ones (benchmarks)",
                      choices=("fashion_mnist", "beton", "synthetic"))
    train_path: str = key("", "training .beton (data.source=beton)")
    eval_path: str = key("", "held-out .beton (data.source=beton)")
    limit: int = key(0, "train on the first N images only; 0: all", ge=0)
    eval_images: int = key(2000, "held-out images evaluated; 0: all", ge=0)
    num_workers: int = key(2, "loader worker processes", ge=0)
    os_cache: bool = key(True, "FFCV: read through the OS page cache (data that fits in RAM), else quasi-random order")
    verify: bool = key(False, "FFCV: compare each .beton's sha256 with its `data_tools.convert` record before "
                       "training (reads the whole file: minutes for 150 GB)")


def settle_data(data: DataConfig, layers: list[tuple[str, set[str]]]) -> dict[str, str]:
    """The user's data is the data: a `train_path`/`eval_path` given at a later layer than `source` (a flag over a
    recipe) switches the source to `beton`; a layer that sets both a path and another source is a one-line error.
    With a .beton, `limit`/`eval_images` cap a file only when set at its path's layer or later: a recipe's (or the
    defaults') are for the built-in data, and the file is read whole. `layers`: (name, keys it sets, relative to the
    data section), lowest priority first, the defaults at 0. Returns what changed, key -> why."""
    notes: dict[str, str] = {}
    given = [k for k in ("train_path", "eval_path") if getattr(data, k)]
    if not given:
        return notes
    path_layer = max(last_setter(layers, k) for k in given)
    source_layer = last_setter(layers, "source")
    if data.source != "beton" and path_layer >= source_layer:
        key = max(given, key=lambda k: last_setter(layers, k))
        if path_layer == source_layer:
            raise ConfigError(f"data.{key}={getattr(data, key)} and data.source={data.source} are both set by "
                              f"{layers[path_layer][0]}: a path is read with data.source=beton; drop data.source "
                              f"(or set it to beton)")
        notes["source"] = f"{layers[path_layer][0]}: beton, as data.{key} is given"
        data.source = "beton"
    if data.source == "beton":
        for limit, path in (("limit", "train_path"), ("eval_images", "eval_path")):
            layer = last_setter(layers, limit)
            if getattr(data, path) and getattr(data, limit) and layer < last_setter(layers, path):
                notes[limit] = (f"0 (all of {getattr(data, path)}): the {getattr(data, limit)} of "
                                f"{layers[layer][0]} is for the built-in data")
                setattr(data, limit, 0)
    return notes
