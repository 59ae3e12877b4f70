"""Held-out masked-token metrics of a MIM checkpoint: both heads' cross-entropy and accuracy on fixed masks.

Training logs report these on training batches; this command measures them on images the model never saw, seen as
training sees them (crop, flip and colour jitter) with augmentation and masks drawn from a fixed seed, so two
checkpoints (or two runs) are compared on the same pixels and the same masked patches. Under a launcher each rank
takes its share of the batches; a batch's view and masks are keyed by its number, not by the rank, so any number of
ranks gives the numbers of one process.
"""
from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F

from data_tools import sources
from data_tools.config import DataConfig
from data_tools.gpu_augment import MimAug, mim_views
from engine.config.cli import check_counts
from engine.config.schema import ConfigError, config_section, saved_run_config
from engine.loop.evaluation import eval_device, write_result
from engine.parallel import distributed as dist_utils
from pretrain.mim.config import MaskingConfig
from pretrain.mim.masking import BlockMaskGenerator
from pretrain.mim.model import gather_masked, load_mim_model
from pretrain.mim.train import check_tokenizer
from pretrain.tokenizer import load_tokenizer


@torch.no_grad()
def evaluate(checkpoint: str, tokenizer: str = "", data_cfg: dict | None = None, masking: dict | None = None,
             batch_size: int = 64, seed: int = 0, augment: bool = True, out: str = "") -> dict:
    """Masked-token cross-entropy and accuracy of the MIM head and the aggregation head on held-out images.

    Args:
        checkpoint: `mim.pt` of a run (or the run's output directory), or an official `*_cls_pt` file.
        tokenizer: the frozen tokenizer the model learned from; defaults to the one in the run's config.json.
        data_cfg: data settings (`source`, `eval_path`, `eval_images`); defaults to the run's, as a JSON object.
        masking: masking settings (`num_masked`, `min_patches`, `min_aspect`); defaults to the run's.
        batch_size: images per forward pass.
        seed: seeds the masks: the same seed masks the same patches of the same images.
        augment: the training view (MIM's crop, flip and colour jitter, from a fixed generator); False gives the
            whole image resized, which a model pretrained on crops predicts less well.
        out: optional JSON path for the result.

    Returns:
        `images`, `masked_tokens`, `mim_loss`, `mim_acc`, `agg_loss`, `agg_acc`, and `majority_code_acc`: the
        accuracy of always answering the most frequent code of these labels, the floor a model must beat.
    """
    check_counts(batch_size=batch_size)
    if os.path.isdir(checkpoint):
        checkpoint = os.path.join(checkpoint, "mim.pt")
    device = eval_device()
    model = load_mim_model(checkpoint).to(device).eval()   # first: a wrong path is reported as such
    if model.arch_kwargs.get("target", "codes") != "codes":
        raise ConfigError(f"{checkpoint} was pretrained on pixel targets: mim evaluate measures masked-code "
                          f"prediction; compare its features with classify linear_probe or knn instead")
    saved = saved_run_config(checkpoint)
    tokenizer = tokenizer or saved.get("tokenizer", "")
    if not tokenizer:
        raise ConfigError(f"no config.json beside {checkpoint} names its tokenizer: give --tokenizer=PATH (the "
                          f"tokenizer the model was pretrained against)")
    data = config_section(DataConfig, saved.get("data", {}), data_cfg, "data_cfg")
    mask_cfg = config_section(MaskingConfig, saved.get("masking", {}), masking, "masking")
    codes_of = load_tokenizer(tokenizer).to(device)
    check_tokenizer(codes_of, model, tokenizer)
    k = mask_cfg.num_masked or model.num_masked_patches
    masks = BlockMaskGenerator(grid_size=tuple(model.patch_embed.grid_size), num_masked=k,
                               min_num_patches=mask_cfg.min_patches, min_aspect=mask_cfg.min_aspect)

    totals = torch.zeros(5, dtype=torch.float64, device=device)   # summed CE and hits of both heads, images
    label_counts = torch.zeros(model.lm_head.out_features, dtype=torch.long, device=device)
    img_size = model.patch_embed.img_size[0]
    view = MimAug(size=img_size) if augment else None
    for batch in sources.eval_batches(data, img_size, batch_size, device, aug=view, rank=dist_utils.rank(),
                                      world_size=dist_utils.world_size()):
        x01 = batch["image"]
        model_view, tokenizer_view = mim_views(x01)
        batch_seed = int(np.random.SeedSequence([seed, batch["batch"]]).generate_state(1)[0])
        generator = torch.Generator().manual_seed(batch_seed)
        mask = masks(x01.shape[0], generator=generator, device=torch.device("cpu")).to(device)
        labels = gather_masked(codes_of.get_codebook_indices(tokenizer_view), mask, k)
        logits, agg_logits = model(model_view, mask, num_masked=k)
        for i, head in enumerate((logits.float(), agg_logits.float() if agg_logits is not None else None)):
            if head is None:   # no aggregation head (--model.aggregation=false): its numbers stay NaN
                continue
            totals[2 * i] += F.cross_entropy(head, labels, reduction="sum")
            totals[2 * i + 1] += (head.argmax(-1) == labels).sum()
        label_counts += torch.bincount(labels, minlength=label_counts.numel())
        totals[4] += x01.shape[0]
    dist_utils.all_reduce_sum_(totals)
    dist_utils.all_reduce_sum_(label_counts)
    images_seen = int(totals[4].item())
    tokens = images_seen * k
    if tokens == 0:
        raise ConfigError(f"no held-out images came from data source {data.source!r}; check --data_cfg")
    mim_loss, mim_acc, agg_loss, agg_acc = (totals[:4] / tokens).tolist()
    if not len(model.cls_pt_layers):
        agg_loss = agg_acc = float("nan")
    result = {"checkpoint": checkpoint, "tokenizer": tokenizer, "images": images_seen, "masked_tokens": tokens,
              "mim_loss": mim_loss, "mim_acc": mim_acc, "agg_loss": agg_loss, "agg_acc": agg_acc,
              "majority_code_acc": label_counts.max().item() / tokens, "num_codes": label_counts.numel()}
    return write_result(result, out)
