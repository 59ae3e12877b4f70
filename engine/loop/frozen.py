"""Frozen helpers (the MIM stage's tokenizer, the tokenizer stage's teacher) partitioned across ranks at ZeRO-3.

A frozen helper runs forward only, every step, on every rank. Kept whole it costs each rank its full size: the
ViT-B tokenizer encoder is 0.32 GiB in fp32, as much as ViT-B's whole parameter partition on 2 ranks. At ZeRO-3 a run
has already chosen memory over communication for its model, so the helper gets the same treatment from DeepSpeed:
an optimizer-less ZeRO-3 engine around it (DeepSpeed's ZeRO inference) keeps 1/world of its weights on each rank
and gathers one layer at a time while it runs. Parameters its code reads outside their own module's forward (a
ViT's `cls_token` and `pos_embed`, a task layer applied with `F.linear`) DeepSpeed gathers when they are read inside
the engine's forward and frees after it. The results equal the whole helper's bit for bit (tested); the cost is one
all-gather of the helper's weights per call.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from engine.config.schema import RunConfig
from engine.parallel import distributed as dist_utils
from engine.parallel.ds_setup import (comm_backend, largest_layer, load_ds_json, quiet_defaults, stage3_gather_limits,
                              zero_stage_of)


def _row_major_strides(shape: torch.Size) -> tuple[int, ...]:
    """The strides of a row-major tensor of `shape` (`is_contiguous()` also accepts other strides on size-1 dims,
    e.g. a channels-last 1x1 convolution weight, which ZeRO-3's flat byte view rejects)."""
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


class _MethodAsForward(nn.Module):
    """`module.<method>(...)` as a forward, so that DeepSpeed's hooks run around the call."""

    def __init__(self, module: nn.Module, method: str):
        super().__init__()
        self.helper, self.method = module, method

    def forward(self, *args, **kwargs):
        return getattr(self.helper, self.method)(*args, **kwargs)


def shards_frozen(run: RunConfig, world_size: int | None = None) -> bool:
    """Whether a run partitions its frozen helpers: ZeRO-3 on more than one rank, unless `run.shard_frozen` is off."""
    world_size = dist_utils.world_size() if world_size is None else world_size
    return run.shard_frozen and world_size > 1 and zero_stage_of(run.ds_config) == 3


def frozen_zero_config(run: RunConfig, module: nn.Module, world_size: int, backend: str) -> dict:
    """The ZeRO-3 inference config of a frozen helper: the run's `zero_optimization` block without what only an
    optimizer uses, over the gather limits the model gets (`engine.parallel.ds_setup.stage3_gather_limits`)."""
    zero = {k: v for k, v in load_ds_json(run.ds_config).get("zero_optimization", {}).items()
            if k not in ("offload_optimizer", "sub_group_size", "reduce_bucket_size", "contiguous_gradients")}
    return quiet_defaults({"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                           "train_batch_size": world_size,
                           "zero_optimization": {**stage3_gather_limits(largest_layer(module), backend), **zero}})


def frozen_entry(module: nn.Module, method: str, run: RunConfig) -> Callable:
    """`module.<method>` as the run calls it: partitioned across ranks when `shards_frozen(run)`, else as is.

    Args:
        module: the frozen helper, already in its compute dtype and on the run's device (the engine casts nothing:
            its own precision blocks stay off, so fp32 parts such as a quantizer's task layer stay fp32).
        method: the method the step calls (e.g. `get_codebook_indices`).
        run: the run's settings (ZeRO stage and limits come from `run.ds_config`).
    """
    if not shards_frozen(run):
        return getattr(module, method)
    import deepspeed
    module.requires_grad_(False).eval()
    for p in module.parameters():   # ZeRO-3 reads each parameter's storage as flat row-major bytes: weights laid out
        if p.stride() != _row_major_strides(p.shape):   # otherwise (a teacher's channels-last convolutions) are copied
            p.data = p.data.clone(memory_format=torch.contiguous_format)
    config = frozen_zero_config(run, module, dist_utils.world_size(), comm_backend())
    engine, _, _, _ = deepspeed.initialize(model=_MethodAsForward(module, method), config=config)
    engine.eval()
    kept = sum(p.ds_tensor.numel() for p in module.parameters())
    total = sum(p.ds_numel for p in module.parameters())
    dist_utils.log_main(f"frozen {type(module).__name__} partitioned at ZeRO-3: {kept / 1e6:.1f}M of its "
                        f"{total / 1e6:.1f}M parameters per rank (run.shard_frozen=false keeps it whole)")
    return engine
