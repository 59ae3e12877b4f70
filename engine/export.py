"""Turn the newest DeepSpeed checkpoint of a run into one fp32 state dict (any ZeRO stage, any precision)."""
from __future__ import annotations

import contextlib
import io
import os

import torch

from engine.checkpoint import CheckpointManager


def consolidated_state_dict(output_dir: str) -> dict[str, torch.Tensor]:
    """fp32 weights and buffers of the latest checkpoint in `output_dir`, on the CPU. Call on one rank."""
    ckpt = CheckpointManager(output_dir)
    tag = ckpt.latest_tag()
    if tag is None:
        raise FileNotFoundError(f"no checkpoint in {ckpt.dir}; train first")
    folder = os.path.join(ckpt.dir, tag)
    if any(f.startswith(("zero_pp_rank", "bf16_zero_pp_rank")) and "optim_states" in f for f in os.listdir(folder)):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        with contextlib.redirect_stdout(io.StringIO()):   # it narrates every step on stdout
            sd = get_fp32_state_dict_from_zero_checkpoint(ckpt.dir, tag=tag)
        return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
    # ZeRO-0 in fp32: the model file holds the full weights.
    states = torch.load(os.path.join(folder, "mp_rank_00_model_states.pt"), map_location="cpu", weights_only=False)
    return {k: v.float() if v.is_floating_point() else v for k, v in states["module"].items()}
