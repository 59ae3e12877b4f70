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
from engine.loop.evaluation import eval_device
from engine.reporting.pictures import ColourBar, Picture, Tile, nearest, render, save_png, tile_side
from pretrain.mim.model import BeitV2MIM, load_mim_model

__all__ = ["attention_figure", "attention_grid", "attention_maps", "attention_picture", "attention_pictures",
           "block_names", "cls_attention", "visualize"]


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

    if not len(model.cls_pt_layers):
        raise ValueError("this MIM model has no patch-aggregation head (pretrained with --model.aggregation=false): "
                         "its attention maps need the head's last block")
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


ALPHA = 0.6   # weight of the colour map over the image in a map tile
HEAT_BAR = ColourBar("inferno", 0.0, 1.0, "attention / the tile's maximum", [0, 0.25, 0.5, 0.75, 1])
HEAT_NOTE = ("Each map: the share of the [CLS] query's attention on each patch (the share it keeps on itself left "
             "out), one square per patch, scaled to the tile's maximum (in its title) and blended {:.0%} over the "
             "input: dark is little attention, yellow the most.")


def _map_tile(rgb: np.ndarray, attention: torch.Tensor, lut: np.ndarray, alpha: float) -> np.ndarray:
    """One attention map `[grid_h, grid_w]` (probabilities) scaled to its maximum, upsampled by nearest neighbour
    to the tile `rgb` (float `[T, T, 3]`, 0-255), coloured and blended over it."""
    a = attention.detach().float().cpu().numpy()
    scaled = nearest(a / max(float(a.max()), 1e-12), rgb.shape[0], rgb.shape[1])
    return np.round((1 - alpha) * rgb + alpha * lut[np.round(scaled * 255).astype(np.int64)]).clip(0, 255
                                                                                                  ).astype(np.uint8)


def _tiles(image: torch.Tensor, maps: torch.Tensor, block: str, per_head: bool, lut: np.ndarray, alpha: float,
           input_title: str = "input") -> list[Tile]:
    """The input, the mean of the heads' maps and (with `per_head`) each head's map, at `tile_side` pixels."""
    side = tile_side(image.shape[-1])
    rgb = nearest(image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255, side)
    mean = maps.float().mean(0)
    tiles = [Tile(np.round(rgb).astype(np.uint8), input_title),
             Tile(_map_tile(rgb, mean, lut, alpha), f"{block} [CLS],\nhead mean (max {mean.max():.1%})")]
    if per_head:
        tiles += [Tile(_map_tile(rgb, m, lut, alpha), f"{block},\nhead {h + 1} (max {m.max():.1%})")
                  for h, m in enumerate(maps.float())]
    return tiles


def block_names(model: BeitV2MIM) -> tuple[str, str]:
    """How the pictures name the two blocks `attention_maps` reads: the backbone's last, the aggregation head's
    last (1-based)."""
    return f"block {len(model.blocks)}", f"aggregation block {len(model.cls_pt_layers)}"


def attention_figure(image: torch.Tensor, backbone: torch.Tensor, head: torch.Tensor, alpha: float = ALPHA,
                     names: tuple[str, str] = ("last block", "aggregation block")) -> Picture:
    """One image's maps as an `engine.reporting.pictures.Picture`: two rows of `tile_side(S)` px tiles (>= 224).

    Row 1: the image, the mean over the heads of the last backbone block's [CLS] attention, then each head's;
    row 2: the same for the last block of the patch-aggregation head. Each map is scaled to its own maximum (its
    title gives that maximum as a share of the [CLS] attention), upsampled to the tile by nearest neighbour (one
    square per patch), coloured with `inferno` and blended over the image; a colour bar gives the scale.

    Args:
        image: `[3, S, S]` RGB in [0, 1].
        backbone, head: `[heads, grid_h, grid_w]` maps of `attention_maps`.
        alpha: weight of the colour map in each tile.
        names: the two blocks, as titles name them (`block_names(model)`).
    """
    lut = _heat_colours()
    groups = [_tiles(image, maps, name, True, lut, alpha) for maps, name in zip((backbone, head), names)]
    return render(groups, 1, f"[CLS] attention per head: {names[0]} (top), {names[1]} (bottom)", HEAT_BAR,
                  HEAT_NOTE.format(alpha))


def attention_picture(image: torch.Tensor, backbone: torch.Tensor, head: torch.Tensor, alpha: float = ALPHA,
                      names: tuple[str, str] = ("last block", "aggregation block")) -> np.ndarray:
    """`attention_figure(...).image`: uint8 RGB `[H, W, 3]`."""
    return attention_figure(image, backbone, head, alpha, names).image


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

    Each PNG (`attention_figure`) has two rows of tiles of `T` pixels (`T` = the model's input size `S` times the
    smallest whole factor that makes it >= 224), each titled: row 1 the image, the mean over the heads of the [CLS]
    attention in the last backbone block, then each head's; row 2 the same for the last block of the
    patch-aggregation head. Each map is scaled to its own maximum and blended over the image (dark: little
    attention, yellow: most); a colour bar on the right gives the scale.

    Args:
        checkpoint: `mim.pt` of a run (or the run's output directory), or an official `*_cls_pt` file.
        images: a folder (its .png/.jpg/.jpeg/.bmp/.webp files), one image file, or comma-separated files;
            each is resized to the model's input size (bicubic, aspect not kept).
        out: folder for the PNGs (`<image stem>.png`; created if missing).
        batch_size: images per forward pass.
    """
    from engine.config.cli import check_counts
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
    files, size = [], None
    for start in range(0, len(paths), batch_size):
        batch = pixels[start:start + batch_size].to(device)
        backbone, head = attention_maps(model, batch)
        for i, name in enumerate(_out_names(paths)[start:start + batch_size]):
            picture = attention_picture(batch[i], backbone[i], head[i], names=block_names(model))
            path = os.path.join(out, name)
            save_png(picture, path)
            files.append(path)
            size = [picture.shape[1], picture.shape[0]]
    heads = model.blocks[-1].attn.num_heads
    return {"checkpoint": checkpoint, "images": len(files), "out": out, "heads": heads,
            "tile": tile_side(side), "png_size": size, "files": files}


def attention_grid(model: BeitV2MIM, images: torch.Tensor) -> Picture:
    """The training runs' picture (`attention_pictures`) with its layout: each image beside the mean over the heads
    of its [CLS] attention in the last backbone block and in the last aggregation-head block, two images a row,
    tiles of `tile_side(S)` px, a colour bar (`mim visualize` draws every head)."""
    backbone, head = attention_maps(model, images)
    lut, names = _heat_colours(), block_names(model)
    groups = []
    for i in range(len(images)):
        tiles = [_tiles(images[i], maps[i], name, False, lut, ALPHA, f"input {i + 1}")
                 for maps, name in zip((backbone, head), names)]
        groups.append(tiles[0] + tiles[1][1:])   # the input once, then both means
    return render(groups, 2, f"[CLS] attention, mean over the heads: {names[0]} and {names[1]}", HEAT_BAR,
                  HEAT_NOTE.format(ALPHA))


def attention_pictures(model: BeitV2MIM, images: torch.Tensor) -> dict[str, np.ndarray]:
    """Tensorboard picture of a training run: `attention_grid(model, images).image`."""
    return {"pictures/attention": attention_grid(model, images).image}
