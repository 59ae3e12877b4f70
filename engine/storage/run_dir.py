"""One training run per output directory, and resumes that cannot silently change what was trained.

Two runs pointed at one output directory would both run to the end: their rows interleave in `metrics.jsonl`, the
checkpoints and final weights come from whichever wrote last, and `config.json` names only one of them. A resume
with another seed or tokenizer would continue from weights trained with the old ones and rewrite `config.json` as if
the whole run had used the new. `claims_output_dir` wraps the engine's `fit` against both (and a stage whose run
writes files after `fit`, such as eval.json, holds `claimed_output_dir` around both):

- Lock: rank 0 holds an exclusive, non-blocking `flock` on `<output_dir>/.run.lock` for the whole of the claim
  (released on return and on exceptions) and writes into it who holds it (host, pid, start time, command line); a
  second run stops with a one-line error naming that holder. The kernel drops a flock when its process dies, so the
  file a killed run leaves does not block the next one. The file is written in place and never removed or renamed
  (either would let two runs hold locks on two different files). Only training takes it: evaluation and export
  only read a run directory, also while it trains. A filesystem without flock support (some network mounts) runs
  without the lock, with a note.
- Resume check: when a checkpoint is there and `run.resume` is set, the resolved config is compared with the saved
  `config.json`. Any difference outside `HARMLESS` (and the stage's
  `harmless_on_resume`) is a one-line error listing the first keys with old -> new,
  unless `run.allow_config_change=true` says the change is meant. A key missing from the saved config (added to the
  code since that run began) is compared with its default. The batch is compared as the global batch (micro x
  accum x ranks, engine.parallel.global_batch): a resume on another number of ranks re-splits the checkpoint
  (engine.storage.checkpoint) and passes when the stage kept the global batch by adjusting the accumulation.
  With the settings equal, the files the run reads at every step (its training .beton, MIM's tokenizer, the
  teacher's weights) must still hold what they held when it began (engine.storage.input_files), on the same terms.
- History: before `config.json` is replaced by a different config (a resume with an allowed change, or a run that
  starts over), the old one is appended to `<output_dir>/config_history.jsonl` as one JSON line
  `{"resumed_at_step": <the new config's first step; 0 when the run started over>, "replaced_utc": ..., "config":
  <old>}`, oldest first. Both files are rewritten atomically (engine.storage.files).

Rank 0 decides and one broadcast gives every rank the outcome, so no rank waits for a run that will not start.
"""
from __future__ import annotations

import contextlib
import datetime
import fcntl
import functools
import json
import os
import shlex
import socket
import sys
from typing import Any, Callable

from engine.config.schema import ConfigError, flat_keys, load_json_config, save_json, to_dict
from engine.parallel import distributed as dist_utils
from engine.parallel.global_batch import resume_changes
from engine.storage.checkpoint import LATEST
from engine.storage.files import write_text_atomically
from engine.storage.input_files import RECORD, input_file_changes, record_input_files

LOCK = ".run.lock"
HISTORY = "config_history.jsonl"
SHOWN = 3   # differing keys named in the error

# Keys a resume may change without --run.allow_config_change: they change how the run reports, saves, is computed
# or evaluated, not the weights it trains. Everything else (seed, arch, tokenizer, init, data, optimizer, schedule,
# precision, ds_config) must match the saved config; micro_batch_size and grad_accum_steps are compared through
# the global batch they make (engine.parallel.global_batch.resume_changes).
# Not here on purpose: data.os_cache, which switches FFCV to another (page-blocked) sample order.
HARMLESS = frozenset({
    "run.output_dir",                       # the same folder by definition, however it is spelled
    "run.log_interval", "run.progress_bar", "run.profile_steps", "run.report_to",
    "run.save_interval", "run.keep_last", "run.save_final",
    "run.resume", "run.allow_config_change",
    "run.max_nonfinite_steps",              # when a diverging run stops, not what a healthy one computes
    "run.preempt_signal", "run.requeue", "run.stop_before_end_s", "run.time_limit_s",   # when a run is stopped
    "run.compile", "run.compile_mode", "run.grad_checkpointing",   # the same function, faster
    "run.shard_frozen",                     # the same codes/teacher features, memory vs one all-gather a step
    "data.num_workers",                     # loader processes; the sample order is planned in the main process
    "data.verify",                          # checks the .beton's sha256 before training, reads the same samples
    "data.eval_images", "data.eval_path",   # evaluation after training only
})   # and each stage's own (StageConfig.harmless_on_resume)


def _holder() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "started_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "command": shlex.join(sys.argv)}


def _describe_holder(text: str) -> str:
    try:
        h = json.loads(text)
        command = " ".join(h["command"].split())   # one line, also for `python -c '<script>'`
        command = command if len(command) <= 160 else command[:157] + "..."
        return f"pid {h['pid']} on {h['host']}, since {h['started_utc']}: {command}"
    except (ValueError, KeyError, TypeError):   # being written just now, or not ours
        return "holder unknown"


class RunLock:
    """An exclusive flock on `<output_dir>/.run.lock`, held from `acquire` to `release` (or the process's end)."""

    def __init__(self, output_dir: str):
        self.output_dir = output_dir
        self.path = os.path.join(output_dir, LOCK)
        self._fd: int | None = None

    def acquire(self) -> None:
        """Raises:
            ConfigError: another process holds it (one line naming the holder).
            OSError: the folder cannot be made or the file cannot be opened.
        """
        os.makedirs(self.output_dir, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe_holder(os.pread(fd, 4096, 0).decode(errors="replace"))
            os.close(fd)
            raise ConfigError(f"output directory {self.output_dir} is in use by another run ({holder}); wait for it "
                              f"to end, or use another --run.output_dir") from None
        except OSError as e:   # no flock on this filesystem
            os.close(fd)
            dist_utils.log_main(f"cannot lock {self.path} ({e.strerror or e}); running without the guard against "
                                f"a second run in this directory")
            return
        self._fd = fd
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(_holder()) + "\n").encode(), 0)

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)   # nobody holds it now; the empty file stays (see the module docstring)
            fcntl.flock(fd, fcntl.LOCK_UN)   # explicitly: a worker forked meanwhile shares the open file
        finally:
            os.close(fd)


def config_changes(saved: dict, cfg: Any, run: Any) -> list[tuple[str, Any, Any]]:
    """(key, saved value, new value) for every key of `cfg` whose value differs from `saved`, in config order.
    Keys are spelled as flags (`run.seed`), also when `cfg` is the RunConfig itself."""
    prefix = "run." if cfg is run else ""
    new, old = flat_keys(to_dict(cfg), prefix), flat_keys(saved, prefix)
    try:
        defaults = flat_keys(to_dict(type(cfg)()), prefix)
    except TypeError:   # a config class without defaults for every field
        defaults = {}
    missing = object()
    changes = []
    for key, value in new.items():
        before = old.get(key, defaults.get(key, missing))
        if before != value:
            changes.append((key, "(absent)" if before is missing else before, value))
    return changes


def _show(value: Any) -> str:
    text = value if value == "(absent)" else json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_resume(cfg: Any, run: Any) -> None:
    """Raises ConfigError when resuming from a checkpoint in `run.output_dir` with settings (outside `HARMLESS` and
    the stage's `harmless_on_resume`) that differ from its config.json, unless `run.allow_config_change` is set."""
    path = os.path.join(run.output_dir, "config.json")
    if not (run.resume and os.path.exists(os.path.join(run.output_dir, "checkpoints", LATEST))
            and os.path.exists(path)):
        return
    harmless = HARMLESS | getattr(cfg, "harmless_on_resume", frozenset())
    saved = load_json_config(path, "restore it, or delete it to resume without comparing settings")
    changed = resume_changes(run, [c for c in config_changes(saved, cfg, run) if c[0] not in harmless])
    if changed:
        shown = ", ".join(f"{key} {_show(old)} -> {_show(new)}" for key, old, new in changed[:SHOWN])
        more = f" (and {len(changed) - SHOWN} more)" if len(changed) > SHOWN else ""
        if run.allow_config_change:
            dist_utils.log_main(f"resuming {run.output_dir} with changed settings (allowed): {shown}{more}; the old "
                                f"config goes to {os.path.join(run.output_dir, HISTORY)}")
            return
        raise ConfigError(f"resuming {run.output_dir} with settings that change what is trained: {shown}{more} "
                          f"(saved in {path}); resume with the saved settings, pass --run.allow_config_change=true "
                          f"if the change is meant, or use another --run.output_dir")
    files = input_file_changes(cfg, run.output_dir)   # the same paths, other content (engine.storage.input_files)
    if not files:
        return
    shown = "; ".join(files[:SHOWN]) + (f" (and {len(files) - SHOWN} more)" if len(files) > SHOWN else "")
    if run.allow_config_change:
        dist_utils.log_main(f"resuming {run.output_dir} on changed input files (allowed): {shown}")
        return
    raise ConfigError(f"resuming {run.output_dir} on input files whose content changed since the run began: {shown} "
                      f"(recorded in {os.path.join(run.output_dir, RECORD)}); put back the files it began with, pass "
                      f"--run.allow_config_change=true if the change is meant, or use another --run.output_dir")


def save_config(cfg: Any, output_dir: str, step: int) -> None:
    """Rank 0: write `config.json` (a different one already there is first appended to the history file) and the
    record of the input files' content (engine.storage.input_files)."""
    if not dist_utils.is_main():
        return
    path = os.path.join(output_dir, "config.json")
    if os.path.exists(path):
        with open(path) as f:
            text = f.read()
        try:
            old = json.loads(text)
        except json.JSONDecodeError:
            old = {"unreadable_config_json": text}
        if old != to_dict(cfg):
            history = os.path.join(output_dir, HISTORY)
            lines = []
            if os.path.exists(history):
                with open(history) as f:
                    lines = f.read().splitlines()
            replaced = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
            lines.append(json.dumps({"resumed_at_step": step, "replaced_utc": replaced, "config": old},
                                    sort_keys=True))
            write_text_atomically(history, "\n".join(lines) + "\n")
    save_json(cfg, path)
    record_input_files(cfg, output_dir)


# Output folders this process holds the lock of: a stage that claims its folder for what it writes after `fit`
# (eval.json, EMA weights) runs `fit` inside its claim, and `fit` must not try to take the lock a second time.
_CLAIMED: set[str] = set()


@contextlib.contextmanager
def claimed_output_dir(cfg, run):
    """Hold the lock of `run.output_dir` (after the resume check) for the `with` body; nested claims of the same
    folder are free. Collective: every rank raises the same one-line ConfigError when the run cannot start."""
    key = os.path.realpath(run.output_dir)
    if key in _CLAIMED:
        yield
        return
    lock, error = RunLock(run.output_dir), ""
    if dist_utils.is_main():
        try:
            lock.acquire()
            check_resume(cfg, run)
        except ConfigError as e:
            error = str(e)
        except OSError as e:   # the folder cannot be made, or the lock file not opened
            error = f"cannot create {lock.path} ({e.strerror or e}); pick a writable --run.output_dir"
        except Exception as e:   # noqa: BLE001 - any failure on rank 0 must reach the other ranks, not hang them
            error = f"{type(e).__name__}: {e}"
        if error:
            lock.release()
    error = dist_utils.broadcast_object(error)
    if error:
        raise ConfigError(error)
    _CLAIMED.add(key)
    try:
        yield
    finally:
        _CLAIMED.discard(key)
        lock.release()


def claims_output_dir(fit: Callable) -> Callable:
    """`fit(cfg, run, ...)` inside `claimed_output_dir(cfg, run)`."""
    @functools.wraps(fit)
    def claimed(cfg, run, *args, **kwargs):
        with claimed_output_dir(cfg, run):
            return fit(cfg, run, *args, **kwargs)
    return claimed
