"""What a stage hands the training loop and gets back: its data source, optional step hooks, the fit result."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Protocol


class DataSource(Protocol):
    steps_per_epoch: int      # optimizer steps per epoch at the run's global batch

    def micro_batches(self, start_step: int) -> Iterator[Any]:
        """This rank's micro-batches from optimizer step `start_step` on (grad_accum_steps per step)."""


class StepHook(Protocol):
    """State a stage keeps beside the model (e.g. an EMA of its weights): updated after every optimizer step, saved
    in each checkpoint under `name` and restored on resume."""
    name: str

    def after_step(self, step: int) -> None:
        """Called with the number of optimizer steps done; must not synchronise with the host."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class FitResult:
    step: int
    last_metrics: dict
    weights: str | None = None   # the consolidated weights file, when the run wrote one

    def summary(self) -> dict:
        """What a stage command prints: the final step, the last logged metrics and the weights file."""
        return {"step": self.step, **self.last_metrics, **({"checkpoint": self.weights} if self.weights else {})}
