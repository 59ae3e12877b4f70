"""Typed configuration and named recipes of classification fine-tuning."""
from __future__ import annotations

from dataclasses import dataclass, field

from engine.config.schema import ConfigError, StageConfig, key, merge
from finetune.model import CLS_ARCHS


@dataclass
class ModelConfig:
    drop_path: float = key(0.1, "stochastic depth rate", ge=0, lt=1)
    img_size: int | None = key(None, "input side; null: the arch's (a checkpoint's position tables are resized to it)",
                               ge=1)
    new_head: bool = key(False, "a fine-tuned checkpoint whose head has another class count starts with a fresh head")
    ema_decay: float = key(0.0, "> 0: keep an fp32 moving average of the weights (official 0.9999), evaluated and "
                           "saved (classifier_ema.pt) beside them; needs ZeRO <= 2", ge=0, lt=1, note="0 is off")
    attention: str = key("sdpa", "sdpa (fused kernel, the bias as mask) or explicit (softmax in Python, the official "
                         "formulation): the same function", choices=("sdpa", "explicit"),
                         note="flex needs the shared bias of pretraining")


@dataclass
class AugmentConfig:
    """Training augmentation (batched on the device) and the evaluation view."""
    scale_min: float = key(0.08, "RandomResizedCrop's smallest area fraction", gt=0, le=1)
    rand_augment: bool = key(True, "RandAugment rand-m{magnitude}-mstd{magnitude_std}-inc1")
    color_jitter: float = key(0.4, "colour jitter strength, only when RandAugment is off (as timm does)", ge=0, le=1)
    magnitude: float = key(9.0, "RandAugment's magnitude", ge=0, le=10)
    magnitude_std: float = key(0.5, "RandAugment's magnitude noise", ge=0)
    erase_prob: float = key(0.25, "random erasing probability", ge=0, le=1)
    mixup: float = key(0.8, "mixup's Beta alpha; 0 is off", ge=0)
    cutmix: float = key(1.0, "cutmix's Beta alpha; 0 is off (one of the two per batch)", ge=0)
    switch_prob: float = key(0.5, "probability of cutmix over mixup when both are on", ge=0, le=1)
    # At 1 every target is uniform over the classes: nothing to learn.
    smoothing: float = key(0.1, "label smoothing of the (mixed) soft targets", ge=0, lt=1,
                           note="0.1 official, 0 off; 1 makes every target uniform")
    eval_crop: float = key(0.875, "evaluation resizes to size / eval_crop and centre-crops size (0.875: 224 of 256)",
                           gt=0, le=1)


@dataclass
class ClassifyConfig(StageConfig):
    harmless_on_resume = frozenset({"model.attention", "augment.eval_crop"})   # a kernel; the view after training
    arch: str = key("beitv2_small_demo", "the backbone", choices=CLS_ARCHS)
    num_classes: int = key(10, "classes of the head", ge=2)
    init: str = key("", "backbone to start from: a MIM checkpoint (ours or official *_cls_pt), a fine-tuned, timm or "
                    "exported file, or random (the from-scratch baseline)")
    layer_decay: float = key(0.65, "layer-wise lr decay: each block trains at this x the lr of the one above",
                             gt=0, le=1)
    model: ModelConfig = field(default_factory=ModelConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def rules(self, prefix: str) -> None:
        if not self.init:
            raise ConfigError("config key 'init' is required: a backbone checkpoint (e.g. runs/x/mim.pt, an "
                              "official BEiT v2 file) or 'random'")
        patch = CLS_ARCHS[self.arch]["patch_size"]
        if self.model.img_size is not None and self.model.img_size % patch:
            raise ConfigError(f"config key 'model.img_size' = {self.model.img_size} must be a multiple of the "
                              f"patch size {patch} of arch {self.arch}")
        if self.model.ema_decay:
            # reads the DeepSpeed JSON (a one-line error when it cannot)
            from engine.parallel.ds_setup import zero_stage_of
            if zero_stage_of(self.run.ds_config) == 3:
                raise ConfigError("model.ema_decay needs whole weights on every rank: use ZeRO <= 2 "
                                  "(--run.ds_config)")


# The official recipe: global batch 1024 (8 ranks x 128 here), AdamW betas (0.9, 0.999), wd 0.05, cosine to 1e-6, the
# fine-tuning augmentation at its defaults, evaluation at 224 from 256.
_OFFICIAL = {
    "num_classes": 1000,
    "data": {"source": "beton"},
    "optim": {"lr": 5e-4, "min_lr": 1e-6, "betas": [0.9, 0.999], "weight_decay": 0.05, "eps": 1e-8},
    "run": {"precision": "bf16", "micro_batch_size": 128, "ds_config": "ds_configs/zero1.json",
            "save_interval": 1000, "log_interval": 50},
}


def _official(arch: str, epochs: int, warmup: int, lr: float, layer_decay: float, drop_path: float,
              out: str) -> dict:
    return merge(_OFFICIAL, {"arch": arch, "optim.lr": lr, "layer_decay": layer_decay,
                             "schedule": {"epochs": epochs, "warmup_epochs": warmup},
                             "model.drop_path": drop_path, "run.output_dir": out})


RECIPES = {
    "beitv2_base_ft_from_300e": _official("beit_base_patch16_224", epochs=100, warmup=20, lr=5e-4,
                                          layer_decay=0.65, drop_path=0.1, out="runs/beitv2_base_ft_from_300e"),
    "beitv2_base_ft_from_1600e": _official("beit_base_patch16_224", epochs=100, warmup=20, lr=5e-4,
                                           layer_decay=0.6, drop_path=0.2, out="runs/beitv2_base_ft_from_1600e"),
    "beitv2_large_ft_from_300e": _official("beit_large_patch16_224", epochs=50, warmup=5, lr=5e-4,
                                           layer_decay=0.8, drop_path=0.2, out="runs/beitv2_large_ft_from_300e"),
    "beitv2_large_ft_from_1600e": _official("beit_large_patch16_224", epochs=50, warmup=5, lr=2e-4,
                                            layer_decay=0.8, drop_path=0.2, out="runs/beitv2_large_ft_from_1600e"),
    # Two CPU cores: the demo backbone on Fashion-MNIST (the MIM stage's 12k training images) for one epoch. So short
    # a run wants light augmentation for 28 px garments (crops of 60-100%, flips) and a milder layer decay.
    "beitv2_small_demo_ft": {
        "arch": "beitv2_small_demo", "num_classes": 10, "layer_decay": 0.85,
        "data": {"source": "fashion_mnist", "limit": 12000, "eval_images": 2000},
        "model": {"drop_path": 0.1},
        "augment": {"scale_min": 0.6, "rand_augment": False, "color_jitter": 0.0, "erase_prob": 0.0, "mixup": 0.0,
                    "cutmix": 0.0, "smoothing": 0.0, "eval_crop": 1.0},
        "optim": {"lr": 2e-3, "min_lr": 1e-5, "betas": [0.9, 0.999], "weight_decay": 0.05},
        "schedule": {"epochs": 1, "warmup_epochs": 0.1},
        # auto: bf16 matmuls on a CPU that computes them natively (AVX512-BF16, AMX), fp32 elsewhere.
        "run": {"precision": "auto", "micro_batch_size": 64, "ds_config": "ds_configs/zero0.json",
                "output_dir": "runs/demo/finetune", "save_interval": 100, "log_interval": 10},
    },
    "beitv2_tiny_test_ft": {
        "arch": "beitv2_tiny_test", "num_classes": 10, "init": "random",
        "data": {"source": "fashion_mnist", "limit": 512, "eval_images": 200, "num_workers": 0},
        "model": {"drop_path": 0.0},
        "augment": {"eval_crop": 1.0},
        "optim": {"lr": 2e-3, "min_lr": 1e-4, "weight_decay": 0.05},
        "schedule": {"total_steps": 8, "warmup_steps": 1},
        "run": {"precision": "fp32", "micro_batch_size": 8, "ds_config": "ds_configs/zero2.json",
                "output_dir": "runs/ft_tiny", "save_interval": 4, "log_interval": 1, "progress_bar": False},
    },
}
