"""Ranks from SLURM's and OpenMPI's variables (engine.parallel.launch_env), the preemption signal and the job's time
limit (engine.loop.guards.PreemptionFlag), in one process. The launches themselves run for real in
tests/test_launch_slurm_mpi.py."""
import os
import signal
import time

import pytest

from engine.config.schema import ConfigError, RunConfig, validate
from engine.loop.guards import PreemptionFlag
from engine.parallel.launch_env import expand_hostlist, fill_from_scheduler, job_end_time

# What `srun -n 4` over two nodes gives task 3 (as read off Debian's SLURM 22.05, tests/local_slurm.py).
SRUN_TASK_3 = {"SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURM_PROCID": "3", "SLURM_LOCALID": "1",
               "SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "4", "SLURM_STEP_NODELIST": "gpu[07-08]",
               "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_NODEID": "1", "SLURM_STEP_TASKS_PER_NODE": "2(x2)"}


def test_compressed_host_lists_expand_as_scontrol_does():
    assert expand_hostlist("node[01-04,07]") == ["node01", "node02", "node03", "node04", "node07"]
    assert expand_hostlist("a1,b[9-10],c") == ["a1", "b9", "b10", "c"]
    assert expand_hostlist("rack[1-2]-n[3,5]") == ["rack1-n3", "rack1-n5", "rack2-n3", "rack2-n5"]
    assert expand_hostlist("vm") == ["vm"]
    with pytest.raises(ConfigError, match="MASTER_ADDR"):
        expand_hostlist("gpu[a-b]")


def test_srun_task_gets_rank_world_local_rank_and_the_first_host():
    env = dict(SRUN_TASK_3)
    assert fill_from_scheduler(env) == "slurm"
    assert {k: env[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "LOCAL_WORLD_SIZE")} == {
        "RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu07", "LOCAL_WORLD_SIZE": "2"}
    port = int(env["MASTER_PORT"])
    assert 10000 <= port < 20000
    restarted = dict(SRUN_TASK_3, SLURM_RESTART_COUNT="1")   # a requeued job's next start: another port
    fill_from_scheduler(restarted)
    assert restarted["MASTER_PORT"] != env["MASTER_PORT"]
    assert fill_from_scheduler(env) is None and env["RANK"] == "3"   # a second call leaves them
    own = dict(SRUN_TASK_3, MASTER_ADDR="ib-gpu07", MASTER_PORT="29400")   # the job script's win
    fill_from_scheduler(own)
    assert (own["MASTER_ADDR"], own["MASTER_PORT"], own["RANK"]) == ("ib-gpu07", "29400", "3")


def test_the_batch_script_itself_is_not_a_rank():
    env = {k: v for k, v in SRUN_TASK_3.items() if not k.startswith("SLURM_STEP")}   # no SLURM_STEP_ID
    assert fill_from_scheduler(env) is None and "RANK" not in env


def test_launcher_variables_that_disagree_with_slurm_are_one_line_errors():
    with pytest.raises(ConfigError) as e:
        fill_from_scheduler(dict(SRUN_TASK_3, RANK="0", WORLD_SIZE="4"))
    assert str(e.value).startswith("RANK=0 but SLURM_PROCID=3 (WORLD_SIZE=4 tasks in both)")
    assert "unset RANK, WORLD_SIZE and LOCAL_RANK" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="^RANK is set but WORLD_SIZE is not"):
        fill_from_scheduler(dict(SRUN_TASK_3, RANK="3"))
    # torchrun inside each srun task (one task per node, 8 ranks each): its own numbers stand.
    env = dict(SRUN_TASK_3, RANK="13", WORLD_SIZE="32", LOCAL_RANK="5")
    assert fill_from_scheduler(env) is None and env["RANK"] == "13"


def test_mpirun_ranks_and_the_master_address_across_nodes():
    one_node = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
                "OMPI_COMM_WORLD_LOCAL_SIZE": "2", "OMPI_MCA_ess_base_jobid": "488964097",
                "SLURM_STEP_ID": "0", "SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_NODELIST": "n1"}
    env = dict(one_node)
    assert fill_from_scheduler(env) == "openmpi"   # mpirun inside a SLURM job: OpenMPI numbers the ranks
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["MASTER_ADDR"]) == ("1", "2", "1", "127.0.0.1")
    assert env["MASTER_PORT"] == str(10000 + 488964097 % 10000)
    two_nodes = dict(one_node, OMPI_COMM_WORLD_SIZE="4")
    with pytest.raises(ConfigError, match=r"^MASTER_ADDR is not set and this mpirun job spans several nodes .*"
                                          r"`mpirun -x MASTER_ADDR=<host> \.\.\.`$"):
        fill_from_scheduler(two_nodes)
    fill_from_scheduler(dict(two_nodes, MASTER_ADDR="n1"))


def test_preempt_signal_key_is_checked():
    validate(RunConfig(preempt_signal="USR1"), "run")
    validate(RunConfig(preempt_signal="SIGUSR2"), "run")
    with pytest.raises(ConfigError, match=r"^config key 'run.preempt_signal' = 'KILL' must be one of TERM, USR1"):
        validate(RunConfig(preempt_signal="KILL"), "run")
    with pytest.raises(ConfigError, match=r"^config key 'run.stop_before_end_s' = -1 must be >= 0"):
        validate(RunConfig(stop_before_end_s=-1), "run")


def test_the_chosen_signal_and_the_time_limit_stop_the_loop_and_count_as_scheduled(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)   # no launcher to watch
    flag = PreemptionFlag(("TERM", "USR1"))
    try:
        assert not flag.agreed()
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.05)
        assert flag.agreed() and flag.scheduled and flag.reason == "SIGUSR1"
    finally:
        flag.restore()
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL
    # The end is 100 s away: a 30 s margin and a short log interval go on, a 120 s margin stops.
    flag = PreemptionFlag(("TERM",), end_time=time.time() + 100, margin_s=30)
    try:
        assert not flag.agreed()
        flag.margin_s = 120
        assert flag.agreed() and flag.scheduled and flag.reason.startswith("the job's time limit (")
    finally:
        flag.restore()
    monkeypatch.setenv("SLURM_JOB_END_TIME", "1800000000")
    assert job_end_time() == 1800000000.0


def _sleep(seconds):
    time.sleep(seconds)


@pytest.mark.parametrize("guard", ["stop_on_signals", "PreemptionFlag"])
def test_a_pool_forked_under_the_signal_handlers_still_terminates(guard):
    """A fork Pool's workers inherit the handlers; Pool.terminate's SIGTERM must still end them (a worker that raised
    Preempted or only noted the signal hung the pool: the loader benchmark's conversion did under load)."""
    import multiprocessing as mp

    from engine.loop.guards import Preempted, stop_on_signals
    flag = None
    context = stop_on_signals(("TERM",)) if guard == "stop_on_signals" else None
    if context:
        context.__enter__()
    else:
        flag = PreemptionFlag(("TERM",))
    try:
        pool = mp.get_context("fork").Pool(2)
        pool.map_async(_sleep, [30, 30])
        time.sleep(0.5)   # both workers inside a task
        workers = list(pool._pool)
        start = time.time()
        pool.terminate()
        pool.join()
        assert time.time() - start < 10
        assert [w.exitcode for w in workers] == [-signal.SIGTERM] * 2
        # the owner itself still gets the handler's behaviour
        if context:
            with pytest.raises(Preempted):
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(1)
        else:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.1)
            assert flag.requested and flag.reason == "SIGTERM"
    finally:
        if context:
            context.__exit__(None, None, None)
        else:
            flag.restore()
