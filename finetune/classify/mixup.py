"""Mixup / CutMix of a batch on the device, with soft targets (timm's `Mixup` in 'batch' mode: one lambda per batch,
each image mixed with the batch in reverse order, cutmix's lambda corrected to the box that fits).

The draws (which of the two, lambda, the box) come from a numpy Generator the caller seeds with (seed, step, rank,
micro), so a resumed run mixes the same way; they are host numbers, so nothing waits for the device.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from timm.data.mixup import mixup_target


@dataclass(frozen=True)
class Mixup:
    """Args:
        num_classes: Classes of the soft targets.
        mixup: Beta alpha of mixup (0 disables it).
        cutmix: Beta alpha of cutmix (0 disables it).
        switch_prob: With both on, the probability of cutmix for a batch.
        smoothing: Label smoothing of the targets.
    """
    num_classes: int
    mixup: float = 0.8
    cutmix: float = 1.0
    switch_prob: float = 0.5
    smoothing: float = 0.1

    def draw(self, rng: np.random.Generator, height: int, width: int) -> tuple[float, tuple[int, int, int, int] | None]:
        """(lambda, cutmix box (y1, y2, x1, x2) or None) for one batch."""
        if self.mixup <= 0 and self.cutmix <= 0:
            return 1.0, None
        use_cutmix = self.cutmix > 0 and (self.mixup <= 0 or rng.random() < self.switch_prob)
        lam = float(rng.beta(self.cutmix, self.cutmix) if use_cutmix else rng.beta(self.mixup, self.mixup))
        if not use_cutmix:
            return lam, None
        # A box of area (1 - lam) of the image, centred uniformly and clipped to it; lam then counts the pixels kept.
        cut_h, cut_w = int(height * np.sqrt(1 - lam)), int(width * np.sqrt(1 - lam))
        cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
        y1, y2 = np.clip(cy - cut_h // 2, 0, height), np.clip(cy + cut_h // 2, 0, height)
        x1, x2 = np.clip(cx - cut_w // 2, 0, width), np.clip(cx + cut_w // 2, 0, width)
        lam = 1.0 - (y2 - y1) * (x2 - x1) / (height * width)
        return lam, (int(y1), int(y2), int(x1), int(x2))

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, rng: np.random.Generator
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """(mixed images [B, C, H, W], soft targets [B, num_classes]) for images and int labels [B]."""
        lam, box = self.draw(rng, images.shape[-2], images.shape[-1])
        if box is not None:
            y1, y2, x1, x2 = box
            images = images.clone()
            images[..., y1:y2, x1:x2] = images[..., y1:y2, x1:x2].flip(0)   # flips only the box (a copy)
        elif lam < 1.0:
            images = images.mul(lam).add_(images.flip(0), alpha=1.0 - lam)
        return images, mixup_target(labels, self.num_classes, lam, self.smoothing)
