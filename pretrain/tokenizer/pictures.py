"""Pictures of token maps: each code coloured by where it sits in the codebook, images beside their maps."""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["code_colours", "token_map_grid"]


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


def token_map_grid(pixels: torch.Tensor, ids: np.ndarray, colours: np.ndarray, columns: int = 8) -> np.ndarray:
    """A grid of (image | token map) pairs as uint8 RGB `[H, W, 3]`.

    Each pair is `side x 2*side` pixels (`side` = the images' size), `columns` pairs per row, the last row
    padded with black; each token covers a `side/grid` square in the colour `colours[id]`.

    Args:
        pixels: `[N, 3, side, side]` RGB in [0, 1].
        ids: `[N, grid_h, grid_w]` token ids.
        colours: uint8 `[num_codes, 3]`, e.g. from `code_colours`.
        columns: pairs per row.
    """
    n, side = pixels.shape[0], pixels.shape[-1]
    images = (pixels.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
    tiles = []
    for i in range(n):
        token_map = colours[ids[i]].repeat(side // ids.shape[1], 0).repeat(side // ids.shape[2], 1)
        canvas = np.zeros((side, side, 3), np.uint8)   # a grid that does not divide the side leaves a black rim
        canvas[:token_map.shape[0], :token_map.shape[1]] = token_map[:side, :side]
        tiles.append(np.concatenate([images[i], canvas], 1))
    tiles += [np.zeros_like(tiles[0])] * (-n % columns)
    rows = [np.concatenate(tiles[r:r + columns], 1) for r in range(0, len(tiles), columns)]
    return np.concatenate(rows, 0)
