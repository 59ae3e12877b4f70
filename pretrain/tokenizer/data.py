"""Data plumbing of the tokenizer stage: the training source, held-out batches, and images for `encode`."""
from __future__ import annotations

import os

import numpy as np
import torch

from data_tools import sources
from engine.reporting.pictures import save_png
from pretrain.tokenizer.pictures import token_map_grid


def train_source(cfg, img_size: int, device: torch.device):
    """The DataSource the engine iterates: RandomResizedCrop(0.08-1) + flip, RGB in [0, 1] on `device`."""
    from data_tools.gpu_augment import TokenizerTrainAug
    return sources.train_source(cfg.data, cfg.run, TokenizerTrainAug(size=img_size), device)


ENCODE_MAX_SIDE = 1024   # larger images are first downscaled while decoding (they end at the tokenizer's size)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def images_for_encoding(folder: str, split: str, count: int, img_size: int) -> torch.Tensor:
    """Images to encode, RGB in [0, 1] on the CPU: every image file in `folder` (sorted), or the first `count`
    Fashion-MNIST images of `split`."""
    if count < 1:
        raise ValueError(f"--count={count}: give the number of images to encode (>= 1)")
    if not folder:
        images, _ = sources.fashion_mnist(split, count)
        return _to_float(images, img_size)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"image folder not found: {folder}")
    return read_images(image_files(folder), img_size)


def image_files(spec: str) -> list[str]:
    """The image files `spec` names: a folder (its .png/.jpg/.jpeg/.bmp/.webp files, sorted), one file, or
    comma-separated files. A name that does not exist is a one-line FileNotFoundError."""
    if os.path.isdir(spec):
        names = sorted(n for n in os.listdir(spec) if n.lower().endswith(IMAGE_SUFFIXES))
        if not names:
            raise ValueError(f"no image files ({'/'.join(IMAGE_SUFFIXES)}) in {spec}")
        return [os.path.join(spec, n) for n in names]
    # A file whose name holds a comma is still one file.
    paths = [spec] if os.path.lexists(spec) else [p.strip() for p in spec.split(",") if p.strip()]
    if not paths:
        raise ValueError("no images given: name a folder, an image file or comma-separated image files")
    for path in paths:
        if not os.path.lexists(path):
            raise FileNotFoundError(f"image not found: {path}")
    return paths


def read_images(paths: list[str], img_size: int) -> torch.Tensor:
    """The files decoded by data_tools.convert's decoder and resized (bicubic) to `img_size` x `img_size`: RGB in
    [0, 1] on the CPU, `[N, 3, img_size, img_size]`. A file that cannot be used is a one-line ValueError naming it."""
    from PIL import Image

    from data_tools.convert import BadImage, load_rgb
    arrays = []
    for path in paths:
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


def save_token_map_png(pixels: torch.Tensor, ids: np.ndarray, colours: np.ndarray, path: str,
                       columns: int = 4) -> None:
    """Write each image beside its token map (`pictures.token_map_picture`: tiles >= 224 px, titled, a legend of
    the codes used most); the format follows the suffix.

    Args:
        pixels: `[N, 3, side, side]` RGB in [0, 1].
        ids: `[N, grid_h, grid_w]` token ids.
        colours: uint8 `[num_codes, 3]`: `pictures.code_colours(codebook)` colours codes by the codebook's
            geometry (nearby codes, nearby colours).
        path: output image file.
        columns: (image, map) pairs per row, at most.
    """
    save_png(token_map_grid(pixels, ids, colours, columns), path)
