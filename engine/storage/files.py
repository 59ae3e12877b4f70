"""Atomic file writes: the files a run or a tool leaves behind (checkpoint RNG states and `latest`, weights, configs,
the metrics file when a resume rewrites it, .beton files, reports) are written under a temporary name, flushed to
disk and renamed, so a reader, or a run resumed after a crash, sees the old file or the whole new one, never half
of one. (Per-step metric rows are appended; a row torn by a kill is dropped on resume, see engine.reporting.metrics.)"""
from __future__ import annotations

import errno
import json
import math
import os
import re
from typing import Any, Callable

# How Rust's I/O errors end (safetensors writes in Rust and raises its own SafetensorError, not OSError).
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")
# What torch.save's zip writer (C++) raises, as a RuntimeError without an errno, when a write comes up short.
_TORCH_WRITE_FAILED = ("PytorchStreamWriter failed", "unexpected pos", "file write failed")


class OutputPathError(ValueError):
    """A file cannot be written where it was asked for (no such folder, no permission, disk full): one line."""


def write_atomically(path: str | os.PathLike, write: Callable[[str], object]) -> None:
    """`write(tmp)` to a temporary name beside `path`, fsync it, then rename it to `path` (parents are made).

    Raises:
        OutputPathError: the folder cannot be made or the file cannot be written (the old file, if any, is kept).
    """
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        _write_reporting_os_errors(write, tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as e:
        raise OutputPathError(f"cannot write {path} ({e.strerror or e}); pick a writable location") from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _write_reporting_os_errors(write: Callable[[str], object], tmp: str) -> None:
    """`write(tmp)`; a writer in native code that reports a failed write (disk full, read-only file system) in
    an exception of its own raises it as the OSError it is."""
    try:
        write(tmp)
    except OSError:
        raise
    except Exception as e:
        match = _RUST_OS_ERROR.search(str(e))
        if match is not None:
            code = int(match.group(1))
        elif any(marker in str(e) for marker in _TORCH_WRITE_FAILED):
            code = _why_a_write_came_up_short(tmp)
        else:
            raise
        raise OSError(code, os.strerror(code)) from e


def _why_a_write_came_up_short(tmp: str) -> int:
    """The errno torch's writer did not report: a full disk when (almost) nothing is left where `tmp` was being
    written (the half-written file still holds its space), else a plain I/O error."""
    try:
        stats = os.statvfs(os.path.dirname(os.path.abspath(tmp)))
    except OSError:
        return errno.EIO
    return errno.ENOSPC if stats.f_bavail * stats.f_frsize < 2 ** 20 else errno.EIO


def write_text_atomically(path: str | os.PathLike, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)
    write_atomically(path, write)


def finite_json(value: Any, where: str = "") -> tuple[Any, list[str]]:
    """`value` with every float that is not finite (NaN, inf) replaced by None, and the keys it was under (dotted,
    `loss`, `ema.top1`, `history.3.loss`): strict JSON has no NaN, and `json.dumps` would write one that most
    readers refuse."""
    if isinstance(value, float) and not math.isfinite(value):
        return None, [where or "(value)"]
    if isinstance(value, dict):
        items = [(k, finite_json(v, f"{where}.{k}" if where else str(k))) for k, v in value.items()]
        return {k: v for k, (v, _) in items}, [p for _, (_, paths) in items for p in paths]
    if isinstance(value, (list, tuple)):
        items = [finite_json(v, f"{where}.{i}" if where else str(i)) for i, v in enumerate(value)]
        return [v for v, _ in items], [p for _, paths in items for p in paths]
    return value, []


def json_text(value: Any, **kwargs: Any) -> str:
    """`json.dumps(value)` as strict JSON: non-finite floats become null (see `finite_json`)."""
    return json.dumps(finite_json(value)[0], allow_nan=False, **kwargs)


def writable_parent_problem(path: str) -> str:
    """'' when the folder that will hold `path` exists (created if needed) and is writable, else why not (one line,
    naming the folder and what to do)."""
    parent = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        return f"cannot create the output folder {parent} ({e.strerror}); pick a writable path"
    if not os.access(parent, os.W_OK):
        return f"{parent} is not writable; pick another output path"
    return ""
