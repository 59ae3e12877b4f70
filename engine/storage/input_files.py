"""What the files a run reads at every step held when it began, so that a resume cannot continue on other content
under the same path.

The resume check (engine.storage.run_dir) compares settings, and a path is a setting: a .beton re-converted in place,
or a tokenizer retrained into the same folder, would pass it, and the run would go on from weights trained on the
old content as if nothing had changed. So rank 0 writes `<output_dir>/input_files.json` beside config.json: for the
training .beton (`data.train_path` with `data.source=beton`) and each key a stage names in
`StageConfig.read_while_training` (MIM's tokenizer, the tokenizer stage's teacher weights), the file's size and a
digest of its content:

- files up to `FULL_HASH_MAX` bytes: the sha256 of the whole file (a tokenizer of ViT-B size hashes in about a second);
- larger files: the sha256 of the size and the first and last `SAMPLE` bytes (a .beton's header, its sample table
  and its index sit at the ends, so a re-conversion changes them), plus the sha256 `data_tools.convert` recorded
  in `<file>.json` when there is one; hashing 150 GB at every start would cost minutes.

A resume recomputes them; any difference is a one-line ConfigError unless `run.allow_config_change` is set (then the
record is rewritten). Files a run reads only once (an init checkpoint, which the resumed checkpoint replaces) or only
to evaluate (`data.eval_path`) are not recorded: other content there does not change what is trained. A run whose
output folder has no record (made before the record existed) resumes without this check.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from data_tools.beton_check import BetonIntegrityError, file_sha256, recorded_sha256
from engine.config.schema import flat_keys, to_dict
from engine.storage.files import write_text_atomically

RECORD = "input_files.json"
FULL_HASH_MAX = 1 << 30   # bytes: above this only the ends are hashed
SAMPLE = 8 << 20          # bytes read at each end of a large file


def read_while_training(cfg: Any) -> dict[str, str]:
    """Config key -> path of every file `cfg`'s run reads at every training step (empty paths left out)."""
    flat = flat_keys(to_dict(cfg))
    keys = list(getattr(cfg, "read_while_training", ()))
    if flat.get("data.source") == "beton":
        keys.insert(0, "data.train_path")
    return {k: flat[k] for k in keys if isinstance(flat.get(k), str) and flat[k]}


def _hash_ends(path: str, size: int) -> str:
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(SAMPLE))
        f.seek(max(size - SAMPLE, 0))
        h.update(f.read(SAMPLE))
    return h.hexdigest()


def _recorded_sha256(path: str) -> str | None:
    try:
        return recorded_sha256(path)
    except BetonIntegrityError:   # no record beside the file (not made by data_tools.convert), or none readable
        return None


def fingerprint(path: str) -> dict:
    """{"size", "sha256"} of a file up to FULL_HASH_MAX bytes; {"size", "ends_sha256", "recorded_sha256"?} of a larger
    one; {"missing": true} when there is no such file, {"unreadable": true} when it cannot be read (the stage itself
    says so when it opens it)."""
    try:
        st = os.stat(path)
    except OSError:
        return {"missing": True}
    if not os.path.isfile(path):
        return {"missing": True}
    # Hashed afresh each time (twice per start, under 1 GiB each: a few seconds). finetune.feature_cache.file_digest
    # memoises full digests by inode, size, mtime and ctime; for a run folder that would still hash a 150 GB .beton
    # in full once per new run, which the ends avoid.
    try:
        if st.st_size <= FULL_HASH_MAX:
            return {"size": st.st_size, "sha256": file_sha256(path)}
        found = {"size": st.st_size, "ends_sha256": _hash_ends(path, st.st_size)}
    except OSError:   # unreadable (permissions): the stage names it when it opens it, not the resume check
        return {"unreadable": True}
    recorded = _recorded_sha256(path)
    if recorded:
        found["recorded_sha256"] = recorded
    return found


def record_input_files(cfg: Any, output_dir: str) -> None:
    """Write `<output_dir>/input_files.json` (atomically) for the files `cfg`'s run reads while training."""
    files = {key: {"path": path, **fingerprint(path)} for key, path in read_while_training(cfg).items()}
    write_text_atomically(os.path.join(output_dir, RECORD), json.dumps(files, indent=2, sort_keys=True) + "\n")


def _why(before: dict, now: dict) -> str:
    if now.get("unreadable") or before.get("unreadable"):   # nothing to compare: the stage's error to give
        return ""
    if now.get("missing"):   # gone now; gone then too (a start allowed without it) is the stage's error to give
        return "" if before.get("missing") else "it is gone"
    if before.get("size") != now.get("size"):
        return f"size {before.get('size')} -> {now.get('size')} bytes"
    for digest in ("sha256", "recorded_sha256", "ends_sha256"):
        if digest in before and digest in now and before[digest] != now[digest]:
            return f"{digest} {before[digest][:12]}... -> {now[digest][:12]}..."
    return ""


def input_file_changes(cfg: Any, output_dir: str) -> list[str]:
    """'key (path): what differs' for every recorded file whose content is not what the run began with; [] when
    there is no record. Keys whose path itself changed are the config check's, not compared here."""
    try:
        with open(os.path.join(output_dir, RECORD)) as f:
            saved = json.load(f)
    except FileNotFoundError:
        return []
    except (OSError, ValueError):   # a damaged record: say so rather than resume unchecked
        return [f"{RECORD} is unreadable (delete it to resume without this check)"]
    changes = []
    for key, path in read_while_training(cfg).items():
        before = saved.get(key) if isinstance(saved, dict) else None
        if not isinstance(before, dict) or before.get("path") != path:
            continue
        why = _why(before, fingerprint(path))
        if why:
            changes.append(f"{key} ({path}): {why}")
    return changes
