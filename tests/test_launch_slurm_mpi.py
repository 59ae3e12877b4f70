"""Launches as a cluster does them, for real: a throwaway one-machine SLURM (tests/local_slurm.py) runs the repository's
job script (scripts/slurm/tokenizer.sbatch) as a 2-task job through `srun`, and OpenMPI's `mpirun` starts 2 ranks.
Each run must match a 2-rank torchrun run of the same config step for step, also across a preemption: a job sent
its `--signal=B:USR1` checkpoints, is requeued by rank 0 (`scontrol requeue`), starts again and resumes; `mpirun`
passes USR1 on to its ranks, which checkpoint, and the same command resumes."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT
from tests.dist_util import losses, run_stage
from tests.local_slurm import LocalSlurm, missing_tools

pytestmark = [pytest.mark.usefixtures("fashion_mnist_available"), pytest.mark.slow]

STEPS = 16
ARGS = ["vqkd_tiny_test", f"--schedule.total_steps={STEPS}", "--run.save_interval=1000"]
JOB_SCRIPT = os.path.join(ROOT, "scripts", "slurm", "tokenizer.sbatch")
# The job script's #SBATCH lines ask for 8 GPUs per node and 10 CPUs per task: this node has 2 CPUs and no GPU.
ON_THIS_NODE = ["--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, fashion_mnist_available):
    out = tmp_path_factory.mktemp("torchrun")
    run_stage("pretrain.tokenizer", ["train", *ARGS, f"--run.output_dir={out}"])
    return losses(out)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    missing = missing_tools()
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed: `make setup` installs Debian's slurm-wlm and munge")
    with LocalSlurm(tmp_path_factory.mktemp("slurm"), cpus=2) as cluster:
        yield cluster


def submit(slurm, out, launcher: str = "srun") -> int:
    slurm.env.update(RECIPE="vqkd_tiny_test", TEACHER="", TRAIN="", OUT=str(out), EXTRA=" ".join(ARGS[1:]),
                     OMP_NUM_THREADS="1", PYTHON=sys.executable, LAUNCHER=launcher)
    return slurm.sbatch(JOB_SCRIPT, *ON_THIS_NODE, f"--output={out}.out", cwd=ROOT)


def wait_for_rows(path, rows: int, job_done, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not (path.exists() and len(path.read_text().splitlines()) >= rows):
        assert not job_done(), "the run ended before it was signalled"
        assert time.time() < deadline, f"no {rows} rows in {path} after {timeout}s"
        time.sleep(0.05)


def test_srun_job_matches_torchrun(slurm, reference, tmp_path):
    out = tmp_path / "run"
    job = submit(slurm, out)
    info = slurm.wait(job)
    log = (tmp_path / "run.out").read_text()
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log[-4000:]
    assert losses(out) == reference   # fp32 on CPU, gloo under both: bitwise the same
    assert log.count("config (* differs from the defaults") == 1   # the plan from rank 0 only: ranks known early
    assert json.loads((out / "config.json").read_text())["run"]["preempt_signal"] == "USR1"


@pytest.mark.parametrize("launcher", ["srun", "deepspeed"])
def test_preempted_job_checkpoints_is_requeued_and_finishes_with_the_same_losses(slurm, reference, tmp_path,
                                                                                 launcher):
    out = tmp_path / "run"
    job = submit(slurm, out, launcher)
    wait_for_rows(out / "metrics.jsonl", 4, lambda: slurm.job(job)["JobState"] not in ("PENDING", "RUNNING"))
    # What `#SBATCH --signal=B:USR1@300` does before the time limit: the batch shell alone gets the signal.
    subprocess.run(["scancel", "--batch", "--signal=USR1", str(job)], env=slurm.env, check=True)
    # The requeued job starts again after SLURM's hold (cred_expire, 10 s on the test's cluster) and resumes.
    info = slurm.wait(job)
    log = (tmp_path / "run.out").read_text()   # --open-mode=append: both starts
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), log[-4000:]
    assert "SIGUSR1: every rank checkpoints the same step and stops" in log
    assert f"requeued job {job}" in log and "stopped by SIGUSR1 after step" in log
    assert "resumed from" in log
    stopped = int(log.split("stopped by SIGUSR1 after step ")[1].split(";")[0])
    assert 4 <= stopped < STEPS
    assert losses(out) == reference
    if launcher == "deepspeed":   # DeepSpeed's SLURM runner started the ranks, at both starts
        assert log.count("cmd = srun -n 2 --kill-on-bad-exit=1") == 2, log[-4000:]


def test_mpirun_matches_torchrun_and_resumes_after_a_signal(reference, tmp_path):
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        pytest.skip("mpirun not installed: `make setup` installs Debian's openmpi-bin")
    out = tmp_path / "run"
    cmd = [mpirun, "--allow-run-as-root", "--oversubscribe", "-np", "2", "-x", "OMP_NUM_THREADS=1",
           "-x", "PYTHONUNBUFFERED=1", sys.executable, "-m", "engine.main", "tokenizer", "train", *ARGS,
           "--run.preempt_signal=USR1", f"--run.output_dir={out}"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        wait_for_rows(out / "metrics.jsonl", 4, lambda: proc.poll() is not None)
        proc.send_signal(signal.SIGUSR1)   # mpirun passes USR1 and USR2 on to every rank
        log, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 143 and "stopped: stopped by SIGUSR1 after step" in log, log[-4000:]
    assert "requeued" not in log   # run.requeue is off (and this is no SLURM job)
    stopped = max(losses(out))
    assert 4 <= stopped < STEPS
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert f"resumed from {out}/checkpoints at step {stopped}/{STEPS}" in done.stderr
    assert losses(out) == reference


def test_deepspeed_openmpi_runner_matches_torchrun(reference, tmp_path):
    """`deepspeed --launcher openmpi`: DeepSpeed's runner builds the mpirun line from a hostfile; the ranks read
    OpenMPI's variables. Its runner takes a script (the console script), not a module."""
    if shutil.which("mpirun") is None or shutil.which("ompi_info") is None:
        pytest.skip("mpirun not installed: `make setup` installs Debian's openmpi-bin")
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile), "--force_multi",
           "--no_ssh_check", "--master_addr", "127.0.0.1", "--launcher", "openmpi",
           "--launcher_args", "--allow-run-as-root --oversubscribe --mca btl_tcp_if_include lo",
           os.path.join(os.path.dirname(sys.executable), "beitv2"), "tokenizer", "train", *ARGS,
           f"--run.output_dir={out}"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    done = subprocess.run(cmd, cwd=ROOT, env=dict(env, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=600)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    assert "cmd = mpirun -n 2 -hostfile" in log
    assert losses(out) == reference
