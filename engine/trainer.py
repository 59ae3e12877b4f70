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

from engine import distributed as dist_utils
from engine import launch_env
from engine import schedule as sched
from engine.checkpoint import CheckpointManager
from engine.config import OptimConfig, RunConfig, ScheduleConfig
from engine.ds_setup import initialize, loop_owns_step, zero_stage
from engine.export import save_final_weights
from engine.global_batch import record as record_global_batch
from engine.interfaces import DataSource, FitResult, StepHook
from engine.guards import NonFiniteSteps, PreemptionFlag, Preempted, TrainingDiverged, clip_and_flag
from engine.metrics import DeviceMeter, RunLogger, StepProfiler, Throughput, peak_memory_gib
from engine.run_dir import claims_output_dir, save_config


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (the engine also checkpoints their states for exact resume)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@claims_output_dir   # one run per output dir, and a resume may not change what is trained (engine.run_dir)
def fit(cfg: Any, run: RunConfig, optim: OptimConfig, schedule: ScheduleConfig, model: nn.Module,
        groups: list[dict], data: DataSource, step_fn: Callable, *, flops_per_image: float | None = None,
        keep_fp32_buffers: tuple[str, ...] = (), hooks: tuple[StepHook, ...] = (),
        final_weights: tuple[str, Callable[[str, dict], None]] | None = None) -> FitResult:
    """Train `model` to the end of `schedule` (resuming from `run.output_dir` when it holds a checkpoint).

    `final_weights=(filename, save_fn)`: after the last checkpoint, rank 0 consolidates it into one fp32 state
    dict and calls `save_fn(<output_dir>/<filename>, state_dict)`. Another run holding the output directory, or a
    resume whose config changes what is trained (the global batch included: a stage resuming on another number of
    ranks calls `engine.global_batch.keep_global_batch` before it builds `data`), is a one-line ConfigError
    before the engine is built.
    """
    world = dist_utils.world_size()
    ckpt = CheckpointManager(run.output_dir, run.keep_last)
    # A checkpoint sharded over another number of ranks is re-split (the engine must know before it is built).
    resplit = run.resume and ckpt.needs_resplit(world)
    engine, ds_config = initialize(model, groups, run, optim, world, keep_fp32_buffers, load_universal=resplit)
    # DeepSpeed clips and skips non-finite updates in its 16-bit and ZeRO optimizers; at ZeRO-0 with fp32
    # gradients the loop does both itself, on the device (`clip_and_flag`).
    own_step = loop_owns_step(run.precision, zero_stage(ds_config))
    trainable = [p for p in engine.module.parameters() if p.requires_grad]
    if world == 1 and zero_stage(ds_config) == 0:
        engine.enable_backward_allreduce = False   # one rank: DeepSpeed would still flatten and copy every grad
    if run.compile:
        engine.compile(compile_kwargs={} if run.compile_mode == "default" else {"mode": run.compile_mode})

    state = ckpt.load(engine, universal=resplit) if run.resume else None
    start = int(state["step"]) if state else 0
    for hook in hooks:
        if state and hook.name not in state:
            raise ValueError(f"the checkpoint in {ckpt.dir} has no '{hook.name}' state; resume with the settings "
                             f"it was written with, or use a new --run.output_dir")
        if state:
            hook.load_state_dict(state[hook.name])
    total, warmup = sched.total_and_warmup_steps(schedule, data.steps_per_epoch)
    if state:
        resplit_note = f" (re-split from {ckpt.saved_world_size(ckpt.latest_tag())} ranks)" if resplit else ""
        dist_utils.log_main(f"resumed from {ckpt.dir} at step {start}/{total}{resplit_note}")
    # Only now: a run that cannot resume must not overwrite the config it was made with (the old one goes to history).
    save_config(cfg, run.output_dir, start)
    record_global_batch(run, world)   # what a later resume keeps (engine.global_batch)

    logger = RunLogger(run.output_dir, total, start, run.progress_bar)
    meter = DeviceMeter()
    speed = Throughput(flops_per_image, world)
    batches = data.micro_batches(start)
    nonfinite = NonFiniteSteps(dist_utils.current_device())
    grad_norm = None
    profiler = None
    preemption = PreemptionFlag(("TERM", run.preempt_signal), margin_s=run.stop_before_end_s,
                                end_time=launch_env.stop_time(run.time_limit_s, run.stop_before_end_s))
    last: dict = {}
    engine.train()
    try:
        for step in range(start, total):
            lr = sched.lr_at(step, optim, total, warmup, schedule.decay)
            wd = sched.weight_decay_at(step, optim, total)
            sched.apply(engine.optimizer.param_groups, lr, wd)
            # After two log intervals: the first holds compilation, the second is what a benchmark reads.
            if profiler is None and run.profile_steps and step == start + 2 * run.log_interval:
                profiler = StepProfiler(run.output_dir, run.profile_steps)
            for micro in range(run.grad_accum_steps):
                loss, metrics = step_fn(engine, next(batches))
                engine.backward(loss)
                if own_step and micro == run.grad_accum_steps - 1:
                    grad_norm, found_inf = clip_and_flag(engine, trainable, optim.grad_clip)
                engine.step()
                meter.add({"loss": loss, **metrics})
                speed.add(run.micro_batch_size * world)
            if not own_step:   # DeepSpeed decided, and has synchronised to do so: its flag costs nothing extra
                found_inf = nonfinite.flags[int(not engine.was_step_applied())]
            nonfinite.add(found_inf)
            for hook in hooks:
                hook.after_step(step + 1)
            logger.advance()
            if profiler is not None:
                profiler.step()
            done = step + 1
            if done % run.log_interval == 0 or done == total:
                skipped, longest_run = nonfinite.read()
                if run.precision != "fp16" and longest_run >= run.max_nonfinite_steps:
                    raise TrainingDiverged(
                        f"{longest_run} steps in a row had non-finite gradients (by step {done}); stopped without "
                        f"saving. Resume from the last checkpoint in {ckpt.dir} with a lower optim.lr or "
                        f"optim.grad_clip set")
                last = meter.read()
                last.update(speed.read())
                last.update(lr=lr, weight_decay=wd, skipped_steps=skipped, peak_mem_gib=peak_memory_gib())
                norm = grad_norm if own_step else engine.get_global_grad_norm()
                if norm is not None:
                    last["grad_norm"] = float(norm)
                scale = getattr(engine.optimizer, "cur_scale", None) if run.precision == "fp16" else None
                if scale is not None:
                    last["loss_scale"] = float(scale)
                logger.log(done, last)
            stop = done % run.log_interval == 0 and preemption.agreed()
            if done % run.save_interval == 0 or (done == total and run.save_final) or stop:
                ckpt.save(engine, done, {hook.name: hook.state_dict() for hook in hooks})
            if stop:
                dist_utils.barrier()   # every rank's checkpoint is written before any rank exits (srun then ends them)
                if run.requeue and preemption.scheduled and dist_utils.is_main():   # a signal or the time limit
                    dist_utils.log_main(launch_env.requeue_job())
                raise Preempted(f"stopped by {preemption.reason} after step {done}; checkpoint saved in {ckpt.dir}, "
                                f"run the same command again to resume")
    finally:
        preemption.restore()
        if profiler is not None:
            profiler.close()
        logger.close()
    weights = None
    if final_weights is not None and run.save_final:
        weights = save_final_weights(run.output_dir, *final_weights)
    return FitResult(step=total, last_metrics=last, weights=weights)
