import itertools
import os
import socket
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(ROOT, ".venv", "torch_extensions"))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

FASHION_MNIST = "/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"


_port_draws = itertools.count()


def free_port() -> int:
    """A port no one listens on, for a launcher's rendezvous or a test's sshd.

    Drawn from a block of 1000 ports per pytest-xdist worker, below the kernel's ephemeral range: two tests running
    side by side never pick the same port, and no rank's outgoing connection takes it before the launcher binds it.
    """
    block = 20000 + 1000 * int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw"))
    for _ in range(1000):
        port = block + next(_port_draws) % 1000
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:   # in use, or still in TIME_WAIT from an earlier test: take the next one
                continue
    raise RuntimeError(f"no free port in {block}-{block + 999}")


_DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def _launch_variables() -> dict:
    return {k: os.environ.get(k) for k in _DIST_ENV}


def _restore(before: dict) -> None:
    for key, value in before.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(autouse=True)
def _keep_launcher_variables_out_of_later_tests():
    """A stage run in process joins a one-rank process group and writes RANK, MASTER_PORT, ... into os.environ; a
    later test's subprocess would inherit them and try to listen on the port this process still holds. Put them
    back as they were after every test."""
    before = _launch_variables()
    yield
    _restore(before)


@pytest.hookimpl(hookwrapper=True)
def pytest_fixture_setup(fixturedef, request):
    """The same for fixtures of every scope: a module fixture that trains in process (tests/test_pictures.py's
    `mim_run`) is set up before the function-scoped guard above takes its snapshot, and its variables leaked into
    every later test of the worker (a subprocess then failed with EADDRINUSE on the inherited port)."""
    before = _launch_variables()
    yield
    _restore(before)


@pytest.fixture(scope="session")
def fashion_mnist_available():
    if not os.path.exists(FASHION_MNIST):
        pytest.fail("Debian's dataset-fashion-mnist is not installed; run `make setup`")


@pytest.fixture(scope="session")
def tiny_tokenizer_file(tmp_path_factory):
    """A randomly initialised `vqkd_tiny_test` tokenizer on disk: its codes are a fixed function of the image."""
    import torch

    from pretrain.tokenizer import build_tokenizer, save_tokenizer
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.pt"
    save_tokenizer(build_tokenizer("vqkd_tiny_test", kmeans_init=False), str(path))
    return path


def cli_error(capsys, commands: dict, *argv) -> str:
    """Run a stage CLI in-process: it must exit 2 with `error: ...` as its last line of stderr; returns that line."""
    from engine.config.cli import run_cli
    assert run_cli(commands, list(argv)) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]   # after the libraries' own warnings
    assert err.startswith("error: ")
    return err


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 64 KiB tmpfs: a real full disk (and read-only after a remount); needs root and mount rights."""
    import subprocess
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)
