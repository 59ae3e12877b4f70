"""Class labels checked against the model's classes on the device, without a sync (training and evaluation)."""
from __future__ import annotations

import torch
from torch import Tensor

from engine.config.schema import ConfigError


class LabelRange:
    """Labels outside 0..num_classes-1 (other than `ignore`) become `ignore` (or 0 without one) so that the step
    stays valid (CUDA would abort on them), and are remembered on the device, without a sync. As an engine step hook
    the flag is read after the first step and at every log interval, next to the engine's own sync there; an
    evaluation calls `check()` once at the end. Either raises a one-line error naming the data (`source`) and the
    label. Stateless: a resumed run checks again from its first step.

    Args:
        what: the label as the message names it, e.g. "label id {} (after reduce_zero_label)".
        fix: what to fix besides num_classes (the labels, the annotations).
    """
    name = "label_range"

    def __init__(self, num_classes: int, source: str, log_interval: int = 1, ignore: int | None = None,
                 what: str = "label {}", fix: str = "the labels"):
        self.num_classes, self.source, self.every = num_classes, source, log_interval
        self.ignore, self.what, self.fix = ignore, what, fix
        self.worst: Tensor | None = None   # the largest bad label seen (int64), the smallest int64 when none
        self.checked = False

    def __call__(self, labels: Tensor) -> Tensor:
        bad = (labels >= self.num_classes) | (labels < 0)
        if self.ignore is not None:
            bad &= labels != self.ignore
        worst = torch.where(bad, labels.long(), torch.iinfo(torch.int64).min).amax()
        self.worst = worst if self.worst is None else torch.maximum(self.worst, worst)
        return torch.where(bad, torch.full_like(labels, 0 if self.ignore is None else self.ignore), labels)

    def check(self, when: str = "") -> None:
        if self.worst is not None and int(self.worst) != torch.iinfo(torch.int64).min:
            label = self.what.format(int(self.worst))
            raise ConfigError(f"{self.source}: {label} is outside the model's {self.num_classes} classes "
                              f"(0..{self.num_classes - 1}){when}; set num_classes to the data's class count or "
                              f"fix {self.fix}")

    def after_step(self, step: int) -> None:
        due = not self.checked or step % self.every == 0
        self.checked = True
        if due:
            self.check(f", by step {step}")

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
