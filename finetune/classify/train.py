"""Classification fine-tuning on the shared engine: layer-wise lr decay, the official augmentation batched on the
device, mixup/cutmix with soft targets, then top-1/top-5 on held-out images."""
from __future__ import annotations

import os

import numpy as np
import torch
from timm.loss import SoftTargetCrossEntropy
from timm.utils import ModelEmaV3

from data_tools.gpu_augment import FinetuneTrainAug
from data_tools.sources import train_source
from engine.config.schema import ConfigError, describe
from engine.loop.evaluation import write_result
from engine.loop.interfaces import FitResult
from engine.loop.labels import LabelRange
from engine.loop.stage import StagePlan, train_stage
from engine.parallel import distributed as dist_utils
from engine.parallel.ds_setup import PARAM_DTYPES, layer_decay_param_groups
from finetune.classify.config import RECIPES, ClassifyConfig
from finetune.classify.evaluate import held_out_metrics
from finetune.classify.mixup import Mixup
from finetune.model import BeitClassifier, build_classifier, save_classifier
from pretrain.mim.attention import set_attention_kernel

EVAL_BATCH = 64


class WeightsEma:
    """An fp32 exponential moving average of the model's weights (timm's ModelEmaV3), as an engine step hook: updated
    on the device after every optimizer step, checkpointed with the run."""
    name = "model_ema"

    def __init__(self, model: torch.nn.Module, decay: float):
        self.model = model
        self.ema = ModelEmaV3(model, decay=decay, dtype=torch.float32)

    def after_step(self, step: int) -> None:
        self.ema.update(self.model, step)

    def state_dict(self) -> dict:
        return self.ema.module.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.ema.module.load_state_dict(state)


def build_model(cfg: ClassifyConfig) -> BeitClassifier:
    overrides = {"drop_path_rate": cfg.model.drop_path}
    if cfg.model.img_size is not None:
        overrides["img_size"] = cfg.model.img_size
    init = None if cfg.init == "random" else cfg.init
    model = build_classifier(cfg.arch, cfg.num_classes, init, new_head=cfg.model.new_head, **overrides)
    set_attention_kernel(model.blocks, cfg.model.attention)
    return model.train()


def prepare(cfg: ClassifyConfig, device: torch.device) -> StagePlan:
    """Fine-tuning: the official augmentation batched on the device, mixup/cutmix with soft targets, layer-wise lr
    decay, an optional EMA of the weights; then top-1/top-5 on held-out images (the EMA's too)."""
    model = build_model(cfg).to(device)   # on the device before the EMA copies it
    ema = WeightsEma(model, cfg.model.ema_decay) if cfg.model.ema_decay else None
    a = cfg.augment
    aug = FinetuneTrainAug(size=model.img_size, scale=(a.scale_min, 1.0), rand_augment=a.rand_augment,
                           color_jitter=a.color_jitter, magnitude=a.magnitude, magnitude_std=a.magnitude_std,
                           erase_prob=a.erase_prob)
    source = train_source(cfg.data, cfg.run, aug, device, wants="labels")
    mixup = Mixup(cfg.num_classes, a.mixup, a.cutmix, a.switch_prob, a.smoothing)
    soft_ce = SoftTargetCrossEntropy()
    groups = layer_decay_param_groups(model, cfg.layer_decay, model.no_weight_decay())
    rank, dtype = dist_utils.rank(), PARAM_DTYPES[cfg.run.precision]
    # Labels beyond num_classes (a file without convert's record, or unlike it): a one-line error naming the file.
    guard = LabelRange(cfg.num_classes, cfg.data.train_path or f"{cfg.data.source} training data",
                       cfg.run.log_interval)

    def step(engine, batch):
        if "label" not in batch:
            raise ConfigError("the training data has no class labels; convert it with its labels "
                              "(python -m data_tools.convert imagefolder ...)")
        labels = guard(batch["label"])
        guard.after_step(batch["step"] + 1)   # reads the flag at the first step and at log points only
        # Mixup draws from (seed, step, rank, micro) like the augmentation, so a resumed run mixes the same way.
        rng = np.random.default_rng([cfg.run.seed, batch["step"], rank, batch["micro"]])
        images, targets = mixup(batch["image"], labels, rng)
        logits = engine(images.to(dtype)).float()
        with torch.no_grad():
            train_acc = (logits.argmax(-1) == labels).float().mean()
        return soft_ce(logits, targets), {"train_acc": train_acc}

    def evaluate(result: FitResult) -> dict:
        held_out = held_out_metrics(model, cfg.data, a.eval_crop, EVAL_BATCH, device, dtype)
        summary = {**result.summary(), **{f"eval_{k}": v for k, v in held_out.items()}}
        if ema is not None:
            if dist_utils.is_main() and cfg.run.save_final:
                save_classifier(model, os.path.join(cfg.run.output_dir, "classifier_ema.pt"), ema.state_dict())
            ema_held_out = held_out_metrics(ema.ema.module, cfg.data, a.eval_crop, EVAL_BATCH, device)
            held_out["ema"] = ema_held_out
            summary.update({f"eval_ema_{k}": v for k, v in ema_held_out.items()})
        write_result(held_out, os.path.join(cfg.run.output_dir, "eval.json"))
        return summary

    return StagePlan(model, groups, source, step, "classifier.pt", save_classifier,
                     flops_per_image=model.flops_per_image(), hooks=(ema,) if ema else (), evaluate=evaluate)


def train(recipe: str = "beitv2_small_demo_ft", **overrides) -> dict:
    """Fine-tune a classifier from a backbone checkpoint (`--init=PATH`, or `random`). Flags override the recipe."""
    return train_stage(ClassifyConfig, RECIPES, recipe, overrides, prepare, data_task="classify")


train.__doc__ += "\n\n" + describe(ClassifyConfig, RECIPES, train)
