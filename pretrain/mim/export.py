"""Conversion of a MIM model to timm's `beitv2_*` fine-tune layout (what official fine-tuning starts from).

The shared relative position table is copied into every block (`blocks.i.attn.relative_position_bias_table`);
the pretraining-only parts (`mask_token`, `lm_head`, `cls_pt_layers`) are dropped. timm's BEiT v2 classifier
pools the patch tokens and applies `fc_norm` (its `norm` is an Identity); official fine-tuning drops the
pretraining `norm` and starts `fc_norm` fresh, which here is written as a unit LayerNorm so that timm can load
the file strictly.

`beitv2 mim export CKPT FOLDER` writes a folder that describes itself (engine.storage.hub_export: model.safetensors,
config.json with the timm architecture and its arguments, a README.md model card) for
`timm.create_model("local-dir:FOLDER", pretrained=True)`, whatever the arch; `beitv2 mim export CKPT FILE.safetensors`
writes the weights alone (`export_to_timm`), for `timm.create_model("beitv2_base_patch16_224", pretrained=True,
pretrained_cfg_overlay=dict(file=FILE))` (base only: timm's name fixes the shape).
"""
from __future__ import annotations

import os
from typing import Mapping

import torch
import torch.nn as nn
from safetensors.torch import save_file

from engine.storage.files import write_atomically

__all__ = ["export", "export_timm_folder", "export_to_timm", "to_timm_state_dict"]

_KEEP_PREFIXES = ("cls_token", "patch_embed.", "blocks.")
_SHARED_TABLE = "rel_pos_bias.relative_position_bias_table"


def to_timm_state_dict(model_or_state_dict: nn.Module | Mapping[str, torch.Tensor],
                       fc_norm_from_norm: bool = False) -> dict[str, torch.Tensor]:
    """The backbone of a MIM model as a timm `Beit(use_rel_pos_bias=True, global_pool="avg")` state dict.

    Args:
        model_or_state_dict: A `BeitV2MIM` or its state dict (official files load via `read_mim_file`).
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


def export(checkpoint: str, out: str, fc_norm_from_norm: bool = False) -> dict:
    """Export the backbone of a MIM checkpoint (ours or official) for timm: a folder, or one .safetensors file.

    A folder (any name not ending in .safetensors) gets model.safetensors, config.json (timm architecture, its
    model_args, preprocessing) and README.md (a model card), loadable for every arch with
    `timm.create_model("local-dir:FOLDER", pretrained=True)` (num_classes=0: use forward_features, or pass
    num_classes=N for a fresh head). A .safetensors path gets the weights alone, in timm's `beitv2_*` layout.

    Args:
        checkpoint: `mim.pt` of a run, an official `*_cls_pt` file, or a run's output directory.
        out: output folder, or a path ending in .safetensors for the weights alone.
        fc_norm_from_norm: copy the pretraining `norm` into `fc_norm` (default: a fresh unit LayerNorm, as official
            fine-tuning starts).
    """
    from pretrain.mim.model import load_mim_model

    if os.path.isdir(checkpoint):
        checkpoint = os.path.join(checkpoint, "mim.pt")
    if out.endswith((".pt", ".pth", ".bin", ".ckpt")):
        raise ValueError(f"export writes safetensors: give a folder (weights, config.json and a model card) or a "
                         f"path ending in .safetensors, not {out}")
    model = load_mim_model(checkpoint)
    result = {"checkpoint": checkpoint, "out": out, "embed_dim": model.embed_dim, "depth": len(model.blocks)}
    if out.endswith(".safetensors"):
        export_to_timm(model, out, fc_norm_from_norm=fc_norm_from_norm)
        return result
    return {**result, **export_timm_folder(model, out, checkpoint, fc_norm_from_norm)}


def export_timm_folder(model: nn.Module, out: str | os.PathLike, source: str,
                       fc_norm_from_norm: bool = False) -> dict:
    """`model`'s backbone as a folder for `timm.create_model("local-dir:OUT", pretrained=True)`
    (engine.storage.hub_export); `source` is the checkpoint it came from (its run folder's config.json, metrics and
    eval.json fill the card)."""
    from engine.storage.hub_export import beit_model_args, write_timm_folder

    arch = model.arch_kwargs
    run = os.path.basename(os.path.dirname(os.path.abspath(source))) or source
    return write_timm_folder(
        out, to_timm_state_dict(model, fc_norm_from_norm), beit_model_args(arch, num_classes=0),
        title=f"BEiT v2 backbone ({run})",
        what=(f"A ViT backbone pretrained by BEiT v2 masked image modeling ({arch['embed_dim']} wide, "
              f"{arch['depth']} blocks, {arch['img_size']} px, {arch['patch_size']} px patches), without a "
              f"classification head: `model.forward_features(x)` gives the tokens, `model(x)` the pooled feature "
              f"(mean of the patch tokens through fc_norm, "
              f"{'the pretraining norm' if fc_norm_from_norm else 'a unit LayerNorm: fine-tuning trains it'}). "
              f"Pass `num_classes=N` to `timm.create_model` for a fresh head to fine-tune. The pretraining-only "
              f"parts (mask token, LM head, patch-aggregation head) are not included."),
        source=source)
