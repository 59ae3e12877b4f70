"""Batched augmentation on the device, every random draw taken from an explicit torch.Generator.

Inputs are uint8 canvases [B, C, Hc, Wc] (C = 1 or 3) whose real image is the top-left (h, w) given by `sizes`
[B, 2]; see data_tools/ffcv_ops.py for why. Nothing here reads global RNG state or synchronises with the host, so the
same (seed, step, rank, micro) gives the same batch after a resume, and shapes stay static.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torchvision.ops import roi_align

from data_tools.gpu_primitives import device_constant, grayscale
from data_tools.gpu_randaugment import rand_augment

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)



def generator_for(seed: int, step: int, rank: int, micro: int, device: torch.device | str) -> torch.Generator:
    """A generator whose stream depends only on (seed, step, rank, micro): resuming at `step` redraws the same
    values."""
    state = np.random.SeedSequence([seed, step, rank, micro]).generate_state(2, np.uint32)
    g = torch.Generator(device=device)
    g.manual_seed((int(state[0]) << 31) ^ int(state[1]))
    return g


def _uniform(n: int, lo: float, hi: float, g: torch.Generator, device) -> Tensor:
    return torch.rand(n, generator=g, device=device) * (hi - lo) + lo


def to_rgb_float(images: Tensor) -> Tensor:
    """uint8 [B, C, H, W] (C = 1 or 3) -> float32 [B, 3, H, W] in [0, 255]; grayscale is repeated, not converted."""
    x = images.float()
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


# ---------------------------------------------------------------------------------------------------------- geometry
def random_resized_crop_boxes(sizes: Tensor, scale: tuple[float, float], ratio: tuple[float, float],
                              g: torch.Generator, tries: int = 10) -> Tensor:
    """torchvision's RandomResizedCrop box for each image: [B, 4] float (x1, y1, x2, y2) in pixels.

    All `tries` candidates are drawn at once and the first valid one kept (same distribution as the per-sample loop);
    an image with no valid candidate gets torchvision's fallback, the central crop with the aspect ratio clamped.
    """
    device = sizes.device
    b = sizes.shape[0]
    h = sizes[:, 0:1].float()
    w = sizes[:, 1:2].float()
    area = h * w
    target = area * (torch.rand(b, tries, generator=g, device=device) * (scale[1] - scale[0]) + scale[0])
    log_r = torch.rand(b, tries, generator=g, device=device) * (math.log(ratio[1]) - math.log(ratio[0]))
    aspect = torch.exp(log_r + math.log(ratio[0]))
    cw = torch.round(torch.sqrt(target * aspect))
    ch = torch.round(torch.sqrt(target / aspect))
    ok = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
    first = torch.argmax(ok.int(), dim=1, keepdim=True)          # first valid try (0 if none, masked below)
    any_ok = ok.any(dim=1)
    cw = cw.gather(1, first).squeeze(1)
    ch = ch.gather(1, first).squeeze(1)
    u = torch.rand(b, 2, generator=g, device=device)
    h1, w1 = h.squeeze(1), w.squeeze(1)
    top = torch.floor(u[:, 0] * (h1 - ch + 1))
    left = torch.floor(u[:, 1] * (w1 - cw + 1))
    # fallback: whole image, aspect clamped into [ratio[0], ratio[1]]
    in_ratio = w1 / h1
    fw = torch.where(in_ratio < ratio[0], w1, torch.where(in_ratio > ratio[1], torch.round(h1 * ratio[1]), w1))
    fh = torch.where(in_ratio < ratio[0], torch.round(w1 / ratio[0]), h1)
    ftop = torch.floor((h1 - fh) / 2)
    fleft = torch.floor((w1 - fw) / 2)
    top, left = torch.where(any_ok, top, ftop), torch.where(any_ok, left, fleft)
    ch, cw = torch.where(any_ok, ch, fh), torch.where(any_ok, cw, fw)
    return torch.stack([left, top, left + cw, top + ch], dim=1)


def center_crop_boxes(sizes: Tensor, crop_fraction: float) -> Tensor:
    """Boxes equal to 'resize the short side to S / crop_fraction, then center-crop S' (timm eval, crop_pct)."""
    h = sizes[:, 0].float()
    w = sizes[:, 1].float()
    side = torch.minimum(h, w) * crop_fraction
    top = (h - side) / 2
    left = (w - side) / 2
    return torch.stack([left, top, left + side, top + side], dim=1)


def crop_resize(images: Tensor, boxes: Tensor, size: int) -> Tensor:
    """Resample each image's box to size x size with roi_align (bilinear, averaging several samples per output pixel
    when shrinking, so downscaling does not alias). images float [B, C, H, W], boxes [B, 4] -> [B, C, size, size]."""
    idx = torch.arange(images.shape[0], device=images.device, dtype=boxes.dtype).unsqueeze(1)
    return roi_align(images, torch.cat([idx, boxes], dim=1), output_size=(size, size), spatial_scale=1.0,
                     sampling_ratio=-1, aligned=True)


def random_flip(x: Tensor, g: torch.Generator, p: float = 0.5) -> Tensor:
    """Horizontal flip of each image with probability p."""
    flip = torch.rand(x.shape[0], generator=g, device=x.device) < p
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


# ------------------------------------------------------------------------------------------------------------ colour
def _blend(img: Tensor, other: Tensor, factor: Tensor, bound: float) -> Tensor:
    return (other + factor.view(-1, 1, 1, 1) * (img - other)).clamp(0, bound)


def color_jitter(x: Tensor, g: torch.Generator, brightness: float = 0.4, contrast: float = 0.4,
                 saturation: float = 0.4, bound: float = 255.0) -> Tensor:
    """torchvision ColorJitter(b, c, s, hue=0) per image: factors in [1-v, 1+v], the three ops in a random order per
    image. Each op is a blend x -> f*x + (1-f)*D with D = 0 (brightness), the mean grey level (contrast) or the grey
    image (saturation), so one round is a single full-size blend with a per-image D: no data-dependent shapes."""
    b, device = x.shape[0], x.device
    factors = torch.stack([_uniform(b, max(0.0, 1 - v), 1 + v, g, device)
                           for v in (brightness, contrast, saturation)], 1)           # [B, 3]
    order = torch.argsort(torch.rand(b, 3, generator=g, device=device), dim=1)
    for r in range(3):
        op = order[:, r]
        f = factors.gather(1, op.unsqueeze(1)).view(-1, 1, 1, 1)
        degenerate = grayscale(x)
        mean = degenerate.mean(dim=(1, 2, 3), keepdim=True)
        degenerate.mul_((op == 2).to(x.dtype).view(-1, 1, 1, 1)).add_(mean * (op == 1).to(x.dtype).view(-1, 1, 1, 1))
        degenerate.mul_(1 - f)
        x = (x * f if r == 0 else x.mul_(f)).add_(degenerate).clamp_(0, bound)   # in place after the first copy
    return x


def normalize(x01: Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> Tensor:
    m = device_constant(tuple(mean), (1, -1, 1, 1), x01.device, x01.dtype)
    s = device_constant(tuple(std), (1, -1, 1, 1), x01.device, x01.dtype)
    return (x01 - m) / s


def random_erasing(x: Tensor, g: torch.Generator, p: float = 0.25, min_area: float = 0.02, max_area: float = 1 / 3,
                   min_aspect: float = 0.3, tries: int = 10) -> Tensor:
    """timm RandomErasing(mode='pixel', max_count=1) on normalised images: with probability p one rectangle per image
    is filled with N(0, 1) noise; up to `tries` (area, aspect) draws, the first that fits is used."""
    bsz, _, h, w = x.shape
    device = x.device
    area = torch.rand(bsz, tries, generator=g, device=device) * (max_area - min_area) + min_area
    log_lo, log_hi = math.log(min_aspect), math.log(1 / min_aspect)
    aspect = torch.exp(torch.rand(bsz, tries, generator=g, device=device) * (log_hi - log_lo) + log_lo)
    eh = torch.round(torch.sqrt(area * h * w * aspect))
    ew = torch.round(torch.sqrt(area * h * w / aspect))
    ok = (ew < w) & (eh < h)
    first = torch.argmax(ok.int(), dim=1, keepdim=True)
    eh, ew = eh.gather(1, first).squeeze(1), ew.gather(1, first).squeeze(1)
    u = torch.rand(bsz, 3, generator=g, device=device)
    apply = (u[:, 0] < p) & ok.any(dim=1)
    top = torch.floor(u[:, 1] * (h - eh + 1))
    left = torch.floor(u[:, 2] * (w - ew + 1))
    rows = torch.arange(h, device=device).view(1, h, 1)
    cols = torch.arange(w, device=device).view(1, 1, w)
    inside = ((rows >= top.view(-1, 1, 1)) & (rows < (top + eh).view(-1, 1, 1))
              & (cols >= left.view(-1, 1, 1)) & (cols < (left + ew).view(-1, 1, 1)) & apply.view(-1, 1, 1))
    noise = torch.randn(x.shape, generator=g, device=device, dtype=x.dtype)
    return torch.where(inside.unsqueeze(1), noise, x)


# --------------------------------------------------------------------------------------------------- stage pipelines
@dataclass(frozen=True)
class TokenizerTrainAug:
    """VQ-KD tokenizer training, as the official recipe: RandomResizedCrop(size, 0.08-1) + flip, float [0, 1]."""
    size: int = 224
    scale: tuple[float, float] = (0.08, 1.0)

    def __call__(self, images: Tensor, sizes: Tensor, g: torch.Generator) -> Tensor:
        boxes = random_resized_crop_boxes(sizes, self.scale, (3 / 4, 4 / 3), g)
        x = crop_resize(to_rgb_float(images), boxes, self.size)
        return random_flip(x, g).div_(255.0).clamp_(0, 1)


@dataclass(frozen=True)
class MimAug:
    """MIM pretraining, as the official recipe: one RandomResizedCrop(size, 0.2-1) + flip + ColorJitter(0.4, 0.4,
    0.4), float [0, 1]. `mim_views` turns it into the model view and the tokenizer view."""
    size: int = 224
    scale: tuple[float, float] = (0.2, 1.0)
    jitter: float = 0.4

    def __call__(self, images: Tensor, sizes: Tensor, g: torch.Generator) -> Tensor:
        boxes = random_resized_crop_boxes(sizes, self.scale, (3 / 4, 4 / 3), g)
        x = random_flip(crop_resize(to_rgb_float(images), boxes, self.size), g)
        x = color_jitter(x, g, self.jitter, self.jitter, self.jitter)
        return x.div_(255.0)


def mim_views(x01: Tensor) -> tuple[Tensor, Tensor]:
    """(ImageNet-normalised model view, [0, 1] tokenizer view) of one decoded crop."""
    return normalize(x01), x01


@dataclass(frozen=True)
class FinetuneTrainAug:
    """Fine-tuning train: RandomResizedCrop(size, 0.08-1) + flip + RandAugment(rand-m9-mstd0.5-inc1) + normalise +
    RandomErasing(0.25). Colour jitter only where RandAugment is off (timm disables it when auto-augment is on).
    Mixup/cutmix belong to the fine-tune stage."""
    size: int = 224
    scale: tuple[float, float] = (0.08, 1.0)
    rand_augment: bool = True
    magnitude: float = 9.0
    magnitude_std: float = 0.5
    color_jitter: float = 0.4
    erase_prob: float = 0.25

    def __call__(self, images: Tensor, sizes: Tensor, g: torch.Generator) -> Tensor:
        boxes = random_resized_crop_boxes(sizes, self.scale, (3 / 4, 4 / 3), g)
        x = random_flip(crop_resize(to_rgb_float(images), boxes, self.size), g)
        if self.rand_augment:
            x = rand_augment(x, g, magnitude=self.magnitude, magnitude_std=self.magnitude_std)
        elif self.color_jitter > 0:
            x = color_jitter(x, g, self.color_jitter, self.color_jitter, self.color_jitter)
        x = normalize(x / 255.0)
        return random_erasing(x, g, self.erase_prob) if self.erase_prob > 0 else x


@dataclass(frozen=True)
class EvalAug:
    """Evaluation: resize the short side to size / crop_fraction and center-crop size (224 from 256), normalised."""
    size: int = 224
    crop_fraction: float = 0.875
    normalized: bool = True

    def __call__(self, images: Tensor, sizes: Tensor, g: torch.Generator | None = None) -> Tensor:
        x = crop_resize(to_rgb_float(images), center_crop_boxes(sizes, self.crop_fraction), self.size) / 255.0
        return normalize(x) if self.normalized else x
