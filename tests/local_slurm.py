"""A throwaway one-machine SLURM cluster for tests: munged with a key in a temporary folder, slurmctld and slurmd as
root on this host (CPU-only partition, non-default ports), config, state and logs in that folder. Clients find it
through SLURM_CONF (`LocalSlurm.env`). Needs Debian's slurm-wlm and munge (`make setup` installs them)."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

TOOLS = ("/usr/sbin/munged", "/usr/sbin/slurmctld", "/usr/sbin/slurmd", "/usr/bin/sbatch", "/usr/bin/srun",
         "/usr/bin/scontrol", "/usr/bin/scancel")


def missing_tools() -> list[str]:
    return [t for t in TOOLS if not os.path.exists(t)]


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class LocalSlurm:
    """`with LocalSlurm(folder, cpus=2) as slurm:` a running cluster of this one node; every daemon it started is
    stopped on exit (and its jobs with them)."""

    def __init__(self, folder: Path, cpus: int = 2):
        self.dir = Path(folder)
        self.cpus = cpus
        self.node = socket.gethostname()
        self.conf = self.dir / "slurm.conf"
        # Jobs inherit this environment (sbatch --export=ALL): no launcher variables of the test process in it.
        self.env = {k: v for k, v in os.environ.items()
                    if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
        self.env["SLURM_CONF"] = str(self.conf)
        self._daemons: list[tuple[str, Path]] = []   # (name, pid file)

    # -- setup ------------------------------------------------------------------------------------------------
    def __enter__(self) -> "LocalSlurm":
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _start(self) -> None:
        d = self.dir
        for sub in ("munge", "state", "spool", "log"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(d / "munge", 0o700)
        key = d / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        self.munge_socket = d / "munge" / "munge.sock"
        subprocess.run(["/usr/sbin/munged", "--force", f"--key-file={key}", f"--socket={self.munge_socket}",
                        f"--pid-file={d / 'munge' / 'munged.pid'}", f"--log-file={d / 'log' / 'munged.log'}",
                        f"--seed-file={d / 'munge' / 'munged.seed'}"], check=True, capture_output=True)
        self._daemons.append(("munged", d / "munge" / "munged.pid"))
        ctld_port, slurmd_port = _free_ports(2)
        self.conf.write_text("\n".join([
            "ClusterName=beitv2test",
            f"SlurmctldHost={self.node}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            f"SlurmdPort={slurmd_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # cred_expire: also how long a requeued job waits before it starts again (120 s by default).
            f"AuthInfo=socket={self.munge_socket},cred_expire=10",
            f"StateSaveLocation={d / 'state'}",
            f"SlurmdSpoolDir={d / 'spool'}",
            f"SlurmctldPidFile={d / 'slurmctld.pid'}",
            f"SlurmdPidFile={d / 'slurmd.pid'}",
            f"SlurmctldLogFile={d / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={d / 'log' / 'slurmd.log'}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/none",
            "MpiDefault=none",
            "SwitchType=switch/none",
            "ReturnToService=2",
            "SchedulerType=sched/backfill",
            "SchedulerParameters=sched_interval=1",
            "KillWait=30",
            "MinJobAge=600",
            "InactiveLimit=0",
            "SlurmctldTimeout=30",
            "SlurmdTimeout=30",
            f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN",
            "PartitionName=cpu Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
            ""]))
        subprocess.run(["/usr/sbin/slurmctld", "-i", "-f", str(self.conf)], check=True, env=self.env,
                       capture_output=True)
        self._daemons.append(("slurmctld", d / "slurmctld.pid"))
        subprocess.run(["/usr/sbin/slurmd", "-f", str(self.conf), "-N", self.node], check=True, env=self.env,
                       capture_output=True)
        self._daemons.append(("slurmd", d / "slurmd.pid"))
        deadline = time.time() + 60
        while time.time() < deadline:
            out = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=self.env, capture_output=True, text=True)
            if out.returncode == 0 and out.stdout.strip() in ("idle", "mixed", "allocated"):
                return
            time.sleep(0.5)
        raise RuntimeError(f"the local SLURM node did not come up: sinfo says {out.stdout.strip()!r} "
                           f"{out.stderr.strip()!r}; logs in {d / 'log'}")

    def stop(self) -> None:
        """Cancel every job, then stop the daemons (slurmd, slurmctld, munged), each waited for."""
        if self.conf.exists():
            subprocess.run(["scancel", "--full", "--signal=KILL", "-u", "root"], env=self.env, capture_output=True)
            subprocess.run(["scancel", "-u", "root"], env=self.env, capture_output=True)
        for name, pidfile in reversed(self._daemons):
            pid = _read_pid(pidfile)
            if pid is None:
                continue
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            deadline = time.time() + 15
            while _alive(pid) and time.time() < deadline:
                time.sleep(0.1)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        self._daemons.clear()

    # -- jobs -------------------------------------------------------------------------------------------------
    def sbatch(self, script: Path, *args: str, cwd: Path | None = None) -> int:
        out = subprocess.run(["sbatch", "--parsable", *args, str(script)], env=self.env, capture_output=True,
                             text=True, cwd=cwd)
        assert out.returncode == 0, out.stderr
        return int(out.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict:
        """`scontrol show job` as a dict of its KEY=VALUE fields (JobState, Restarts, ExitCode, ...)."""
        out = subprocess.run(["scontrol", "-o", "show", "job", str(job_id)], env=self.env, capture_output=True,
                             text=True)
        assert out.returncode == 0, out.stderr
        return dict(re.findall(r"(\w+)=(\S*)", out.stdout))

    def wait(self, job_id: int, timeout: float = 600, states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT",
                                                               "NODE_FAIL", "OUT_OF_MEMORY")) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} still {self.job(job_id).get('JobState')} after {timeout}s")


def _read_pid(pidfile: Path) -> int | None:
    try:
        return int(Path(pidfile).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:   # a zombie child of ours counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False
