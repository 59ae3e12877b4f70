"""Pick the image source a stage trains from: Fashion-MNIST arrays, an FFCV .beton file, or synthetic images.

Both sources follow the engine's DataSource protocol and apply the stage's augmentation (`data_tools.gpu_augment`)
on the device with randomness drawn from (seed, step, rank, micro), so a resumed run sees the same batches.
"""
from __future__ import annotations

import numpy as np
import torch

from data_tools.beton_header import check_schema
from data_tools.config import DataConfig
from engine.config.schema import ConfigError, RunConfig
from engine.parallel import distributed as dist_utils


def fashion_mnist(split: str, limit: int = 0) -> tuple[np.ndarray, np.ndarray]:
    from data_tools.fashion_mnist import load_fashion_mnist
    images, labels = load_fashion_mnist(split)
    return (images[:limit], labels[:limit]) if limit else (images, labels)


def synthetic(num_images: int, size: int) -> np.ndarray:
    """Random RGB images (benchmarks and smoke tests only: nothing to learn from them)."""
    return np.random.default_rng(0).integers(0, 256, size=(num_images, size, size, 3), dtype=np.uint8)


def synthetic_labels(num_images: int, num_classes: int = 10) -> np.ndarray:
    """Labels for synthetic images (benchmarks: they carry no information)."""
    return np.arange(num_images, dtype=np.int64) % num_classes


def train_source(data: DataConfig, run: RunConfig, aug, device: torch.device, wants: str = "images"):
    """This rank's training stream: `{"image": aug(batch), "label": ...}` micro-batches from any step on. `wants`:
    what the stage reads from a .beton, `images` (pretraining) or `labels` (classification), see
    `data_tools.beton_header.check_schema`."""
    common = dict(micro_batch_size=run.micro_batch_size, grad_accum_steps=run.grad_accum_steps,
                  rank=dist_utils.rank(), world_size=dist_utils.world_size(), seed=run.seed, device=device)
    from data_tools.ffcv_loader import ArraySource, FFCVSource
    if data.source == "fashion_mnist":
        images, labels = fashion_mnist("train", data.limit)
        return ArraySource(images, labels, aug=aug, **common)
    if data.source == "synthetic":
        n = data.limit or 2048
        return ArraySource(synthetic(n, aug.size), synthetic_labels(n), aug=aug, **common)
    if not data.train_path:
        raise ConfigError("config key 'data.train_path' is required with data.source=beton (a .beton from "
                          "python -m data_tools.convert)")
    source = FFCVSource(data.train_path, aug, num_workers=data.num_workers, os_cache=data.os_cache,
                        limit=data.limit, verify=data.verify, **common)
    check_schema(data.train_path, source.reader.field_names, wants)
    return source


def array_eval_batches(images: np.ndarray, img_size: int, batch_size: int, device: torch.device, aug=None):
    """uint8 images [N, H, W(, C)] in order, in batches: by default the whole image resized to img_size, RGB in
    [0, 1]; `aug` replaces that view (its randomness comes from one fixed generator, so it is the same each call)."""
    from data_tools.ffcv_loader import ArraySource
    from data_tools.gpu_augment import EvalAug
    source = ArraySource(images, aug=aug or EvalAug(img_size, crop_fraction=1.0, normalized=False),
                         micro_batch_size=min(batch_size, len(images)), device=device)   # the plan wants one batch
    for batch in source.eval_batches(batch_size):
        yield batch["image"]


def eval_batches(data: DataConfig, img_size: int, batch_size: int, device: torch.device, aug=None, rank: int = 0,
                 world_size: int = 1):
    """This rank's whole batches of the held-out images (Fashion-MNIST's test split, the first `data.eval_images`,
    or `data.eval_path`) as `{"image", "batch"}` dicts: RGB in [0, 1], un-augmented unless `aug` is given, and the
    global batch number. Ranks take batches in turn and each batch's random view is keyed by its number, so the
    batches of all ranks together are those of one process (`_PlannedSource.eval_batches(whole_batches=True)`)."""
    from data_tools.ffcv_loader import ArraySource, FFCVSource
    from data_tools.gpu_augment import EvalAug
    view = aug or EvalAug(img_size, crop_fraction=1.0, normalized=False)
    common = dict(aug=view, micro_batch_size=1, rank=rank, world_size=world_size, device=device)
    if data.source == "beton":
        if not data.eval_path:
            raise ValueError("evaluation needs data.eval_path (a .beton of held-out images) with source=beton")
        source, limit = FFCVSource(data.eval_path, num_workers=data.num_workers, verify=data.verify, **common), \
            data.eval_images
        check_schema(data.eval_path, source.reader.field_names, "images")
    elif data.source == "synthetic":
        source, limit = ArraySource(synthetic(data.eval_images or 256, img_size), **common), 0
    else:
        source, limit = ArraySource(fashion_mnist("test", data.eval_images)[0], **common), 0
    for batch in source.eval_batches(batch_size, limit, whole_batches=True):
        yield {"image": batch["image"], "batch": batch["batch"]}


def labelled_batches(data: DataConfig, split: str, aug, batch_size: int, device: torch.device, rank: int = 0,
                     world_size: int = 1):
    """Every image of a split once, in index order, with its class label: this rank's shard (index % world_size ==
    rank), as `{"image": aug(batch), "label", "index"}` dicts; the last batch may be smaller.

    `split`: "train" (`data.train_path` or Fashion-MNIST's training images, the first `data.limit`) or "test"
    (`data.eval_path` or Fashion-MNIST's test images, the first `data.eval_images`).
    """
    from data_tools.ffcv_loader import ArraySource, FFCVSource
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    limit = data.limit if split == "train" else data.eval_images
    common = dict(aug=aug, micro_batch_size=1, rank=rank, world_size=world_size, device=device)
    if data.source == "beton":
        path = data.train_path if split == "train" else data.eval_path
        if not path:
            raise ConfigError(f"config key 'data.{'train_path' if split == 'train' else 'eval_path'}' is required "
                              f"with data.source=beton (a labelled .beton from python -m data_tools.convert)")
        source = FFCVSource(path, num_workers=data.num_workers, verify=data.verify, **common)
        check_schema(path, source.reader.field_names, "labels")
    elif data.source == "synthetic":
        n = limit or 256
        source = ArraySource(synthetic(n, aug.size), synthetic_labels(n), **common)
    else:
        images, labels = fashion_mnist(split)
        source = ArraySource(images, labels, **common)
    for batch in source.eval_batches(batch_size, limit):
        if "label" not in batch:
            raise ConfigError(f"{path} has no class labels; convert it with its labels (python -m data_tools.convert "
                              f"imagefolder ...)")
        yield batch


# ------------------------------------------------------------------------------------------------- segmentation
def segmentation_arrays(data: DataConfig, split: str, size: int) -> tuple[np.ndarray, np.ndarray]:
    """In-memory images [N, S, S, 3] and annotation maps [N, S, S] (raw ids): Fashion-MNIST mosaics
    (data_tools.mosaics; `data.limit` training / `data.eval_images` validation mosaics), or random pixels and labels
    (synthetic: benchmarks only)."""
    n = (data.limit or 2000) if split == "training" else (data.eval_images or 200)
    if data.source == "synthetic":
        rng = np.random.default_rng(0 if split == "training" else 1)
        return (rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
                rng.integers(0, 12, (n, size, size), dtype=np.uint8))
    from data_tools.mosaics import mosaic_arrays
    return mosaic_arrays(split, n, size=size)


def segmentation_source(data: DataConfig, split: str, aug, device: torch.device, *, size: int,
                        micro_batch_size: int = 1, grad_accum_steps: int = 1, seed: int = 0):
    """This rank's source of images with label maps: `data.train_path` / `data.eval_path` (.beton from
    `python -m data_tools.convert ade20k`) or in-memory arrays (`segmentation_arrays`). `aug(images, labels, sizes,
    g)` is applied on the device; `RawAug()` keeps the uint8 canvases (evaluation)."""
    from data_tools.ffcv_loader import ArraySource, FFCVSource
    common = dict(micro_batch_size=micro_batch_size, grad_accum_steps=grad_accum_steps, rank=dist_utils.rank(),
                  world_size=dist_utils.world_size(), seed=seed, device=device)
    if data.source != "beton":
        images, labels = segmentation_arrays(data, split, size)
        return ArraySource(images, labels, aug=aug, **common)
    key = "train_path" if split == "training" else "eval_path"
    path = getattr(data, key)
    if not path:
        raise ConfigError(f"config key 'data.{key}' is required with data.source=beton (a .beton from "
                          f"python -m data_tools.convert ade20k)")
    source = FFCVSource(path, aug, num_workers=data.num_workers, os_cache=data.os_cache,
                        limit=data.limit if split == "training" else data.eval_images, verify=data.verify, **common)
    check_schema(path, source.reader.field_names, "label_maps")
    return source
