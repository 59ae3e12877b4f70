"""Process-group setup and the few collectives the stages need, working the same on CPU (gloo) and CUDA (nccl)."""
from __future__ import annotations

import os
import socket
import sys

import torch
import torch.distributed as dist

from engine.config.schema import RunConfig
from engine.parallel import host_memory, launch_env
from engine.parallel.ds_setup import zero_stage_of


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init(run: RunConfig | None = None) -> torch.device:
    """Initialise torch.distributed through DeepSpeed and return this rank's device.

    Works under the `deepspeed` launcher, `torchrun`, `srun` and `mpirun` (the env:// variables from SLURM's or
    OpenMPI's: engine.parallel.launch_env, docs/launch.md), and as a plain single process (then it sets the env://
    variables itself, so DeepSpeed does not go looking for MPI). A training stage passes its `run` config: its ZeRO
    stage decides where a CPU process puts big host blocks (engine.parallel.host_memory).
    """
    if not torch.cuda.is_available():
        # DeepSpeed's CPU accelerator; it falls back to gloo without oneCCL.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # Before the stage builds anything (engine.parallel.host_memory).
    host_memory.at_process_start(zero_stage_of(run.ds_config) if run is not None else None)
    launch_env.fill_from_scheduler()   # srun / mpirun without a torch launcher (the CLI did it already)
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    import deepspeed  # imported late: DS_ACCELERATOR must be set first

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        deepspeed.init_distributed(dist_backend=backend)
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def shutdown() -> None:
    """Tear the process group down while the interpreter is still whole, before a launched rank exits. Left to the
    destructors that run at exit, gloo's communication threads can still be joinable when their objects die, and a
    rank then aborts after its work is done ("terminate called without an active exception", seen in CI)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def current_device() -> torch.device:
    """Where collectives expect tensors: the local GPU under nccl, the CPU under gloo."""
    if torch.cuda.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def log_main(msg: str) -> None:
    """A progress message from rank 0 only, on stderr (stdout carries the command's result)."""
    if is_main():
        print(msg, file=sys.stderr, flush=True)


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def all_reduce_sum_(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (a no-op on one process)."""
    if world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    if world_size() > 1:
        dist.broadcast(t, src=src)
    return t


def broadcast_object(obj, src: int = 0):
    """`obj` from rank `src` on every rank (a picklable Python value; for rare control messages, not tensors)."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate equally-shaped tensors from all ranks along dim 0, in rank order."""
    if world_size() == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, dim=0)


def all_gather_uneven(t: torch.Tensor) -> torch.Tensor:
    """Concatenate tensors whose first dimension differs between ranks (uneven shards), in rank order."""
    if world_size() == 1:
        return t
    sizes = all_gather_cat(torch.tensor([t.shape[0]], device=t.device))
    padded = torch.zeros((int(sizes.max()), *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[:t.shape[0]] = t
    parts = all_gather_cat(padded).split(int(sizes.max()))
    return torch.cat([p[:int(n)] for p, n in zip(parts, sizes)])
