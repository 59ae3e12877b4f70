"""Top-1 / top-5 of a classifier on held-out images: each rank its shard under a launcher, counts all-reduced, every
image counted once; or all images on one process."""
from __future__ import annotations

import os
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from data_tools.config import DataConfig
from data_tools.gpu_augment import EvalAug
from data_tools.sources import labelled_batches
from engine.config.cli import check_counts
from engine.config.run_plan import check_labels, data_split
from engine.config.schema import ConfigError, config_section, saved_run_config
from engine.loop.evaluation import eval_device, write_result
from engine.loop.labels import LabelRange
from engine.parallel import distributed as dist_utils
from finetune.model import build_classifier, load_classifier

OFFICIAL_EVAL_CROP = 224 / 256   # resize 256, centre crop 224


def topk_hits(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """`[hits@1, hits@5]` (float, on the device) of class scores `[n, C]` against labels `[n]`."""
    hits = scores.topk(min(5, scores.shape[-1]), dim=-1).indices == labels.unsqueeze(-1)
    return torch.stack([hits[:, 0].sum(), hits.sum()]).float()


@torch.no_grad()
def classification_metrics(model: nn.Module, batches: Iterable[dict], dtype: torch.dtype = torch.float32,
                           source: str = "the held-out data", class_names: list | None = None) -> dict:
    """`images`, `top1`, `top5` (fractions) and mean cross-entropy `loss` over `batches` of all ranks, and each
    class's `per_class` images and top-1 (named by `class_names`) when the model says its `num_classes`. A label
    outside the model's classes is a one-line error naming `source` and the label (counted on the device, read once
    at the end)."""
    was_training = model.training
    model.eval()
    device = dist_utils.current_device()
    totals = torch.zeros(4, dtype=torch.float64, device=device)   # images, hits@1, hits@5, CE
    num_classes = int(getattr(model, "num_classes", 0) or 0)
    per_class = torch.zeros(2, num_classes, dtype=torch.int64, device=device)   # images, hits@1 of each class
    guard = LabelRange(num_classes, source) if num_classes else None
    for batch in batches:
        logits = model(batch["image"].to(dtype)).float()
        guard = guard or LabelRange(logits.shape[-1], source)
        labels = guard(batch["label"])
        ce = F.cross_entropy(logits, labels, reduction="sum")
        totals += torch.cat([ce.new_tensor([len(labels)]), topk_hits(logits, labels), ce[None]]).to(totals)
        if num_classes:
            per_class[0] += torch.bincount(labels, minlength=num_classes).to(device)
            per_class[1] += torch.bincount(labels[logits.argmax(-1) == labels], minlength=num_classes).to(device)
    model.train(was_training)
    none = torch.iinfo(torch.int64).min
    worst = guard.worst.view(1).to(device) if guard is not None and guard.worst is not None else \
        torch.full((1,), none, device=device)
    worst = dist_utils.all_gather_cat(worst).max()   # the worst label of all ranks: every rank stops alike
    if guard is not None:
        guard.worst = worst
        guard.check()
    elif int(worst) != none:
        raise ConfigError(f"{source}: label {int(worst)} is outside the model's classes")
    dist_utils.all_reduce_sum_(totals)
    dist_utils.all_reduce_sum_(per_class)
    n, top1, top5, loss = totals.tolist()
    if n == 0:
        raise ConfigError("no held-out images to evaluate on; check data.eval_path / data.eval_images")
    result = {"images": int(n), "top1": top1 / n, "top5": top5 / n, "loss": loss / n}
    if num_classes:
        names = class_names if class_names and len(class_names) == num_classes else range(num_classes)
        result["per_class"] = [{"class": str(name), "images": int(k), "top1": hits / k if k else None}
                               for name, (k, hits) in zip(names, per_class.T.tolist())]
    return result


def held_out_metrics(model: nn.Module, data: DataConfig, eval_crop: float, batch_size: int, device: torch.device,
                     dtype: torch.dtype = torch.float32) -> dict:
    """`classification_metrics` on the test split seen as the official evaluation sees it (resize, centre crop)."""
    view = EvalAug(model.patch_embed.img_size[0], crop_fraction=eval_crop)
    batches = labelled_batches(data, "test", view, batch_size, device, dist_utils.rank(), dist_utils.world_size())
    split = data_split(data, "eval", "classify")
    return classification_metrics(model, batches, dtype, split.where, split.class_names)


def evaluate(checkpoint: str, arch: str = "", num_classes: int = 0, data_cfg: dict | None = None,
             eval_crop: float = 0.0, batch_size: int = 64, out: str = "") -> dict:
    """Top-1 / top-5 accuracy and cross-entropy of a classifier on held-out images.

    Args:
        checkpoint: a fine-tune run's `classifier.pt` (or its output directory); with `arch`, any checkpoint route,
            e.g. an official fine-tuned release.
        arch: classifier arch for files that do not record theirs (official: beit_base_patch16_224, ...).
        num_classes: head size, with `arch`.
        data_cfg: data settings (`source`, `eval_path`, `eval_images`), as a JSON object; defaults to the run's.
        eval_crop: centre-crop fraction (0.875 = 224 of 256); defaults to the run's, else the official 0.875.
        batch_size: images per forward pass (per rank).
        out: optional JSON path for the result.
    """
    check_counts(batch_size=batch_size)
    if os.path.isdir(checkpoint):
        checkpoint = os.path.join(checkpoint, "classifier.pt")
    if arch and num_classes < 2:
        raise ConfigError("--arch needs --num_classes (the head size of the checkpoint)")
    device = eval_device()
    model = build_classifier(arch, num_classes, checkpoint) if arch else load_classifier(checkpoint)
    saved = saved_run_config(checkpoint)
    data = config_section(DataConfig, saved.get("data", {}), data_cfg, "data_cfg")
    split = data_split(data, "eval", "classify")
    dist_utils.log_main(split.line())
    check_labels([split], model.num_classes, f"the head of {checkpoint}")
    crop = eval_crop or saved.get("augment", {}).get("eval_crop", OFFICIAL_EVAL_CROP)
    if not 0 < crop <= 1:
        raise ConfigError(f"--eval_crop must be in (0, 1], got {crop}")
    result = held_out_metrics(model.to(device), data, crop, batch_size, device)
    return write_result({"checkpoint": checkpoint, "eval_crop": crop, **result}, out)
