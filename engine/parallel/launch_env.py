"""Where a rank learns who it is when no torch launcher started it: SLURM's `srun` and OpenMPI's `mpirun`, and what a
scheduler needs back (its job's end, a requeue). No torch here: the CLI calls `fill_from_scheduler` first thing, so
that the lines only rank 0 prints (the run plan) come once per run under `srun` too.

torch.distributed's env:// rendezvous reads RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; `torchrun`
and the `deepspeed` launcher set them. When they are absent:

- under `srun` (a job step: SLURM_STEP_ID set), one task per rank: RANK = SLURM_PROCID, WORLD_SIZE =
  SLURM_STEP_NUM_TASKS (SLURM_NTASKS), LOCAL_RANK = SLURM_LOCALID, MASTER_ADDR = the first host of the step's node
  list (SLURM_STEP_NODELIST / SLURM_JOB_NODELIST, compressed lists such as `gpu[01-04,07]` expanded here),
  MASTER_PORT = 10000-19999 from SLURM_JOB_ID, SLURM_STEP_ID and SLURM_RESTART_COUNT (the same on every task of a
  step);
- under `mpirun` (OpenMPI: OMPI_COMM_WORLD_RANK set): RANK, WORLD_SIZE and LOCAL_RANK from OMPI_COMM_WORLD_RANK,
  _SIZE and _LOCAL_RANK; MASTER_ADDR from the environment (`mpirun -x MASTER_ADDR=<rank 0's host>`), 127.0.0.1 when
  every rank is on this node; MASTER_PORT from the environment, else 10000-19999 from mpirun's job id.

MASTER_ADDR and MASTER_PORT set in the environment always win. A launcher's variables that are already there are
checked against the scheduler's where both describe one task per rank (a stale RANK exported into the job, a
LOCAL_RANK of another step): a disagreement is a one-line error, not a hang at the rendezvous. A launcher that runs
several ranks per scheduler task (`srun` of `torchrun` per node) has its own WORLD_SIZE and is left alone.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from typing import MutableMapping

from engine.config.schema import ConfigError

LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
DEFAULT_MPI_PORT = 29500


def expand_hostlist(hostlist: str) -> list[str]:
    """SLURM's compressed host list as host names: `gpu[01-03,07],cpu1` -> gpu01 gpu02 gpu03 gpu07 cpu1 (zero
    padding kept; several bracket groups in one name multiply out, as `scontrol show hostnames` does)."""
    hosts: list[str] = []
    for item in _split_top(hostlist.strip()):
        hosts.extend(_expand_one(item))
    return hosts


def _split_top(text: str) -> list[str]:
    """Split at the commas outside brackets."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    return [item for item in items if item]


def _expand_one(item: str) -> list[str]:
    m = re.search(r"\[([^\]]*)\]", item)
    if m is None:
        return [item]
    head, tail = item[:m.start()], item[m.end():]
    names = []
    for part in m.group(1).split(","):
        lo, _, hi = part.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            raise ConfigError(f"cannot read the SLURM host list {item!r} (range {part!r}); set MASTER_ADDR to rank "
                              f"0's host in the job script")
        width = len(lo)
        for n in range(int(lo), int(hi or lo) + 1):
            names.append(f"{head}{n:0{width}d}")
    return [name + rest for name in names for rest in _expand_one(tail)]


def _tasks_on_node(tasks_per_node: str, node_index: int) -> int | None:
    """This node's task count from SLURM_STEP_TASKS_PER_NODE (`8(x2),4`) and SLURM_NODEID, None if unreadable."""
    counts: list[int] = []
    for part in tasks_per_node.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if m is None:
            return None
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts[node_index] if 0 <= node_index < len(counts) else None


def from_slurm(env: MutableMapping[str, str]) -> dict[str, str] | None:
    """The launcher variables of a task that `srun` started, or None outside a job step (the batch script itself
    has SLURM_PROCID=0 and the job's SLURM_NTASKS but is one process: it is not a rank of the step)."""
    step = env.get("SLURM_STEP_ID", env.get("SLURM_STEPID"))
    if step is None or "SLURM_PROCID" not in env:
        return None
    tasks = env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS"))
    nodes = env.get("SLURM_STEP_NODELIST", env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "")))
    if tasks is None or not nodes:
        raise ConfigError("this srun task has SLURM_PROCID but no SLURM_STEP_NUM_TASKS/SLURM_NTASKS or node list; "
                          "set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT in the job script")
    job = env.get("SLURM_JOB_ID", env.get("SLURM_JOBID", "0"))
    # Below the ephemeral range; another port for each step and each start of a requeued job.
    restarts = env.get("SLURM_RESTART_COUNT", "0")
    port = 10000 + (int(job) * 100 + (int(step) % 10 if step.isdigit() else 0) * 10
                    + (int(restarts) if restarts.isdigit() else 0) % 10) % 10000
    found = {"RANK": env["SLURM_PROCID"], "WORLD_SIZE": tasks, "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
             "MASTER_ADDR": expand_hostlist(nodes)[0], "MASTER_PORT": str(port)}
    local = _tasks_on_node(env.get("SLURM_STEP_TASKS_PER_NODE", env.get("SLURM_TASKS_PER_NODE", "")),
                           int(env.get("SLURM_NODEID", "0") or 0))
    if local is not None:
        found["LOCAL_WORLD_SIZE"] = str(local)
    return found


def from_openmpi(env: MutableMapping[str, str]) -> dict[str, str] | None:
    """The launcher variables of a rank that OpenMPI's `mpirun` started, or None."""
    if "OMPI_COMM_WORLD_RANK" not in env:
        return None
    size = env.get("OMPI_COMM_WORLD_SIZE", "1")
    local_size = env.get("OMPI_COMM_WORLD_LOCAL_SIZE", size)
    addr = env.get("MASTER_ADDR")
    if addr is None:
        if local_size != size:
            raise ConfigError(f"MASTER_ADDR is not set and this mpirun job spans several nodes ({size} ranks, "
                              f"{local_size} here): pass rank 0's host, `mpirun -x MASTER_ADDR=<host> ...`")
        addr = "127.0.0.1"
    return {"RANK": env["OMPI_COMM_WORLD_RANK"], "WORLD_SIZE": size,
            "LOCAL_RANK": env.get("OMPI_COMM_WORLD_LOCAL_RANK", "0"), "MASTER_ADDR": addr,
            "MASTER_PORT": env.get("MASTER_PORT", str(_mpi_port(env))), "LOCAL_WORLD_SIZE": local_size}


def _mpi_port(env: MutableMapping[str, str]) -> int:
    """10000-19999 from mpirun's job id (the same on every rank: two mpirun jobs on one node get two ports), else
    DEFAULT_MPI_PORT."""
    job = env.get("OMPI_MCA_ess_base_jobid", "")
    return 10000 + int(job) % 10000 if job.isdigit() else DEFAULT_MPI_PORT


def fill_from_scheduler(env: MutableMapping[str, str] | None = None) -> str | None:
    """Set the launcher variables from `mpirun`'s or `srun`'s when a launcher did not (module doc); returns
    "openmpi" or "slurm" when it set them, else None. Idempotent: a second call finds them set and checks them."""
    env = os.environ if env is None else env
    # mpirun under SLURM runs its daemons as srun tasks: their SLURM_PROCID numbers nodes, OpenMPI's numbers ranks.
    found, source, origin = from_openmpi(env), "openmpi", "OMPI_COMM_WORLD_"
    if found is None:
        found, source, origin = from_slurm(env), "slurm", "SLURM_"
    if found is None:
        return None
    if env.get("BEITV2_LAUNCH_SOURCE") == source:   # set by an earlier call in this process
        return None
    present = [v for v in ("RANK", "WORLD_SIZE") if v in env]
    if present:
        _check_agrees(env, found, origin)
        return None
    for key, value in found.items():
        if key in ("MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
            env.setdefault(key, value)
        else:
            env[key] = value
    # Not LOCAL_SIZE: on CPU it switches DeepSpeed to a shared-memory all-reduce named after MASTER_ADDR/PORT, which
    # a requeued job (same port) would find left over from its killed run; gloo's, as under torchrun, it is.
    env["BEITV2_LAUNCH_SOURCE"] = source
    return source


def _check_agrees(env: MutableMapping[str, str], found: dict[str, str], origin: str) -> None:
    if "RANK" not in env or "WORLD_SIZE" not in env:
        have, lack = ("RANK", "WORLD_SIZE") if "RANK" in env else ("WORLD_SIZE", "RANK")
        raise ConfigError(f"{have} is set but {lack} is not: unset {have} in the job script to take both from "
                          f"{origin.rstrip('_')}'s variables, or set both (and LOCAL_RANK, MASTER_ADDR, MASTER_PORT)")
    if env["WORLD_SIZE"] != found["WORLD_SIZE"]:
        return   # a launcher of its own inside each scheduler task (torchrun per node): its numbers stand
    scheduler_name = {"RANK": "PROCID", "LOCAL_RANK": "LOCALID"} if origin == "SLURM_" else \
        {"RANK": "RANK", "LOCAL_RANK": "LOCAL_RANK"}
    for key in ("RANK", "LOCAL_RANK"):
        if key in env and env[key] != found[key]:
            raise ConfigError(f"{key}={env[key]} but {origin}{scheduler_name[key]}={found[key]} (WORLD_SIZE="
                              f"{env['WORLD_SIZE']} tasks in both): the launcher variables in the environment are "
                              f"not this task's; unset RANK, WORLD_SIZE and LOCAL_RANK in the job script so that "
                              f"they come from {origin.rstrip('_')}")


# -- what the training loop asks of a scheduler --------------------------------------------------------------------

def job_end_time(env: MutableMapping[str, str] | None = None) -> float | None:
    """When the scheduler ends this job (unix seconds): SLURM_JOB_END_TIME, set under a time limit; else None."""
    env = os.environ if env is None else env
    value = env.get("SLURM_JOB_END_TIME", "")
    return float(value) if value.isdigit() and int(value) > 0 else None


def requeue_job(env: MutableMapping[str, str] | None = None) -> str:
    """`scontrol requeue $SLURM_JOB_ID` when SLURM still lists the job as running (a job that `scancel` cancelled
    is not brought back); returns a line saying what was done, for the log."""
    env = os.environ if env is None else env
    job = env.get("SLURM_JOB_ID")
    if not job:
        return "not requeued: no SLURM_JOB_ID (run.requeue needs a SLURM batch job)"
    try:
        shown = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True, timeout=60)
        state = re.search(r"JobState=(\S+)", shown.stdout)
        if state is None or state.group(1) != "RUNNING":
            return f"not requeued: job {job} is {state.group(1) if state else 'unknown to scontrol'}"
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"not requeued: scontrol failed ({e})"
    if done.returncode != 0:
        return f"not requeued: scontrol requeue {job}: {(done.stderr or done.stdout).strip()}"
    return f"requeued job {job}: it resumes from this checkpoint when it starts again"


def stop_time(time_limit_s: int, stop_before_end_s: int) -> float | None:
    """The end a run checkpoints ahead of (run.stop_before_end_s > 0): run.time_limit_s after this process started,
    else SLURM_JOB_END_TIME; None when off or when no end is known (said once on stderr)."""
    if stop_before_end_s <= 0:
        return None
    if time_limit_s > 0:
        try:
            import psutil
            started = psutil.Process().create_time()
        except Exception:   # no psutil or /proc: count from now
            started = time.time()
        return started + time_limit_s
    end = job_end_time()
    if end is None and os.environ.get("RANK", "0") == "0":
        print(f"note: run.stop_before_end_s={stop_before_end_s} has no end to count back from: SLURM_JOB_END_TIME is "
              f"not set (a job without a time limit) and run.time_limit_s is 0", file=sys.stderr, flush=True)
    return end
