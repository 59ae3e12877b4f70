"""What skips a training step or stops a run: non-finite gradients (counted and skipped on the device), the
loop's own clipping at ZeRO-0, and a scheduler's SIGTERM (agreed between ranks at the log interval)."""
from __future__ import annotations

import signal

import torch

from engine import distributed as dist_utils


class TrainingDiverged(RuntimeError):
    pass


class Preempted(RuntimeError):
    pass


class PreemptionFlag:
    """SIGTERM (what schedulers send before they kill a job) asks the loop to checkpoint and stop.

    Ranks may see the signal at different steps, so they agree at the log interval, where the loop reads the
    device anyway: one all-reduce of a flag, then every rank saves the same step.
    """

    def __init__(self):
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def agreed(self) -> bool:
        flag = torch.tensor([float(self.requested)], device=dist_utils.current_device())
        return bool(dist_utils.all_reduce_sum_(flag).item() > 0)

    def restore(self) -> None:
        signal.signal(signal.SIGTERM, self._previous)


class NonFiniteSteps:
    """Counts skipped updates and the longest run of them, on the device: read at the log interval, no sync.

    `add(flag)` takes a 0-d float tensor, 1.0 for a skipped update. `read()` returns `(skipped so far, longest run
    since the last read)`; a run that is still going carries into the next interval.
    """

    def __init__(self, device: torch.device):
        self.total = 0
        self._skipped, self._run, self._longest = (torch.zeros((), device=device) for _ in range(3))
        self.flags = (torch.zeros((), device=device), torch.ones((), device=device))   # for host-known outcomes

    def add(self, flag: torch.Tensor) -> None:
        self._skipped += flag
        self._run = (self._run + 1) * flag
        self._longest = torch.maximum(self._longest, self._run)

    def read(self) -> tuple[int, int]:
        self.total += int(self._skipped.item())
        longest = int(self._longest.item())
        self._skipped.zero_()
        self._longest = self._run.clone()
        return self.total, longest


def clip_and_flag(engine, params: list[torch.Tensor], max_norm: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip the (all-reduced) gradients of `params` to `max_norm` (0: only measure) and arm the fused optimizer's
    skip.

    Returns `(grad_norm, found_inf)` as device tensors. torch's fused AdamW reads `found_inf` and leaves weights,
    moments and step count untouched when it is 1, so a non-finite step is skipped without a host sync.
    """
    if max_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None], foreach=True)
    found_inf = (~norm.isfinite()).float()
    engine.optimizer.found_inf = found_inf
    return norm, found_inf
