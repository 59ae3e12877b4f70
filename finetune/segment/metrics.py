"""Segmentation evaluation: the official test-time view (resize to the test scale, sliding windows, optional
multi-scale + flip), a confusion matrix all-reduced over ranks, and mIoU / mAcc / aAcc as mmseg computes them."""
from __future__ import annotations

import math
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from data_tools.gpu_augment import normalize, to_rgb_float
from data_tools.gpu_segment import IGNORE, reduce_zero_label
from engine.parallel import distributed as dist_utils

Predict = Callable[[Tensor], Tensor]   # normalised crops [B, 3, c, c] -> logits [B, K, c, c]
# mmseg's multi-scale test ratios (of the test scale), used with flip for the "+MS" numbers.
MS_RATIOS = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)


def confusion_matrix(pred: Tensor, label: Tensor, num_classes: int, ignore_index: int = IGNORE) -> Tensor:
    """int64 [K, K] counts of (label row, prediction column) over the pixels whose label is not `ignore_index`."""
    valid = label != ignore_index
    idx = label[valid].long() * num_classes + pred[valid].long()
    return torch.bincount(idx, minlength=num_classes * num_classes).view(num_classes, num_classes)


def segmentation_metrics(cm: Tensor, class_names: Sequence[str] | None = None) -> dict:
    """mIoU and mAcc (means over classes, skipping classes without pixels in labels and predictions (IoU) or in
    labels (Acc), as mmseg's nanmean) and aAcc (pixel accuracy), as fractions; plus the per-class table."""
    cm = cm.double().cpu()
    hit, in_label, in_pred = cm.diag(), cm.sum(1), cm.sum(0)
    union = in_label + in_pred - hit
    iou = torch.where(union > 0, hit / union.clamp(min=1), torch.full_like(hit, math.nan))
    acc = torch.where(in_label > 0, hit / in_label.clamp(min=1), torch.full_like(hit, math.nan))
    names = list(class_names) if class_names else [str(i) for i in range(len(hit))]
    return {"mIoU": float(iou.nanmean()), "mAcc": float(acc.nanmean()),
            "aAcc": float(hit.sum() / in_label.sum().clamp(min=1)), "pixels": int(in_label.sum()),
            "per_class": [{"class": names[i], "iou": None if math.isnan(iou[i]) else float(iou[i]),
                           "acc": None if math.isnan(acc[i]) else float(acc[i]), "pixels": int(in_label[i])}
                          for i in range(len(hit))]}


def per_class_table(metrics: dict) -> str:
    """The per-class IoU / accuracy as a Markdown table (percent; '-' for classes absent from the data)."""
    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.2f}"
    rows = [f"| {c['class']} | {pct(c['iou'])} | {pct(c['acc'])} |" for c in metrics["per_class"]]
    return "\n".join(["| class | IoU | Acc |", "| --- | ---: | ---: |", *rows])


def slide_logits(predict: Predict, image: Tensor, num_classes: int, crop: int, stride: int, batch: int = 8
                 ) -> Tensor:
    """mmseg's sliding-window inference of one normalised image [1, 3, H, W] -> logits [1, K, H, W]: windows of
    `crop` every `stride` pixels (the last one flush with the border), overlapping logits averaged. An image smaller
    than the crop is padded with zeros (the mean colour after normalisation) and the padding cut off again."""
    _, _, h0, w0 = image.shape
    pad_h, pad_w = max(crop - h0, 0), max(crop - w0, 0)
    image = F.pad(image, (0, pad_w, 0, pad_h))
    h, w = image.shape[2:]
    rows = max(h - crop + stride - 1, 0) // stride + 1
    cols = max(w - crop + stride - 1, 0) // stride + 1
    boxes = []
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * stride + crop, h), min(c * stride + crop, w)
            boxes.append((y2 - crop, x2 - crop))
    logits = image.new_zeros(1, num_classes, h, w, dtype=torch.float32)
    count = image.new_zeros(1, 1, h, w, dtype=torch.float32)
    for start in range(0, len(boxes), batch):
        chunk = boxes[start:start + batch]
        out = predict(torch.cat([image[:, :, y:y + crop, x:x + crop] for y, x in chunk])).float()
        for (y, x), o in zip(chunk, out):
            logits[0, :, y:y + crop, x:x + crop] += o
            count[0, :, y:y + crop, x:x + crop] += 1
    return (logits / count)[:, :, :h0, :w0]


def scaled_size(h: int, w: int, scale: Sequence[int], ratio: float = 1.0) -> tuple[int, int]:
    """mmcv's keep-ratio rescale: the largest size with long side <= scale[0] * ratio, short <= scale[1] * ratio."""
    long_edge, short_edge = max(scale) * ratio, min(scale) * ratio
    f = min(long_edge / max(h, w), short_edge / min(h, w))
    return int(h * f + 0.5), int(w * f + 0.5)


@torch.no_grad()
def predict_image(predict: Predict, image: Tensor, num_classes: int, crop: int, stride: int,
                  scale: Sequence[int], ratios: Sequence[float] = (1.0,), flip: bool = False) -> Tensor:
    """Class probabilities [K, h, w] of one uint8 image [3, h, w] at its own size: per ratio (and flip), resized to the
    test scale, slid over, resized back and soft-maxed; the views' probabilities averaged (mmseg's aug_test)."""
    h, w = image.shape[1:]
    rgb = to_rgb_float(image.unsqueeze(0))   # [1, 3, h, w] in [0, 255]
    probs = rgb.new_zeros(num_classes, h, w, dtype=torch.float32)
    views = 0
    for ratio in ratios:
        x = F.interpolate(rgb, size=scaled_size(h, w, scale, ratio), mode="bilinear", align_corners=False)
        x = normalize(x / 255.0)
        for flipped in ((False, True) if flip else (False,)):
            view = x.flip(-1) if flipped else x
            logits = slide_logits(predict, view, num_classes, crop, stride)
            logits = logits.flip(-1) if flipped else logits
            logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
            probs += logits[0].softmax(0)
            views += 1
    return probs / views


def check_label_range(label: Tensor, num_classes: int, where: str) -> None:
    """A label map (after reduce_zero_label) may hold class ids < num_classes and the ignore index only."""
    bad = (label >= num_classes) & (label != IGNORE)
    if bool(bad.any()):
        value = int(label[bad].max())
        raise ValueError(f"{where}: label id {value} is outside the model's {num_classes} classes (annotation ids "
                         f"are 1..{num_classes} with reduce_zero_label, 0 = ignored); set num_classes to the data's "
                         f"class count or fix the annotations")


@torch.no_grad()
def evaluate_segmenter(predict: Predict, batches: Iterable[dict], num_classes: int, *, crop: int, stride: int,
                       scale: Sequence[int], ratios: Sequence[float] = (1.0,), flip: bool = False,
                       reduce_zero: bool = True, class_names: Sequence[str] | None = None,
                       source: str = "held-out data") -> dict:
    """mIoU / mAcc / aAcc over raw (un-augmented) batches `{"image": uint8 canvases, "label", "size"}` of every rank:
    each image is cut from its canvas, predicted at its own size, and counted once in the all-reduced matrix."""
    cm = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=dist_utils.current_device())
    images = torch.zeros(1, dtype=torch.int64, device=cm.device)
    for batch in batches:
        for img, lab, (h, w) in zip(batch["image"], batch["label"], batch["size"].tolist()):
            label = lab[:h, :w].long()
            label = reduce_zero_label(label) if reduce_zero else label
            check_label_range(label, num_classes, source)
            probs = predict_image(predict, img[:, :h, :w], num_classes, crop, stride, scale, ratios, flip)
            cm += confusion_matrix(probs.argmax(0), label.to(probs.device), num_classes).to(cm)
            images += 1
    dist_utils.all_reduce_sum_(cm)
    dist_utils.all_reduce_sum_(images)
    return {"images": int(images), **segmentation_metrics(cm, class_names)}
