"""Per-step learning-rate and weight-decay schedules: linear warm-up, then cosine (BEiT v2) or linear poly (mmseg)."""
from __future__ import annotations

import math

from engine.config.schema import OptimConfig, ScheduleConfig


def total_and_warmup_steps(schedule: ScheduleConfig, steps_per_epoch: int) -> tuple[int, int]:
    total = schedule.total_steps or max(1, round(schedule.epochs * steps_per_epoch))
    warmup = schedule.warmup_steps if schedule.warmup_steps is not None else round(
        schedule.warmup_epochs * steps_per_epoch)
    return total, min(warmup, total)


def cosine(step: int, total: int, start: float, end: float) -> float:
    if total <= 0:
        return end
    t = min(max(step, 0), total) / total
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * t))


def poly(step: int, total: int, start: float, end: float, power: float = 1.0) -> float:
    t = min(max(step, 0), total) / max(total, 1)
    return end + (start - end) * (1 - t) ** power


def lr_at(step: int, optim: OptimConfig, total: int, warmup: int, decay: str = "cosine") -> float:
    """cosine: 0 -> lr linearly over `warmup` steps, then cosine lr -> min_lr over the remaining steps.
    poly: lr -> min_lr linearly over all `total` steps, scaled by step / warmup during the warm-up (mmcv)."""
    if decay == "poly":
        return poly(step, total, optim.lr, optim.min_lr) * (min(step / warmup, 1.0) if warmup else 1.0)
    if step < warmup:
        return optim.lr * step / warmup
    return cosine(step - warmup, total - warmup, optim.lr, optim.min_lr)


def weight_decay_at(step: int, optim: OptimConfig, total: int) -> float:
    if optim.weight_decay_end is None:
        return optim.weight_decay
    return cosine(step, total, optim.weight_decay, optim.weight_decay_end)


def apply(param_groups, lr: float, weight_decay: float) -> None:
    """Write this step's values into the optimizer groups, honouring each group's lr/wd scale."""
    for g in param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
        g["weight_decay"] = weight_decay * g.get("wd_scale", 1.0)
