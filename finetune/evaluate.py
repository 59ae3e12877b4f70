"""Top-1 / top-5 of a classifier on held-out images: each rank its shard under a launcher, counts all-reduced, every
image counted once; or all images on one process."""
from __future__ import annotations

import os
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from data_tools.gpu_augment import EvalAug
from data_tools.sources import labelled_batches
from engine import distributed as dist_utils
from engine.cli import check_counts
from engine.config import ConfigError, DataConfig, config_section, saved_run_config
from engine.evaluation import eval_device, write_result
from finetune.model import build_classifier, load_classifier

OFFICIAL_EVAL_CROP = 224 / 256   # resize 256, centre crop 224


def topk_hits(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """`[hits@1, hits@5]` (float, on the device) of class scores `[n, C]` against labels `[n]`."""
    hits = scores.topk(min(5, scores.shape[-1]), dim=-1).indices == labels.unsqueeze(-1)
    return torch.stack([hits[:, 0].sum(), hits.sum()]).float()


@torch.no_grad()
def classification_metrics(model: nn.Module, batches: Iterable[dict], dtype: torch.dtype = torch.float32) -> dict:
    """`images`, `top1`, `top5` (fractions) and mean cross-entropy `loss` over `batches` of all ranks."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=dist_utils.current_device())   # images, hits@1, hits@5, CE
    for batch in batches:
        logits = model(batch["image"].to(dtype)).float()
        labels = batch["label"]
        ce = F.cross_entropy(logits, labels, reduction="sum")
        totals += torch.cat([ce.new_tensor([len(labels)]), topk_hits(logits, labels), ce[None]]).to(totals)
    dist_utils.all_reduce_sum_(totals)
    model.train(was_training)
    n, top1, top5, loss = totals.tolist()
    if n == 0:
        raise ConfigError("no held-out images to evaluate on; check data.eval_path / data.eval_images")
    return {"images": int(n), "top1": top1 / n, "top5": top5 / n, "loss": loss / n}


def held_out_metrics(model: nn.Module, data: DataConfig, eval_crop: float, batch_size: int, device: torch.device,
                     dtype: torch.dtype = torch.float32) -> dict:
    """`classification_metrics` on the test split seen as the official evaluation sees it (resize, centre crop)."""
    view = EvalAug(model.patch_embed.img_size[0], crop_fraction=eval_crop)
    batches = labelled_batches(data, "test", view, batch_size, device, dist_utils.rank(), dist_utils.world_size())
    return classification_metrics(model, batches, dtype)


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
    crop = eval_crop or saved.get("augment", {}).get("eval_crop", OFFICIAL_EVAL_CROP)
    if not 0 < crop <= 1:
        raise ConfigError(f"--eval_crop must be in (0, 1], got {crop}")
    result = held_out_metrics(model.to(device), data, crop, batch_size, device)
    return write_result({"checkpoint": checkpoint, "eval_crop": crop, **result}, out)
