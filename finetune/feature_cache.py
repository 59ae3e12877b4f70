"""Where k-NN and the linear probe keep frozen features between runs (`--cache_dir`).

The folder of a feature kind is named by the *content* of what determines the features, never by paths, sizes or
modification times alone: the sha256 of the checkpoint file and of every .beton read, the arch, layer, pooling, data
settings, view and number of ranks. A .beton rewritten in place (new labels) or another checkpoint copied over the
old one (same size, even the same mtime) names another folder, so stale features are never reused.

Hashing a large .beton takes a while (1-2 GB/s), so each digest is remembered in `<cache_dir>/digests/` together
with the file's identity and change times (device, inode, size, mtime and ctime in ns): any write to the file, and
any `touch` or `cp -p` that restores its mtime, changes its ctime, which no user can set, and the file is hashed
again.

A `--cache_dir` that cannot be written (read-only, not a folder, full) is said in one line and the features are
computed in a temporary folder instead, unless every file needed is already there (a read-only cache is read).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from typing import Any

from data_tools.beton_check import file_sha256
from engine.parallel import distributed as dist_utils
from engine.storage.files import write_text_atomically


def _signature(path: str) -> list[int]:
    st = os.stat(path)
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def file_digest(path: str, cache_dir: str) -> str:
    """sha256 of the file at `path`, remembered under `cache_dir` for as long as the file is unchanged."""
    path = os.path.abspath(path)
    memo = os.path.join(cache_dir, "digests", hashlib.sha256(path.encode()).hexdigest()[:24] + ".json")
    signature = _signature(path)
    try:
        with open(memo) as f:
            record = json.load(f)
        if record["path"] == path and record["stat"] == signature and isinstance(record["sha256"], str):
            return record["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    digest = file_sha256(path)
    if _signature(path) == signature:   # not written to while it was read
        try:
            write_text_atomically(memo, json.dumps({"path": path, "stat": signature, "sha256": digest}))
        except (OSError, ValueError):     # a read-only cache: hashed again next time
            pass
    return digest


def cache_key(checkpoint: str, cache_dir: str, *, arch: str, seed: int, data: Any, settings: list) -> str:
    """The folder name of a feature kind: a hash of the checkpoint's content (or `random`, its arch and seed), of
    the content of the .beton files `data` reads, and of `settings` (JSON-able: kind, layer, pooling, data config,
    view, ranks)."""
    from engine.config.schema import to_dict
    model = ["random", arch, seed] if checkpoint == "random" else [file_digest(checkpoint, cache_dir), arch]
    files = [file_digest(p, cache_dir) if p else "" for p in (data.train_path, data.eval_path)] \
        if data.source == "beton" else []
    blob = json.dumps([model, files, to_dict(data), settings], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def usable_folder(cache_dir: str, key: str, ready: bool) -> str | None:
    """`<cache_dir>/<key>` when features can be kept there (or, `ready`, are all there already), else None after
    one line saying the features are computed without the cache."""
    folder = os.path.join(cache_dir, key)
    if ready:
        return folder
    probe = os.path.join(folder, f".probe{os.getpid()}")
    try:
        os.makedirs(folder, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"\0" * 65536)
            f.flush()
            os.fsync(f.fileno())
        os.remove(probe)
        return folder
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(probe)
        dist_utils.log_main(f"note: --cache_dir {cache_dir} cannot be written ({e.strerror or e}); computing the "
                            f"features without a cache")
        return None


__all__ = ["cache_key", "file_digest", "usable_folder"]
