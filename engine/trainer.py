"""The one training loop every stage runs: DeepSpeed engine, per-step schedule, checkpoints, metrics.

A stage supplies the model, its parameter groups, a data source and a `step_fn(engine, batch)` that returns
`(loss, metrics)`, where `metrics` holds detached scalar tensors that stay on the device until the log interval.
"""
from __future__ import annotations

import random
import signal
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Protocol

import numpy as np
import torch
from torch import nn

from engine import distributed as dist_utils
from engine import schedule as sched
from engine.checkpoint import CheckpointManager
from engine.config import OptimConfig, RunConfig, ScheduleConfig, save_json
from engine.ds_setup import initialize, zero_stage
from engine.export import save_final_weights
from engine.metrics import DeviceMeter, RunLogger, StepProfiler, Throughput, peak_memory_gib


class DataSource(Protocol):
    steps_per_epoch: int      # optimizer steps per epoch at the run's global batch

    def micro_batches(self, start_step: int) -> Iterator[Any]:
        """This rank's micro-batches from optimizer step `start_step` on (grad_accum_steps per step)."""


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


@dataclass
class FitResult:
    step: int
    last_metrics: dict
    weights: str | None = None   # the consolidated weights file, when the run wrote one

    def summary(self) -> dict:
        """What a stage command prints: the final step, the last logged metrics and the weights file."""
        return {"step": self.step, **self.last_metrics, **({"checkpoint": self.weights} if self.weights else {})}


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (the engine also checkpoints their states for exact resume)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def grads_finite(model: nn.Module) -> bool:
    """One host sync: are all gradients finite?"""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return bool(torch.stack(torch._foreach_norm(grads)).isfinite().all()) if grads else True


def fit(cfg: Any, run: RunConfig, optim: OptimConfig, schedule: ScheduleConfig, model: nn.Module,
        groups: list[dict], data: DataSource, step_fn: Callable, *, flops_per_image: float | None = None,
        keep_fp32_buffers: tuple[str, ...] = (),
        final_weights: tuple[str, Callable[[str, dict], None]] | None = None) -> FitResult:
    """Train `model` to the end of `schedule` (resuming from `run.output_dir` when it holds a checkpoint).

    `final_weights=(filename, save_fn)`: after the last checkpoint, rank 0 consolidates it into one fp32 state
    dict and calls `save_fn(<output_dir>/<filename>, state_dict)`.
    """
    world = dist_utils.world_size()
    engine, ds_config = initialize(model, groups, run, optim, world, keep_fp32_buffers)
    # DeepSpeed skips an update whose gradients are not finite in fp16/bf16 and, in fp32, from ZeRO-1 on; with
    # ZeRO-0 in fp32 it steps regardless, so the loop checks the gradients itself there.
    check_grads = zero_stage(ds_config) == 0 and run.precision == "fp32"
    if run.compile:
        engine.compile()

    ckpt = CheckpointManager(run.output_dir, run.keep_last)
    state = ckpt.load(engine) if run.resume else None
    start = int(state["step"]) if state else 0
    total, warmup = sched.total_and_warmup_steps(schedule, data.steps_per_epoch)
    if state:
        dist_utils.log_main(f"resumed from {ckpt.dir} at step {start}/{total}")
    if dist_utils.is_main():   # only now: a run that cannot resume must not overwrite the config it was made with
        save_json(cfg, f"{run.output_dir}/config.json")

    logger = RunLogger(run.output_dir, total, start, run.progress_bar)
    meter = DeviceMeter()
    speed = Throughput(flops_per_image, world)
    batches = data.micro_batches(start)
    nonfinite_in_a_row, skipped_total = 0, 0
    profiler = None
    preemption = PreemptionFlag()
    last: dict = {}
    engine.train()
    try:
        for step in range(start, total):
            lr = sched.lr_at(step, optim, total, warmup)
            wd = sched.weight_decay_at(step, optim, total)
            sched.apply(engine.optimizer.param_groups, lr, wd)
            if profiler is None and run.profile_steps and step == start + run.log_interval:
                profiler = StepProfiler(run.output_dir, run.profile_steps)
            skipped_here = False
            for micro in range(run.grad_accum_steps):
                loss, metrics = step_fn(engine, next(batches))
                engine.backward(loss)
                if check_grads and micro == run.grad_accum_steps - 1 and not grads_finite(engine.module):
                    engine.zero_grad()   # grads become None: AdamW leaves those parameters and their state alone
                    skipped_here = True
                engine.step()
                meter.add({"loss": loss, **metrics})
                speed.add(run.micro_batch_size * world)
            # Where DeepSpeed decides, it has already synchronised: reading its flag costs nothing extra.
            if engine.was_step_applied() and not skipped_here:
                nonfinite_in_a_row = 0
            else:
                nonfinite_in_a_row += 1
                skipped_total += 1
                if run.precision != "fp16" and nonfinite_in_a_row >= run.max_nonfinite_steps:
                    raise TrainingDiverged(
                        f"{nonfinite_in_a_row} steps in a row had non-finite gradients (last at step {step}); "
                        f"stopped without saving. Resume from the last checkpoint in {ckpt.dir} with a lower "
                        f"optim.lr or optim.grad_clip set")
            logger.advance()
            if profiler is not None:
                profiler.step()
            done = step + 1
            if done % run.log_interval == 0 or done == total:
                last = meter.read()
                last.update(speed.read())
                last.update(lr=lr, weight_decay=wd, skipped_steps=skipped_total, peak_mem_gib=peak_memory_gib())
                grad_norm = engine.get_global_grad_norm()
                if grad_norm is not None:
                    last["grad_norm"] = float(grad_norm)
                scale = getattr(engine.optimizer, "cur_scale", None) if run.precision == "fp16" else None
                if scale is not None:
                    last["loss_scale"] = float(scale)
                logger.log(done, last)
            stop = done % run.log_interval == 0 and preemption.agreed()
            if done % run.save_interval == 0 or (done == total and run.save_final) or stop:
                ckpt.save(engine, done, {})
            if stop:
                raise Preempted(f"stopped by SIGTERM after step {done}; checkpoint saved in {ckpt.dir}, run the same "
                                f"command again to resume")
    finally:
        preemption.restore()
        if profiler is not None:
            profiler.close()
        logger.close()
    weights = None
    if final_weights is not None and run.save_final:
        weights = save_final_weights(run.output_dir, *final_weights)
    return FitResult(step=total, last_metrics=last, weights=weights)
