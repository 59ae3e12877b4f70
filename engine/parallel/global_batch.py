"""A resume keeps the global batch, micro_batch_size x grad_accum_steps x ranks, also on another number of ranks.

The global batch G sets the schedule's length (steps per epoch = samples // G, engine.loop.schedule) and where in each
epoch's order a step reads (data_tools.ffcv_loader.ShardPlan: step s reads [s*G, (s+1)*G)). A run resumed with
another G would continue a longer or shorter schedule from another place in the data. So:

- Record: at every start `fit` writes (rank 0) `<output_dir>/global_batch.json` beside config.json, with the
  micro-batch, accumulation and number of ranks that run trains with, and the accumulation it was asked for. The
  factors are written together, so G never mixes one start's accumulation with another's number of ranks (a
  checkpoint can be older than the last start). A run from before this file: config.json's micro x accum x the
  ranks that wrote its latest checkpoint (one RNG file each).
- Adjust: `keep_global_batch(run)`, which every stage calls after `dist_utils.init()` and before it builds its
  data source (which plans by G), sets grad_accum_steps to G / (micro x ranks) when that divides, with a note;
  otherwise it is a one-line ConfigError naming flags that keep G. A resume whose batch flags differ from those
  the saved run was asked for, with `--run.allow_config_change=true`, trains on with the new G, knowingly; the
  same flags (the same command on another number of ranks, or after an adjusted start) are always adjusted.
- Compare: `engine.storage.run_dir.check_resume` (inside `fit`) compares G rather than micro_batch_size and
  grad_accum_steps one by one (`resume_changes`), so an adjusted accumulation is no change of what is trained,
  and a `fit` caller that changes G without `keep_global_batch` gets a one-line error. config.json then records
  the accumulation that actually ran (the one it replaces goes to the config history).

Each step reads the same samples as in the saved run; which rank and micro-batch a sample lands in, and so its
augmentation draw (keyed by (seed, step, rank, micro)), can differ.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import Any

from engine.config.schema import ConfigError, RunConfig
from engine.parallel import distributed as dist_utils
from engine.storage.checkpoint import LATEST, CheckpointManager
from engine.storage.files import write_text_atomically

RECORD = "global_batch.json"
KEYS = ("run.micro_batch_size", "run.grad_accum_steps")   # compared through G on resume, not one by one
CHANGE = "global batch (run.micro_batch_size x run.grad_accum_steps x ranks)"   # its name in check_resume's list
REQUESTED = "requested_grad_accum_steps"   # set on the RunConfig by keep_global_batch when it adjusts


@dataclass(frozen=True)
class BatchRecord:
    micro_batch_size: int
    grad_accum_steps: int
    world_size: int
    requested_grad_accum_steps: int   # the accumulation the run was asked for, before any adjustment

    @property
    def global_batch(self) -> int:
        return self.micro_batch_size * self.grad_accum_steps * self.world_size

    def describe(self) -> str:
        return (f"{self.micro_batch_size} x {self.grad_accum_steps} x {self.world_size} "
                f"rank{'s' if self.world_size > 1 else ''}")


def current(run: RunConfig, world: int | None = None) -> BatchRecord:
    """What `run` trains with on `world` ranks (default: this process group's)."""
    world = dist_utils.world_size() if world is None else world
    requested = getattr(run, REQUESTED, run.grad_accum_steps)
    return BatchRecord(run.micro_batch_size, run.grad_accum_steps, world, requested)


def record(run: RunConfig, world: int | None = None) -> None:
    """Rank 0: write `<output_dir>/global_batch.json` for this start (atomically)."""
    if dist_utils.is_main():
        batch = current(run, world)
        write_text_atomically(os.path.join(run.output_dir, RECORD),
                              json.dumps({"global_batch": batch.global_batch, **asdict(batch)}, indent=2))


def _from_record(output_dir: str) -> BatchRecord | None:
    path = os.path.join(output_dir, RECORD)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            values = json.load(f)
        accum = int(values["grad_accum_steps"])
        return BatchRecord(int(values["micro_batch_size"]), accum, int(values["world_size"]),
                           int(values.get(REQUESTED, accum)))
    except (ValueError, KeyError, TypeError):   # torn or edited by hand: fall back to config.json + checkpoint
        dist_utils.log_main(f"{path} is unreadable; reading the saved global batch from config.json instead")
        return None


def _from_config_and_checkpoint(output_dir: str) -> BatchRecord | None:
    """A run from before `global_batch.json`: its config.json and the ranks that wrote its latest checkpoint."""
    try:
        with open(os.path.join(output_dir, "config.json")) as f:
            saved = json.load(f)
        manager = CheckpointManager(output_dir)
        tag = manager.latest_tag()
        world = manager.saved_world_size(tag) if tag else 0
    except (OSError, ValueError):   # no config.json, or an unreadable one (check_resume names it), no checkpoint
        return None
    values = saved.get("run", saved) if isinstance(saved, dict) else {}
    if not world or not isinstance(values, dict):
        return None
    defaults = RunConfig()
    micro = values.get("micro_batch_size", defaults.micro_batch_size)
    accum = values.get("grad_accum_steps", defaults.grad_accum_steps)
    if not all(isinstance(v, int) and v >= 1 for v in (micro, accum)):
        return None
    return BatchRecord(micro, accum, world, accum)


def saved_batch(output_dir: str) -> BatchRecord | None:
    """What the run in `output_dir` was trained with, or None when nothing says."""
    return _from_record(output_dir) or _from_config_and_checkpoint(output_dir)


def resuming(run: RunConfig) -> bool:
    """Whether `fit` will resume from a checkpoint in `run.output_dir`."""
    return run.resume and os.path.exists(os.path.join(run.output_dir, "checkpoints", LATEST))


def keeping_flags(global_batch: int, world: int, micro: int) -> str | None:
    """Flags that give `global_batch` on `world` ranks with the largest micro-batch up to `micro` (the memory the
    run was given), or None when `world` does not divide it."""
    if global_batch % world:
        return None
    per_rank = global_batch // world
    m = max(d for d in range(1, min(micro, per_rank) + 1) if per_rank % d == 0)
    return f"--run.micro_batch_size={m} --run.grad_accum_steps={per_rank // m}"


def _decide(run: RunConfig, world: int) -> tuple[int, str, str]:
    """(grad_accum_steps to run with, note, error) for resuming with `run` on `world` ranks."""
    accum = run.grad_accum_steps
    saved = saved_batch(run.output_dir) if resuming(run) else None
    now = current(run, world)
    if saved is None or now.global_batch == saved.global_batch:
        return accum, "", ""
    flags_changed = (run.micro_batch_size, accum) != (saved.micro_batch_size, saved.requested_grad_accum_steps)
    if flags_changed and run.allow_config_change:   # a new global batch, asked for (check_resume logs it)
        return accum, "", ""
    G, per_step = saved.global_batch, run.micro_batch_size * world
    if G % per_step == 0:
        note = (f"resuming {run.output_dir} on {world} rank{'s' if world > 1 else ''}: run.grad_accum_steps "
                f"{accum} -> {G // per_step} keeps the global batch of {G} (saved: {saved.describe()})")
        return G // per_step, note, ""
    if run.allow_config_change:   # the saved run's flags, and G cannot be kept: a new one, knowingly
        return accum, "", ""
    flags = keeping_flags(G, world, run.micro_batch_size)
    keep = (f"keep it with {flags}" if flags else
            f"no micro-batch splits it over {world} ranks: resume on {saved.world_size} "
            f"rank{'s' if saved.world_size > 1 else ''} to keep it")
    error = (f"resuming {run.output_dir} with a global batch of {now.global_batch} ({now.describe()}) instead of "
             f"the saved {G} ({saved.describe()}) would change the schedule and the data order; {keep}, or pass "
             f"--run.allow_config_change=true to train on with a global batch of {now.global_batch}")
    return accum, "", error


def keep_global_batch(run: RunConfig) -> None:
    """Collective, after `dist_utils.init()` and before the data source is built: on resume, set
    `run.grad_accum_steps` so that the global batch is the saved run's (see the module docstring).

    Raises:
        ConfigError: the saved global batch is not a multiple of micro_batch_size x ranks (one line, on every rank).
    """
    decision = ("", "", "")
    if dist_utils.is_main():   # rank 0 reads the run directory; every rank gets the same answer
        decision = _decide(run, dist_utils.world_size())
    accum, note, error = dist_utils.broadcast_object(decision)
    if error:
        raise ConfigError(error)
    if note:
        dist_utils.log_main(note)
        setattr(run, REQUESTED, getattr(run, REQUESTED, run.grad_accum_steps))
        run.grad_accum_steps = accum


def resume_changes(run: RunConfig, changes: list[tuple[str, Any, Any]]) -> list[tuple[str, Any, Any]]:
    """check_resume's list of changed keys, with micro_batch_size and grad_accum_steps replaced by the global
    batch they make on this many ranks (when the saved one is known)."""
    saved = saved_batch(run.output_dir)
    if saved is None:
        return changes
    kept = [c for c in changes if c[0] not in KEYS]
    now = current(run).global_batch
    return kept if now == saved.global_batch else [(CHANGE, saved.global_batch, now), *kept]
