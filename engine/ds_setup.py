"""Build the DeepSpeed config (JSON file + typed run config) and the engine.

The typed config is the single source of truth for batch sizes, accumulation, clipping, precision and the
optimizer. The JSON in `ds_configs/` holds what only DeepSpeed knows about (ZeRO stage, bucket sizes, offload,
communication). A key both define with different values is an error rather than a silent override.
"""
from __future__ import annotations

import json
from typing import Any, Iterable

import torch
from torch import nn

from engine.config import ConfigError, OptimConfig, RunConfig

# `bf16` and `fp16` are DeepSpeed's modes: 16-bit weights and gradients, fp32 master weights in the optimizer.
# `bf16_autocast` keeps fp32 weights and gradients and runs the forward under torch.autocast (bf16 matmuls); at
# ZeRO-0 it is the lean path: no master-weight copies, no per-parameter overflow checks with host syncs.
PARAM_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "bf16_autocast": torch.float32,
                "fp16": torch.float16}
COMPUTE_DTYPES = {**PARAM_DTYPES, "bf16_autocast": torch.bfloat16}   # what frozen helpers (teacher, tokenizer) run in


def loop_owns_step(precision: str, stage: int) -> bool:
    """Whether the training loop clips and skips non-finite updates itself (see `engine.trainer`).

    DeepSpeed does both inside its own optimizers (16-bit modes, ZeRO >= 1), with a host sync per parameter
    check. At ZeRO-0 with fp32 gradients the optimizer is torch's fused AdamW, which skips an update on device
    when told `found_inf`: the loop clips with one foreach norm and never waits for the device.
    """
    return stage == 0 and precision in ("fp32", "bf16_autocast")


def load_ds_json(path: str) -> dict:
    """The JSON object in `path`; anything else (no such file, a folder, not JSON, not an object) is a one-line
    ConfigError."""
    try:
        with open(path) as f:
            ds = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"DeepSpeed config not found: {path} (pick one of ds_configs/*.json)") from None
    except IsADirectoryError:
        raise ConfigError(f"DeepSpeed config {path} is a folder; give a JSON file (one of ds_configs/*.json)"
                          ) from None
    except OSError as e:
        raise ConfigError(f"cannot read DeepSpeed config {path} ({e.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:   # a binary file fails to decode before it parses
        where = f"{e.msg} at line {e.lineno}" if isinstance(e, json.JSONDecodeError) else "not UTF-8 text"
        raise ConfigError(f"DeepSpeed config {path} is not valid JSON ({where})") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"DeepSpeed config {path} must hold a JSON object ({{...}}), not {json.dumps(ds)[:40]}")
    return ds


def _put(ds: dict, key: str, value: Any, source: str, path: str) -> None:
    """Set ds[key] = value unless the JSON already holds a different value."""
    if key in ds and ds[key] != value:
        raise ConfigError(f"{path} sets '{key}' = {ds[key]!r} but the run config gives {value!r} ({source}); "
                          f"remove the key from the JSON or change the run config")
    ds[key] = value


def build_ds_config(run: RunConfig, optim: OptimConfig, world_size: int, load_universal: bool = False) -> dict:
    path = run.ds_config
    ds = load_ds_json(path)
    if load_universal:   # resuming from a checkpoint re-split for another number of ranks (engine.checkpoint)
        ds["checkpoint"] = {**ds.get("checkpoint", {}), "load_universal": True}
    if "scheduler" in ds:
        raise ConfigError(f"{path} has a 'scheduler' block; the lr schedule comes from the run config's "
                          f"'schedule' section, remove the block")
    _put(ds, "train_micro_batch_size_per_gpu", run.micro_batch_size, "run.micro_batch_size", path)
    _put(ds, "gradient_accumulation_steps", run.grad_accum_steps, "run.grad_accum_steps", path)
    _put(ds, "train_batch_size", run.micro_batch_size * run.grad_accum_steps * world_size,
         "micro_batch_size x grad_accum_steps x world size", path)
    clip = 0.0 if loop_owns_step(run.precision, zero_stage(ds)) else float(optim.grad_clip)   # 0: the loop clips
    _put(ds, "gradient_clipping", clip, "optim.grad_clip", path)

    autocast = run.precision == "bf16_autocast"
    if "torch_autocast" in ds:
        raise ConfigError(f"{path} has a 'torch_autocast' block; set run.precision=bf16_autocast instead")
    if autocast:
        ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    for name, wanted in (("bf16", run.precision == "bf16"), ("fp16", run.precision == "fp16")):
        block = dict(ds.get(name, {}))
        if "enabled" in block and bool(block["enabled"]) != wanted:
            raise ConfigError(f"{path} sets '{name}.enabled' = {block['enabled']} but run.precision is "
                              f"'{run.precision}'; remove 'enabled' from the JSON or change run.precision")
        block["enabled"] = wanted
        if name == "fp16" and wanted:
            block.setdefault("loss_scale", 0)          # 0 = dynamic loss scaling
            block.setdefault("initial_scale_power", 16)
        ds[name] = block

    # torch's fused AdamW instead of DeepSpeed's FusedAdam: the same update in one kernel per step (CUDA and CPU),
    # no JIT-compiled op, and an on-device `found_inf` skip that the lean path relies on.
    optimizer = {"type": "AdamW", "params": {
        "lr": optim.lr, "betas": list(optim.betas), "eps": optim.eps, "weight_decay": optim.weight_decay,
        "torch_adam": True, "adam_w_mode": True, "fused": True}}
    if "optimizer" in ds and ds["optimizer"] != optimizer:
        raise ConfigError(f"{path} has an 'optimizer' block; the optimizer comes from the run config's 'optim' "
                          f"section, remove the block")
    ds["optimizer"] = optimizer
    ds.setdefault("steps_per_print", 10 ** 9)   # our logger reports; keep DeepSpeed's own prints quiet
    ds.setdefault("wall_clock_breakdown", False)
    return ds


def param_groups(model: nn.Module, no_decay_names: Iterable[str] = ()) -> list[dict]:
    """AdamW groups from timm (no decay for 1-d params, biases and `no_decay_names`), each tagged with
    `wd_scale` (0 or 1): the per-step schedule writes `weight_decay * wd_scale` into every group."""
    from timm.optim import param_groups_weight_decay
    groups = param_groups_weight_decay(model, weight_decay=1.0, no_weight_decay_list=list(no_decay_names))
    for g in groups:
        g["wd_scale"] = g["weight_decay"]
    return groups


def layer_decay_param_groups(model: nn.Module, layer_decay: float, no_decay_names: Iterable[str] = ()
                             ) -> list[dict]:
    """AdamW groups with layer-wise lr decay (BEiT): lr scale `layer_decay ** (L + 1 - layer_id)`, layer id 0 for
    the embeddings and CLS token, i + 1 for block i, L + 1 for the rest (timm's `param_groups_layer_decay` over the
    model's `group_matcher`); each group tagged with `lr_scale` and `wd_scale` for the per-step schedule."""
    from timm.optim import param_groups_layer_decay
    groups = param_groups_layer_decay(model, weight_decay=1.0, no_weight_decay_list=list(no_decay_names),
                                      layer_decay=layer_decay)
    for g in groups:
        g["wd_scale"] = g["weight_decay"]
    return groups


def cast_for_precision(model: nn.Module, precision: str, keep_fp32: Iterable[str] = ()) -> nn.Module:
    """Cast parameters and buffers to the training dtype before DeepSpeed sees the model.

    DeepSpeed's bf16/fp16 paths cast parameters only; timm's attention keeps its zero key bias as an fp32
    buffer, which then meets bf16 weights in the qkv matmul. Buffers named by prefix in `keep_fp32` (EMA
    statistics such as a codebook) stay fp32.
    """
    dtype = PARAM_DTYPES[precision]
    if dtype == torch.float32:
        return model
    prefixes = tuple(keep_fp32)
    saved = {n: b.detach().clone() for n, b in model.named_buffers() if prefixes and n.startswith(prefixes)}
    model.to(dtype)
    for name, value in saved.items():
        module_name, _, buf_name = name.rpartition(".")
        module = model.get_submodule(module_name) if module_name else model
        module._buffers[buf_name] = value
    return model


def initialize(model: nn.Module, groups: list[dict], run: RunConfig, optim: OptimConfig, world_size: int,
               keep_fp32_buffers: Iterable[str] = (), load_universal: bool = False):
    """Return a DeepSpeed engine for `model`; the engine's optimizer holds `groups`."""
    import deepspeed

    ds_config = build_ds_config(run, optim, world_size, load_universal)
    cast_for_precision(model, run.precision, keep_fp32_buffers)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=ds_config)
    return engine, ds_config


def zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))
