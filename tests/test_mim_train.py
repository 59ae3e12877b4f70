"""MIM pretraining end to end on 2 gloo ranks: ZeRO 0/2/3 in fp32 and bf16, tokenizer checks, no host syncs, and
held-out evaluation of a trained run. (SIGKILL + resume and the export to timm run in test_stage_beton.py, on the
.beton source.)

Real data (Fashion-MNIST from Debian). The frozen tokenizer is a tiny randomly initialised VQ-KD saved by the
test: its codes are a fixed function of the image, which is all MIM needs to have something to learn.
"""
import json
import subprocess
import sys

import pytest
import torch

from engine.config.schema import resolve
from pretrain.mim import build_mim_model, save_mim_model
from pretrain.mim.config import RECIPES, MIMConfig
from pretrain.mim.evaluate import evaluate
from pretrain.mim.train import build_model
from pretrain.tokenizer import build_tokenizer, save_tokenizer
from tests.conftest import ROOT
from tests.dist_util import losses, run_stage

pytestmark = pytest.mark.usefixtures("fashion_mnist_available")


def train_args(tokenizer, out, *extra):
    return ["train", "beitv2_tiny_test", f"--tokenizer={tokenizer}", f"--run.output_dir={out}", *extra]


def pretrain(tokenizer, out, zero: int, precision: str):
    run_stage("pretrain.mim", train_args(tokenizer, out, f"--run.ds_config=ds_configs/zero{zero}.json",
                                         f"--run.precision={precision}", "--schedule.total_steps=16"))
    return out


@pytest.fixture(scope="module")
def zero2_fp32_run(tmp_path_factory, tiny_tokenizer_file):
    """One 16-step ZeRO-2 fp32 run, shared by the loss test and the held-out evaluation test."""
    return pretrain(tiny_tokenizer_file, tmp_path_factory.mktemp("mim") / "run", 2, "fp32")


@pytest.mark.slow
@pytest.mark.parametrize("zero,precision", [(2, "fp32"), (3, "fp32"), (2, "bf16"), (3, "bf16"),
                                            (0, "bf16_autocast")])
def test_two_rank_pretraining_loss_falls(request, tmp_path, tiny_tokenizer_file, zero, precision):
    if (zero, precision) == (2, "fp32"):
        out = request.getfixturevalue("zero2_fp32_run")
    else:
        out = pretrain(tiny_tokenizer_file, tmp_path / "run", zero, precision)
    curve = losses(out)
    assert sorted(curve) == list(range(1, 17))
    first, last = sum(curve[s] for s in (1, 2, 3)) / 3, sum(curve[s] for s in (14, 15, 16)) / 3
    assert last < first - 0.5, curve
    acc = losses(out, "mim_acc")
    assert max(acc[s] for s in (14, 15, 16)) > 1 / 64   # better than chance over the 64 codes
    agg = losses(out, "agg_loss")
    assert agg[16] < agg[1]   # the aggregation head learns too


@pytest.mark.slow
def test_held_out_evaluation_sees_what_pretraining_learned(tmp_path, zero2_fp32_run, tiny_tokenizer_file):
    data = {"eval_images": 300}
    trained = evaluate(str(zero2_fp32_run), data_cfg=data, out=str(tmp_path / "eval.json"))
    assert trained["tokenizer"] == str(tiny_tokenizer_file)   # read from the run's config.json
    assert trained["images"] == 300 and trained["masked_tokens"] == 300 * 6
    assert json.loads((tmp_path / "eval.json").read_text()) == trained
    # An untrained model of the same arch, on the same images and masks (so the same labels and majority code).
    torch.manual_seed(0)
    save_mim_model(build_mim_model("beitv2_tiny_test"), tmp_path / "untrained.pt")
    untrained = evaluate(str(tmp_path / "untrained.pt"), tokenizer=str(tiny_tokenizer_file), data_cfg=data,
                         masking={"min_patches": 2})
    assert untrained["majority_code_acc"] == trained["majority_code_acc"]
    assert trained["mim_loss"] < untrained["mim_loss"] - 0.5 and trained["agg_loss"] < untrained["agg_loss"] - 0.5
    assert trained["mim_acc"] > trained["majority_code_acc"] > untrained["mim_acc"]
    # Fixed seeds: the same call gives the same numbers; another seed or the un-augmented view other ones.
    assert evaluate(str(zero2_fp32_run), data_cfg=data) == trained
    assert evaluate(str(zero2_fp32_run), data_cfg=data, seed=1)["majority_code_acc"] != trained["majority_code_acc"]
    assert evaluate(str(zero2_fp32_run), data_cfg=data, augment=False)["mim_loss"] != trained["mim_loss"]
    with pytest.raises(ValueError, match="--batch_size must be a whole number >= 1"):
        evaluate(str(zero2_fp32_run), batch_size=0)
    with pytest.raises(FileNotFoundError, match="MIM model checkpoint not found: .*nothing.pt"):
        evaluate(str(tmp_path / "nothing.pt"))
    with pytest.raises(ValueError, match="names its tokenizer: give --tokenizer=PATH"):
        evaluate(str(tmp_path / "untrained.pt"))
    wrong = tmp_path / "wrong.pt"
    save_tokenizer(build_tokenizer("vqkd_tiny_test", num_codes=32), str(wrong))
    with pytest.raises(ValueError, match="vocabulary 32 vs the model's 64"):
        evaluate(str(zero2_fp32_run), tokenizer=str(wrong))


@pytest.mark.slow
def test_pretraining_starts_from_given_weights(tmp_path, zero2_fp32_run, tiny_tokenizer_file):
    # Same seed, so step 1 sees the same batch as the first run's step 1: the loss there is the trained model's.
    out = tmp_path / "continued"
    run_stage("pretrain.mim", train_args(tiny_tokenizer_file, out, f"--init_weights={zero2_fp32_run / 'mim.pt'}",
                                         "--schedule.total_steps=2"))
    fresh, continued = losses(zero2_fp32_run), losses(out)
    assert continued[1] < fresh[1] - 0.5, (continued, fresh)
    other_arch = tmp_path / "small.pt"
    save_mim_model(build_mim_model("beitv2_small_demo"), other_arch)
    cfg = resolve(MIMConfig, RECIPES, "beitv2_tiny_test", {"tokenizer": "t.pt", "init_weights": str(other_arch)})
    with pytest.raises(ValueError) as err:
        build_model(cfg)
    assert str(err.value).startswith(f"{other_arch} does not match MIM arch beitv2_tiny_test: missing")
    assert str(err.value).endswith("pick the recipe or --arch that matches the file")


@pytest.mark.slow
def test_tokenizer_that_does_not_fit_is_a_one_line_error(tmp_path):
    wrong = tmp_path / "wrong.pt"
    save_tokenizer(build_tokenizer("vqkd_tiny_test", num_codes=32), str(wrong))
    proc = subprocess.run([sys.executable, "-m", "pretrain.mim", *train_args(wrong, tmp_path / "out")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: tokenizer") and "vocabulary 32 vs the model's 64" in last
    proc = subprocess.run([sys.executable, "-m", "pretrain.mim", "train", "beitv2_tiny_test"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "config key 'tokenizer' is required" in proc.stderr


def test_flex_attention_on_a_cpu_run_is_a_one_line_error(tmp_path, tiny_tokenizer_file):
    proc = subprocess.run([sys.executable, "-m", "pretrain.mim",
                           *train_args(tiny_tokenizer_file, tmp_path / "out", "--model.attention=flex")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: model.attention=flex trains on CUDA only")


SYNC_COUNT = """
import sys
from bench.common import DispatchCounter
from pretrain.mim.train import train
tokenizer, out, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
with DispatchCounter() as counter:
    train("beitv2_tiny_test", tokenizer=tokenizer, **{
        "data.source": "synthetic", "data.limit": 64, "run.output_dir": out, "run.precision": "bf16_autocast",
        "run.ds_config": "ds_configs/zero0.json", "run.log_interval": steps, "run.save_interval": 1000,
        "run.save_final": False, "run.progress_bar": False, "schedule.total_steps": steps})
print("SYNCS", counter.syncs)
"""


@pytest.mark.slow
def test_the_pretraining_step_never_waits_for_the_device(tmp_path, tiny_tokenizer_file):
    # Masks, device augmentation, tokenizer targets, model, losses and the lean engine step: 2 or 6 steps
    # between two log points read the device the same number of times.
    syncs = []
    for steps in (2, 6):
        proc = subprocess.run([sys.executable, "-c", SYNC_COUNT, str(tiny_tokenizer_file), str(tmp_path / str(steps)),
                               str(steps)], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        syncs.append(int(proc.stdout.split("SYNCS ")[1].split()[0]))
    assert syncs[0] == syncs[1], syncs
