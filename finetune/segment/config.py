"""Typed configuration and named recipes of semantic segmentation (UperNet, mmseg's ADE20K recipe)."""
from __future__ import annotations

from dataclasses import dataclass, field

from engine.config.schema import ConfigError, StageConfig, key, merge
from finetune.model import CLS_ARCHS
from finetune.segment.model import SEG_ARCHS


@dataclass
class SegModelConfig:
    drop_path: float = key(0.15, "stochastic depth of the backbone", ge=0, lt=1)
    # 0 would fall back to the arch's crop unnoticed.
    img_size: int | None = key(None, "training crop side; null: the arch's (512 official); position tables are "
                               "resized to it", ge=1, note="or null for the arch's crop")
    new_head: bool = key(False, "with a segmenter.pt of another class count as init, start fresh classifiers")
    aux_weight: float = key(0.4, "weight of the FCN auxiliary head's loss (0.4 official)", ge=0)
    attention: str = key("sdpa", "sdpa or explicit softmax (the same function)", choices=("sdpa", "explicit"))


@dataclass
class SegAugmentConfig:
    """mmseg's ADE20K training pipeline, batched on the device (data_tools/gpu_segment.py)."""
    scale: tuple[int, int] = key((2048, 512), "(long, short) image scale: training resizes to it x a ratio from "
                                 "ratio_range, evaluation to it", ge=1)
    ratio_range: tuple[float, float] = key((0.5, 2.0), "random resize ratios (lo, hi)", gt=0)
    cat_max_ratio: float = key(0.75, "a crop where one class covers more than this fraction is redrawn (up to 10 "
                               "times)", gt=0, le=1)
    photometric: bool = key(True, "brightness / contrast / saturation / hue distortion")
    reduce_zero_label: bool = key(True, "annotation id 0 is 'other' (ignored) and ids 1.. are the classes (ADE20K)")

    def rules(self, prefix: str) -> None:
        if self.ratio_range[0] > self.ratio_range[1]:
            raise ConfigError(f"config key '{prefix}.ratio_range' = {list(self.ratio_range)} must be 0 < lo <= hi")


@dataclass
class SegEvalConfig:
    """How held-out images are predicted (mmseg's test pipeline)."""
    stride: int = key(341, "sliding-window stride (341 of a 512 crop official)", ge=1)
    ratios: list[float] = key([1.0], "test-scale ratios: [1.0] single scale; [0.5, 0.75, 1.0, 1.25, 1.5, 1.75] with "
                              "flip: multi-scale", gt=0)
    flip: bool = key(False, "also predict the mirrored image and average")

    def rules(self, prefix: str) -> None:
        if not self.ratios:
            raise ConfigError(f"config key '{prefix}.ratios' = [] must be a non-empty list of ratios > 0")


@dataclass
class SegmentConfig(StageConfig):
    # Another attention kernel (the same function); the test-time view of the evaluation after training.
    harmless_on_resume = frozenset({"model.attention", "eval.stride", "eval.ratios", "eval.flip"})
    arch: str = key("upernet_beitv2_small_demo", "the segmenter", choices=SEG_ARCHS)
    num_classes: int = key(11, "classes", ge=2, le=255, note="label maps are uint8 with 255 = ignore")
    init: str = key("", "backbone to start from: any checkpoint of classification (mim.pt, official releases, timm, "
                    "exported, classifier.pt), a segmenter.pt, or random (the from-scratch baseline)")
    layer_decay: float = key(0.75, "layer-wise lr decay: each block trains at this x the lr of the one above",
                             gt=0, le=1)
    mosaic_size: int = key(96, "data.source=fashion_mnist: side of the Fashion-MNIST mosaics (data_tools.mosaics) "
                           "trained on", ge=28, note="one garment")
    model: SegModelConfig = field(default_factory=SegModelConfig)
    augment: SegAugmentConfig = field(default_factory=SegAugmentConfig)
    eval: SegEvalConfig = field(default_factory=SegEvalConfig)

    @property
    def crop(self) -> int:
        return self.model.img_size or SEG_ARCHS[self.arch]["img_size"]

    def rules(self, prefix: str) -> None:
        if not self.init:
            raise ConfigError("config key 'init' is required: a backbone checkpoint (e.g. runs/x/mim.pt, an "
                              "official BEiT v2 file), a segmenter.pt, or 'random'")
        patch = CLS_ARCHS[SEG_ARCHS[self.arch]["backbone"]]["patch_size"]
        if self.crop % patch:
            raise ConfigError(f"config key 'model.img_size' = {self.crop} must be a multiple of the patch size {patch} "
                              f"of arch {self.arch}")
        if self.run.micro_batch_size < 2:
            raise ConfigError("config key 'run.micro_batch_size' must be >= 2: batch norm of the pyramid pooling's "
                              "1x1 level needs two images per rank (official: 2)")
        if self.eval.stride > self.crop:
            raise ConfigError(f"config key 'eval.stride' = {self.eval.stride} must be <= the crop {self.crop}: "
                              f"windows further apart leave pixels unpredicted")


# The official configs: 160k iterations at global batch 16 (8 ranks x 2), AdamW betas
# (0.9, 0.999) wd 0.05, poly decay to 0 after a 1,500-iteration linear warm-up, 512 crops, ADE20K's 150 classes.
_OFFICIAL = {
    "num_classes": 150,
    "data": {"source": "beton"},
    "optim": {"min_lr": 0.0, "betas": [0.9, 0.999], "weight_decay": 0.05, "eps": 1e-8},
    "schedule": {"total_steps": 160_000, "warmup_steps": 1500, "decay": "poly"},
    "eval": {"stride": 341},
    "run": {"precision": "bf16", "micro_batch_size": 2, "ds_config": "ds_configs/zero1.json",
            "save_interval": 4000, "log_interval": 50},
}


def _official(arch: str, lr: float, layer_decay: float, drop_path: float, out: str) -> dict:
    return merge(_OFFICIAL, {"arch": arch, "optim.lr": lr, "layer_decay": layer_decay,
                             "model.drop_path": drop_path, "run.output_dir": out})


# What the demo's segmentation recipes share. auto: bf16 matmuls on a CPU that computes them natively, fp32
# elsewhere. ZeRO-0: the demo runs it as one process, where ZeRO-2's flat gradient buffers only add copies (1.2x the
# images/s without them on 2 cores). One FFCV decoding thread: the mosaics are raw pixels, and a serial decoder
# compiles in 6 s instead of 12 (numba's parallel one) in each process.
_DEMO_MOSAICS = {
    "num_classes": 11,
    "data": {"source": "fashion_mnist", "limit": 2000, "eval_images": 200, "num_workers": 1},
    "model": {"img_size": 48},
    "augment": {"scale": [96, 96], "ratio_range": [0.5, 1.0]},
    "eval": {"stride": 32},
    "optim": {"min_lr": 0.0, "betas": [0.9, 0.999], "weight_decay": 0.05},
    "schedule": {"decay": "poly"},
    "run": {"precision": "auto", "micro_batch_size": 16, "ds_config": "ds_configs/zero0.json", "save_interval": 100,
            "log_interval": 20},
}

RECIPES = {
    "upernet_beitv2_base_ade20k": _official("upernet_beitv2_base", lr=5e-5, layer_decay=0.75, drop_path=0.15,
                                            out="runs/upernet_beitv2_base_ade20k"),
    "upernet_beitv2_large_ade20k": _official("upernet_beitv2_large", lr=4e-5, layer_decay=0.9, drop_path=0.2,
                                             out="runs/upernet_beitv2_large_ade20k"),
    # Two CPU cores: the demo backbone on Fashion-MNIST mosaics (96 px canvases of 1-3 garments, 11 classes) at its
    # pretraining size of 48 px (crops of 50-100% scaled canvases). A run this short wants a much higher lr than the
    # 160k-iteration recipe: the head starts from scratch and stays stuck on garment-vs-background below ~4e-3; the
    # layer decay keeps the backbone's lr lower (docs/demo.md, "Segmentation").
    "upernet_beitv2_small_demo_mosaics": merge(_DEMO_MOSAICS, {
        "arch": "upernet_beitv2_small_demo", "layer_decay": 0.65, "model": {"drop_path": 0.1},
        "optim": {"lr": 4e-3}, "schedule": {"total_steps": 280, "warmup_steps": 20},
        "run": {"output_dir": "runs/demo/segment"}}),
    # The linear probe of the frozen demo backbone on the same mosaics, crops and test view: only batch norm and a
    # 1x1 classifier train, so the held-out mIoU is what the last block's patch tokens hold (docs/demo.md).
    "linear_beitv2_small_demo_mosaics": merge(_DEMO_MOSAICS, {
        "arch": "linear_beitv2_small_demo", "layer_decay": 1.0, "model": {"drop_path": 0.0},
        "optim": {"lr": 1e-2}, "schedule": {"total_steps": 280, "warmup_steps": 20},
        "run": {"output_dir": "runs/demo/segment_linear"}}),
    "upernet_beitv2_tiny_test": {
        "arch": "upernet_beitv2_tiny_test", "num_classes": 11, "init": "random", "mosaic_size": 48,
        "data": {"source": "fashion_mnist", "limit": 64, "eval_images": 8, "num_workers": 0},
        "model": {"drop_path": 0.0},
        "augment": {"scale": [48, 48], "ratio_range": [0.75, 1.25]},
        "eval": {"stride": 16},
        "optim": {"lr": 2e-3, "min_lr": 0.0, "weight_decay": 0.05},
        "schedule": {"total_steps": 8, "warmup_steps": 1, "decay": "poly"},
        "run": {"precision": "fp32", "micro_batch_size": 4, "ds_config": "ds_configs/zero2.json",
                "output_dir": "runs/seg_tiny", "save_interval": 4, "log_interval": 1, "progress_bar": False},
    },
}
