"""The one training skeleton of every stage: a stage states what is its own in a `StagePlan` (model, parameter
groups, data, step, weights file, and what it evaluates after training) and `train_stage` runs the rest, the same
way for the tokenizer, MIM, classification and segmentation:

    resolve and print the config (--dry_run stops) -> start the ranks -> keep the resumed global batch ->
    seed (same on every rank) -> the stage's `prepare` -> seed per rank -> fit -> final pictures -> evaluate

A stage's `train(recipe, **overrides)` is one call:

    def train(recipe="beitv2_small_demo", **overrides) -> dict:
        return train_stage(MIMConfig, RECIPES, recipe, overrides, prepare)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from torch import nn

from engine.config.run_plan import start_run
from engine.loop.interfaces import DataSource, FitResult, StepHook
from engine.loop.trainer import fit, seed_everything
from engine.parallel import distributed as dist_utils
from engine.parallel.global_batch import keep_global_batch
from engine.reporting.metrics import TensorboardPictures
from engine.storage.run_dir import claimed_output_dir

__all__ = ["StagePlan", "train_stage"]


@dataclass
class StagePlan:
    """What one stage trains and how; `prepare(cfg, device)` builds it with the run's shared seed set, so the
    random initial weights are the same on every rank."""
    model: nn.Module
    param_groups: list[dict]
    data: DataSource
    step: Callable[[Any, dict], Any]   # (engine, micro-batch) -> loss, or (loss, {metric: tensor})
    weights_file: str                  # written in run.output_dir after training, e.g. "mim.pt"
    save_weights: Callable[[nn.Module, str, dict], None]   # (model, path, consolidated fp32 state dict)
    flops_per_image: float             # one training step's FLOPs per image, frozen teachers included (MFU)
    hooks: tuple[StepHook, ...] = ()   # state kept beside the model, checkpointed with it (an EMA of weights)
    keep_fp32_buffers: tuple[str, ...] = ()   # buffer prefixes that stay fp32 under bf16/fp16 (a codebook)
    # render(module, images) -> {tag: HWC uint8 picture}: tensorboard pictures of a few fixed training images at
    # checkpoint steps and at the last step (a picture per log point would pile up thousands in a long run).
    pictures: Callable[[nn.Module, torch.Tensor], dict] | None = None
    # After training, while the run still holds its output directory: held-out metrics, files; returns the
    # command's result (default: the fit summary).
    evaluate: Callable[[FitResult], dict] | None = None


def train_stage(config_cls: type, recipes: Mapping[str, Mapping[str, Any]], recipe: str | None,
                overrides: Mapping[str, Any], prepare: Callable[[Any, torch.device], StagePlan], *,
                data_task: str = "images") -> dict:
    """Resolve the config (defaults < recipe < --config < flags), then train what `prepare` plans and evaluate it.

    `data_task` names the data the stage reads, for the plan printed before anything is built and its checks:
    "images" (train split only), "classify" (class labels; num_classes from the data), "segment" (label maps)."""
    cfg = start_run(config_cls, recipes, recipe, overrides, task=data_task)   # prints data and config; --dry_run
    device = dist_utils.init(cfg.run)
    keep_global_batch(cfg.run)   # on resume: the saved micro x accum x ranks; before the data source is built
    seed_everything(cfg.run.seed)   # same seed on every rank: identical initial weights
    plan = prepare(cfg, device)
    if cfg.run.grad_checkpointing:
        plan.model.set_grad_checkpointing(True)
    seed_everything(cfg.run.seed + dist_utils.rank())   # per-rank randomness (dropout, drop path) from here on

    pictures = TensorboardPictures(cfg.run.output_dir, cfg.run.save_interval, plan.pictures) if plan.pictures \
        else None
    step = plan.step if pictures is None else _drawing_pictures(pictures, plan.step)
    with claimed_output_dir(cfg, cfg.run):   # what is written after training belongs to this run too
        try:
            result = fit(cfg, cfg.run, cfg.optim, cfg.schedule, plan.model, plan.param_groups, plan.data, step,
                         flops_per_image=plan.flops_per_image, keep_fp32_buffers=plan.keep_fp32_buffers,
                         hooks=plan.hooks,
                         final_weights=(plan.weights_file, lambda path, sd: plan.save_weights(plan.model, path, sd)))
            if pictures is not None:
                pictures.final(plan.model, result.step)   # the trained weights' pictures, at the last step
        finally:
            if pictures is not None:
                pictures.close()
        return plan.evaluate(result) if plan.evaluate is not None else result.summary()


def _drawing_pictures(pictures: TensorboardPictures, step: Callable) -> Callable:
    def step_and_pictures(engine, batch):
        pictures(engine, batch["image"])   # before the step: the weights the step starts from
        return step(engine, batch)
    return step_and_pictures
