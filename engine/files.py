"""Atomic file writes: every file a run or a tool leaves behind (checkpoints, weights, configs, metrics, .beton
files) is written under a temporary name, flushed to disk and renamed, so a reader, or a run resumed after a crash,
sees the old file or the whole new one, never half of one."""
from __future__ import annotations

import os
from typing import Callable


def write_atomically(path: str | os.PathLike, write: Callable[[str], object]) -> None:
    """`write(tmp)` to a temporary name beside `path`, fsync it, then rename it to `path` (parents are made)."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text_atomically(path: str | os.PathLike, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)
    write_atomically(path, write)
