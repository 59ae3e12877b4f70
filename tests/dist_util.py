"""Multi-rank helpers for tests: collective code on N gloo ranks, and stage CLIs under torchrun."""
import json
import os
import signal
import subprocess
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.conftest import ROOT, free_port


def _worker(rank, world, port, fn, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def run_ranks(fn, world: int = 2, *args) -> None:
    """Run `fn(rank, world, *args)` on `world` spawned gloo ranks; a rank's exception is re-raised here (as
    torch's ProcessRaisedException, with that rank's traceback)."""
    mp.start_processes(_worker, args=(world, free_port(), fn, args), nprocs=world, start_method="spawn")


def launch_stage(module: str, args: list, nproc: int = 2) -> subprocess.Popen:
    """`torchrun --nproc_per_node N -m <module> <args>` in its own process group (so a test can SIGKILL it all)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(free_port()), "-m", module, *map(str, args)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def run_stage(module: str, args: list, timeout: int = 600) -> str:
    """Run a stage CLI on 2 ranks to the end; its output, or an assertion error with the tail of it."""
    proc = launch_stage(module, args)
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def losses(out_dir, key: str = "loss") -> dict:
    """{step: value} of the training rows in a run's metrics.jsonl."""
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r[key] for r in rows if r["split"] == "train"}


def kill_when(proc: subprocess.Popen, metrics_path, rows: int, timeout: float = 300) -> None:
    """SIGKILL the launcher and every rank once `metrics_path` holds `rows` lines; wait for them to die."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(metrics_path):
            with open(metrics_path) as f:
                if len(f.read().splitlines()) >= rows:
                    # torchrun starts its workers in sessions of their own: kill every descendant explicitly.
                    import psutil
                    workers = psutil.Process(proc.pid).children(recursive=True)
                    proc.send_signal(signal.SIGKILL)   # the launcher: reaped by Popen, so returncode is -9
                    for p in workers:
                        p.send_signal(signal.SIGKILL)
                    psutil.wait_procs(workers, timeout=30)
                    break
        time.sleep(0.02)
    proc.communicate()


class StepNumbers:
    """A data source of fixed numbers per step (every rank the same), for engine tests on a tiny linear model."""
    steps_per_epoch = 100

    def micro_batches(self, start):
        step = start
        while True:
            yield torch.randn(8, 4, generator=torch.Generator().manual_seed(step))
            step += 1
