"""Pictures of token maps: each code coloured by where it sits in the codebook, images beside their maps
(`engine.reporting.pictures` lays them out: tiles >= 224 px, titled, a legend of the codes)."""
from __future__ import annotations

import numpy as np
import torch

from engine.reporting.pictures import Legend, Picture, Tile, nearest, render, tile_side

__all__ = ["code_colours", "token_map_grid", "token_map_picture"]


def code_colours(codebook: torch.Tensor | np.ndarray) -> np.ndarray:
    """One RGB colour per code from the codebook's geometry: nearby codes get nearby colours.

    The code vectors are l2-normalised (the quantizer compares them by cosine) and projected on the first three
    principal components of the codebook; each component is scaled to 0-255 over the codebook and becomes one
    of R, G, B. A colour is a function of the code vector alone, so equal codes get equal colours, and the
    result does not depend on the order of the rows. The sign of a principal component is arbitrary; it is fixed
    by making the largest-magnitude entry of each component positive, so a fixed codebook always gets the same
    colours. A component the codebook does not have (fewer than 3 dimensions, or all codes equal along it)
    gives the constant 128 in its channel.

    Args:
        codebook: `[num_codes, code_dim]` code vectors (any float dtype, any device).

    Returns:
        uint8 `[num_codes, 3]`.
    """
    w = torch.as_tensor(codebook).detach().to("cpu", torch.float64).numpy()
    if w.ndim != 2 or w.shape[0] < 1:
        raise ValueError(f"codebook must be [num_codes, code_dim] with at least one code, got shape {w.shape}")
    w = w / np.maximum(np.linalg.norm(w, axis=1, keepdims=True), 1e-12)
    centred = w - w.mean(0)
    # Principal axes from the small code_dim x code_dim covariance (the sum over codes ignores their order).
    values, vectors = np.linalg.eigh(centred.T @ centred)
    order = np.argsort(values)[::-1][:3]
    axes = vectors[:, order].T                                     # [<=3, code_dim], largest variance first
    biggest = np.abs(axes).argmax(1)
    axes = axes * np.where(axes[np.arange(len(axes)), biggest] < 0, -1.0, 1.0)[:, None]
    projected = centred @ axes.T                                   # [num_codes, <=3]
    colours = np.full((w.shape[0], 3), 128.0)
    for c in range(projected.shape[1]):
        low, high = projected[:, c].min(), projected[:, c].max()
        if high - low > 1e-9 * max(1.0, abs(high)):   # a flat component carries no geometry: leave it grey
            colours[:, c] = (projected[:, c] - low) / (high - low) * 255
    return np.round(colours).astype(np.uint8)


def token_map_picture(pixels: torch.Tensor, ids: np.ndarray, colours: np.ndarray, columns: int = 4,
                      title: str = "token maps: each image beside its tokens") -> Picture:
    """Each image beside its token map, as an `engine.reporting.pictures.Picture` (its tiles: image 1, map 1, image 2,
    ...).

    A tile is `tile_side(side)` pixels (>= 224): the image and its map upsampled by nearest neighbour, so each token
    is a square of one colour, `colours[id]`. A map's title says how many distinct codes it uses of the codebook's;
    the legend lists the codes used most in the shown maps, with their colour and patch count.

    Args:
        pixels: `[N, 3, side, side]` RGB in [0, 1].
        ids: `[N, grid_h, grid_w]` token ids.
        colours: uint8 `[num_codes, 3]`, e.g. from `code_colours`.
        columns: (image, map) pairs per row, at most; the rows are filled evenly.
        title: the picture's title.
    """
    n, side = pixels.shape[0], pixels.shape[-1]
    tile = tile_side(side)
    images = (pixels.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
    ids = np.asarray(ids)
    groups = []
    for i in range(n):
        distinct = len(np.unique(ids[i]))
        groups.append([Tile(nearest(images[i], tile), f"input {i + 1}"),
                       Tile(nearest(colours[ids[i]], tile),
                            f"token ids: {distinct} distinct\nof {len(colours)} codes")])
    codes, counts = np.unique(ids, return_counts=True)
    order = np.argsort(-counts, kind="stable")
    plural = lambda k: f"{k} patch" if k == 1 else f"{k} patches"   # noqa: E731
    legend = Legend(f"most used codes ({len(codes)} in all)",
                    [(colours[codes[j]], f"code {codes[j]}: {plural(counts[j])}") for j in order[:16]])
    note = (f"{ids.shape[1]} x {ids.shape[2]} tokens per image, one square per patch. A code's colour is its vector's "
            "first three principal components over the codebook as red, green, blue: similar codes look alike.")
    return render(groups, columns, title, legend, note)


def token_map_grid(pixels: torch.Tensor, ids: np.ndarray, colours: np.ndarray, columns: int = 4) -> np.ndarray:
    """`token_map_picture(...).image`: uint8 RGB `[H, W, 3]`, each image beside its titled token map, a legend."""
    return token_map_picture(pixels, ids, colours, columns).image
