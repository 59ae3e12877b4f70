"""Attention maps of a MIM model: where the [CLS] token of the last backbone block and of the patch-aggregation
head looks, per head, drawn over the image.

The training forward uses fused attention (SDPA or FlexAttention), which never materialises the probabilities.
Here forward pre-hooks capture the input of the two attention modules of interest during an ordinary forward,
and only the [CLS] query's softmax row is recomputed from it with the block's own weights and relative position
bias: one `[B, heads, 1 + patches]` tensor per block, nothing added to the training path.
"""
from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from data_tools.gpu_augment import normalize
from engine.evaluation import eval_device
from engine.files import write_atomically
from pretrain.mim.model import BeitV2MIM, load_mim_model

__all__ = ["attention_maps", "attention_picture", "cls_attention", "visualize"]


def cls_attention(attn: nn.Module, x: torch.Tensor, shared_rel_pos_bias: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention of the [CLS] query (token 0) over all tokens, for one timm BEiT `Attention` module.

    Args:
        attn: The block's attention module (its qkv weights, q/v biases, optional own bias table).
        x: What the module was called with, `[B, N, C]` (the block's `norm1` output).
        shared_rel_pos_bias: The shared relative position bias it was called with, `[heads, N, N]`, or None.

    Returns:
        fp32 `[B, heads, N]`, each row summing to 1 (keys in token order, [CLS] first).
    """
    B, N, _ = x.shape
    if attn.q_bias is None:
        qkv = attn.qkv(x)
    else:
        bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
        qkv = attn.qkv(x) + bias if attn.qkv_bias_separate else F.linear(x, attn.qkv.weight, bias)
    qkv = qkv.float().reshape(B, N, 3, attn.num_heads, -1)
    q = qkv[:, :1, 0].transpose(1, 2) * attn.scale    # [B, H, 1, d]: only the [CLS] query
    k = qkv[:, :, 1].transpose(1, 2)                  # [B, H, N, d]
    scores = q @ k.transpose(-2, -1)                  # [B, H, 1, N]
    if attn.relative_position_bias_table is not None:
        scores = scores + attn._get_rel_pos_bias()[:, :, :1].float()
    if shared_rel_pos_bias is not None:
        scores = scores + shared_rel_pos_bias[:, :1].float()
    return scores.softmax(-1)[:, :, 0]


@torch.no_grad()
def attention_maps(model: BeitV2MIM, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[CLS] attention over the patches in the last backbone block and in the last aggregation-head block.

    Args:
        model: The MIM model (any attention kernel; FlexAttention is swapped for SDPA during this call, so no
            new shape is compiled). Call it in eval mode for maps without drop path.
        images: `[B, 3, H, W]` RGB in [0, 1] at the model's input size (ImageNet-normalised here, as MIM's
            model view is).

    Returns:
        `(backbone, head)`, each fp32 `[B, heads, grid_h, grid_w]`: the probability mass of the [CLS] query on
        each patch (the rest of each row, on [CLS] itself, is left out).
    """
    captured: dict[str, tuple] = {}

    def capture(name):
        def hook(module, args, kwargs):
            captured[name] = (args[0] if args else kwargs["x"], kwargs.get("shared_rel_pos_bias"))
        return hook

    targets = {"backbone": model.blocks[-1].attn, "head": model.cls_pt_layers[-1].attn}
    handles = [m.register_forward_pre_hook(capture(name), with_kwargs=True) for name, m in targets.items()]
    kernel = model.arch_kwargs.get("attention", "sdpa")
    if kernel == "flex":
        model.set_attention("sdpa")
    try:
        dtype = model.patch_embed.proj.weight.dtype
        model.forward_features(normalize(images.float()).to(dtype))
    finally:
        for h in handles:
            h.remove()
        if kernel == "flex":
            model.set_attention("flex")
    grid = tuple(model.patch_embed.grid_size)
    return tuple(cls_attention(targets[name], *captured[name])[:, :, 1:].unflatten(-1, grid)
                 for name in ("backbone", "head"))


def _heat_colours() -> np.ndarray:
    """uint8 `[256, 3]` lookup table: matplotlib's perceptually uniform `inferno`, dark (low) to yellow (high)."""
    from matplotlib import colormaps
    return np.round(colormaps["inferno"](np.linspace(0, 1, 256))[:, :3] * 255).astype(np.uint8)


def attention_picture(image: torch.Tensor, backbone: torch.Tensor, head: torch.Tensor, alpha: float = 0.6
                      ) -> np.ndarray:
    """One image's maps as a grid, uint8 RGB `[2 * S, (1 + heads) * S, 3]` with `S` the image side.

    Row 1: the image, then one tile per head of the last backbone block; row 2: the image, then one tile per head
    of the aggregation head. Each tile is that head's map scaled to its own maximum, upsampled to the image
    (nearest: one square per patch), coloured with `inferno` and blended over the image.

    Args:
        image: `[3, S, S]` RGB in [0, 1].
        backbone, head: `[heads, grid_h, grid_w]` maps of `attention_maps`.
        alpha: weight of the colour map in each tile.
    """
    lut = _heat_colours()
    side = image.shape[-1]
    rgb = image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()
    rows = []
    for maps in (backbone, head):
        maps = maps.detach().float().cpu()
        scaled = maps / maps.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]
        up = F.interpolate(scaled[None], size=(side, side), mode="nearest")[0].numpy()
        tiles = [rgb * 255] + [(1 - alpha) * rgb * 255 + alpha * lut[np.round(m * 255).astype(np.int64)]
                               for m in up]
        rows.append(np.concatenate(tiles, 1))
    return np.round(np.concatenate(rows, 0)).clip(0, 255).astype(np.uint8)


def _out_names(paths: list[str]) -> list[str]:
    """`<stem>.png` per input; a stem seen before gets `-2`, `-3`... (a.jpg and a.png in one folder)."""
    names, seen = [], {}
    for path in paths:
        stem = os.path.splitext(os.path.basename(path))[0]
        seen[stem] = seen.get(stem, 0) + 1
        names.append(f"{stem}.png" if seen[stem] == 1 else f"{stem}-{seen[stem]}.png")
    return names


@torch.no_grad()
def visualize(checkpoint: str, images: str, out: str, batch_size: int = 16) -> dict:
    """Attention maps of the [CLS] token per head, one PNG per image.

    Each PNG is a grid of `S x S` tiles (`S` = the model's input size, e.g. 224): 2 rows and 1 + heads columns,
    i.e. `(1 + heads) * S` wide and `2 * S` high. Row 1: the image, then the [CLS] attention of each head of the
    last backbone block; row 2: the image, then that of the patch-aggregation head's last block. Each map is
    scaled to its own maximum and blended over the image (dark: little attention, yellow: most).

    Args:
        checkpoint: `mim.pt` of a run (or the run's output directory), or an official `*_cls_pt` file.
        images: a folder (its .png/.jpg/.jpeg/.bmp/.webp files), one image file, or comma-separated files;
            each is resized to the model's input size (bicubic, aspect not kept).
        out: folder for the PNGs (`<image stem>.png`; created if missing).
        batch_size: images per forward pass.
    """
    from PIL import Image

    from engine.cli import check_counts
    from pretrain.tokenizer.data import image_files, read_images
    check_counts(batch_size=batch_size)
    if os.path.isdir(checkpoint):
        checkpoint = os.path.join(checkpoint, "mim.pt")
    paths = image_files(images)
    device = eval_device()
    model = load_mim_model(checkpoint).to(device).eval()   # first: a wrong path is reported as such
    side = model.patch_embed.img_size[0]
    pixels = read_images(paths, side)   # every file is checked before anything is written
    os.makedirs(out, exist_ok=True)
    files = []
    for start in range(0, len(paths), batch_size):
        batch = pixels[start:start + batch_size].to(device)
        backbone, head = attention_maps(model, batch)
        for i, name in enumerate(_out_names(paths)[start:start + batch_size]):
            picture = Image.fromarray(attention_picture(batch[i], backbone[i], head[i]))
            path = os.path.join(out, name)
            write_atomically(path, lambda tmp: picture.save(tmp, format="PNG"))
            files.append(path)
    heads = model.blocks[-1].attn.num_heads
    return {"checkpoint": checkpoint, "images": len(files), "out": out, "heads": heads,
            "png_size": [(1 + heads) * side, 2 * side], "files": files}


TENSORBOARD_SIDE = 112   # tiles of the training pictures are at most this big: (1 + heads) columns of them per row


def attention_pictures(model: BeitV2MIM, images: torch.Tensor) -> dict[str, np.ndarray]:
    """Tensorboard picture of a training run: `attention_picture` of each fixed image, stacked top to bottom,
    tiles shrunk to at most `TENSORBOARD_SIDE` pixels (a ViT-B's 13 columns of 224 px would be 2912 px wide)."""
    from PIL import Image
    backbone, head = attention_maps(model, images)
    grid = np.concatenate([attention_picture(images[i], backbone[i], head[i]) for i in range(len(images))], 0)
    side = images.shape[-1]
    if side > TENSORBOARD_SIDE:
        h, w = grid.shape[:2]
        size = (w * TENSORBOARD_SIDE // side, h * TENSORBOARD_SIDE // side)
        grid = np.asarray(Image.fromarray(grid).resize(size, Image.Resampling.BOX))
    return {"pictures/attention": grid}
