"""The DeepSpeed JSON configs shipped with beitv2-ds (ZeRO stage, buckets, offload; see engine/parallel/ds_setup.py).

They install with the package, so `--run.ds_config=ds_configs/zero2.json` (what the recipes name) also works
from an installed copy run in any folder: a path that does not exist as given, but names one of these files by
`ds_configs/<file>` or by its bare file name, is read from here.
"""
from __future__ import annotations

import os

PACKAGED_DIR = os.path.dirname(os.path.abspath(__file__))


def packaged_names() -> list[str]:
    return sorted(f for f in os.listdir(PACKAGED_DIR) if f.endswith(".json"))


def resolve_path(path: str) -> str:
    """`path` itself when it exists, else the packaged config it names, else `path` (the caller reports it)."""
    if os.path.exists(path):
        return path
    name = os.path.basename(path)
    if os.path.normpath(path) in (name, os.path.join("ds_configs", name)):
        packaged = os.path.join(PACKAGED_DIR, name)
        if os.path.isfile(packaged):
            return packaged
    return path
