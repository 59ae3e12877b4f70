"""Iteration-level checkpoints on top of DeepSpeed's own save/load, made atomic and resumable.

Layout under `<output_dir>/checkpoints`: one folder per saved step (`step_00000120/`, written by DeepSpeed, plus
one `rng_rank<r>.pt` per rank) and a `latest` file naming the newest complete one. A save writes into a fresh
`.step_00000120.partial/` (a stale one, left by a save that was killed, is removed first); only after every rank has
finished does rank 0 rename it to `step_00000120/` and then replace `latest`, so a folder named `step_*` is always
whole and a run killed mid-save resumes from the previous step. Weights that are not finite are never saved (the run
stops with `TrainingDiverged`). Partial folders and folders beyond `keep_last` are removed by the next save.

On resume the newest checkpoint that loads wins: a damaged one (a torn shard, a corrupt RNG file) is reported and
the previous one kept by `keep_last` is loaded instead, with every rank agreeing on which; an empty or garbled
`latest` falls back to the newest `step_*` folder.

A run resumed on another number of ranks re-splits sharded optimizer states through DeepSpeed's universal
checkpoint: rank 0 converts the checkpoint once into `<tag>_universal/` (removed by the next save), and the engine
loads that with `checkpoint.load_universal`. (DeepSpeed's files do not record their folder's name: a renamed folder
loads, converts and consolidates like one written in place.)

Every file is read weights-only (`engine.storage.safe_load`), DeepSpeed's reads included: a checkpoint file holding
pickled objects other than weights stops the resume with a one-line error naming it (no fallback to an older checkpoint
of the same directory), and nothing in it runs.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
from functools import partial

import numpy as np
import torch

from engine.loop.guards import TrainingDiverged
from engine.parallel import distributed as dist_utils
from engine.storage.files import write_atomically, write_text_atomically
from engine.storage.safe_load import (REFUSED, UntrustedCheckpoint, deepspeed_loads_weights_only, load,
                                      load_deepspeed_file)

LATEST = "latest"
UNIVERSAL = "_universal"
TAG = re.compile(r"step_\d{8,}")
FITS = "does not fit this run ({}); use a new --run.output_dir, or --run.resume=false to start over"


def _tag(step: int) -> str:
    return f"step_{step:08d}"


def _step(tag: str) -> int:
    return int(tag[len("step_"):])


def _first_line(e: BaseException) -> str:
    if isinstance(e, UntrustedCheckpoint):   # already one line, naming the file
        return str(e)
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def _to_universal(folder: str, target: str) -> str:
    """DeepSpeed's converter from `folder` into `target` (written under a temporary name, then renamed);
    returns "" or the converter's last line of output as the reason it failed."""
    tmp = target + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    workers = str(max(1, min(4, os.cpu_count() or 1)))
    # Through `engine.storage.safe_load`: the converter's own loads would unpickle anything. `inject_missing_state`: the
    # converter expects Megatron-DeepSpeed's parallelism record; a plain model has none.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-m", "engine.storage.safe_load", "deepspeed.checkpoint.ds_to_universal",
                           "--input_folder", folder, "--output_folder", tmp, "--num_extract_workers", workers,
                           "--num_merge_workers", workers, "--inject_missing_state"],
                          capture_output=True, text=True, env=env)
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
    saved = load_deepspeed_file(os.path.join(folder, "zero", "optimizer_state.pt"))
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


def _weights_finite(engine) -> bool:
    """Collective: whether the weights every rank holds are finite (one all-reduce, one host read).

    Checks the module's parameters (under ZeRO-3 this rank's partition, `ds_tensor`; the parameter itself is empty)
    and the fp32 master partitions of DeepSpeed's ZeRO and bf16 optimizers."""
    device = dist_utils.current_device()
    tensors = [p if getattr(p, "ds_tensor", None) is None else p.ds_tensor for p in engine.module.parameters()]
    for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat", "fp32_groups_flat_partition"):
        tensors += [t for t in getattr(engine.optimizer, name, None) or () if torch.is_tensor(t)]
    bad = torch.zeros((), device=device)
    for t in tensors:
        if t.numel():
            bad += (~torch.isfinite(t)).any().to(device)
    return dist_utils.all_reduce_sum_(bad).item() == 0


def _agree(error: str) -> str:
    """Collective: "" when no rank has an error, else the error of the first rank that has one, on every rank."""
    flags = dist_utils.all_gather_cat(torch.tensor([float(bool(error))], device=dist_utils.current_device()))
    failed = flags.nonzero().flatten().tolist()
    return dist_utils.broadcast_object(error, src=int(failed[0])) if failed else ""


class CheckpointManager:
    def __init__(self, output_dir: str, keep_last: int = 2):
        self.dir = os.path.join(output_dir, "checkpoints")
        self.keep_last = keep_last
        self.loaded_tag: str | None = None   # the checkpoint `load` restored
        self._good: str | None = None        # the newest checkpoint this run loaded or saved
        self._failed: dict[str, tuple[str, str]] = {}   # tag -> (reason, error), checkpoints that cannot resume
        self._warned = False

    def _complete_tags(self) -> list[str]:
        """The published checkpoint folders, newest first (partial and re-split folders are not among them)."""
        if not os.path.isdir(self.dir):
            return []
        tags = [d for d in os.listdir(self.dir) if TAG.fullmatch(d) and os.path.isdir(os.path.join(self.dir, d))]
        return sorted(tags, key=_step, reverse=True)

    def latest_tag(self) -> str | None:
        path = os.path.join(self.dir, LATEST)
        if not os.path.exists(path):
            return None
        with open(path, errors="replace") as f:
            tag = f.read().strip()
        if not TAG.fullmatch(tag):   # empty or garbled: the newest published folder is the newest whole one
            complete = self._complete_tags()
            if not complete:
                raise FileNotFoundError(f"{path} is empty or garbled ({tag[:40]!r}) and {self.dir} holds no "
                                        f"checkpoint; delete {path} to start over")
            if not self._warned:
                dist_utils.log_main(f"{path} is empty or garbled ({tag[:40]!r}); using the newest checkpoint "
                                    f"folder, {complete[0]}")
                self._warned = True
            return complete[0]
        if not os.path.isdir(os.path.join(self.dir, tag)):
            raise FileNotFoundError(f"{path} names checkpoint '{tag}', which is missing; delete {path} to start "
                                    f"over or restore the folder")
        return tag

    def _candidates(self) -> list[str]:
        """What a resume tries, in order: the latest checkpoint, then the older ones that `keep_last` kept."""
        latest = self.latest_tag()
        if latest is None:
            return []
        return [latest] + [t for t in self._complete_tags() if _step(t) < _step(latest)]

    def saved_world_size(self, tag: str) -> int:
        """Ranks that wrote checkpoint `tag` (each writes one RNG file); 0 if unknown."""
        return sum(f.startswith("rng_rank") for f in os.listdir(os.path.join(self.dir, tag)))

    def _resplit(self, tag: str, world_size: int) -> str:
        """Collective: make the universal copy of `tag` (rank 0, once); "" or the reason it failed."""
        folder = os.path.join(self.dir, tag)
        error = ""
        if dist_utils.is_main() and not os.path.isdir(folder + UNIVERSAL):
            dist_utils.log_main(f"re-splitting {folder} from {self.saved_world_size(tag)} to {world_size} ranks "
                                f"(universal checkpoint)")
            error = _to_universal(folder, folder + UNIVERSAL)
        return dist_utils.broadcast_object(error)

    def _resplit_error(self, tag: str, world_size: int, error: str) -> tuple[str, str]:
        folder, saved = os.path.join(self.dir, tag), self.saved_world_size(tag)
        return (f"re-splitting it failed: {error[:200]}",
                f"checkpoint {folder} was written by {saved} ranks and this run has {world_size}; re-splitting it "
                f"failed ({error[:200]}): resume with {saved} ranks, or start over with --run.resume=false")

    def needs_resplit(self, world_size: int) -> bool:
        """Collective. Whether the checkpoint to resume from holds optimizer states sharded over another number of
        ranks; if so it is converted (once, by rank 0) to DeepSpeed's universal format for `load(universal=True)`
        and the engine must be built with `checkpoint.load_universal`. One whose conversion fails is passed over
        for the previous one."""
        for tag in self._candidates():
            folder = os.path.join(self.dir, tag)
            saved = self.saved_world_size(tag)
            sharded = any("zero_pp_rank" in f and f.endswith("optim_states.pt") for f in os.listdir(folder))
            if not saved or saved == world_size or not sharded:
                return False
            error = self._resplit(tag, world_size)
            if not error:
                return True
            if REFUSED in error:   # the converter's last line: one of its files holds pickled objects
                raise ValueError(error)
            self._failed[tag] = self._resplit_error(tag, world_size, error)
        if self._failed:
            raise ValueError(self._none_loads())
        return False

    def save(self, engine, step: int, client_state: dict) -> str:
        """Collective: every rank calls it. Returns the tag written.

        Raises:
            TrainingDiverged: the weights are not finite; nothing is written and `latest` stays where it was.
        """
        tag = _tag(step)
        work = f".{tag}.partial"   # every rank knows the name; a kill leaves it for the next save to remove
        if dist_utils.is_main():
            os.makedirs(self.dir, exist_ok=True)
            shutil.rmtree(os.path.join(self.dir, work), ignore_errors=True)
        # An all-reduce: no rank writes before rank 0 has removed what a killed save left.
        if not _weights_finite(engine):
            where = (f"resume from {os.path.join(self.dir, self._good)} (the last good checkpoint)" if self._good
                     else f"this run has no earlier checkpoint in {self.dir}: start over")
            raise TrainingDiverged(f"the weights are not finite at step {step}, so they were not saved; {where} "
                                   f"with a lower optim.lr or optim.grad_clip set")
        engine.save_checkpoint(self.dir, tag=work, client_state=dict(client_state, step=step), save_latest=False)
        write_atomically(os.path.join(self.dir, work, f"rng_rank{dist_utils.rank()}.pt"),
                         partial(torch.save, rng_state()))
        dist_utils.barrier()
        if dist_utils.is_main():
            self._publish(work, tag)
            write_text_atomically(os.path.join(self.dir, LATEST), tag)
            self._prune(keep=tag)
        dist_utils.barrier()
        self._good = tag
        return tag

    def _publish(self, work: str, tag: str) -> None:
        """Rename the finished `work` folder to `tag`. A `tag` folder already there is from an earlier run that
        was resumed from before it (killed after this step's save, or its checkpoint did not load): set aside."""
        folder, old = os.path.join(self.dir, tag), os.path.join(self.dir, f".{tag}.old")
        if os.path.exists(folder):
            shutil.rmtree(old, ignore_errors=True)
            os.replace(folder, old)
        os.replace(os.path.join(self.dir, work), folder)
        shutil.rmtree(old, ignore_errors=True)

    def _prune(self, keep: str) -> None:
        entries = os.listdir(self.dir)
        # Partial folders of killed saves (any step), folders set aside, and re-split copies, which served one
        # resume and are superseded by the new checkpoint.
        stale = [d for d in entries if d.startswith(".step_") or (d.startswith("step_") and UNIVERSAL in d)]
        tags = sorted(self._complete_tags(), key=_step)
        complete = [t for t in tags if _step(t) <= _step(keep)]
        stale += complete[:-self.keep_last] + [t for t in tags if _step(t) > _step(keep)]  # + a resume's leftovers
        for d in stale:
            shutil.rmtree(os.path.join(self.dir, d), ignore_errors=True)

    def load(self, engine, universal: bool = False) -> dict | None:
        """Collective. Restores model, optimizer and this rank's RNG; returns the client state or None.
        `universal`: load re-split copies (the engine was built for them, see `needs_resplit`).

        The newest checkpoint that loads on every rank wins; each one passed over is named on stderr. If none
        loads: a one-line ValueError about the newest."""
        candidates = self._candidates()
        rng_before = rng_state()
        for tag in candidates:
            if tag in self._failed:
                continue
            error, client_state = self._try_load(engine, tag, universal, rng_before)
            if error is None:
                for bad, (reason, _) in self._failed.items():
                    dist_utils.log_main(f"checkpoint {os.path.join(self.dir, bad)} does not load ({reason}); "
                                        f"resuming from the previous one, {os.path.join(self.dir, tag)}")
                self.loaded_tag = self._good = tag
                return client_state
            self._failed[tag] = error
        if self._failed:
            raise ValueError(self._none_loads())
        return None

    def _none_loads(self) -> str:
        newest, *older = sorted(self._failed, key=_step, reverse=True)
        message = self._failed[newest][1]
        return f"{message} (nor do the older {', '.join(older)})" if older else message

    def _try_load(self, engine, tag: str, universal: bool, rng_before: dict
                  ) -> tuple[tuple[str, str] | None, dict | None]:
        """Collective: `(None, client state)`, or `((reason, one-line error), None)` on every rank alike."""
        folder, world = os.path.join(self.dir, tag), dist_utils.world_size()
        if universal:
            error = self._resplit(tag, world)
            if error:
                return self._resplit_error(tag, world, error), None
        source = folder + UNIVERSAL if universal else folder
        # First every file is checked (each rank a share) and the ranks agree: damage must be found on every rank
        # alike before DeepSpeed's load, which at ZeRO-3 and from a re-split copy has collectives inside.
        error = _agree(self._damage(source, folder))
        _stop_if_refused(error)
        if error:
            return self._load_error(folder, error, "is damaged ({}); restore it, or start over with "
                                                   "--run.resume=false"), None
        error = self._stage_mismatch(folder, engine.zero_optimization_stage(), universal)
        if error:   # decided from file names and the config: every rank alike
            return (error.split(":")[0], error), None
        client_state, error = None, ""
        try:
            set_rng_state(rng_before)   # a checkpoint passed over may have set it
            with deepspeed_loads_weights_only():   # the files were checked above; this covers DeepSpeed's reads too
                _, client_state = engine.load_checkpoint(self.dir, tag=os.path.basename(source),
                                                         load_optimizer_states=True, load_lr_scheduler_states=False)
        except Exception as e:   # noqa: BLE001 - another model, ZeRO layout, optimizer or number of ranks
            error = _first_line(e)
            if universal or engine.zero_optimization_stage() == 3:
                # The other ranks may wait inside DeepSpeed's collectives, where no agreement reaches them: this
                # rank stops the run (theirs fail as its connections close), as it did before fallbacks existed.
                _stop_if_refused(error)
                raise ValueError(self._load_error(folder, error, FITS)[1]) from None
        if not error:
            try:
                if client_state is None:
                    raise ValueError("DeepSpeed found no model states in it")
                if universal and engine.zero_optimization_stage() == 3:
                    _repair_stage3_universal_load(engine.optimizer.optimizer, source)
                rng_path = os.path.join(folder, f"rng_rank{dist_utils.rank()}.pt")
                if os.path.exists(rng_path):
                    set_rng_state(load(rng_path))
            except Exception as e:   # noqa: BLE001
                error = _first_line(e)
        error = _agree(error)   # a later checkpoint overwrites whatever this one left half-loaded
        _stop_if_refused(error)
        if not error:
            return None, client_state
        return self._load_error(folder, error, FITS), None

    def _stage_mismatch(self, folder: str, stage: int, universal: bool) -> str:
        """"" when DeepSpeed can load the checkpoint in `folder` at ZeRO `stage`, else a one-line error. Its files
        tell its stage: ZeRO-3 shards the model states, ZeRO-1/2 only the optimizer's (either loads the other's),
        ZeRO-0 shards nothing. Across those layouts DeepSpeed's load fails with a bare AssertionError or a missing
        file; a re-split copy (universal) serves any ZeRO stage >= 1."""
        names = os.listdir(folder)
        saved = (3 if any(n.startswith("zero_pp_rank") and n.endswith("model_states.pt") for n in names) else
                 1 if any("zero_pp_rank" in n and n.endswith("optim_states.pt") for n in names) else 0)
        now = min(stage, 1) if stage < 3 else 3
        if saved == now or (universal and saved and now):
            return ""
        try:   # config.json still holds the saved run's settings (fit rewrites it after the load)
            with open(os.path.join(os.path.dirname(self.dir), "config.json")) as f:
                saved_cfg = json.load(f)
            ds_config = saved_cfg.get("run", saved_cfg)["ds_config"]
            keep = f"resume with --run.ds_config={ds_config} (the saved run's)"
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            keep = "resume with the run.ds_config it was written with"
        was = {0: "ZeRO-0", 1: "ZeRO-1/2", 3: "ZeRO-3"}[saved]
        return (f"checkpoint {folder} was written at {was} and this run uses ZeRO-{stage} (run.ds_config); "
                f"DeepSpeed cannot load a checkpoint across these stages: {keep}, or start over with "
                f"--run.resume=false")

    def _load_error(self, folder: str, error: str, template: str) -> tuple[str, str]:
        """(reason, one-line error) for a checkpoint that does not load; one written by another number of ranks
        says so whatever failed."""
        saved, world = self.saved_world_size(os.path.basename(folder)), dist_utils.world_size()
        if saved and saved != world:
            return error[:200], (f"checkpoint {folder} was written by {saved} ranks and does not load on {world} "
                                 f"({error[:200]}): resume with {saved} ranks, or start over with "
                                 f"--run.resume=false")
        return error[:200], f"checkpoint {folder} " + template.format(error[:200])

    def _damage(self, source: str, folder: str) -> str:
        """"" when the checkpoint has every rank's files and this rank's share of them opens and holds what its
        name says (tensors memory-mapped, not read), else the first file that does not and why."""
        names = os.listdir(folder)
        ranks = {kind: {int(m.group(1)) for m in map(re.compile(pattern).fullmatch, names) if m}
                 for kind, pattern in (("RNG file", r"rng_rank(\d+)\.pt"),
                                       ("optimizer shard", r"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt"),
                                       ("model shard", r"zero_pp_rank_(\d+)_mp_rank_00_model_states\.pt"))}
        saved, tag = max((max(r) for r in ranks.values() if r), default=-1) + 1, os.path.basename(folder)
        for kind, found in ranks.items():   # every rank writes an RNG file; shards are there for all or none
            missing = sorted(set(range(saved)) - found)
            if missing and (found or kind == "RNG file"):
                return f"{tag}: the {kind} of rank {missing[0]} is missing"
        if not ranks["model shard"] and "mp_rank_00_model_states.pt" not in names:
            return f"{tag}/mp_rank_00_model_states.pt is missing"
        paths = sorted(os.path.join(root, f) for root, _, files in os.walk(source) for f in files
                       if f.endswith(".pt"))
        if source != folder:   # a re-split copy: the RNG files stay in the original
            paths += sorted(os.path.join(folder, f) for f in names if f.startswith("rng_rank"))
        for path in paths[dist_utils.rank()::dist_utils.world_size()]:
            try:
                _check_file(path)
            except UntrustedCheckpoint as e:   # not damage: names the file itself
                return str(e)
            except Exception as e:   # noqa: BLE001 - torn, empty or garbled: whatever torch says, one line
                return f"{os.path.relpath(path, self.dir)}: {_first_line(e)}"
        return ""


def _stop_if_refused(error: str) -> None:
    """An agreed error that is a refusal (`engine.storage.safe_load`) stops the resume on every rank: falling back would
    read more files of the same untrusted directory."""
    if REFUSED in error:
        raise ValueError(error)


def _check_file(path: str) -> None:
    """Open one checkpoint file (weights only) and check it holds what its name says (raises if not)."""
    name = os.path.basename(path)
    if name.startswith("rng_rank"):
        state = load(path)
        if not (isinstance(state, dict) and {"torch", "python", "numpy"} <= state.keys()):
            raise ValueError("holds no RNG state")
        return
    state = load_deepspeed_file(path, map_location="cpu", mmap=True)
    if name.endswith("optim_states.pt") and not (isinstance(state, dict) and isinstance(
            state.get("optimizer_state_dict"), dict)):
        raise ValueError("holds no optimizer state")
    if name.endswith("model_states.pt") and not (isinstance(state, dict) and "module" in state):
        raise ValueError("holds no model state")
