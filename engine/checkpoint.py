"""Iteration-level checkpoints on top of DeepSpeed's own save/load, made atomic and resumable.

Layout under `<output_dir>/checkpoints`: one folder per saved step (`step_00000120/`, written by DeepSpeed, plus
one `rng_rank<r>.pt` per rank) and a `latest` file naming the newest complete one. `latest` is replaced with a
rename only after every rank has finished writing, so a run killed mid-save resumes from the previous step;
incomplete folders and folders beyond `keep_last` are removed by the next save.

A run resumed on another number of ranks re-splits sharded optimizer states through DeepSpeed's universal
checkpoint: rank 0 converts the latest checkpoint once into `<tag>_universal/` (removed by the next save), and
the engine loads that with `checkpoint.load_universal`.
"""
from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
from functools import partial

import numpy as np
import torch

from engine import distributed as dist_utils
from engine.files import write_atomically, write_text_atomically

LATEST = "latest"
UNIVERSAL = "_universal"


def _tag(step: int) -> str:
    return f"step_{step:08d}"


def _to_universal(folder: str, target: str) -> str:
    """DeepSpeed's converter from `folder` into `target` (written under a temporary name, then renamed);
    returns "" or the converter's last line of output as the reason it failed."""
    tmp = target + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    workers = str(max(1, min(4, os.cpu_count() or 1)))
    # `inject_missing_state`: the converter expects Megatron-DeepSpeed's parallelism record; a plain model has none.
    proc = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", folder,
                           "--output_folder", tmp, "--num_extract_workers", workers, "--num_merge_workers", workers,
                           "--inject_missing_state"], capture_output=True, text=True)
    if proc.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        return lines[-1] if lines else f"exit status {proc.returncode}"
    os.replace(tmp, target)
    stray = os.path.join(os.path.dirname(target), "latest_universal")   # the converter's pointer; ours is `latest`
    if os.path.exists(stray):
        os.remove(stray)
    return ""


def _repair_stage3_universal_load(optimizer: torch.optim.Optimizer, folder: str) -> None:
    """DeepSpeed's stage-3 universal loader (0.19.8) copies the first parameter group's hyper-parameters (here
    `wd_scale`, so no-decay parameters would decay) to every group and gives all groups one shared `step` tensor,
    which fused AdamW then advances once per group per step. Put back each group's own values and counters."""
    saved = torch.load(os.path.join(folder, "zero", "optimizer_state.pt"), weights_only=False)
    groups = saved["optimizer_state_dict"]["param_groups"]
    if len(groups) != len(optimizer.param_groups):
        raise ValueError(f"{folder}: {len(groups)} saved optimizer groups for {len(optimizer.param_groups)} "
                         f"here; resume with the number of ranks that wrote it, or --run.resume=false")
    for group, saved_group in zip(optimizer.param_groups, groups):
        group.update({k: v for k, v in saved_group.items() if k != "params"})
    for state in optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def rng_state() -> dict:
    """RNG states as tensors and plain Python values, so they load with `weights_only=True`."""
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                       "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached": float(np_state[4])}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class CheckpointManager:
    def __init__(self, output_dir: str, keep_last: int = 2):
        self.dir = os.path.join(output_dir, "checkpoints")
        self.keep_last = keep_last

    def latest_tag(self) -> str | None:
        path = os.path.join(self.dir, LATEST)
        if not os.path.exists(path):
            return None
        with open(path) as f:
            tag = f.read().strip()
        if not os.path.isdir(os.path.join(self.dir, tag)):
            raise FileNotFoundError(f"{path} names checkpoint '{tag}', which is missing; delete {path} to start "
                                    f"over or restore the folder")
        return tag

    def saved_world_size(self, tag: str) -> int:
        """Ranks that wrote checkpoint `tag` (each writes one RNG file); 0 if unknown."""
        return sum(f.startswith("rng_rank") for f in os.listdir(os.path.join(self.dir, tag)))

    def needs_resplit(self, world_size: int) -> bool:
        """Collective. Whether the latest checkpoint holds optimizer states sharded over another number of
        ranks; if so it is converted (once, by rank 0) to DeepSpeed's universal format for `load(universal=True)`
        and the engine must be built with `checkpoint.load_universal`."""
        tag = self.latest_tag()
        if tag is None:
            return False
        folder = os.path.join(self.dir, tag)
        saved = self.saved_world_size(tag)
        sharded = any("zero_pp_rank" in f and f.endswith("optim_states.pt") for f in os.listdir(folder))
        if not saved or saved == world_size or not sharded:
            return False
        target = folder + UNIVERSAL
        error = ""
        if dist_utils.is_main() and not os.path.isdir(target):
            dist_utils.log_main(f"re-splitting {folder} from {saved} to {world_size} ranks (universal checkpoint)")
            error = _to_universal(folder, target)
        error = dist_utils.broadcast_object(error)
        if error:
            raise ValueError(f"checkpoint {folder} was written by {saved} ranks and this run has {world_size}; "
                             f"re-splitting it failed ({error[:200]}): resume with {saved} ranks, or start over "
                             f"with --run.resume=false")
        return True

    def save(self, engine, step: int, client_state: dict) -> str:
        """Collective: every rank calls it. Returns the tag written."""
        tag = _tag(step)
        os.makedirs(self.dir, exist_ok=True)
        engine.save_checkpoint(self.dir, tag=tag, client_state=dict(client_state, step=step), save_latest=False)
        write_atomically(os.path.join(self.dir, tag, f"rng_rank{dist_utils.rank()}.pt"),
                         partial(torch.save, rng_state()))
        dist_utils.barrier()
        if dist_utils.is_main():
            write_text_atomically(os.path.join(self.dir, LATEST), tag)
            self._prune(keep=tag)
        dist_utils.barrier()
        return tag

    def _prune(self, keep: str) -> None:
        tags = sorted(d for d in os.listdir(self.dir) if d.startswith("step_") and os.path.isdir(
            os.path.join(self.dir, d)))
        resplit = [t for t in tags if UNIVERSAL in t]   # served one resume; the new checkpoint supersedes them
        tags = [t for t in tags if UNIVERSAL not in t]
        complete = [t for t in tags if t <= keep]
        stale = resplit + complete[:-self.keep_last] + [t for t in tags if t > keep]  # + leftovers of a killed save
        for t in stale:
            shutil.rmtree(os.path.join(self.dir, t), ignore_errors=True)

    def load(self, engine, universal: bool = False) -> dict | None:
        """Collective. Restores model, optimizer and this rank's RNG; returns the client state or None.
        `universal`: load the re-split copy that `needs_resplit` made (the engine was built for it)."""
        tag = self.latest_tag()
        if tag is None:
            return None
        folder = os.path.join(self.dir, tag)
        saved_world = self.saved_world_size(tag)
        try:
            _, client_state = engine.load_checkpoint(self.dir, tag=tag + UNIVERSAL if universal else tag,
                                                     load_optimizer_states=True, load_lr_scheduler_states=False)
        except Exception as e:   # noqa: BLE001 - another model, ZeRO layout, optimizer or number of ranks
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if saved_world and saved_world != dist_utils.world_size():
                raise ValueError(f"checkpoint {folder} was written by {saved_world} ranks and does not load on "
                                 f"{dist_utils.world_size()} ({first[:200]}): resume with {saved_world} ranks, or "
                                 f"start over with --run.resume=false") from None
            if not isinstance(e, (RuntimeError, KeyError, AssertionError, ValueError)):
                raise
            raise ValueError(f"checkpoint {folder} does not fit this run ({first[:200]}); "
                             f"use a new --run.output_dir, or --run.resume=false to start over") from None
        if client_state is None:
            raise ValueError(f"could not load checkpoint {folder}; it may be from another "
                             f"model or ZeRO layout: start a new output_dir or pass --run.resume=false")
        if universal and engine.zero_optimization_stage() == 3:
            _repair_stage3_universal_load(engine.optimizer.optimizer, folder + UNIVERSAL)
        rng_path = os.path.join(folder, f"rng_rank{dist_utils.rank()}.pt")
        if os.path.exists(rng_path):
            set_rng_state(torch.load(rng_path, weights_only=True))
        return client_state
