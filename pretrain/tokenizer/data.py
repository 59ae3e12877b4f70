"""Data plumbing of the tokenizer stage: the training source, held-out batches, and images for `encode`."""
from __future__ import annotations

import os

import numpy as np
import torch

from data_tools import sources
from engine.files import write_atomically


def train_source(cfg, img_size: int, device: torch.device):
    """The DataSource the engine iterates: RandomResizedCrop(0.08-1) + flip, RGB in [0, 1] on `device`."""
    from data_tools.gpu_augment import TokenizerTrainAug
    return sources.train_source(cfg.data, cfg.run, TokenizerTrainAug(size=img_size), device)


ENCODE_MAX_SIDE = 1024   # larger images are first downscaled while decoding (they end at the tokenizer's size)


def images_for_encoding(folder: str, split: str, count: int, img_size: int) -> torch.Tensor:
    """Images to encode, RGB in [0, 1] on the CPU: every image file in `folder` (sorted), or the first `count`
    Fashion-MNIST images of `split`."""
    if count < 1:
        raise ValueError(f"--count={count}: give the number of images to encode (>= 1)")
    if not folder:
        images, _ = sources.fashion_mnist(split, count)
        return _to_float(images, img_size)
    from PIL import Image

    from data_tools.convert import BadImage, load_rgb
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"image folder not found: {folder}")
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith((".png", ".jpg", ".jpeg", ".bmp", ".webp")))
    if not names:
        raise ValueError(f"no image files (.png/.jpg/.jpeg/.bmp/.webp) in {folder}")
    arrays = []
    for name in names:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):   # a folder named like an image, a dangling link, a symlink loop
            raise ValueError(f"{path} is not a readable image file; remove it from the folder or fix the link")
        try:   # convert's decoder: size limits, 16-bit scaled to 8 bits, alpha over grey, damaged files refused
            rgb = load_rgb(path, max_side=ENCODE_MAX_SIDE)
        except BadImage as e:
            raise ValueError(f"{path}: {e}; fix or remove it") from None
        arrays.append(np.asarray(Image.fromarray(rgb).resize((img_size, img_size), Image.BICUBIC)))
    return _to_float(np.stack(arrays), img_size)


def _to_float(images: np.ndarray, img_size: int) -> torch.Tensor:
    return torch.cat(list(sources.array_eval_batches(images, img_size, 256, torch.device("cpu"))))


def save_token_map_png(pixels: torch.Tensor, ids: np.ndarray, num_codes: int, path: str, columns: int = 8) -> None:
    """A grid of (image | token map) pairs; each token id gets a fixed pseudo-random colour."""
    from PIL import Image
    palette = np.random.default_rng(0).integers(0, 256, size=(num_codes, 3), dtype=np.uint8)
    n, side = pixels.shape[0], pixels.shape[-1]
    tiles = []
    for i in range(n):
        img = (pixels[i].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        token_map = palette[ids[i]].repeat(side // ids.shape[1], 0).repeat(side // ids.shape[2], 1)
        pad = np.zeros((side, side - token_map.shape[1], 3), np.uint8) if token_map.shape[1] < side else None
        if pad is not None:
            token_map = np.concatenate([token_map, pad], 1)
        tiles.append(np.concatenate([img, token_map[:side, :side]], 1))
    rows = [np.concatenate(tiles[r:r + columns] + [np.zeros_like(tiles[0])] * (columns - len(tiles[r:r + columns])),
                           1) for r in range(0, n, columns)]
    image = Image.fromarray(np.concatenate(rows, 0))
    image_format = Image.registered_extensions().get(os.path.splitext(path)[1].lower(), "PNG")
    write_atomically(path, lambda tmp: image.save(tmp, format=image_format))
