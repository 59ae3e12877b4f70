"""timm's RandAugment 'rand-mM-mstdS-inc1' (the BEiT fine-tuning policy) for a whole batch on the device.

Same 15 'increasing' ops, op probability 0.5, 2 layers, magnitude ~ N(M, S) clipped to [0, 10], random sign, the same
level-to-argument mapping as timm.data.auto_augment, and PIL's definitions of each op (ImageEnhance blends, SMOOTH
kernel for sharpness, affine maps with the ImageNet-mean fill). Differences from timm, on purpose: geometric ops
resample bilinearly (timm picks bilinear/bicubic at random) and values stay float between ops (PIL rounds to uint8).
Each layer evaluates every op on the whole batch and keeps each image's chosen one, so shapes never depend on data.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.transforms.v2 import functional as TF

from data_tools.gpu_primitives import device_constant, grayscale

OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing", "SolarizeAdd",
       "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY",
       "TranslateXRel", "TranslateYRel")
_GEOMETRIC = {"Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"}
FILL = (124.0, 116.0, 104.0)  # timm's img_mean for ImageNet mean, in [0, 255]


def _bcast(v: Tensor) -> Tensor:
    return v.view(-1, 1, 1, 1)


def _blend(img: Tensor, degenerate: Tensor, factor: Tensor) -> Tensor:
    return (degenerate + _bcast(factor) * (img - degenerate)).clamp(0, 255)


def _sharp_degenerate(x: Tensor) -> Tensor:
    """PIL ImageFilter.SMOOTH ([[1,1,1],[1,5,1],[1,1,1]] / 13) with the one-pixel border left unfiltered."""
    k = torch.ones(3, 3, device=x.device, dtype=x.dtype)
    k[1, 1] = 5.0
    k = (k / 13.0).expand(x.shape[1], 1, 3, 3)
    smooth = F.conv2d(x, k, padding=1, groups=x.shape[1])
    out = x.clone()
    out[..., 1:-1, 1:-1] = smooth[..., 1:-1, 1:-1]
    return out


def _affine(x: Tensor, m: Tensor) -> Tensor:
    """Apply per-image output->input pixel maps m [B, 2, 3] (PIL's AFFINE convention), filling with FILL."""
    b, _, h, w = x.shape
    # pixel -> [-1, 1] and back, in closed form (no inverse on the device, no per-call host copies)
    to_norm = device_constant((2.0 / w, 0.0, -1.0, 0.0, 2.0 / h, -1.0, 0.0, 0.0, 1.0), (3, 3), x.device, x.dtype)
    from_norm = device_constant((w / 2.0, 0.0, w / 2.0, 0.0, h / 2.0, h / 2.0, 0.0, 0.0, 1.0), (3, 3), x.device,
                                x.dtype)
    m3 = torch.cat([m, device_constant((0.0, 0.0, 1.0), (1, 1, 3), x.device, x.dtype).expand(b, 1, 3)], dim=1)
    theta = (to_norm @ m3 @ from_norm)[:, :2]
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    ones = torch.ones(b, 1, h, w, device=x.device, dtype=x.dtype)
    out = F.grid_sample(torch.cat([x, ones], 1), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    fill = device_constant(FILL, (1, 3, 1, 1), x.device, x.dtype)
    valid = out[:, 3:]
    return out[:, :3] + (1 - valid) * fill


def _geometric_maps(op: Tensor, level: Tensor, h: int, w: int) -> Tensor:
    """PIL output->input affine coefficients for the geometric op chosen per image (identity for the others)."""
    b = op.shape[0]
    m = torch.zeros(b, 2, 3, device=level.device, dtype=level.dtype)
    m[:, 0, 0] = 1
    m[:, 1, 1] = 1
    sel = {name: op == OPS.index(name) for name in _GEOMETRIC}
    # Rotate: PIL rotates counter-clockwise about the centre by `deg`; timm level -> +-30 deg
    a = -torch.deg2rad(level * 30.0)
    cx, cy = w / 2.0, h / 2.0
    cos, sin = torch.cos(a), torch.sin(a)
    rot = torch.stack([torch.stack([cos, sin, cx - cos * cx - sin * cy], 1),
                       torch.stack([-sin, cos, cy + sin * cx - cos * cy], 1)], 1)
    m = torch.where(sel["Rotate"].view(-1, 1, 1), rot, m)
    shear = level * 0.3
    m[:, 0, 1] = torch.where(sel["ShearX"], shear, m[:, 0, 1])
    m[:, 1, 0] = torch.where(sel["ShearY"], shear, m[:, 1, 0])
    m[:, 0, 2] = torch.where(sel["TranslateXRel"], level * 0.45 * w, m[:, 0, 2])
    m[:, 1, 2] = torch.where(sel["TranslateYRel"], level * 0.45 * h, m[:, 1, 2])
    return m


def _one_layer(x: Tensor, op: Tensor, level: Tensor, signed: Tensor) -> Tensor:
    """x float [B, 3, H, W] in [0, 255]; op [B] op ids (-1 = skip); level = magnitude / 10 in [0, 1]."""
    u8 = x.round().clamp(0, 255).to(torch.uint8)
    enhance = (1.0 + signed * 0.9).clamp(min=0.1)
    bits = (4 - torch.floor(level * 4)).to(torch.int64)                      # PosterizeIncreasing: keep 4..0 bits
    mask = torch.bitwise_left_shift(torch.full_like(bits, 0xFF), 8 - bits).bitwise_and(0xFF).to(torch.uint8)
    thresh = 256 - torch.clamp(torch.floor(level * 256), max=256)           # SolarizeIncreasing
    add = torch.clamp(torch.floor(level * 110), max=128)                     # SolarizeAdd (threshold 128)
    gray = grayscale(x)
    candidates = {
        "AutoContrast": TF.autocontrast(u8).float(),
        "Equalize": TF.equalize(u8).float(),
        "Invert": 255 - x,
        "PosterizeIncreasing": (u8 & _bcast(mask)).float(),
        "SolarizeIncreasing": torch.where(x >= _bcast(thresh), 255 - x, x),
        "SolarizeAdd": torch.where(x < 128, (x + _bcast(add)).clamp(max=255), x),
        "ColorIncreasing": _blend(x, gray.expand_as(x), enhance),
        "ContrastIncreasing": _blend(x, gray.mean(dim=(1, 2, 3), keepdim=True).expand_as(x), enhance),
        "BrightnessIncreasing": _blend(x, torch.zeros_like(x), enhance),
        "SharpnessIncreasing": _blend(x, _sharp_degenerate(x), enhance),
    }
    out = _affine(x, _geometric_maps(op, signed, x.shape[2], x.shape[3]))
    is_geo = torch.zeros_like(op, dtype=torch.bool)
    for name in _GEOMETRIC:
        is_geo |= op == OPS.index(name)
    out = torch.where(_bcast(is_geo), out, x)
    for name, y in candidates.items():
        out = torch.where(_bcast(op == OPS.index(name)), y, out)
    return out


def rand_augment(x: Tensor, g: torch.Generator, magnitude: float = 9.0, magnitude_std: float = 0.5,
                 num_layers: int = 2, prob: float = 0.5) -> Tensor:
    """RandAugment on float [B, 3, H, W] in [0, 255]; returns the same layout."""
    b, device = x.shape[0], x.device
    for _ in range(num_layers):
        op = torch.randint(len(OPS), (b,), generator=g, device=device)
        applied = torch.rand(b, generator=g, device=device) < prob
        mag = (magnitude + magnitude_std * torch.randn(b, generator=g, device=device)).clamp(0, 10)
        sign = torch.where(torch.rand(b, generator=g, device=device) > 0.5, -1.0, 1.0)
        level = mag / 10.0
        op = torch.where(applied, op, torch.full_like(op, -1))
        x = _one_layer(x, op, level.to(x.dtype), (level * sign).to(x.dtype))
    return x

