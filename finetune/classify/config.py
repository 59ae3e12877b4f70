"""Typed configuration and named recipes of classification fine-tuning."""
from __future__ import annotations

from dataclasses import dataclass, field

from engine.config import ConfigError, StageConfig, merge
from finetune.model import CLS_ARCHS


@dataclass
class ModelConfig:
    """Args:
        drop_path: stochastic depth rate.
        img_size: input side; None keeps the arch's (a checkpoint's position tables are resized to it).
        new_head: a fine-tuned checkpoint whose head has another number of classes starts with a fresh head.
        ema_decay: > 0 keeps an exponential moving average of the weights (fp32; official: 0.9999), evaluated and
            saved (`classifier_ema.pt`) beside the trained weights; needs ZeRO <= 2 (whole weights on each rank).
        attention: `sdpa` (fused kernel, the bias as mask) or `explicit` (softmax in Python, the official
            formulation); the same function.
    """
    drop_path: float = 0.1
    img_size: int | None = None
    new_head: bool = False
    ema_decay: float = 0.0
    attention: str = "sdpa"

    def validate(self, prefix: str = "model") -> None:
        if not 0 <= self.drop_path < 1:
            raise ConfigError(f"config key '{prefix}.drop_path' = {self.drop_path} must be in [0, 1)")
        if self.attention not in ("sdpa", "explicit"):
            raise ConfigError(f"config key '{prefix}.attention' = {self.attention!r} must be sdpa or explicit "
                              f"(flex needs the shared bias of pretraining)")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"config key '{prefix}.ema_decay' = {self.ema_decay} must be in [0, 1) (0 is off)")
        if self.img_size is not None and self.img_size < 1:
            raise ConfigError(f"config key '{prefix}.img_size' = {self.img_size} must be >= 1")


@dataclass
class AugmentConfig:
    """Training augmentation (batched on the device) and the evaluation view.

    Args:
        scale_min: RandomResizedCrop's smallest area fraction.
        rand_augment: RandAugment rand-m{magnitude}-mstd{magnitude_std}-inc1.
        color_jitter: colour jitter strength, applied only when RandAugment is off (as timm does).
        erase_prob: random erasing probability.
        mixup, cutmix: Beta alphas (0 disables each); one of them per batch, cutmix with `switch_prob`.
        smoothing: label smoothing of the (mixed) soft targets.
        eval_crop: evaluation resizes to size / eval_crop and centre-crops size (0.875: 224 of 256).
    """
    scale_min: float = 0.08
    rand_augment: bool = True
    color_jitter: float = 0.4
    magnitude: float = 9.0
    magnitude_std: float = 0.5
    erase_prob: float = 0.25
    mixup: float = 0.8
    cutmix: float = 1.0
    switch_prob: float = 0.5
    smoothing: float = 0.1
    eval_crop: float = 0.875

    def validate(self, prefix: str = "augment") -> None:
        for key in ("erase_prob", "switch_prob", "scale_min", "eval_crop", "color_jitter"):
            value, open_low = getattr(self, key), key in ("scale_min", "eval_crop")
            if not (0 < value <= 1 if open_low else 0 <= value <= 1):
                raise ConfigError(f"config key '{prefix}.{key}' = {value} must be in {'(0' if open_low else '[0'}, 1]")
        # At 1 every target is uniform over the classes: nothing to learn (0.1 official, 0 off).
        if not 0 <= self.smoothing < 1:
            raise ConfigError(f"config key '{prefix}.smoothing' = {self.smoothing} must be in [0, 1) (0.1 official, "
                              f"0 off; 1 makes every target uniform)")
        if not 0 <= self.magnitude <= 10:
            raise ConfigError(f"config key '{prefix}.magnitude' = {self.magnitude} must be in [0, 10]")
        if self.mixup < 0 or self.cutmix < 0 or self.magnitude_std < 0:
            raise ConfigError(f"config keys '{prefix}.mixup', '{prefix}.cutmix' and '{prefix}.magnitude_std' "
                              f"must be >= 0")


@dataclass
class ClassifyConfig(StageConfig):
    harmless_on_resume = frozenset({"model.attention", "augment.eval_crop"})   # a kernel; the view after training
    arch: str = "beitv2_small_demo"
    num_classes: int = 10
    # Backbone to start from: a MIM checkpoint (ours or official `*_cls_pt`), a fine-tuned or timm or exported
    # file, or `random` for the from-scratch baseline.
    init: str = ""
    layer_decay: float = 0.65
    model: ModelConfig = field(default_factory=ModelConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def validate(self) -> None:
        if self.arch not in CLS_ARCHS:
            raise ConfigError(f"config key 'arch' = {self.arch!r} must be one of {', '.join(CLS_ARCHS)}")
        if self.num_classes < 2:
            raise ConfigError(f"config key 'num_classes' = {self.num_classes} must be >= 2")
        if not self.init:
            raise ConfigError("config key 'init' is required: a backbone checkpoint (e.g. runs/x/mim.pt, an "
                              "official BEiT v2 file) or 'random'")
        patch = CLS_ARCHS[self.arch]["patch_size"]
        if self.model.img_size is not None and self.model.img_size % patch:
            raise ConfigError(f"config key 'model.img_size' = {self.model.img_size} must be a multiple of the "
                              f"patch size {patch} of arch {self.arch}")
        if not 0 < self.layer_decay <= 1:
            raise ConfigError(f"config key 'layer_decay' = {self.layer_decay} must be in (0, 1]")


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
        "run": {"precision": "fp32", "micro_batch_size": 32, "ds_config": "ds_configs/zero2.json",
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
