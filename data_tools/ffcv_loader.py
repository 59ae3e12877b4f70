"""The data sources every training stage streams from (engine.loop.interfaces.DataSource).

A source yields this rank's micro-batches forever, as dicts on the device:
    {"image": augmented images, "label": int64 [B] class ids or [B, S, S] label maps (when the data has labels),
     "index": int64 [B] dataset indices (CPU), "size": int64 [B, 2] (h, w) of the source images (CPU),
     "step", "micro": the optimizer step and micro-batch the batch belongs to (training batches only)}.

Order: epoch e is a permutation drawn from numpy's Generator seeded with (seed, e) (page-blocked when the data is read
without the OS cache, see `page_blocked_permutation`). Optimizer step s of the epoch takes the contiguous slice
[s*G, (s+1)*G) of it, G = micro_batch_size * grad_accum_steps * world_size; rank r takes its own contiguous part of
that slice, cut into grad_accum_steps micro-batches. So ranks never share a sample, every sample is used at most once
per epoch (the last len % G are dropped), and resuming at step s yields exactly the micro-batches an uninterrupted run
would have, without decoding any skipped sample. Augmentation (data_tools/gpu_augment.py) runs on the device with a
torch.Generator seeded by (seed, step, rank, micro), so the augmented pixels are resume-exact too.

`ArraySource` holds a uint8 array on the device (quick experiments, tests, Fashion-MNIST); `FFCVSource` streams a
.beton written by `python -m data_tools.convert`.
"""
from __future__ import annotations

import math
import os
import queue
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
from torch import Tensor

from data_tools.beton_check import BlackImages, verify_sha256
from data_tools.beton_header import check_beton
from data_tools.gpu_augment import TokenizerTrainAug, generator_for

# (images, sizes, g) -> images, or for label maps (images, labels, sizes, g) -> (images, labels)
Aug = Callable[..., Any]
IMAGE, LABEL, ANNOTATION = "image", "label", "annotation"   # .beton field names written by data_tools.convert
_LOADERS: dict[tuple, Any] = {}                              # see FFCVSource._loader
EVAL_STEP = 2 ** 40             # generator key of evaluation batches: no training step reaches it


class RawAug:
    """No augmentation: the uint8 canvases [B, C, Hc, Wc] as they are (the real image is the top-left "size")."""

    def __call__(self, images: Tensor, sizes: Tensor, g: Optional[torch.Generator] = None) -> Tensor:
        return images.clone()


@dataclass(frozen=True)
class ShardPlan:
    """Which dataset indices rank `rank` reads at which optimizer step; pure numpy, no I/O."""
    num_samples: int
    micro_batch_size: int
    grad_accum_steps: int = 1
    world_size: int = 1
    rank: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside world_size {self.world_size}")
        if min(self.micro_batch_size, self.grad_accum_steps) < 1:
            raise ValueError("micro_batch_size and grad_accum_steps must be >= 1")
        if self.steps_per_epoch < 1:
            raise ValueError(f"the dataset has {self.num_samples} samples, fewer than one global batch of "
                             f"{self.global_batch} (micro_batch_size x grad_accum_steps x world_size); use a "
                             f"smaller batch or more data")

    @property
    def global_batch(self) -> int:
        return self.micro_batch_size * self.grad_accum_steps * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.global_batch

    def rank_indices(self, permutation: np.ndarray, first_step: int) -> np.ndarray:
        """This rank's indices for epoch-relative steps first_step..steps_per_epoch-1, in consumption order."""
        per_rank = self.micro_batch_size * self.grad_accum_steps
        used = permutation[:self.steps_per_epoch * self.global_batch].reshape(self.steps_per_epoch, self.world_size,
                                                                             per_rank)
        return np.ascontiguousarray(used[first_step:, self.rank].reshape(-1))


def uniform_permutation(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(num_samples)


def page_blocked_permutation(sample_pages: np.ndarray, seed: int, epoch: int, pages_per_block: int) -> np.ndarray:
    """Quasi-random order for data read page by page (os_cache=False): pages are shuffled, grouped `pages_per_block`
    at a time, and samples are shuffled within each group, so any stretch of the order touches few pages at once.
    (FFCV's own QUASI_RANDOM draws from numba's global RNG and refuses distributed use; this one is seeded and
    sharded like the uniform order.)"""
    rng = np.random.default_rng([seed, epoch])
    pages, page_of_sample = np.unique(sample_pages, return_inverse=True)
    page_rank = np.empty(len(pages), np.int64)
    page_rank[rng.permutation(len(pages))] = np.arange(len(pages))
    block = page_rank[page_of_sample] // max(1, pages_per_block)
    return np.lexsort((rng.random(len(sample_pages)), block))


class _PlannedSource:
    """The order, sharding, resume and augmentation logic shared by both sources; subclasses only fetch pixels."""

    def __init__(self, num_samples: int, aug: Aug, *, micro_batch_size: int, grad_accum_steps: int = 1,
                 world_size: int = 1, rank: int = 0, seed: int = 0, device: torch.device | str = "cpu") -> None:
        self.plan = ShardPlan(num_samples, micro_batch_size, grad_accum_steps, world_size, rank, seed)
        self.steps_per_epoch: int = self.plan.steps_per_epoch
        self.aug = aug
        self.device = torch.device(device)

    # ---- to implement
    def _fetch(self, order: np.ndarray, batch_size: int) -> Iterator[tuple[Tensor, Optional[Tensor]]]:
        """(uint8 images [b, C, H, W] on the device, labels or None) for consecutive chunks of `order`."""
        raise NotImplementedError

    def _sizes(self, index: np.ndarray) -> np.ndarray:
        """(h, w) of the stored images, int64 [b, 2]."""
        raise NotImplementedError

    def _permutation(self, epoch: int) -> np.ndarray:
        return uniform_permutation(self.plan.num_samples, self.plan.seed, epoch)

    # ---- DataSource
    def epoch_order(self, epoch: int, first_step: int = 0) -> np.ndarray:
        """This rank's dataset indices for the rest of `epoch` from epoch-relative step `first_step` on."""
        return self.plan.rank_indices(self._permutation(epoch), first_step)

    def micro_batches(self, start_step: int = 0) -> Iterator[dict]:
        """This rank's micro-batches from optimizer step `start_step` on, epoch after epoch, forever."""
        p = self.plan
        mb, accum = p.micro_batch_size, p.grad_accum_steps
        step = start_step
        while True:
            epoch, first = divmod(step, self.steps_per_epoch)
            order = self.epoch_order(epoch, first)
            for k, (images, labels) in enumerate(self._fetch(order, mb)):
                s, micro = step + k // accum, k % accum
                g = generator_for(p.seed, s, p.rank, micro, self.device)
                batch = self._finish(images, labels, order[k * mb:(k + 1) * mb], g)
                batch["step"], batch["micro"] = s, micro   # keys for randomness a stage draws itself (mixup)
                yield batch
            step = (epoch + 1) * self.steps_per_epoch

    def eval_batches(self, batch_size: Optional[int] = None, limit: int = 0, whole_batches: bool = False
                     ) -> Iterator[dict]:
        """Every sample of this rank's shard (index % world_size == rank) once, in index order, the last batch
        possibly smaller; for evaluation. `limit` keeps the first `limit` samples of the dataset (0 = all).

        `whole_batches`: shard by batch instead. The dataset in index order is cut into batches of `batch_size`;
        this rank takes batches rank, rank + world_size, ... and augments each from a generator keyed by its batch
        number `batch` (a key of the dicts), not by the rank: any number of ranks sees the batches, the random
        views and the batch numbers (for randomness the caller draws per batch, such as masks) of one process.
        """
        p = self.plan
        n = min(limit, p.num_samples) if limit else p.num_samples
        bs = batch_size or p.micro_batch_size
        if not whole_batches:
            order = np.arange(p.rank, n, p.world_size)
            g = generator_for(p.seed, EVAL_STEP, p.rank, 0, self.device)
            for k, (images, labels) in enumerate(self._fetch(order, bs)):
                yield self._finish(images, labels, order[k * bs:(k + 1) * bs], g)
            return
        mine = list(range(p.rank, -(-n // bs), p.world_size))
        if not mine:   # fewer batches than ranks
            return
        order = np.concatenate([np.arange(b * bs, min((b + 1) * bs, n)) for b in mine])
        for k, (images, labels) in enumerate(self._fetch(order, bs)):   # the last batch is the only short one
            g = generator_for(p.seed, EVAL_STEP, mine[k], 1, self.device)
            batch = self._finish(images, labels, order[k * bs:(k + 1) * bs], g)
            batch["batch"] = mine[k]
            yield batch

    def _finish(self, images: Tensor, labels: Optional[Tensor], index: np.ndarray, g: torch.Generator) -> dict:
        sizes_np = self._sizes(index)
        sizes = torch.from_numpy(sizes_np).to(self.device, non_blocking=True)
        out: dict = {"index": torch.from_numpy(index.astype(np.int64)), "size": torch.from_numpy(sizes_np)}
        if labels is not None and labels.ndim == 3:        # label maps (segmentation): augmented with the image
            if isinstance(self.aug, RawAug):
                out["image"], out["label"] = images.clone(), labels.clone()
            else:
                out["image"], out["label"] = self.aug(images, labels, sizes, g)
            return out
        out["image"] = self.aug(images, sizes, g)
        if labels is not None:
            out["label"] = labels
        return out


class ArraySource(_PlannedSource):
    """In-memory uint8 images [N, H, W] or [N, H, W, C] (C = 1 or 3) with optional labels ([N] class ids or
    [N, H, W] label maps), kept on the device; augmentation as in FFCVSource.

    `aug` defaults to RandomResizedCrop(img_size, scale) + flip in [0, 1] (TokenizerTrainAug)."""

    def __init__(self, images: np.ndarray | Tensor, labels: np.ndarray | Tensor | None = None, *,
                 aug: Optional[Aug] = None, img_size: int = 224, scale: tuple[float, float] = (0.08, 1.0),
                 micro_batch_size: int, grad_accum_steps: int = 1, world_size: int = 1, rank: int = 0,
                 seed: int = 0, device: torch.device | str = "cpu") -> None:
        x = torch.as_tensor(images)
        if x.dtype != torch.uint8 or x.ndim not in (3, 4):
            raise ValueError(f"images must be uint8 [N, H, W] or [N, H, W, C], got {x.dtype} {tuple(x.shape)}")
        x = x.unsqueeze(-1) if x.ndim == 3 else x
        if x.shape[-1] not in (1, 3):
            raise ValueError(f"images need 1 or 3 channels (last axis), got {x.shape[-1]}")
        super().__init__(x.shape[0], aug or TokenizerTrainAug(img_size, scale), micro_batch_size=micro_batch_size,
                         grad_accum_steps=grad_accum_steps, world_size=world_size, rank=rank, seed=seed,
                         device=device)
        self.images = x.permute(0, 3, 1, 2).contiguous().to(self.device)
        self.labels = None
        if labels is not None:
            y = torch.as_tensor(labels)
            if y.shape[0] != x.shape[0]:
                raise ValueError(f"{y.shape[0]} labels for {x.shape[0]} images")
            self.labels = (y.long() if y.ndim == 1 else y.to(torch.uint8)).to(self.device)
        self._hw = np.array([x.shape[1], x.shape[2]], np.int64)

    def _fetch(self, order: np.ndarray, batch_size: int) -> Iterator[tuple[Tensor, Optional[Tensor]]]:
        idx_all = torch.from_numpy(order.astype(np.int64)).to(self.device)
        for start in range(0, len(order), batch_size):
            idx = idx_all[start:start + batch_size]
            yield self.images[idx], (self.labels[idx] if self.labels is not None else None)

    def _sizes(self, index: np.ndarray) -> np.ndarray:
        return np.broadcast_to(self._hw, (len(index), 2)).copy()


class FFCVSource(_PlannedSource):
    """A .beton from data_tools.convert (fields image [+ label | annotation]) streamed by one FFCV Loader per process.

    FFCV only decodes (onto canvases, see data_tools/ffcv_ops.py); the epoch order computed here is handed to FFCV's
    epoch iterator directly, so one numba compilation (12-20 s here) serves every epoch and every resume.
    os_cache=True reads through the OS page cache in uniform random order (data that fits in RAM); os_cache=False
    reads whole pages into process memory in a page-blocked quasi-random order (data larger than RAM).

    Integrity (data_tools.beton_check): `verify=True` compares the file's sha256 with the one data_tools.convert
    recorded before anything is read (the first process of each node hashes it: the whole file, minutes for a large
    one); the decoder flags every image that came out entirely black, as damaged JPEGs do, and more than 1% of them
    stop the run with a one-line error.
    """

    def __init__(self, path: str, aug: Aug, *, micro_batch_size: int, grad_accum_steps: int = 1,
                 world_size: int = 1, rank: int = 0, seed: int = 0, device: torch.device | str = "cpu",
                 num_workers: int = 2, os_cache: bool = True, pages_per_block: int = 32,
                 batches_ahead: int = 3, limit: int = 0, verify: bool = False) -> None:
        from engine.config.extras import require
        Reader = require("ffcv.reader", f"reading {path} (a .beton file)").Reader
        from data_tools.ffcv_ops import LabelMapField
        check_beton(path)   # header and pointers against the file's size, before FFCV allocates by the header's say
        try:
            self.reader = Reader(path, custom_handlers={ANNOTATION: LabelMapField})
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no such .beton; write one with `python -m data_tools.convert`") from None
        except (OSError, IndexError, AssertionError, ValueError) as e:   # empty, a folder, or another format
            raise ValueError(f"{path}: not a readable .beton ({type(e).__name__}: {e}); rewrite it with "
                             f"`python -m data_tools.convert`") from None
        if IMAGE not in self.reader.field_names:
            raise ValueError(f"{path} has fields {self.reader.field_names}, no '{IMAGE}'; "
                             f"write it with `python -m data_tools.convert`")
        if verify and int(os.environ.get("LOCAL_RANK", 0)) == 0:   # one hash per node: the file may be a local copy
            verify_sha256(path)
        num_samples = int(self.reader.num_samples)
        num_samples = min(num_samples, limit) if limit else num_samples   # the file's first `limit` samples
        super().__init__(num_samples, aug, micro_batch_size=micro_batch_size,
                         grad_accum_steps=grad_accum_steps, world_size=world_size, rank=rank, seed=seed,
                         device=device)
        self.path = path
        self.num_workers = num_workers
        self.os_cache = os_cache
        self.pages_per_block = pages_per_block
        self.batches_ahead = batches_ahead
        meta = self.reader.metadata[f"f{self.reader.field_names.index(IMAGE)}"]
        self._hw_all = np.stack([meta["height"], meta["width"]], 1).astype(np.int64)
        self.black_images = BlackImages(path, self.device)

    def _permutation(self, epoch: int) -> np.ndarray:
        if self.os_cache:
            return super()._permutation(epoch)
        table = self.reader.alloc_table
        table = table[table["sample_id"] < self.plan.num_samples]
        first_page = np.full(self.plan.num_samples, np.iinfo(np.int64).max, np.int64)
        np.minimum.at(first_page, table["sample_id"].astype(np.int64),
                      (table["ptr"] // int(self.reader.page_size)).astype(np.int64))
        return page_blocked_permutation(first_page, self.plan.seed, epoch, self.pages_per_block)

    def _loader(self, batch_size: int):
        """The process-wide Loader for this file and batch size, built on first use: a Loader holds no order or rank,
        so sources for other ranks, seeds or augmentations share it (and its numba compilation)."""
        key = (os.path.abspath(self.path), batch_size, str(self.device), self.num_workers, self.os_cache,
               self.batches_ahead)
        if key not in _LOADERS:
            from ffcv.fields.basics import IntDecoder
            from ffcv.loader import Loader, OrderOption
            from ffcv.transforms import ToDevice, ToTensor

            from data_tools.ffcv_ops import CanvasLabelDecoder, CanvasRGBDecoder, LabelMapField

            to_dev = [ToDevice(self.device, non_blocking=True)] if self.device.type == "cuda" else []
            fields = self.reader.field_names
            pipelines: dict = {name: None for name in fields}
            pipelines[IMAGE] = [CanvasRGBDecoder(), ToTensor(), *to_dev]
            if ANNOTATION in fields:
                pipelines[ANNOTATION] = [CanvasLabelDecoder(), ToTensor(), *to_dev]
            elif LABEL in fields:
                pipelines[LABEL] = [IntDecoder(), ToTensor()]
            threads = torch.get_num_threads()
            try:
                _LOADERS[key] = Loader(
                    self.path, batch_size=batch_size, num_workers=self.num_workers, os_cache=self.os_cache,
                    order=OrderOption.SEQUENTIAL, pipelines=pipelines, custom_fields={ANNOTATION: LabelMapField},
                    drop_last=False, batches_ahead=self.batches_ahead)
            finally:   # FFCV sets torch's intra-op threads to its own num_workers: the caller's count stays
                torch.set_num_threads(threads)
        return _LOADERS[key]

    def _fetch(self, order: np.ndarray, batch_size: int) -> Iterator[tuple[Tensor, Optional[Tensor]]]:
        from ffcv.loader.epoch_iterator import EpochIterator
        loader = self._loader(batch_size)
        names = list(loader.pipeline_specs)          # FFCV returns one output per enabled field, in this order
        it = EpochIterator(loader, order.astype(np.uint64))
        try:
            for _ in range(math.ceil(len(order) / batch_size)):
                out = dict(zip(names, _next(it)))
                canvases = out[IMAGE].to(self.device, non_blocking=True)   # [b, H + 1, W, 3]
                self.black_images.add(canvases[:, -1, 0, 0])               # the status row (data_tools.ffcv_ops)
                images = canvases[:, :-1].permute(0, 3, 1, 2)
                labels = out.get(ANNOTATION)
                if LABEL in out:    # FFCV reuses its output buffers a few batches later: copy what is kept as is
                    labels = out[LABEL].reshape(-1).clone().to(self.device, non_blocking=True)
                yield images, labels
        finally:
            it.close()
        self.black_images.check()   # the end of a pass: a cheap moment to read the counter

    def _sizes(self, index: np.ndarray) -> np.ndarray:
        return self._hw_all[index]


def _next(it: Any, poll_s: float = 1.0) -> tuple:
    """EpochIterator.__next__ that fails instead of waiting forever when FFCV's worker thread died (for example a
    numba compilation error), which FFCV itself does not notice."""
    while True:
        try:
            item = it.output_queue.get(timeout=poll_s)
            break
        except queue.Empty:
            if not it.is_alive():
                raise RuntimeError("FFCV's decoding thread stopped (its traceback is printed above)") from None
    if item is None:
        raise RuntimeError("FFCV ran out of samples before the planned order was read")
    slot, result = item
    if getattr(it, "current_stream", None) is not None:      # FFCV made CUDA copies on its own stream
        it.current_stream.wait_stream(it.cuda_streams[slot])
    return result


__all__ = ["ArraySource", "FFCVSource", "RawAug", "ShardPlan", "page_blocked_permutation",
           "uniform_permutation"]
