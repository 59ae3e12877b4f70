"""What both the stage pipelines (data_tools/gpu_augment.py) and RandAugment (data_tools/gpu_randaugment.py) are
built from; it sits below both so that neither imports the other's module to get it."""
from __future__ import annotations

import functools

import torch
from torch import Tensor

_GRAY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights


@functools.lru_cache(maxsize=None)
def device_constant(values: tuple, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> Tensor:
    """A small constant made once per device and dtype: `torch.tensor(..., device=cuda)` on every step would be a
    blocking host-to-device copy, i.e. a sync in the hot path."""
    return torch.tensor(values, dtype=dtype).view(shape).to(device)


def grayscale(x: Tensor) -> Tensor:
    """[B, 3, H, W] -> [B, 1, H, W] with torchvision's weights."""
    return x[:, 0:1] * _GRAY[0] + x[:, 1:2] * _GRAY[1] + x[:, 2:3] * _GRAY[2]
