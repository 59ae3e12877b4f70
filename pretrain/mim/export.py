"""Conversion of a MIM model to timm's `beitv2_*` fine-tune layout (what official fine-tuning starts from).

The shared relative position table is copied into every block (`blocks.i.attn.relative_position_bias_table`);
the pretraining-only parts (`mask_token`, `lm_head`, `cls_pt_layers`) are dropped. timm's BEiT v2 classifier
pools the patch tokens and applies `fc_norm` (its `norm` is an Identity); official fine-tuning drops the
pretraining `norm` and starts `fc_norm` fresh, which here is written as a unit LayerNorm so that timm can load
the file strictly. The result is a safetensors file for
`timm.create_model("beitv2_base_patch16_224", pretrained=True, pretrained_cfg_overlay=dict(file=path))`.
"""
from __future__ import annotations

import os
from typing import Mapping

import torch
import torch.nn as nn
from safetensors.torch import save_file

from engine.files import write_atomically

__all__ = ["export_to_timm", "to_timm_state_dict"]

_KEEP_PREFIXES = ("cls_token", "patch_embed.", "blocks.")
_SHARED_TABLE = "rel_pos_bias.relative_position_bias_table"


def to_timm_state_dict(model_or_state_dict: nn.Module | Mapping[str, torch.Tensor],
                       fc_norm_from_norm: bool = False) -> dict[str, torch.Tensor]:
    """The backbone of a MIM model as a timm `Beit(use_rel_pos_bias=True, global_pool="avg")` state dict.

    Args:
        model_or_state_dict: A `BeitV2MIM` or its state dict (official files load via `read_checkpoint`).
        fc_norm_from_norm: Copy the pretraining `norm` into `fc_norm` instead of a fresh unit LayerNorm
            (the official fine-tuning starts fresh).

    Returns:
        Tensors keyed as timm's BEiT v2 with `num_classes=0` (no `head`), on the input's device.
    """
    sd = model_or_state_dict.state_dict() if isinstance(model_or_state_dict, nn.Module) else model_or_state_dict
    if _SHARED_TABLE not in sd or "norm.weight" not in sd:
        raise ValueError(f"not a BEiT v2 MIM state dict: needs '{_SHARED_TABLE}' and 'norm.weight'")
    out = {k: v.detach() for k, v in sd.items()
           if k.startswith(_KEEP_PREFIXES) and not k.endswith("relative_position_index")}
    depth = 1 + max(int(k.split(".")[1]) for k in out if k.startswith("blocks."))
    for i in range(depth):
        # Separate copies: blocks fine-tune their tables independently (and safetensors refuses shared storage).
        out[f"blocks.{i}.attn.relative_position_bias_table"] = sd[_SHARED_TABLE].detach().clone()
    norm_w, norm_b = sd["norm.weight"].detach(), sd["norm.bias"].detach()
    out["fc_norm.weight"] = norm_w.clone() if fc_norm_from_norm else torch.ones_like(norm_w)
    out["fc_norm.bias"] = norm_b.clone() if fc_norm_from_norm else torch.zeros_like(norm_b)
    return out


def export_to_timm(model_or_state_dict: nn.Module | Mapping[str, torch.Tensor], out_path: str | os.PathLike,
                   fc_norm_from_norm: bool = False) -> dict[str, torch.Tensor]:
    """Write the backbone in timm's `beitv2_*` layout as an fp32 safetensors file.

    Args:
        model_or_state_dict: A `BeitV2MIM` or its state dict.
        out_path: Output file; timm picks the safetensors reader by the `.safetensors` suffix.
        fc_norm_from_norm: See `to_timm_state_dict`.

    Returns:
        The tensors written (CPU, fp32).
    """
    out_path = os.fspath(out_path)
    if not out_path.endswith(".safetensors"):
        raise ValueError(f"{out_path}: use a .safetensors name (timm chooses its reader by the suffix)")
    sd = {k: v.float().cpu().contiguous() for k, v in to_timm_state_dict(model_or_state_dict,
                                                                        fc_norm_from_norm).items()}
    write_atomically(out_path, lambda tmp: save_file(sd, tmp, metadata={"format": "pt"}))
    return sd
