"""Pick the image source a stage trains from: the in-memory Fashion-MNIST arrays or an FFCV .beton file.

Both sources follow the engine's DataSource protocol and apply the stage's augmentation (`data_tools.gpu_augment`)
on the device with randomness drawn from (seed, step, rank, micro), so a resumed run sees the same batches.
"""
from __future__ import annotations

import numpy as np
import torch

from engine import distributed as dist_utils
from engine.config import DataConfig, RunConfig


def fashion_mnist(split: str, limit: int = 0) -> tuple[np.ndarray, np.ndarray]:
    from data_tools.fashion_mnist import load_fashion_mnist
    images, labels = load_fashion_mnist(split)
    return (images[:limit], labels[:limit]) if limit else (images, labels)


def train_source(data: DataConfig, run: RunConfig, aug, device: torch.device):
    """This rank's training stream: `{"image": aug(batch), "label": ...}` micro-batches from any step on."""
    common = dict(micro_batch_size=run.micro_batch_size, grad_accum_steps=run.grad_accum_steps,
                  rank=dist_utils.rank(), world_size=dist_utils.world_size(), seed=run.seed, aug=aug, device=device)
    if data.source == "fashion_mnist":
        from data_tools.ffcv_loader import ArraySource
        images, labels = fashion_mnist("train", data.limit)
        return ArraySource(images, labels, **common)
    from data_tools.ffcv_loader import BetonSource
    return BetonSource(data.train_path, num_workers=data.num_workers, os_cache=data.os_cache, **common)
