"""Segmentation training augmentation on the device (the mmseg ADE20K recipe BEiT uses), image and label aligned.

Per image: reduce_zero_label; Resize to scale (2048, 512) x U(0.5, 2) keeping the aspect ratio; RandomCrop 512 with
cat_max_ratio 0.75 (up to 10 checked boxes, else an 11th unchecked one, as mmseg); flip 0.5; PhotoMetricDistortion
(brightness +-32, contrast 0.5-1.5 before or after the HSV ops, saturation 0.5-1.5, hue +-18 of 180, each p 0.5);
normalise; pad to the crop with 0 (image) and 255 (label). Resize + crop is one resampling per image (bilinear for the
image, nearest for the label) read straight from the canvas, so no intermediate full-size image is made.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from data_tools.gpu_augment import normalize, to_rgb_float

IGNORE = 255


def reduce_zero_label(labels: Tensor) -> Tensor:
    """ADE20K: class 0 ('other') becomes ignore, the rest shift down by one (mmseg's reduce_zero_label)."""
    shifted = torch.where(labels == 0, torch.full_like(labels, IGNORE), labels - 1)
    return torch.where(shifted == IGNORE - 1, torch.full_like(labels, IGNORE), shifted)


def _sample(src: Tensor, scale: Tensor, offset: Tensor, crop: int, mode: str, flip_width: Tensor | None = None
            ) -> Tensor:
    """Output pixel (y, x) of each crop reads the canvas at continuous position ((top + y + 0.5) / s_y, ...).

    src [N, C, Hc, Wc]; scale [N, 2] (s_y, s_x); offset [N, 2] (top, left) in scaled pixels; flip_width [N]: mirror
    x inside the first flip_width output columns (the valid crop width) where > 0, so padding stays bottom/right."""
    n, _, hc, wc = src.shape
    pos = torch.arange(crop, device=src.device, dtype=torch.float32).view(1, -1) + 0.5
    xpos = pos if flip_width is None else torch.where(flip_width.view(-1, 1) > 0, flip_width.view(-1, 1) - pos, pos)
    ys = (pos + offset[:, 0:1]) / scale[:, 0:1]                              # [N, crop] continuous source coords
    xs = (xpos + offset[:, 1:2]) / scale[:, 1:2]
    gy = (2 * ys / hc - 1).view(n, crop, 1).expand(n, crop, crop)
    gx = (2 * xs / wc - 1).view(n, 1, crop).expand(n, crop, crop)
    return F.grid_sample(src, torch.stack([gx, gy], dim=-1), mode=mode, padding_mode="border", align_corners=False)


def _rgb_to_hsv(x: Tensor) -> Tensor:
    r, g, b = x.unbind(1)
    maxc, _ = x.max(1)
    minc, _ = x.min(1)
    delta = maxc - minc
    s = torch.where(maxc > 0, delta / maxc.clamp(min=1e-12), torch.zeros_like(maxc))
    d = delta.clamp(min=1e-12)
    h = torch.where(maxc == r, ((g - b) / d) % 6, torch.where(maxc == g, (b - r) / d + 2, (r - g) / d + 4)) / 6
    h = torch.where(delta > 0, h, torch.zeros_like(h))
    return torch.stack([h, s, maxc], 1)


def _hsv_to_rgb(hsv: Tensor) -> Tensor:
    h, s, v = hsv.unbind(1)
    k = torch.stack([(5 + h * 6) % 6, (3 + h * 6) % 6, (1 + h * 6) % 6], 1)
    return v.unsqueeze(1) - (v * s).unsqueeze(1) * torch.clamp(torch.minimum(k, 4 - k), 0, 1)


def photometric_distortion(x: Tensor, g: torch.Generator) -> Tensor:
    """mmseg PhotoMetricDistortion on float [B, 3, H, W] in [0, 255], per-image random choices."""
    b, dev = x.shape[0], x.device

    def coin() -> Tensor:
        return (torch.rand(b, generator=g, device=dev) < 0.5).view(-1, 1, 1, 1)

    def unif(lo: float, hi: float) -> Tensor:
        return (torch.rand(b, generator=g, device=dev) * (hi - lo) + lo).view(-1, 1, 1, 1)

    x = torch.where(coin(), (x + unif(-32, 32)).clamp(0, 255), x)
    contrast_first = coin()
    use_c, alpha_c = coin(), unif(0.5, 1.5)
    x = torch.where(contrast_first & use_c, (x * alpha_c).clamp(0, 255), x)
    hsv = _rgb_to_hsv(x / 255.0)
    use_s, alpha_s = coin(), unif(0.5, 1.5)
    sat = torch.where(use_s.view(-1, 1, 1), (hsv[:, 1] * alpha_s.view(-1, 1, 1)).clamp(0, 1), hsv[:, 1])
    use_h = coin().view(-1, 1, 1)
    shift = torch.randint(-18, 19, (b,), generator=g, device=dev).float().view(-1, 1, 1) / 180.0
    hue = torch.where(use_h, (hsv[:, 0] + shift) % 1.0, hsv[:, 0])
    x = _hsv_to_rgb(torch.stack([hue, sat, hsv[:, 2]], 1)) * 255.0
    return torch.where(~contrast_first & use_c, (x * alpha_c).clamp(0, 255), x)


@dataclass(frozen=True)
class SegTrainAug:
    """images uint8 [B, 3, Hc, Wc], labels uint8 [B, Hc, Wc], sizes [B, 2] -> (normalised [B, 3, crop, crop],
    int64 labels [B, crop, crop] with 255 = ignore)."""
    crop: int = 512
    scale: tuple[int, int] = (2048, 512)
    ratio_range: tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75
    reduce_zero_label: bool = True
    tries: int = 10
    photometric: bool = True

    def __call__(self, images: Tensor, labels: Tensor, sizes: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor]:
        b, dev, k = images.shape[0], images.device, self.tries + 1
        h, w = sizes[:, 0].float(), sizes[:, 1].float()
        r = torch.rand(b, generator=g, device=dev) * (self.ratio_range[1] - self.ratio_range[0]) + self.ratio_range[0]
        s = torch.minimum(self.scale[0] * r / torch.maximum(h, w), self.scale[1] * r / torch.minimum(h, w))
        nh, nw = torch.floor(h * s + 0.5), torch.floor(w * s + 0.5)
        scale = torch.stack([nh / h, nw / w], 1)
        ch, cw = nh.clamp(max=self.crop), nw.clamp(max=self.crop)
        u = torch.rand(b, k, 2, generator=g, device=dev)
        offs = torch.floor(u * torch.stack([nh - ch + 1, nw - cw + 1], 1).unsqueeze(1))       # [B, K, 2]
        lab = labels.unsqueeze(1)
        if self.reduce_zero_label:
            lab = reduce_zero_label(lab)
        choice = torch.full((b,), k - 1, device=dev, dtype=torch.long)
        if self.cat_max_ratio < 1:
            cand = _sample(lab.repeat_interleave(k - 1, 0).float(), scale.repeat_interleave(k - 1, 0),
                           offs[:, :-1].reshape(-1, 2), self.crop, "nearest").squeeze(1).long()
            inside = self._inside(ch, cw).repeat_interleave(k - 1, 0)
            cand = torch.where(inside, cand, torch.full_like(cand, IGNORE))
            counts = torch.zeros(cand.shape[0], 256, device=dev, dtype=torch.long)
            counts.scatter_add_(1, cand.flatten(1), torch.ones_like(cand.flatten(1)))
            counts = counts[:, :IGNORE]
            ok = ((counts > 0).sum(1) > 1) & (counts.max(1).values < self.cat_max_ratio * counts.sum(1))
            ok = ok.view(b, k - 1)
            choice = torch.where(ok.any(1), torch.argmax(ok.int(), 1), choice)
        off = offs[torch.arange(b, device=dev), choice]
        flip_width = torch.where(torch.rand(b, generator=g, device=dev) < 0.5, cw, torch.zeros_like(cw))
        img = _sample(to_rgb_float(images), scale, off, self.crop, "bilinear", flip_width)
        out_lab = _sample(lab.float(), scale, off, self.crop, "nearest", flip_width).squeeze(1).long()
        inside = self._inside(ch, cw)
        if self.photometric:
            img = photometric_distortion(img, g)
        img = normalize(img / 255.0) * inside.unsqueeze(1)
        out_lab = torch.where(inside, out_lab, torch.full_like(out_lab, IGNORE))
        return img, out_lab

    def _inside(self, ch: Tensor, cw: Tensor) -> Tensor:
        pos = torch.arange(self.crop, device=ch.device)
        return (pos.view(1, -1, 1) < ch.view(-1, 1, 1)) & (pos.view(1, 1, -1) < cw.view(-1, 1, 1))
