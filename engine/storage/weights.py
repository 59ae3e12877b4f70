"""Weights in and out of a run: consolidate the newest DeepSpeed checkpoint into one fp32 state dict (any ZeRO
stage, any precision), write and read the stages' weights files, and load a state dict strictly with a one-line
error. Every file is read weights-only (`engine.storage.safe_load`): one holding pickled objects is refused, not run."""
from __future__ import annotations

import contextlib
import io
import json
import os
from typing import Any, Mapping

import torch
from torch import nn

from engine.parallel import distributed as dist_utils
from engine.storage.checkpoint import CheckpointManager
from engine.storage.files import write_atomically
from engine.storage.safe_load import UntrustedCheckpoint, deepspeed_loads_weights_only, load, load_deepspeed_file


def consolidated_state_dict(output_dir: str) -> dict[str, torch.Tensor]:
    """fp32 weights and buffers of the latest checkpoint in `output_dir`, on the CPU. Call on one rank."""
    ckpt = CheckpointManager(output_dir)
    tag = ckpt.latest_tag()
    if tag is None:
        raise FileNotFoundError(f"no checkpoint in {ckpt.dir}; train first")
    folder = os.path.join(ckpt.dir, tag)
    if any(f.startswith(("zero_pp_rank", "bf16_zero_pp_rank")) and "optim_states" in f for f in os.listdir(folder)):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        # It narrates every step on stdout, and reads DeepSpeed's files with `weights_only=False`.
        with contextlib.redirect_stdout(io.StringIO()), deepspeed_loads_weights_only():
            sd = get_fp32_state_dict_from_zero_checkpoint(ckpt.dir, tag=tag)
        return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
    # ZeRO-0 in fp32: the model file holds the full weights.
    states = load_deepspeed_file(os.path.join(folder, "mp_rank_00_model_states.pt"), map_location="cpu")
    return {k: v.float() if v.is_floating_point() else v for k, v in states["module"].items()}


def save_final_weights(output_dir: str, filename: str, save_fn) -> str:
    """Collective: rank 0 writes `save_fn(path, consolidated_state_dict)` to `<output_dir>/<filename>`."""
    path = os.path.join(output_dir, filename)
    if dist_utils.is_main():
        save_fn(path, consolidated_state_dict(output_dir))
        dist_utils.log_main(f"saved {path}")
    dist_utils.barrier()
    return path


def load_strict(model: nn.Module, state_dict: dict, source: str, what: str) -> nn.Module:
    """`model.load_state_dict(state_dict, strict=True)`, but a mismatch is one line naming `source` and keys."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
             if k in state_dict and state_dict[k].shape != v.shape]
    if missing or unexpected or wrong:
        raise ValueError(f"{source} does not match {what}: missing {missing[:3]}, unexpected {unexpected[:3]}, "
                         f"wrong shapes {wrong[:3]}")
    check_finite(state_dict, source)
    model.load_state_dict(state_dict, strict=True)
    return model


def check_finite(state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Raises a one-line ValueError naming `source` when any floating-point tensor of `state_dict` holds a NaN or
    an inf: weights like that evaluate to a NaN loss and train nothing, whatever the learning rate."""
    bad = [k for k, v in state_dict.items() if torch.is_tensor(v) and v.is_floating_point()
           and not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(f"{source} holds weights that are not finite (NaN or inf) in {len(bad)} tensor"
                         f"{'s' if len(bad) > 1 else ''}, first {bad[0]}; it cannot be evaluated or trained from: "
                         f"use a checkpoint written before its run diverged")


def save_weights_file(path: str | os.PathLike, state_dict: Mapping[str, torch.Tensor], arch: dict,
                      file_format: str) -> None:
    """Write `{"model": fp32 CPU tensors, "arch", "format"}` atomically; `read_weights_file` reads it back."""
    sd = {k: v.detach().float().cpu() if v.is_floating_point() else v.detach().cpu() for k, v in state_dict.items()}
    write_atomically(os.fspath(path), lambda tmp: torch.save({"model": sd, "arch": arch, "format": file_format}, tmp))


def read_weights_file(path: str | os.PathLike, what: str, file_format: str | tuple[str, ...]
                      ) -> tuple[dict[str, torch.Tensor], Any]:
    """`(state_dict, saved arch or None)` from one of our files or an official one, without unpickling objects.

    Accepts `{"model"|"module"|"state_dict": sd, ...}`, a bare state dict, or safetensors (an `arch` JSON entry in
    its metadata is honoured). A file of another of our formats, or anything unreadable, is a one-line ValueError.

    Args:
        path: The file.
        what: What the caller expects, for messages (e.g. "VQ-KD tokenizer").
        file_format: The `format` entry our files of that kind carry (or the formats the caller accepts).
    """
    accepted = (file_format,) if isinstance(file_format, str) else tuple(file_format)
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} checkpoint not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors import safe_open
        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                sd = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # noqa: BLE001 - SafetensorError is not a ValueError
            raise ValueError(f"cannot read {path} as safetensors ({e})") from None
        return sd, json.loads(meta["arch"]) if "arch" in meta else None
    try:
        obj = load(path, map_location="cpu")
    except UntrustedCheckpoint:   # one line naming the file and what it holds
        raise
    except Exception as e:  # noqa: BLE001 - any unreadable file becomes one clear message
        raise ValueError(f"cannot read {path} as a weights-only checkpoint ({type(e).__name__})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path} does not hold a state dict (found {type(obj).__name__})")
    if obj.get("format", accepted[0]) not in accepted:
        raise ValueError(f"{path} is a '{obj['format']}' file, not a {what}; pass a {what} checkpoint")
    arch = obj.get("arch")
    for key in ("model", "module", "state_dict"):
        if isinstance(obj.get(key), dict):
            return obj[key], arch
    return obj, arch
