"""Classification fine-tuning, linear probe and k-NN end to end on real Fashion-MNIST images (tiny ViT, CPU ranks)."""
import json

import pytest
import torch

from tests.conftest import cli_error
from tests.dist_util import kill_when, launch_stage, losses, run_stage

pytestmark = pytest.mark.slow
STAGE = "finetune.classify"
# Light augmentation and a high lr: a tiny ViT from scratch learns Fashion-MNIST slowly under the full recipe.
LEARNABLE = ["--augment.rand_augment=false", "--augment.mixup=0", "--augment.cutmix=0", "--augment.erase_prob=0",
             "--augment.scale_min=0.5", "--optim.lr=5e-3", "--data.limit=4096", "--data.eval_images=301"]


def tiny_args(out, *extra):
    return ["train", "beitv2_tiny_test_ft", f"--run.output_dir={out}", *extra]


@pytest.fixture(scope="module")
def learned(tmp_path_factory, fashion_mnist_available):
    """A 2-rank ZeRO-2 fine-tune from random weights, long enough to learn (200 steps of 32 images)."""
    out = tmp_path_factory.mktemp("ft") / "learn"
    run_stage(STAGE, tiny_args(out, *LEARNABLE, "--run.micro_batch_size=16", "--schedule.total_steps=200",
                               "--schedule.warmup_steps=10", "--run.log_interval=20", "--run.save_interval=100"))
    return out


def test_a_tiny_fine_tune_learns_fashion_mnist_and_evaluates_the_same_through_the_cli(learned):
    ev = json.loads((learned / "eval.json").read_text())
    assert ev["images"] == 301   # 2 ranks, uneven shards (151 + 150): every image counted once
    assert ev["top1"] > 0.4, ev   # chance is 0.1
    assert ev["top5"] >= ev["top1"]
    curve = losses(learned)
    assert curve[200] < curve[20] - 0.3, curve
    # The saved classifier, evaluated alone, gives the numbers the run measured with its own weights.
    from finetune.classify.evaluate import evaluate
    again = evaluate(str(learned))
    assert again["images"] == 301 and again["top1"] == pytest.approx(ev["top1"], abs=1e-9)
    assert again["loss"] == pytest.approx(ev["loss"], rel=1e-5)


def test_knn_on_two_ranks_equals_one_process_and_probes_beat_chance(learned, tmp_path, monkeypatch):
    from finetune.classify.probe import knn, linear_probe
    data = '{"source": "fashion_mnist", "limit": 1001, "eval_images": 301}'
    ckpt = str(learned / "classifier.pt")
    common = [f"--data_cfg={data}", "--eval_crop=1.0", "--pooling=mean"]   # the pooling the classifier learned
    run_stage(STAGE, ["knn", ckpt, *common, f"--out={tmp_path / 'knn2.json'}"])
    two = json.loads((tmp_path / "knn2.json").read_text())
    one = knn(ckpt, pooling="mean", data_cfg=json.loads(data), eval_crop=1.0)
    assert two["test_images"] == one["test_images"] == 301
    assert (two["top1"], two["top5"]) == (one["top1"], one["top5"])   # uneven shards merged exactly
    assert one["top1"] > 0.4
    cache = tmp_path / "features"
    probe = linear_probe(ckpt, pooling="mean", data_cfg=json.loads(data), epochs=5, batch_size=128, eval_crop=1.0,
                         cache_dir=str(cache))
    assert probe["top1"] > 0.4 and len(probe["history"]) == 5
    assert probe["history"][-1]["loss"] < probe["history"][0]["loss"]
    # The cached features serve k-NN without computing anything again, and give the same answer.
    from finetune.features import FrozenFeatures
    monkeypatch.setattr(FrozenFeatures, "forward", lambda *a: pytest.fail("features computed again"))
    cached = knn(ckpt, pooling="mean", data_cfg=json.loads(data), eval_crop=1.0, cache_dir=str(cache))
    assert (cached["top1"], cached["top5"]) == (one["top1"], one["top5"])
    assert len(list(cache.glob("*/*.done"))) == 2   # train and test of one feature kind, one rank


def test_a_killed_fine_tune_resumes_with_the_same_losses(tmp_path, fashion_mnist_available):
    # The full recipe (RandAugment, random erasing, mixup/cutmix, label smoothing, drop path) and a weights EMA:
    # every draw is resume-exact and the EMA is checkpointed.
    args = ["--schedule.total_steps=8", "--run.save_interval=3", "--model.drop_path=0.1", "--model.ema_decay=0.9"]
    run_stage(STAGE, tiny_args(tmp_path / "straight", *args))
    killed = tmp_path / "killed"
    proc = launch_stage(STAGE, tiny_args(killed, *args))
    kill_when(proc, killed / "metrics.jsonl", rows=5)
    assert proc.returncode != 0 and (killed / "checkpoints" / "latest").read_text() == "step_00000003"
    out = run_stage(STAGE, tiny_args(killed, *args))
    assert "resumed from" in out
    assert losses(killed) == losses(tmp_path / "straight")   # bitwise: steps 4-8 redone identically
    from engine.storage.weights import read_weights_file
    ema_a, _ = read_weights_file(tmp_path / "straight" / "classifier_ema.pt", "ema", "beitv2-ds/classifier/1")
    ema_b, _ = read_weights_file(killed / "classifier_ema.pt", "ema", "beitv2-ds/classifier/1")
    final, _ = read_weights_file(killed / "classifier.pt", "final", "beitv2-ds/classifier/1")
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)
    assert not torch.equal(ema_b["head.weight"], final["head.weight"])   # an average, not the last weights
    ev = json.loads((killed / "eval.json").read_text())
    assert ev["ema"]["images"] == ev["images"] and 0 <= ev["ema"]["top1"] <= 1


def _cli_error(capsys, *argv):
    from finetune.classify.__main__ import COMMANDS
    return cli_error(capsys, COMMANDS, *argv)


def test_bad_inputs_are_one_line_errors(tiny_tokenizer_file, learned, capsys, tmp_path):
    err = _cli_error(capsys, *tiny_args(tmp_path / "a", f"--init={tiny_tokenizer_file}"))
    assert "tokenizer" in err and str(tiny_tokenizer_file) in err
    # 12: more classes than Fashion-MNIST's labels need (fewer is an error about the data: test_user_data.py)
    err = _cli_error(capsys, *tiny_args(tmp_path / "b", f"--init={learned / 'classifier.pt'}", "--num_classes=12"))
    assert "10 classes" in err and "new_head" in err
    err = _cli_error(capsys, *tiny_args(tmp_path / "c", "--model.img_size=30"))
    assert "model.img_size" in err and "multiple" in err
    err = _cli_error(capsys, "evaluate", str(learned / "classifier.pt"), "--arch=beitv2_tiny_test")
    assert "--num_classes" in err
    err = _cli_error(capsys, "linear_probe", "random", "--pooling=agg")
    assert "--pooling" in err
    assert not (tmp_path / "a").exists()   # nothing written by a run that could not start
