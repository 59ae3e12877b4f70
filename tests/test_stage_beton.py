"""Both pretraining stages stream from FFCV .beton files written by `data_tools.convert` (Fashion-MNIST from
Debian) on 2 ranks; MIM is SIGKILLed mid-epoch, resumes with the same losses, evaluates on held-out images of a
.beton and exports to timm."""
import json
import signal
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from tests.dist_util import kill_when, launch_stage, losses, run_stage

pytestmark = [pytest.mark.usefixtures("fashion_mnist_available"), pytest.mark.slow]


@pytest.fixture(scope="module")
def betons(tmp_path_factory):
    out = tmp_path_factory.mktemp("fmnist")
    proc = subprocess.run([sys.executable, "-m", "data_tools.convert", "fashion_mnist", str(out), "--progress=False"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out / "train.beton", out / "test.beton"


def test_tokenizer_trains_from_a_beton_and_evaluates_on_one(tmp_path, betons):
    train, test = betons
    out = tmp_path / "tok"
    run_stage("pretrain.tokenizer", ["train", "vqkd_tiny_test", "--data.source=beton", f"--data.train_path={train}",
                                     f"--data.eval_path={test}", "--data.num_workers=1", f"--run.output_dir={out}",
                                     "--schedule.total_steps=10"])
    curve = losses(out)
    assert sorted(curve) == list(range(1, 11)) and curve[10] < curve[1] - 0.2
    proc = subprocess.run([sys.executable, "-m", "pretrain.tokenizer", "evaluate", str(out / "tokenizer.pt"),
                           '--data_cfg={"eval_images": 64}', f"--out={tmp_path / 'eval.json'}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert '"images": 64' in (tmp_path / "eval.json").read_text()


def test_mim_resumes_inside_an_epoch_of_a_beton_and_exports_to_timm(tmp_path, betons, tiny_tokenizer_file):
    train, test = betons
    args = ["train", "beitv2_tiny_test", f"--tokenizer={tiny_tokenizer_file}", "--data.source=beton",
            f"--data.train_path={train}", "--data.num_workers=1", "--schedule.total_steps=16",
            "--run.save_interval=4"]
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    run_stage("pretrain.mim", args + [f"--run.output_dir={ref}"])
    proc = launch_stage("pretrain.mim", args + [f"--run.output_dir={killed}"])
    kill_when(proc, killed / "metrics.jsonl", rows=7)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    out = run_stage("pretrain.mim", args + [f"--run.output_dir={killed}"])
    assert "resumed from" in out
    assert losses(killed) == losses(ref)

    # Held-out masked-token metrics through the command line, on the test .beton under the training view.
    proc = subprocess.run([sys.executable, "-m", "pretrain.mim", "evaluate", str(ref),
                           f'--data_cfg={{"eval_path": "{test}", "eval_images": 64}}',
                           f"--out={tmp_path / 'eval.json'}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    held_out = json.loads((tmp_path / "eval.json").read_text())
    assert held_out["images"] == 64 and held_out["masked_tokens"] == 64 * 6
    assert 0 < held_out["mim_acc"] <= 1 and 0 < held_out["mim_loss"] < 10

    # The finished run exports to timm's BEiT v2 layout, and timm gives our backbone's features.
    import timm
    import torch

    from pretrain.mim import load_mim_model
    target = tmp_path / "backbone.safetensors"
    proc = subprocess.run([sys.executable, "-m", "pretrain.mim", "export", str(ref), str(target)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ours = load_mim_model(str(ref / "mim.pt")).eval()
    theirs = timm.create_model("beitv2_base_patch16_224", pretrained=True, num_classes=0,
                               pretrained_cfg_overlay=dict(file=str(target)), img_size=32, patch_size=8,
                               embed_dim=64, depth=3, num_heads=2).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(theirs.forward_features(images), ours.forward_features(images)[0])
