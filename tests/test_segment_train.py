"""Segmentation end to end on real Fashion-MNIST garments (mosaics; tiny UperNet BEiT, CPU ranks): the ADE20K folder
layout through the converter and the FFCV loader into training, learning, exact resume after SIGKILL, distributed
evaluation through the CLI, and the one-line errors."""
import json

import pytest
import torch

from tests.conftest import cli_error
from tests.dist_util import kill_when, launch_stage, losses, run_stage

pytestmark = pytest.mark.slow
STAGE = "finetune.segment"


def tiny_args(out, *extra):
    return ["train", "upernet_beitv2_tiny_test", f"--run.output_dir={out}", *extra]


@pytest.fixture(scope="module")
def mosaics_beton(tmp_path_factory, fashion_mnist_available):
    """24 training and 6 validation mosaics (48 px) written in the ADE20K layout and converted to .beton files."""
    from data_tools.convert import ade20k
    from data_tools.mosaics import write_ade20k
    root = tmp_path_factory.mktemp("mosaics")
    write_ade20k(str(root / "ade"), train=24, val=6, height=48, width_range=(48, 64))
    for split, name in (("training", "train"), ("validation", "val")):
        ade20k(str(root / "ade"), str(root / f"{name}.beton"), split=split, progress=False)
    return root


def test_a_tiny_segmenter_learns_mosaics_from_a_beton(mosaics_beton, tmp_path):
    """Trained on 24 mosaics from the converted .beton and evaluated on the same images: mIoU must rise well above
    that of the same model before training (the machinery learns; generalisation is the demo's question)."""
    from finetune.segment.config import SegAugmentConfig, SegEvalConfig
    from finetune.segment.train import held_out_metrics, train
    from finetune.segment.model import build_segmenter, load_segmenter
    from data_tools.config import DataConfig
    train_beton = str(mosaics_beton / "train.beton")
    data = DataConfig(source="beton", train_path=train_beton, eval_path=train_beton, eval_images=0, num_workers=1)
    augment = SegAugmentConfig(scale=(48, 48), ratio_range=(0.75, 1.25))
    ev = SegEvalConfig(stride=16)
    torch.manual_seed(0)
    before = held_out_metrics(build_segmenter("upernet_beitv2_tiny_test", 11), data, augment, ev, 48,
                              torch.device("cpu"))
    summary = train("upernet_beitv2_tiny_test", **{
        "data.source": "beton", "data.train_path": train_beton, "data.eval_path": train_beton,
        "data.eval_images": 0, "data.limit": 0, "data.num_workers": 1, "schedule.total_steps": 300,
        "schedule.warmup_steps": 10, "optim.lr": 3e-3, "run.micro_batch_size": 8, "run.log_interval": 25,
        "run.save_interval": 300, "run.output_dir": str(tmp_path / "run")})
    after = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert before["images"] == after["images"] == 24
    assert after["mIoU"] > before["mIoU"] + 0.15 and after["mIoU"] > 2 * before["mIoU"], (before, after)
    assert summary["eval_mIoU"] == after["mIoU"]
    curve = losses(tmp_path / "run")
    assert curve[300] < curve[25] - 0.3, curve
    # The saved segmenter gives the run's numbers again on its own.
    again = held_out_metrics(load_segmenter(tmp_path / "run" / "segmenter.pt"), data, augment, ev, 48,
                             torch.device("cpu"))
    assert again["mIoU"] == pytest.approx(after["mIoU"], abs=1e-12)


def test_the_linear_probe_learns_mosaics_with_the_backbone_left_as_loaded(mosaics_beton, tmp_path):
    """The linear probe on a tiny MIM checkpoint, trained through the stage on the converted .beton and evaluated on
    the same images: its head learns (pixel accuracy and mIoU above the untrained head's, the loss falls), and the saved
    segmenter's backbone is the checkpoint's to the bit (frozen: no gradients, no batch norm or drop path drift)."""
    from data_tools.config import DataConfig
    from finetune.segment.config import SegAugmentConfig, SegEvalConfig
    from finetune.segment.model import build_segmenter, load_segmenter
    from finetune.segment.train import held_out_metrics, train
    from pretrain.mim import save_mim_model
    from tests.test_finetune_model import tiny_mim
    mim = tmp_path / "mim.pt"
    save_mim_model(tiny_mim(), mim)
    train_beton = str(mosaics_beton / "train.beton")
    data = DataConfig(source="beton", train_path=train_beton, eval_path=train_beton, eval_images=0, num_workers=1)
    augment, ev = SegAugmentConfig(scale=(48, 48), ratio_range=(0.75, 1.25)), SegEvalConfig(stride=16)
    torch.manual_seed(0)
    loaded = build_segmenter("linear_beitv2_tiny_test", 11, mim)
    before = held_out_metrics(loaded, data, augment, ev, 48, torch.device("cpu"))
    train("upernet_beitv2_tiny_test", **{
        "arch": "linear_beitv2_tiny_test", "init": str(mim), "model.drop_path": 0.1,
        "data.source": "beton", "data.train_path": train_beton, "data.eval_path": train_beton,
        "data.eval_images": 0, "data.limit": 0, "data.num_workers": 1, "schedule.total_steps": 120,
        "schedule.warmup_steps": 10, "optim.lr": 1e-2, "run.micro_batch_size": 8, "run.log_interval": 10,
        "run.save_interval": 120, "run.output_dir": str(tmp_path / "run")})
    after = json.loads((tmp_path / "run" / "eval.json").read_text())
    # The tiny checkpoint's features are weak: the head learns background (aAcc 0.30 -> 0.50) and a few classes.
    assert after["aAcc"] > before["aAcc"] + 0.12 and after["mIoU"] > before["mIoU"] + 0.03, (before, after)
    curve = losses(tmp_path / "run")
    assert curve[120] < curve[10] - 0.25, curve
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert not any("loss_aux" in r for r in rows)   # no auxiliary head
    saved = load_segmenter(tmp_path / "run" / "segmenter.pt").state_dict()
    for key, value in loaded.state_dict().items():
        if key.startswith("backbone."):
            assert torch.equal(saved[key], value), key
        elif key == "decode_head.conv_seg.weight":
            assert not torch.equal(saved[key], value)


def test_a_killed_segmentation_run_resumes_with_the_same_losses_and_evaluates_alike_on_two_ranks(tmp_path):
    # Full pipeline (random resize, cat_max_ratio crops, flip, photometric distortion) and drop path: every draw is
    # resume-exact.
    args = ["--schedule.total_steps=8", "--run.save_interval=3", "--model.drop_path=0.1"]
    run_stage(STAGE, tiny_args(tmp_path / "straight", *args))
    killed = tmp_path / "killed"
    proc = launch_stage(STAGE, tiny_args(killed, *args))
    kill_when(proc, killed / "metrics.jsonl", rows=5)
    assert proc.returncode != 0 and (killed / "checkpoints" / "latest").read_text() == "step_00000003"
    out = run_stage(STAGE, tiny_args(killed, *args))
    assert "resumed from" in out
    assert losses(killed) == losses(tmp_path / "straight")   # bitwise: steps 4-8 redone identically
    assert losses(killed, "loss_aux") == losses(tmp_path / "straight", "loss_aux")
    # 8 validation mosaics on 2 ranks (4 + 4) and 7 (4 + 3, uneven) through the evaluate CLI vs one process.
    from finetune.segment.evaluate import evaluate
    run_eval = json.loads((killed / "eval.json").read_text())
    one = evaluate(str(killed))
    assert one["images"] == run_eval["images"] == 8 and one["mIoU"] == pytest.approx(run_eval["mIoU"], abs=1e-12)
    data = '{"source": "fashion_mnist", "eval_images": 7}'
    run_stage(STAGE, ["evaluate", str(killed), f"--data_cfg={data}", f"--out={tmp_path / 'two.json'}"])
    two = json.loads((tmp_path / "two.json").read_text())
    one = evaluate(str(killed), data_cfg=json.loads(data))
    assert two["images"] == one["images"] == 7
    assert (two["mIoU"], two["mAcc"], two["aAcc"], two["pixels"]) == (one["mIoU"], one["mAcc"], one["aAcc"],
                                                                       one["pixels"])


def _cli_error(capsys, *argv):
    from finetune.segment.__main__ import COMMANDS
    return cli_error(capsys, COMMANDS, *argv)


def test_bad_inputs_are_one_line_errors(tiny_tokenizer_file, capsys, tmp_path, fashion_mnist_available):
    from finetune.segment.model import build_segmenter, save_segmenter
    err = _cli_error(capsys, *tiny_args(tmp_path / "a", f"--init={tiny_tokenizer_file}"))
    assert "tokenizer" in err and str(tiny_tokenizer_file) in err
    seg = tmp_path / "segmenter.pt"
    save_segmenter(build_segmenter("upernet_beitv2_tiny_test", 11), seg)
    err = _cli_error(capsys, *tiny_args(tmp_path / "b", f"--init={seg}", "--num_classes=5"))
    assert "segments 11 classes" in err and "new_head" in err
    # Mosaic annotations hold ids up to 11 (10 garments after reduce_zero_label): 5 classes cannot take them.
    err = _cli_error(capsys, *tiny_args(tmp_path / "c", "--num_classes=5"))
    assert "label id" in err and "outside the model's 5 classes" in err and "num_classes" in err
    err = _cli_error(capsys, "evaluate", str(seg), "--arch=upernet_beitv2_tiny_test")
    assert "--num_classes" in err
    err = _cli_error(capsys, *tiny_args(tmp_path / "d", "--run.micro_batch_size=1"))
    assert "micro_batch_size" in err
    err = _cli_error(capsys, *tiny_args(tmp_path / "e", "--data.source=beton"))
    assert "data.train_path" in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "d").exists()   # nothing written by runs that never began
