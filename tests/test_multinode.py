"""Multi-node launch as a cluster does it: the `deepspeed` launcher with a hostfile of two "nodes" (localhost and
127.0.0.1, one rank each), pdsh over ssh to an sshd the test starts on the loopback address with throwaway keys.
The run must match a 2-rank torchrun run of the same config step for step."""
import os
import shutil
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT, free_port
from tests.dist_util import losses, run_stage

pytestmark = [pytest.mark.usefixtures("fashion_mnist_available"), pytest.mark.slow]


@pytest.fixture()
def loopback_sshd(tmp_path):
    for tool in ("/usr/sbin/sshd", "/usr/bin/pdsh", "/usr/bin/ssh"):
        if not os.path.exists(tool):
            pytest.fail(f"{tool} is missing: run `make setup` (installs openssh-server and pdsh)")
    d, port = tmp_path / "ssh", free_port()
    (d / "bin").mkdir(parents=True)
    for key in ("hostkey", "userkey"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / key)], check=True)
    shutil.copy(d / "userkey.pub", d / "authorized_keys")
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/hostkey\nAuthorizedKeysFile {d}/authorized_keys\n"
        f"PidFile {d}/sshd.pid\nStrictModes no\nUsePAM no\nPasswordAuthentication no\n")
    # The launcher and pdsh call `ssh` from PATH: a wrapper points it at this test's keys, port and known hosts.
    (d / "ssh_config").write_text(f"Host *\n  Port {port}\n  IdentityFile {d}/userkey\n  IdentitiesOnly yes\n"
                                  f"  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n")
    (d / "bin" / "ssh").write_text(f'#!/bin/sh\nexec /usr/bin/ssh -F {d}/ssh_config "$@"\n')
    (d / "bin" / "ssh").chmod(0o755)
    os.makedirs("/run/sshd", exist_ok=True)   # sshd's privilege-separation directory
    subprocess.run(["/usr/sbin/sshd", "-f", str(d / "sshd_config"), "-E", str(d / "sshd.log")], check=True)
    deadline = time.time() + 10
    while not (d / "sshd.pid").exists() and time.time() < deadline:
        time.sleep(0.05)
    yield d
    pid = int((d / "sshd.pid").read_text())
    os.kill(pid, 15)


def test_hostfile_launch_over_ssh_matches_torchrun(tmp_path, loopback_sshd):
    d = loopback_sshd
    (d / "hostfile").write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    # What each node's launcher needs besides PYTHON* variables (which DeepSpeed forwards by itself).
    (d / "ds_env").write_text(f"DS_ACCELERATOR=cpu\nTORCH_EXTENSIONS_DIR={os.environ['TORCH_EXTENSIONS_DIR']}\n"
                              f"OMP_NUM_THREADS=1\nLOCAL_SIZE=1\n")
    args = ["train", "vqkd_tiny_test", "--schedule.total_steps=6"]
    env = dict(os.environ, PATH=f"{d}/bin:{os.environ['PATH']}", DS_ENV_FILE=str(d / "ds_env"), PYTHONPATH=ROOT)
    cmd = [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--hostfile", str(d / "hostfile"),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "--module", "pretrain.tokenizer",
           *args, f"--run.output_dir={tmp_path / 'multinode'}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "127.0.0.1:" in proc.stdout and "localhost:" in proc.stdout   # pdsh prefixes each node's output
    run_stage("pretrain.tokenizer", args + [f"--run.output_dir={tmp_path / 'torchrun'}"])
    assert losses(tmp_path / "multinode") == losses(tmp_path / "torchrun")
