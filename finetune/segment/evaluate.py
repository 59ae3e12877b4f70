"""`python -m finetune.segment evaluate`: mIoU / mAcc / aAcc of a segmenter on held-out images, single- or
multi-scale, each rank its shard under a launcher (confusion matrix all-reduced), or all images on one process."""
from __future__ import annotations

import os

from data_tools.config import DataConfig
from engine.config.cli import check_counts
from engine.config.schema import ConfigError, config_section, saved_run_config
from engine.loop.evaluation import eval_device, write_result
from finetune.segment.config import SegAugmentConfig, SegEvalConfig, SegmentConfig
from finetune.segment.metrics import MS_RATIOS
from finetune.segment.train import held_out_metrics
from finetune.segment.model import build_segmenter, load_segmenter


def evaluate(checkpoint: str, arch: str = "", num_classes: int = 0, data_cfg: dict | None = None,
             augment_cfg: dict | None = None, stride: int = 0, multi_scale: bool = False, flip: bool = False,
             out: str = "") -> dict:
    """Segmentation metrics of a `segmenter.pt` (or its run directory) on held-out images.

    Args:
        checkpoint: a segmentation run's `segmenter.pt` or output directory; with `arch`, any file `--init` takes.
        arch: segmenter arch for files that do not record theirs (upernet_beitv2_base, ...).
        num_classes: classes, with `arch`.
        data_cfg: data settings (`source`, `eval_path`, `eval_images`) as a JSON object; defaults to the run's.
        augment_cfg: test scale and label settings (`scale`, `reduce_zero_label`) as a JSON object; defaults to the
            run's, else the official (2048, 512).
        stride: sliding-window stride; defaults to the run's, else the official 341.
        multi_scale: test at ratios 0.5-1.75 of the test scale and average (mmseg's "+MS"); add --flip for MS+flip.
        flip: also predict mirrored images.
        out: optional JSON path for the result.
    """
    if os.path.isdir(checkpoint):
        checkpoint = os.path.join(checkpoint, "segmenter.pt")
    if arch and num_classes < 2:
        raise ConfigError("--arch needs --num_classes (the class count of the checkpoint)")
    if stride:
        check_counts(stride=stride)
    device = eval_device()
    model = build_segmenter(arch, num_classes, checkpoint) if arch else load_segmenter(checkpoint)
    saved = saved_run_config(checkpoint)
    data = config_section(DataConfig, saved.get("data", {}), data_cfg, "data_cfg")
    augment = config_section(SegAugmentConfig, saved.get("augment", {}), augment_cfg, "augment_cfg")
    ev = config_section(SegEvalConfig, saved.get("eval", {}), None, "eval")
    ev.stride = stride or ev.stride
    ev.ratios = list(MS_RATIOS) if multi_scale else ev.ratios
    ev.flip = flip or ev.flip
    mosaic_size = saved.get("mosaic_size", SegmentConfig.mosaic_size)
    result = held_out_metrics(model.to(device), data, augment, ev, mosaic_size, device)
    return write_result({"checkpoint": checkpoint, "stride": ev.stride, "ratios": ev.ratios, "flip": ev.flip,
                         **result}, out)
