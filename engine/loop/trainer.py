"""The one training loop every stage runs: DeepSpeed engine, per-step schedule, checkpoints, metrics.

A stage supplies the model, its parameter groups, a data source and a `step_fn(engine, batch)` that returns
`(loss, metrics)`, where `metrics` holds detached scalar tensors that stay on the device until the log interval.
"""
from __future__ import annotations

import random
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from engine.config.schema import OptimConfig, RunConfig, ScheduleConfig, to_dict
from engine.loop import schedule as sched
from engine.loop.guards import NonFiniteSteps, PreemptionFlag, Preempted, TrainingDiverged, clip_and_flag
from engine.loop.interfaces import DataSource, FitResult, StepHook
from engine.parallel import distributed as dist_utils
from engine.parallel import launch_env
from engine.parallel.ds_setup import initialize, loop_owns_step, zero_stage
from engine.parallel.global_batch import record as record_global_batch
from engine.reporting import trackers
from engine.reporting.metrics import DeviceMeter, RunLogger, StepProfiler, Throughput, peak_memory_gib
from engine.storage.checkpoint import CheckpointManager
from engine.storage.run_dir import claims_output_dir, save_config
from engine.storage.weights import save_final_weights


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (the engine also checkpoints their states for exact resume)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@claims_output_dir   # one run per output dir, and a resume may not change what is trained (engine.storage.run_dir)
def fit(cfg: Any, run: RunConfig, optim: OptimConfig, schedule: ScheduleConfig, model: nn.Module,
        groups: list[dict], data: DataSource, step_fn: Callable, *, flops_per_image: float | None = None,
        keep_fp32_buffers: tuple[str, ...] = (), hooks: tuple[StepHook, ...] = (),
        final_weights: tuple[str, Callable[[str, dict], None]] | None = None) -> FitResult:
    """Train `model` to the end of `schedule` (resuming from `run.output_dir` when it holds a checkpoint).

    `final_weights=(filename, save_fn)`: after the last checkpoint, rank 0 consolidates it into one fp32 state
    dict and calls `save_fn(<output_dir>/<filename>, state_dict)`. Another run holding the output directory, or a
    resume whose config changes what is trained (the global batch included: a stage resuming on another number of
    ranks calls `engine.parallel.global_batch.keep_global_batch` before it builds `data`), is a one-line ConfigError
    before the engine is built.
    """
    loop = _Loop(cfg, run, optim, schedule, model, groups, data, keep_fp32_buffers, hooks, flops_per_image)
    try:
        for step in range(loop.start, loop.total):
            loop.set_schedule(step)
            loop.optimizer_step(step_fn, step)
            done = step + 1
            if done % run.log_interval == 0 or done == loop.total:
                loop.log(done)
            loop.checkpoint(done)
    except BaseException as e:   # what stopped the run, for the trackers' run status
        loop.close(e)
        raise
    loop.close()
    weights = None
    if final_weights is not None and run.save_final:
        weights = save_final_weights(run.output_dir, *final_weights)
    return FitResult(step=loop.total, last_metrics=loop.last, weights=weights)


class _Loop:
    """The state `fit` carries from step to step, one method per phase of a step."""

    def __init__(self, cfg: Any, run: RunConfig, optim: OptimConfig, schedule: ScheduleConfig, model: nn.Module,
                 groups: list[dict], data: DataSource, keep_fp32_buffers: tuple[str, ...],
                 hooks: tuple[StepHook, ...], flops_per_image: float | None) -> None:
        """Build the engine, resume, and only then write the run's config (see `fit`)."""
        self.run, self.optim, self.schedule, self.hooks = run, optim, schedule, hooks
        trackers.require(run.report_to)   # every rank, before the engine: a missing package is one line
        self.world = world = dist_utils.world_size()
        self.ckpt = ckpt = CheckpointManager(run.output_dir, run.keep_last)
        # A checkpoint sharded over another number of ranks is re-split (the engine must know before it is built).
        resplit = run.resume and ckpt.needs_resplit(world)
        engine, ds_config = initialize(model, groups, run, optim, world, keep_fp32_buffers, load_universal=resplit)
        self.engine = engine
        # DeepSpeed clips and skips non-finite updates in its 16-bit and ZeRO optimizers; at ZeRO-0 with fp32
        # gradients the loop does both itself, on the device (`clip_and_flag`).
        self.own_step = loop_owns_step(run.precision, zero_stage(ds_config))
        self.trainable = [p for p in engine.module.parameters() if p.requires_grad]
        if world == 1 and zero_stage(ds_config) == 0:
            engine.enable_backward_allreduce = False   # one rank: DeepSpeed would still flatten and copy every grad
        if run.compile:
            engine.compile(compile_kwargs={} if run.compile_mode == "default" else {"mode": run.compile_mode})

        state = ckpt.load(engine, universal=resplit) if run.resume else None
        self.start = start = int(state["step"]) if state else 0
        for hook in hooks:
            if state and hook.name not in state:
                raise ValueError(f"the checkpoint in {ckpt.dir} has no '{hook.name}' state; resume with the "
                                 f"settings it was written with, or use a new --run.output_dir")
            if state:
                hook.load_state_dict(state[hook.name])
        self.total, self.warmup = sched.total_and_warmup_steps(schedule, data.steps_per_epoch)
        if state:
            resplit_note = f" (re-split from {ckpt.saved_world_size(ckpt.latest_tag())} ranks)" if resplit else ""
            dist_utils.log_main(f"resumed from {ckpt.dir} at step {start}/{self.total}{resplit_note}")
        # Only now: a run that cannot resume must not overwrite the config it was made with (the old one goes to
        # history).
        save_config(cfg, run.output_dir, start)
        record_global_batch(run, world)   # what a later resume keeps (engine.parallel.global_batch)

        # W&B / MLflow runs (run.report_to; collective: a tracker that cannot start stops every rank here).
        self.logger = RunLogger(run.output_dir, self.total, start, run.progress_bar,
                                trackers=trackers.start(to_dict(cfg), run.report_to, run.output_dir, start))
        self.meter = DeviceMeter()
        self.speed = Throughput(flops_per_image, world)
        self.batches = data.micro_batches(start)
        self.nonfinite = NonFiniteSteps(dist_utils.current_device())
        self.grad_norm = None
        self.profiler: StepProfiler | None = None
        self.preemption = PreemptionFlag(("TERM", run.preempt_signal), margin_s=run.stop_before_end_s,
                                         end_time=launch_env.stop_time(run.time_limit_s, run.stop_before_end_s))
        self.last: dict = {}
        engine.train()

    def set_schedule(self, step: int) -> None:
        """This step's learning rate and weight decay into every parameter group."""
        self.lr = sched.lr_at(step, self.optim, self.total, self.warmup, self.schedule.decay)
        self.wd = sched.weight_decay_at(step, self.optim, self.total)
        sched.apply(self.engine.optimizer.param_groups, self.lr, self.wd)

    def optimizer_step(self, step_fn: Callable, step: int) -> None:
        """grad_accum_steps forward/backward passes and one update; metrics stay on the device."""
        run, engine = self.run, self.engine
        # After two log intervals: the first holds compilation, the second is what a benchmark reads.
        if self.profiler is None and run.profile_steps and step == self.start + 2 * run.log_interval:
            self.profiler = StepProfiler(run.output_dir, run.profile_steps)
        for micro in range(run.grad_accum_steps):
            loss, metrics = step_fn(engine, next(self.batches))
            engine.backward(loss)
            if self.own_step and micro == run.grad_accum_steps - 1:
                self.grad_norm, found_inf = clip_and_flag(engine, self.trainable, self.optim.grad_clip)
            engine.step()
            self.meter.add({"loss": loss, **metrics})
            self.speed.add(run.micro_batch_size * self.world)
        if not self.own_step:   # DeepSpeed decided, and has synchronised to do so: its flag costs nothing extra
            found_inf = self.nonfinite.flags[int(not engine.was_step_applied())]
        self.nonfinite.add(found_inf)
        for hook in self.hooks:
            hook.after_step(step + 1)
        self.logger.advance()
        if self.profiler is not None:
            self.profiler.step()

    def log(self, done: int) -> None:
        """Read the metrics off the device (the log interval's only host sync); stop a run that diverged."""
        run, engine = self.run, self.engine
        skipped, longest_run = self.nonfinite.read()
        if run.precision != "fp16" and longest_run >= run.max_nonfinite_steps:
            raise TrainingDiverged(
                f"{longest_run} steps in a row had non-finite gradients (by step {done}); stopped without saving. "
                f"Resume from the last checkpoint in {self.ckpt.dir} with a lower optim.lr or optim.grad_clip set")
        last = self.meter.read()
        last.update(self.speed.read())
        last.update(lr=self.lr, weight_decay=self.wd, skipped_steps=skipped, peak_mem_gib=peak_memory_gib())
        norm = self.grad_norm if self.own_step else engine.get_global_grad_norm()
        if norm is not None:
            last["grad_norm"] = float(norm)
        scale = getattr(engine.optimizer, "cur_scale", None) if run.precision == "fp16" else None
        if scale is not None:
            last["loss_scale"] = float(scale)
        self.logger.log(done, last)
        self.last = last

    def checkpoint(self, done: int) -> None:
        """Save at the save interval and at the end; on an agreed preemption save on every rank, then stop."""
        run = self.run
        stop = done % run.log_interval == 0 and self.preemption.agreed()
        if done % run.save_interval == 0 or (done == self.total and run.save_final) or stop:
            self.ckpt.save(self.engine, done, {hook.name: hook.state_dict() for hook in self.hooks})
        if stop:
            dist_utils.barrier()   # every rank's checkpoint is written before any rank exits (srun then ends them)
            if run.requeue and self.preemption.scheduled and dist_utils.is_main():   # a signal or the time limit
                dist_utils.log_main(launch_env.requeue_job())
            raise Preempted(f"stopped by {self.preemption.reason} after step {done}; checkpoint saved in "
                            f"{self.ckpt.dir}, run the same command again to resume")

    def close(self, error: BaseException | None = None) -> None:
        self.preemption.restore()
        if self.profiler is not None:
            self.profiler.close()
        self.logger.close(error)
