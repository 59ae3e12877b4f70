"""Iteration-level checkpoints on top of DeepSpeed's own save/load, made atomic and resumable.

Layout under `<output_dir>/checkpoints`: one folder per saved step (`step_00000120/`, written by DeepSpeed, plus
one `rng_rank<r>.pt` per rank) and a `latest` file naming the newest complete one. `latest` is replaced with a
rename only after every rank has finished writing, so a run killed mid-save resumes from the previous step;
incomplete folders and folders beyond `keep_last` are removed by the next save.
"""
from __future__ import annotations

import os
import random
import shutil
from functools import partial

import numpy as np
import torch

from engine import distributed as dist_utils
from engine.files import write_atomically, write_text_atomically

LATEST = "latest"


def _tag(step: int) -> str:
    return f"step_{step:08d}"


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
        complete = [t for t in tags if t <= keep]
        stale = complete[:-self.keep_last] + [t for t in tags if t > keep]  # old ones, and leftovers of a killed save
        for t in stale:
            shutil.rmtree(os.path.join(self.dir, t), ignore_errors=True)

    def load(self, engine) -> dict | None:
        """Collective. Restores model, optimizer and this rank's RNG; returns the client state or None."""
        tag = self.latest_tag()
        if tag is None:
            return None
        folder = os.path.join(self.dir, tag)
        saved_world = sum(f.startswith("rng_rank") for f in os.listdir(folder))   # one file per rank that saved
        try:
            _, client_state = engine.load_checkpoint(self.dir, tag=tag, load_optimizer_states=True,
                                                     load_lr_scheduler_states=False)
        except Exception as e:   # noqa: BLE001 - another model, ZeRO layout, optimizer or number of ranks
            if saved_world and saved_world != dist_utils.world_size():
                raise ValueError(f"checkpoint {folder} was written by {saved_world} ranks and this run has "
                                 f"{dist_utils.world_size()}; sharded optimizer states do not re-split: resume with "
                                 f"{saved_world} ranks, or start over with --run.resume=false") from None
            if not isinstance(e, (RuntimeError, KeyError, AssertionError, ValueError)):
                raise
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"checkpoint {folder} does not fit this run ({first[:200]}); "
                             f"use a new --run.output_dir, or --run.resume=false to start over") from None
        if client_state is None:
            raise ValueError(f"could not load checkpoint {folder}; it may be from another "
                             f"model or ZeRO layout: start a new output_dir or pass --run.resume=false")
        rng_path = os.path.join(folder, f"rng_rank{dist_utils.rank()}.pt")
        if os.path.exists(rng_path):
            set_rng_state(torch.load(rng_path, weights_only=True))
        return client_state
