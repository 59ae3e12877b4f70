"""Pretraining loader speed: images/s and images per CPU-second, ours against the official recipe, same files, same run.

Ours: FFCVSource decoding a .beton onto canvases, then on the device one RandomResizedCrop(224, 0.2-1) + flip +
ColorJitter, the two views (gpu_augment.mim_views) and the batch's block masks (pretrain.mim.masking). Measured twice:
`host` is what the CPU does when a GPU takes the device part (FFCV decode + batching, the integrity checks
included), `host_plus_device_on_cpu` also runs the device part on this CPU (the only option without a GPU).
Baselines: `official_dataloader`, what the official code does per sample in a torch DataLoader: PIL decode of the
source JPEGs, ColorJitter, flip, one RandomResizedCrop box resized twice (bicubic), ToTensor + Normalize, and the
per-sample block-mask loop; and `plain_ffcv`, FFCV's own Loader iterating the same file with the same canvas decode
and no checks, no sharding plan and no per-batch bookkeeping: `ours_host.vs_plain_ffcv` is what FFCVSource costs on
top of FFCV (1.0 = nothing), so an overhead that creeps into the host path shows up as a ratio.
The images are synthetic 256-px JPEGs written to a temporary folder.

    python -m bench.loader --images=384 --workers=2 --out=bench_loader.json
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
from typing import Callable, Iterator

import numpy as np
import psutil
import torch
from PIL import Image

from bench.common import device_info, write_json
from engine.config.cli import check_counts, run_cli

SIZE, GRID, MASKED = 224, 14, 75


def synthetic_jpegs(folder: str, count: int, seed: int = 0) -> None:
    """`count` synthetic photos-like JPEGs (smooth shapes + noise, 256 px on the long side) in 4 class folders."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        h, w = (256, int(rng.integers(192, 257))) if i % 2 else (int(rng.integers(192, 257)), 256)
        y, x = np.mgrid[:h, :w] / 256.0
        img = np.zeros((h, w, 3))
        for c in range(3):
            fx, fy, ph = rng.uniform(1, 8, 3)
            img[..., c] = 127 + 90 * np.sin(fx * x * 6.28 + ph) * np.cos(fy * y * 6.28)
        img += rng.normal(0, 12, img.shape)
        d = os.path.join(folder, f"class{i % 4}")
        os.makedirs(d, exist_ok=True)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(os.path.join(d, f"{i:05d}.jpg"), quality=90)


class OfficialPretrainDataset(torch.utils.data.Dataset):
    """Per sample, as the official DataAugmentationForBEiT: two views of one crop and a Python block mask."""

    def __init__(self, paths: list[str]) -> None:
        from torchvision import transforms as T
        self.paths = paths
        self.jitter_flip = T.Compose([T.ColorJitter(0.4, 0.4, 0.4), T.RandomHorizontalFlip()])
        self.normalize = T.Compose([T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
        self.to_tensor = T.ToTensor()

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from torchvision.transforms import InterpolationMode, RandomResizedCrop
        from torchvision.transforms import functional as F

        from pretrain.mim.masking import reference_block_mask
        with open(self.paths[i], "rb") as f:
            img = Image.open(f).convert("RGB")
        img = self.jitter_flip(img)
        box = RandomResizedCrop.get_params(img, (0.2, 1.0), (3 / 4, 4 / 3))
        view = F.resized_crop(img, *box, [SIZE, SIZE], InterpolationMode.BICUBIC)
        tok = F.resized_crop(img, *box, [SIZE, SIZE], InterpolationMode.BICUBIC)   # the official "second size"
        mask = reference_block_mask(GRID, MASKED, 16, rng=np.random.default_rng())
        return self.normalize(view), self.to_tensor(tok), torch.from_numpy(mask)


def cpu_seconds() -> float:
    """User + system CPU time of this process and all its live children (DataLoader workers)."""
    me = psutil.Process()
    total = sum(me.cpu_times()[:2])
    for child in me.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except psutil.NoSuchProcess:
            pass
    return total


def measure(batches: Iterator, consume: Callable, images: int, batch: int, repeats: int) -> dict:
    """Time `images` images `repeats` times (after the caller's warm-up) and keep the best run: the machine may be
    shared, and other load only ever slows a run down."""
    runs = []
    for _ in range(repeats):
        n, cpu0, t0 = 0, cpu_seconds(), time.perf_counter()
        while n < images:
            consume(next(batches))
            n += batch
        wall, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
        runs.append({"images": n, "seconds": round(wall, 3), "images_per_s": round(n / wall, 1),
                     "cpu_seconds": round(cpu, 3), "images_per_cpu_s": round(n / cpu, 1)})
    return {**max(runs, key=lambda r: r["images_per_cpu_s"]), "repeats": repeats}


def plain_ffcv(beton: str, batch: int, workers: int) -> Iterator:
    """FFCV's Loader over `beton` with nothing of ours around it: the canvas decode without the black-image flag,
    FFCV's random order, batches as FFCV returns them; warmed up (numba compilation) by one epoch."""
    from ffcv.fields.basics import IntDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import ToTensor

    from data_tools.ffcv_ops import CanvasRGBDecoder
    loader = Loader(beton, batch_size=batch, num_workers=workers, order=OrderOption.RANDOM, drop_last=True,
                    pipelines={"image": [CanvasRGBDecoder(flag_black=False), ToTensor()],
                               "label": [IntDecoder(), ToTensor()]}, batches_ahead=3)

    def forever() -> Iterator:
        while True:
            yield from loader

    it = forever()
    for _ in range(len(loader)):
        next(it)
    return it


def main(images: int = 384, workers: int = 2, batch: int = 64, epochs: int = 3, repeats: int = 2,
         out: str = "bench_loader.json", folder: str = "") -> dict:
    """Run the three measurements; `folder` benchmarks your own class-folder JPEGs instead of synthetic ones."""
    check_counts(images=images, workers=workers, batch=batch, epochs=epochs, repeats=repeats)
    from data_tools.convert import main as convert_main
    from data_tools.ffcv_loader import FFCVSource
    from data_tools.gpu_augment import MimAug, mim_views
    from pretrain.mim.masking import BlockMaskGenerator

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tmp = tempfile.TemporaryDirectory()
    src = folder or os.path.join(tmp.name, "jpegs")
    if not folder:
        synthetic_jpegs(src, images)
    paths = sorted(os.path.join(d, f) for d, _, fs in os.walk(src) for f in fs)
    beton = os.path.join(tmp.name, "bench.beton")
    t = time.perf_counter()
    if convert_main(["imagefolder", src, beton, "--mode=jpg", "--quality=90", "--max_side=256",
                     f"--workers={workers}", "--progress=False"]) != 0:
        raise SystemExit("bench: conversion failed")
    convert_s = time.perf_counter() - t
    total = epochs * (len(paths) // batch) * batch
    masks = BlockMaskGenerator(GRID, MASKED)
    result: dict = {"jpegs": len(paths), "synthetic": not folder, "jpeg_side": 256 if not folder else None,
                    "batch": batch, "workers": workers, "cores": os.cpu_count(), "convert_s": round(convert_s, 1),
                    **device_info(device)}

    def ours(aug) -> tuple[Iterator, float]:
        source = FFCVSource(beton, aug, micro_batch_size=batch, device=device, num_workers=workers, seed=0)
        it = source.micro_batches(0)
        t0 = time.perf_counter()
        for _ in range(source.steps_per_epoch):          # first epoch: numba compilation + page cache
            next(it)
        return it, time.perf_counter() - t0

    def host_only(images_, sizes, g):
        return images_

    it, warm = ours(host_only)
    result["ours_host"] = measure(it, lambda b: b, total, batch, repeats)
    result["ours_first_epoch_s"] = round(warm, 1)
    result["plain_ffcv"] = measure(plain_ffcv(beton, batch, workers), lambda b: b, total, batch, repeats)
    for field in ("images_per_s", "images_per_cpu_s"):
        result["ours_host"].setdefault("vs_plain_ffcv", {})[field] = round(
            result["ours_host"][field] / result["plain_ffcv"][field], 3)

    def device_part(b: dict) -> None:
        model_view, tok_view = mim_views(b["image"])
        masks(batch, torch.Generator(device=device).manual_seed(int(b["index"][0])), device)
        if device.type == "cuda":
            torch.cuda.synchronize()

    it, _ = ours(MimAug(SIZE))
    result["ours_host_plus_device_on_cpu" if device.type == "cpu" else "ours_host_plus_device"] = measure(
        it, device_part, total, batch, repeats)

    # Workers started by a fork server, not forked from this process: FFCV's decoding threads and torch's thread pool
    # are alive here, and a child forked beside them can deadlock on a lock one of them held.
    loader = torch.utils.data.DataLoader(OfficialPretrainDataset(paths), batch_size=batch, shuffle=True,
                                         num_workers=workers, drop_last=True, persistent_workers=True,
                                         multiprocessing_context="forkserver")

    def forever() -> Iterator:
        while True:
            yield from loader

    it = forever()
    next(it)                                              # start the workers
    result["official_dataloader"] = measure(it, lambda b: b, total, batch, repeats)
    base = result["official_dataloader"]["images_per_cpu_s"]
    for key in ("ours_host", "ours_host_plus_device_on_cpu", "ours_host_plus_device"):
        if key in result:
            result[key]["speedup_per_cpu_s"] = round(result[key]["images_per_cpu_s"] / base, 2)
            result[key]["speedup_wall"] = round(result[key]["images_per_s"]
                                                / result["official_dataloader"]["images_per_s"], 2)
    tmp.cleanup()
    return write_json(result, out)


if __name__ == "__main__":
    sys.exit(run_cli(main))
