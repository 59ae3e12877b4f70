"""Build the DeepSpeed config (JSON file + typed run config) and the engine.

The typed config is the single source of truth for batch sizes, accumulation, clipping, precision and the
optimizer. The JSON in `ds_configs/` holds what only DeepSpeed knows about (ZeRO stage, bucket sizes, offload,
communication). A key both define with different values is an error rather than a silent override.

ZeRO settings DeepSpeed would otherwise take from its defaults are derived from the model at startup
(`zero_settings_for`), for every key of `zero_optimization` the JSON leaves out (a key the JSON sets wins), so one
`zero3.json` fits ViT-B and ViT-L alike. DeepSpeed's defaults are sized for billion-parameter models and cost more
than they save on a ViT (measured in docs/scale.md with `python -m bench.memory`):

- `reduce_bucket_size` (and `allgather_bucket_size` at ZeRO-1/2): 1/8 of the trainable elements, at least the
  largest tensor, at most 5e7. DeepSpeed's 5e8 is a 2 GB fp32 buffer, bigger than ViT-B's whole gradient, which
  ZeRO-3 allocates up front and fills with every gradient before it reduces any.
- `stage3_max_reuse_distance`: one layer. DeepSpeed's 1e9 keeps every gathered layer alive from the forward until
  its backward, so at ZeRO-3 each rank ends up holding the whole unpartitioned model.
- `stage3_max_live_parameters`: two layers (the one computing and the one prefetched); `stage3_prefetch_bucket_size`:
  one layer. A layer is the largest entry of the model's ModuleLists (a transformer block). Under gloo, where
  nothing overlaps (below), one live layer, no prefetch, and a ZeRO-3 `reduce_bucket_size` of at most one layer:
  prefetching only holds a second layer, and DeepSpeed's reduce-scatter copies its whole bucket once more (ViT-B,
  2 CPU ranks: 0.08 GiB lower peak per rank).
- `sub_group_size`: each rank's partition in about 4 optimizer sub-groups. At startup ZeRO-3 zeroes a gradient
  buffer as large as the largest sub-group's unpartitioned size; with DeepSpeed's 1e9 that is the whole model.
- `overlap_comm`: on under NCCL, off under gloo. On a GPU the reduction runs on its own stream and hides behind
  the backward (`python -m bench.memory step_time`: ViT-B, 128 images per rank, 8 ranks, bf16 gradients over
  25 GB/s links at 40% MFU: 42 ms of compute and 17 ms of all-reduce per step, 1.35x faster with overlap). Under
  gloo the same CPU cores compute and communicate, so nothing overlaps (2 CPU ranks, ViT-B, 2 images: ~5 s of
  compute against ~0.09 s of all-reduce at 5 GB/s, under 2% to win), while overlap costs a second reduction
  bucket at ZeRO-1/2.

On CPU runs, where glibc places big host tensors decides how much resident memory a ZeRO rank keeps after its engine
start (`engine.parallel.host_memory`).
"""
from __future__ import annotations

import json
from typing import Any, Iterable

import torch
from torch import nn

from engine.config.schema import ConfigError, OptimConfig, RunConfig
from engine.parallel import host_memory

# `bf16` and `fp16` are DeepSpeed's modes: 16-bit weights and gradients, fp32 master weights in the optimizer.
# `bf16_autocast` keeps fp32 weights and gradients and runs the forward under torch.autocast (bf16 matmuls); at
# ZeRO-0 it is the lean path: no master-weight copies, no per-parameter overflow checks with host syncs.
PARAM_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "bf16_autocast": torch.float32,
                "fp16": torch.float16}
COMPUTE_DTYPES = {**PARAM_DTYPES, "bf16_autocast": torch.bfloat16}   # what frozen helpers (teacher, tokenizer) run in


def loop_owns_step(precision: str, stage: int) -> bool:
    """Whether the training loop clips and skips non-finite updates itself (see `engine.loop.trainer`).

    DeepSpeed does both inside its own optimizers (16-bit modes, ZeRO >= 1), with a host sync per parameter
    check. At ZeRO-0 with fp32 gradients the optimizer is torch's fused AdamW, which skips an update on device
    when told `found_inf`: the loop clips with one foreach norm and never waits for the device.
    """
    return stage == 0 and precision in ("fp32", "bf16_autocast")


def load_ds_json(path: str) -> dict:
    """The JSON object in `path`; anything else (no such file, a folder, not JSON, not an object, a
    `zero_optimization` that is not an object or a stage other than 0-3) is a one-line ConfigError."""
    from ds_configs import packaged_names, resolve_path
    try:
        with open(resolve_path(path)) as f:
            ds = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"DeepSpeed config not found: {path} (pick one of ds_configs/{{"
                          f"{','.join(packaged_names())}}} or give a path to your own JSON)") from None
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
    zero = ds.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ConfigError(f"{path}: 'zero_optimization' must be a JSON object, not {json.dumps(zero)[:40]}")
    stage = zero.get("stage", 0)
    if type(stage) is not int or not 0 <= stage <= 3:   # type(): a JSON true is not stage 1
        raise ConfigError(f"{path}: 'zero_optimization.stage' must be 0, 1, 2 or 3, not {json.dumps(stage)[:40]}")
    return ds


def zero_stage_of(path: str) -> int:
    """The ZeRO stage of the DeepSpeed config at `path` (what a stage checks before it builds anything)."""
    return zero_stage(load_ds_json(path))


def _put(ds: dict, key: str, value: Any, source: str, path: str) -> None:
    """Set ds[key] = value unless the JSON already holds a different value."""
    if key in ds and ds[key] != value:
        raise ConfigError(f"{path} sets '{key}' = {ds[key]!r} but the run config gives {value!r} ({source}); "
                          f"remove the key from the JSON or change the run config")
    ds[key] = value


def largest_layer(model: nn.Module) -> int:
    """Elements of the largest entry of any ModuleList (a transformer block), else of the largest tensor."""
    layers = [sum(p.numel() for p in m.parameters()) for lst in model.modules() if isinstance(lst, nn.ModuleList)
              for m in lst]
    return max(layers or [max((p.numel() for p in model.parameters()), default=0)])


def zero_settings_for(stage: int, trainable: list[int], largest_layer: int, world_size: int, backend: str) -> dict:
    """ZeRO settings for a model of `trainable` parameter tensor sizes (see the module docstring for why).

    Args:
        stage: ZeRO stage.
        trainable: element count of every trainable parameter tensor.
        largest_layer: elements of the largest layer ZeRO-3 gathers at once.
        world_size: data-parallel ranks.
        backend: torch.distributed backend (`nccl` overlaps communication, `gloo` does not).
    """
    if stage == 0 or not trainable:
        return {}
    total = sum(trainable)
    bucket = int(min(5e7, max(max(trainable), total // 8)))
    bucket = -(-bucket // 1024) * 1024   # ZeRO-1/2 want buckets that are a multiple of their alignment (2 or 4)
    out = {"overlap_comm": backend == "nccl", "reduce_bucket_size": bucket}
    if stage in (1, 2):
        out["allgather_bucket_size"] = bucket
    if stage == 3:
        layer = max(largest_layer, max(trainable))
        out.update(stage3_gather_limits(layer, backend),
                   sub_group_size=int(min(1e9, max(1e6, -(-total // (4 * world_size))))))
        if not out["overlap_comm"]:   # a bucket larger than one layer only holds memory (module docstring)
            out["reduce_bucket_size"] = min(bucket, layer)
    return out


def stage3_gather_limits(layer: int, backend: str) -> dict:
    """ZeRO-3's gather limits for layers of `layer` elements: one layer live and none prefetched under gloo, where
    nothing overlaps and a prefetched layer only holds memory; two live and one prefetched under NCCL."""
    overlap = backend == "nccl"
    return {"overlap_comm": overlap, "stage3_prefetch_bucket_size": layer if overlap else 0,
            "stage3_max_live_parameters": (2 if overlap else 1) * layer, "stage3_max_reuse_distance": layer}


def quiet_defaults(ds: dict) -> dict:
    """DeepSpeed's own reporting off where the JSON leaves it out: our logger reports. Its throughput timer
    would synchronize the device at every forward and optimizer step (DeepSpeed 0.19: `timers.throughput` on and
    `synchronized` by default), which stops the host from queueing the next step while the device works."""
    ds.setdefault("steps_per_print", 10 ** 9)
    ds.setdefault("wall_clock_breakdown", False)
    ds.setdefault("timers", {"throughput": {"enabled": False}})
    return ds


def comm_backend() -> str:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return str(dist.get_backend())
    return "nccl" if torch.cuda.is_available() else "gloo"


def build_ds_config(run: RunConfig, optim: OptimConfig, world_size: int, load_universal: bool = False, *,
                    model: nn.Module | None = None, backend: str | None = None) -> dict:
    """The DeepSpeed config of a run: the JSON, the run config's batch/precision/optimizer, and ZeRO settings the
    JSON leaves out derived from `model` (when given) and the communication `backend` (default: the process
    group's)."""
    path = run.ds_config
    ds = load_ds_json(path)
    zero = ds.get("zero_optimization", {})
    trainable = [p.numel() for p in model.parameters() if p.requires_grad] if model is not None else []
    derived = zero_settings_for(zero_stage(ds), trainable, largest_layer(model) if model is not None else 0,
                                world_size, backend or comm_backend())
    if model is None and zero_stage(ds) >= 1:   # no model to size buffers by: only the backend's choice
        derived = {"overlap_comm": (backend or comm_backend()) == "nccl"}
    if derived:
        ds["zero_optimization"] = {**derived, **zero}
    if load_universal:   # resuming from a checkpoint re-split for another number of ranks (engine.storage.checkpoint)
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
    return quiet_defaults(ds)


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

    ds_config = build_ds_config(run, optim, world_size, load_universal, model=model)
    cast_for_precision(model, run.precision, keep_fp32_buffers)
    host_memory.at_process_start(zero_stage(ds_config))   # normally done by dist_utils.init; at the latest here
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=ds_config)
    share_fp32_master_weights(engine)
    host_memory.after_engine_start()
    return engine, ds_config


def share_fp32_master_weights(engine) -> int:
    """At ZeRO-3 with fp32 weights, let the optimizer step on the weight partitions themselves; returns the
    partitions shared.

    DeepSpeed 0.19 means to skip the fp32 master copy when the weights already are fp32 on the optimizer's device,
    but its test compares a `torch.device` with a device-name string, which is never equal, so every rank keeps a
    second fp32 copy of its partition. Pointing the master partition at the weight partition gives the intended
    layout: the step updates the weights in place and DeepSpeed's copy back is a copy onto itself.
    """
    opt = engine.optimizer   # only DeepSpeed's ZeRO-3 optimizer has these two lists
    masters = getattr(opt, "fp32_partitioned_groups_flat", None)
    weights = getattr(opt, "fp16_partitioned_groups_flat", None)
    if not masters or not weights or getattr(opt, "offload_optimizer", False) or getattr(opt, "offload_param", False):
        return 0
    shared = 0
    for master, weight in zip(masters, weights):
        if (weight is not None and master.dtype == weight.dtype and master.device == weight.device
                and master.shape == weight.shape and master.data_ptr() != weight.data_ptr()):
            master.data = weight.data   # the clone is freed; the optimizer holds `master`, now a view of the weights
            shared += 1
    return shared


def zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))
