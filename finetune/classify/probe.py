"""Linear probing and k-NN on frozen features (`finetune.features`), each rank on its own shard.

Linear probe: the MAE protocol on features computed once from the evaluation view (cached to disk, so no crop
augmentation): BatchNorm1d without affine holding the exact feature statistics of the whole training split (all
ranks), then a linear head (init std 0.01) trained with LARS (or SGD), momentum 0.9, no weight decay, lr = base_lr x
global batch / 256, warm-up then cosine; gradients averaged over ranks. k-NN: DINO's protocol, cosine similarity to
every training feature, the k = 20 nearest vote with weight exp(similarity / 0.07).
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from data_tools.config import DataConfig
from data_tools.gpu_augment import EvalAug
from data_tools.sources import labelled_batches
from engine.config.cli import check_counts
from engine.config.run_plan import Split, data_split
from engine.config.schema import ConfigError, OptimConfig, config_section, saved_run_config
from engine.loop.evaluation import eval_device, write_result
from engine.loop.schedule import lr_at
from engine.parallel import distributed as dist_utils
from finetune.classify.evaluate import topk_hits
from finetune.feature_cache import cache_key, usable_folder
from finetune.features import FeatureFile, FrozenFeatures, extract

OPTIMIZERS = ("lars", "sgd")
EXTRACT_BATCH = 256   # images per forward pass when features are computed (fixed: cached features do not depend on it)


@contextlib.contextmanager
def _features(checkpoint: str, arch: str, layer: int, pooling: str, data_cfg, eval_crop: float, cache_dir: str,
              seed: int, num_classes: int) -> Iterator[tuple[FrozenFeatures, tuple, tuple, int]]:
    """(model, this rank's train (features, labels), its test (features, labels), the class count checked against
    the labels: `_class_count`). With `cache_dir` the features are kept in a folder named by what determines them
    (the checkpoint's and the .beton files' content, arch, layer, pooling, data, view, seed of `random`, ranks:
    `finetune.feature_cache`) and reused by later runs; without, they live in a temporary folder for the duration
    of the `with` block. What each split is (`engine.config.run_plan.data_split`) is printed first."""
    if not 0 < eval_crop <= 1:
        raise ConfigError(f"--eval_crop must be in (0, 1], got {eval_crop}")
    if os.path.isdir(checkpoint):
        checkpoint = os.path.join(checkpoint, "mim.pt")
    device = eval_device()
    torch.manual_seed(seed)
    model = FrozenFeatures(checkpoint, arch, layer, pooling)
    saved = saved_run_config(checkpoint) if checkpoint != "random" else {}
    data = config_section(DataConfig, saved.get("data", {}), data_cfg, "data_cfg")
    splits = [data_split(data, split, "classify") for split in ("train", "eval")]
    dist_utils.log_main("\n".join(s.line() for s in splits))
    view = EvalAug(model.img_size, crop_fraction=eval_crop, normalized=False)
    rank, world = dist_utils.rank(), dist_utils.world_size()
    names = [f"{split}_rank{rank}of{world}" for split in ("train", "test")]
    with contextlib.ExitStack() as stack:
        folder = None
        if cache_dir:   # named by the content of the checkpoint and the data files (finetune.feature_cache)
            key = cache_key(checkpoint, cache_dir, arch=arch, seed=seed, data=data,
                            settings=[model.kind, model.layer, pooling, eval_crop, world])
            ready = all(FeatureFile(os.path.join(cache_dir, key, n), model.dim).complete for n in names)
            folder = usable_folder(cache_dir, key, ready)
        folder = folder or stack.enter_context(tempfile.TemporaryDirectory())
        train, test = (extract(model, labelled_batches(data, split, view, EXTRACT_BATCH, device, rank, world),
                               os.path.join(folder, name), device)
                       for split, name in zip(("train", "test"), names))
        (x_train, y_train), (x_test, y_test) = train.read(), test.read()
        yield (model, (x_train, y_train), (x_test, y_test),
               _class_count(splits, num_classes, [y_train, y_test]))


def _class_count(splits: list[Split], num_classes: int, labels: list[np.ndarray]) -> int:
    """`--num_classes`, else the data's class count (convert's record, else the largest label of all ranks + 1); a
    label at or above it is a one-line error naming the file and the label, on every rank alike."""
    if num_classes == 1 or num_classes < 0:
        raise ConfigError(f"--num_classes must be 0 (the data's class count) or >= 2, got {num_classes}")
    found = torch.tensor([[int(y.max(initial=-1)) for y in labels]], device=dist_utils.current_device())
    found = dist_utils.all_gather_cat(found).amax(0).tolist()   # the largest label of each split, all ranks
    given = "--num_classes"
    if not num_classes:
        num_classes, given = splits[0].num_classes or max(found) + 1, "the data's classes"
    for split, worst in zip(splits, found):
        if worst >= num_classes:
            raise ConfigError(f"{split.where}: label {worst} is outside num_classes={num_classes} ({given}); pass "
                              f"--num_classes={worst + 1} or more")
    return max(num_classes, 2)


def _topk_counts(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[images, hits@1, hits@5] of class scores [n, C] against labels [n], float64 on the device."""
    return torch.cat([scores.new_tensor([len(labels)]), topk_hits(scores, labels)]).double()


def _summed(counts: torch.Tensor) -> dict:
    counts = dist_utils.all_reduce_sum_(counts.to(dist_utils.current_device())).cpu()
    n, top1, top5 = counts.tolist()
    if n == 0:
        raise ConfigError("no held-out images; check data.eval_path / data.eval_images")
    return {"test_images": int(n), "top1": top1 / n, "top5": top5 / n}


def _feature_stats(feats: np.ndarray, dim: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Mean and variance of the training features over all ranks (float64 sums, chunked over the memmap)."""
    sums = torch.zeros(2 * dim + 1, dtype=torch.float64)
    for start in range(0, len(feats), 65536):
        chunk = torch.from_numpy(np.array(feats[start:start + 65536])).double()
        sums += torch.cat([chunk.sum(0), (chunk * chunk).sum(0), torch.tensor([len(chunk)], dtype=torch.float64)])
    sums = dist_utils.all_reduce_sum_(sums.to(dist_utils.current_device())).cpu()
    n = int(sums[-1])
    mean = sums[:dim] / max(n, 1)
    return mean, (sums[dim:2 * dim] / max(n, 1) - mean * mean).clamp(min=0), n


def linear_probe(checkpoint: str, arch: str = "", layer: int = 0, pooling: str = "cls",
                 data_cfg: dict | None = None, num_classes: int = 0, epochs: int = 90, batch_size: int = 256,
                 base_lr: float = 0.1, optimizer: str = "lars", warmup_epochs: int = 10, eval_crop: float = 0.875,
                 seed: int = 0, cache_dir: str = "", out: str = "") -> dict:
    """Linear probe of a frozen backbone (protocol in the module doc); top-1/top-5 on the held-out split.

    Args:
        checkpoint: MIM checkpoint (ours or official `*_cls_pt`; or a run's output dir), tokenizer file (its
            encoder), classifier-layout file, or `random` (with `arch`).
        arch: MIM arch for `random`; classifier arch for files that do not record theirs.
        layer: block whose features are probed (1..depth); 0 = the last.
        pooling: `cls`, `mean` or `agg_cls` (the aggregation head's CLS token).
        data_cfg: data settings as a JSON object; defaults to the run's config.json beside the checkpoint.
        num_classes: classes of the labels; 0 takes the data's (convert's record, else the largest label + 1).
        epochs, batch_size (global), base_lr, optimizer (`lars` or `sgd`), warmup_epochs: the head's training.
        eval_crop: centre-crop fraction of the feature view (0.875 = 224 of 256).
        cache_dir: keep the features here and reuse them in later runs (default: a temporary folder, removed).
        out: optional JSON path for the result (with the per-epoch history).
    """
    check_counts(epochs=epochs, batch_size=batch_size)
    if optimizer not in OPTIMIZERS:
        raise ConfigError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")
    with _features(checkpoint, arch, layer, pooling, data_cfg, eval_crop, cache_dir, seed, num_classes) as (
            model, (x_train, y_train), (x_test, y_test), num_classes):
        mean, var, n_train = _feature_stats(x_train, model.dim)
        world = dist_utils.world_size()
        local_batch = batch_size // world
        steps_per_epoch = n_train // (local_batch * world) if local_batch else 0
        if steps_per_epoch < 1:
            raise ConfigError(f"--batch_size={batch_size} needs >= 1 image per rank and at most the {n_train} "
                              f"training images")
        device = eval_device()   # where the head trains: the rank's GPU, else the CPU
        torch.manual_seed(seed)   # the same head on every rank
        bn = nn.BatchNorm1d(model.dim, affine=False, eps=1e-6).eval()
        bn.running_mean.copy_(mean), bn.running_var.copy_(var)
        linear = nn.Linear(model.dim, num_classes)
        nn.init.trunc_normal_(linear.weight, std=0.01)
        nn.init.zeros_(linear.bias)
        head = nn.Sequential(bn, linear).to(device)
        lr = base_lr * batch_size / 256
        if optimizer == "lars":
            from timm.optim import Lars
            opt = Lars(linear.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
        else:
            opt = torch.optim.SGD(linear.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
        total, warmup = epochs * steps_per_epoch, min(warmup_epochs, epochs) * steps_per_epoch
        schedule = OptimConfig(lr=lr, min_lr=0.0)
        history, step = [], 0
        for epoch in range(epochs):
            order = np.random.default_rng([seed, epoch, dist_utils.rank()]).permutation(len(y_train))
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)   # read once per epoch
            for s in range(steps_per_epoch):
                idx = np.sort(order[s * local_batch:(s + 1) * local_batch])
                x = torch.from_numpy(np.array(x_train[idx])).to(device, non_blocking=True)
                y = torch.from_numpy(np.array(y_train[idx])).to(device, non_blocking=True)
                for g in opt.param_groups:   # linear warm-up, then cosine to 0 (per step)
                    g["lr"] = lr_at(step, schedule, total, warmup)
                loss = F.cross_entropy(head(x), y)
                opt.zero_grad(set_to_none=False)
                loss.backward()
                for p in linear.parameters():   # data parallel: the mean gradient of all ranks' micro-batches
                    dist_utils.all_reduce_sum_(p.grad).div_(world)
                opt.step()
                loss_sum += loss.detach()
                step += 1
            with torch.no_grad():
                held_out = _summed(_topk_counts(head(torch.from_numpy(np.array(x_test)).to(device)),
                                                torch.from_numpy(np.array(y_test)).to(device)))
            history.append({"epoch": epoch + 1, "loss": loss_sum.item() / steps_per_epoch, "top1": held_out["top1"]})
            dist_utils.log_main(f"linear probe epoch {epoch + 1}/{epochs}: loss {history[-1]['loss']:.4f}, "
                                f"held-out top-1 {held_out['top1']:.4f}")
        del x_train, y_train, x_test, y_test   # memmaps into the folder about to be removed
    result = {"checkpoint": checkpoint, "feature": f"{model.kind} layer {model.layer} {pooling}",
              "train_images": n_train, "epochs": epochs, "num_classes": num_classes, **held_out,
              "history": history}
    return write_result(result, out)


def knn(checkpoint: str, arch: str = "", layer: int = 0, pooling: str = "cls", data_cfg: dict | None = None,
        num_classes: int = 0, k: int = 20, temperature: float = 0.07, eval_crop: float = 0.875, seed: int = 0,
        cache_dir: str = "", out: str = "") -> dict:
    """Weighted k-NN classification on frozen features (DINO's protocol); top-1/top-5 on the held-out split.

    Every rank holds the training features of its shard: it scores all test images against them, the k best of
    each rank are gathered and merged, so the result equals one process holding everything.

    Args: as `linear_probe`, plus `k` neighbours and the vote `temperature`.
    """
    check_counts(k=k)
    if temperature <= 0:
        raise ConfigError(f"--temperature must be > 0, got {temperature}")
    with _features(checkpoint, arch, layer, pooling, data_cfg, eval_crop, cache_dir, seed, num_classes) as (
            model, (x_train, y_train), (x_test, y_test), num_classes):
        dev = eval_device()   # the GPU when there is one (also what nccl collectives need)
        queries = F.normalize(dist_utils.all_gather_uneven(torch.from_numpy(np.array(x_test)).to(dev)), dim=1)
        labels = dist_utils.all_gather_uneven(torch.from_numpy(np.array(y_test)).to(dev))
        best_sim = torch.full((len(queries), k), -float("inf"), device=dev)
        best_label = torch.zeros((len(queries), k), dtype=torch.long, device=dev)
        for start in range(0, len(y_train), 8192):   # this rank's training shard, chunk by chunk
            keys = F.normalize(torch.from_numpy(np.array(x_train[start:start + 8192])).to(dev), dim=1)
            key_labels = torch.from_numpy(np.array(y_train[start:start + 8192])).to(dev)
            sim = torch.cat([best_sim, queries @ keys.T], dim=1)
            cand = torch.cat([best_label, key_labels.expand(len(queries), -1)], dim=1)
            best_sim, pick = sim.topk(k, dim=1)
            best_label = cand.gather(1, pick)
        del x_train, y_train, x_test, y_test
    # Merge the k best of every rank: gather them side by side, keep the k best overall.
    sims = dist_utils.all_gather_cat(best_sim.T.contiguous()).view(-1, k, len(queries)).permute(2, 0, 1)
    labs = dist_utils.all_gather_cat(best_label.T.contiguous()).view(-1, k, len(queries)).permute(2, 0, 1)
    sims, pick = sims.reshape(len(queries), -1).topk(k, dim=1)
    labs = labs.reshape(len(queries), -1).gather(1, pick)
    votes = torch.zeros(len(queries), num_classes, device=dev, dtype=torch.float64)
    votes.scatter_add_(1, labs.clamp(min=0), torch.exp(sims.double() / temperature).nan_to_num(0.0))
    counts = _topk_counts(votes, labels)
    n, top1, top5 = counts.tolist()   # every rank scored every test image: no sum over ranks
    result = {"checkpoint": checkpoint, "feature": f"{model.kind} layer {model.layer} {pooling}", "k": k,
              "temperature": temperature, "test_images": int(n), "top1": top1 / max(n, 1),
              "top5": top5 / max(n, 1)}
    return write_result(result, out)
