"""Semantic segmentation fine-tuning on the shared engine (UperNet on a BEiT v2 backbone, mmseg's ADE20K recipe):
layer-wise lr decay, poly schedule, the mmseg training pipeline batched on the device, then mIoU on held-out images."""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from data_tools.config import DataConfig
from data_tools.ffcv_loader import RawAug
from data_tools.gpu_segment import IGNORE, SegTrainAug
from data_tools.sources import segmentation_source
from engine.config.schema import describe
from engine.loop.evaluation import write_result
from engine.loop.interfaces import FitResult
from engine.loop.labels import LabelRange
from engine.loop.stage import StagePlan, train_stage
from engine.parallel import distributed as dist_utils
from engine.parallel.ds_setup import PARAM_DTYPES, layer_decay_param_groups, zero_stage_of
from finetune.segment.config import RECIPES, SegAugmentConfig, SegEvalConfig, SegmentConfig
from finetune.segment.metrics import evaluate_segmenter, per_class_table
from finetune.segment.model import BeitSegmenter, build_segmenter, load_segmenter, save_segmenter
from pretrain.mim.attention import set_attention_kernel

EVAL_BATCH = 8   # held-out images decoded per batch (each is then predicted on its own, window by window)


def pixel_cross_entropy(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """mmseg 0.x's loss: logits upsampled (bilinear) to the label map, cross-entropy averaged over all pixels,
    ignored ones counting as 0 (so a crop with much padding weighs less, as officially). Returns (loss, the
    upsampled logits), which the step's pixel accuracy reuses instead of upsampling a second time."""
    logits = F.interpolate(logits.float(), size=labels.shape[-2:], mode="bilinear", align_corners=False)
    return F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="none").mean(), logits


class AverageBatchNormStats:
    """Batch norm running statistics averaged over ranks after every optimizer step (one all-reduce of all of them),
    where batch norm is not synchronised (CPU ranks): otherwise each rank's statistics drift apart, the checkpoint
    keeps rank 0's, and the end-of-run evaluation (each rank its shard, its own statistics) disagrees with the saved
    segmenter. With SyncBatchNorm (GPUs) they are equal already and the hook does nothing. Always registered
    (stateless), so a run can resume on any number of ranks."""
    name = "batch_norm_stats"

    def __init__(self, model: nn.Module, active: bool):
        self.buffers = [b for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                        for b in (m.running_mean, m.running_var)] if active else []

    def after_step(self, step: int) -> None:
        if not self.buffers:
            return
        flat = torch._utils._flatten_dense_tensors(self.buffers)
        dist_utils.all_reduce_sum_(flat).div_(dist_utils.world_size())
        for buf, mean in zip(self.buffers, torch._utils._unflatten_dense_tensors(flat, self.buffers)):
            buf.copy_(mean)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def build_model(cfg: SegmentConfig) -> BeitSegmenter:
    overrides = {"drop_path_rate": cfg.model.drop_path, "img_size": cfg.crop}
    init = None if cfg.init == "random" else cfg.init
    model = build_segmenter(cfg.arch, cfg.num_classes, init, new_head=cfg.model.new_head, **overrides)
    set_attention_kernel(model.backbone.blocks, cfg.model.attention)
    return model.train()


def class_names(data: DataConfig, num_classes: int) -> list[str] | None:
    if data.source == "fashion_mnist":
        from data_tools.mosaics import CLASS_NAMES
        return list(CLASS_NAMES) if len(CLASS_NAMES) == num_classes else None
    return None


def held_out_metrics(model: BeitSegmenter, data: DataConfig, augment: SegAugmentConfig, ev: SegEvalConfig,
                     mosaic_size: int, device: torch.device, dtype: torch.dtype = torch.float32) -> dict:
    """mIoU / mAcc / aAcc on the held-out split at the test scale `augment.scale`, predicted as `ev` says (crops of
    the model's size), each rank its shard."""
    was_training = model.training
    model.eval()
    source = segmentation_source(data, "validation", RawAug(), device, size=mosaic_size)
    result = evaluate_segmenter(lambda x: model.predict(x.to(dtype)), source.eval_batches(EVAL_BATCH),
                                model.num_classes, crop=model.img_size, stride=ev.stride, scale=augment.scale,
                                ratios=ev.ratios, flip=ev.flip, reduce_zero=augment.reduce_zero_label,
                                class_names=class_names(data, model.num_classes),
                                source=data.eval_path or f"{data.source} validation data")
    model.train(was_training)
    return result


def prepare(cfg: SegmentConfig, device: torch.device) -> StagePlan:
    """UperNet fine-tuning (or the linear probe's head alone): the mmseg training pipeline batched on the device,
    per-pixel cross-entropy of the main and auxiliary heads, layer-wise lr decay; then mIoU / mAcc / aAcc on
    held-out images."""
    model = build_model(cfg).to(device)
    sync_bn = device.type == "cuda" and dist_utils.world_size() > 1   # official SyncBN (torch's needs a GPU)
    if sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    bn_stats = AverageBatchNormStats(model, active=dist_utils.world_size() > 1 and not sync_bn)
    a = cfg.augment
    aug = SegTrainAug(crop=cfg.crop, scale=tuple(a.scale), ratio_range=tuple(a.ratio_range),
                      cat_max_ratio=a.cat_max_ratio, reduce_zero_label=a.reduce_zero_label, photometric=a.photometric)
    source = segmentation_source(cfg.data, "training", aug, device, size=cfg.mosaic_size,
                                 micro_batch_size=cfg.run.micro_batch_size, grad_accum_steps=cfg.run.grad_accum_steps,
                                 seed=cfg.run.seed)
    # The official constructor exempts 1-d parameters and biases only (its name list never matches the prefixed
    # `backbone.cls_token`, so the CLS token is decayed there, and here).
    groups = layer_decay_param_groups(model, cfg.layer_decay)
    dtype = PARAM_DTYPES[cfg.run.precision]
    guard = LabelRange(cfg.num_classes, cfg.data.train_path or f"{cfg.data.source} training data",
                       cfg.run.log_interval, ignore=IGNORE, what="label id {} (after reduce_zero_label)",
                       fix="the annotations")

    def step(engine, batch):
        labels = guard(batch["label"])
        main, aux = engine(batch["image"].to(dtype))
        loss_main, full_size = pixel_cross_entropy(main, labels)
        with torch.no_grad():
            pred = full_size.argmax(1)
            valid = labels != IGNORE
            pixel_acc = ((pred == labels) & valid).sum() / valid.sum().clamp(min=1)
        loss, aux_metrics = loss_main, {}
        if aux is not None:   # UperNet's auxiliary head (the linear probe has none)
            loss_aux = pixel_cross_entropy(aux, labels)[0]
            loss, aux_metrics = loss_main + cfg.model.aux_weight * loss_aux, {"loss_aux": loss_aux.detach()}
        return loss, {"loss_decode": loss_main.detach(), **aux_metrics, "pixel_acc": pixel_acc}

    def evaluate(result: FitResult) -> dict:
        # ZeRO-3 leaves each rank a shard of the weights: evaluate the consolidated file (every rank reads it).
        eval_model, eval_dtype = model, dtype
        if zero_stage_of(cfg.run.ds_config) == 3 and result.weights:
            eval_model, eval_dtype = load_segmenter(result.weights).to(device), torch.float32
        held_out = held_out_metrics(eval_model, cfg.data, cfg.augment, cfg.eval, cfg.mosaic_size, device,
                                    eval_dtype)
        write_result(held_out, os.path.join(cfg.run.output_dir, "eval.json"))
        dist_utils.log_main(f"held-out mIoU {100 * held_out['mIoU']:.2f}  mAcc {100 * held_out['mAcc']:.2f}  "
                            f"aAcc {100 * held_out['aAcc']:.2f} ({held_out['images']} images)\n"
                            f"{per_class_table(held_out)}")
        return {**result.summary(), **{f"eval_{k}": held_out[k] for k in ("mIoU", "mAcc", "aAcc")}}

    return StagePlan(model, groups, source, step, "segmenter.pt", save_segmenter,
                     flops_per_image=model.flops_per_image(), hooks=(bn_stats, guard), evaluate=evaluate)


def train(recipe: str = "upernet_beitv2_small_demo_mosaics", **overrides) -> dict:
    """Fine-tune a UperNet segmenter from a backbone checkpoint (`--init=PATH`, or `random`), or train the linear
    probe of the frozen backbone (`linear_*` archs and recipes). Flags override the recipe; `segmenter.pt` and
    `eval.json` (mIoU, mAcc, aAcc, per-class IoU) land in run.output_dir."""
    return train_stage(SegmentConfig, RECIPES, recipe, overrides, prepare, data_task="segment")


train.__doc__ += "\n\n" + describe(SegmentConfig, RECIPES, train)
