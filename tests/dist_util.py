"""Run a function on N gloo ranks in child processes (for collective code paths without a launcher)."""
import os
import traceback

import torch.distributed as dist
import torch.multiprocessing as mp

from tests.conftest import free_port


def _worker(rank, world, port, fn, args, errors):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    except Exception:  # noqa: BLE001 - reported to the parent
        errors.put(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def run_ranks(fn, world: int = 2, *args) -> None:
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    mp.start_processes(_worker, args=(world, free_port(), fn, args, errors), nprocs=world, start_method="spawn")
    if not errors.empty():
        raise AssertionError(errors.get())
