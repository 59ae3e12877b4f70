"""Typed configuration and named recipes of the MIM pretraining stage."""
from __future__ import annotations

from dataclasses import dataclass, field

from engine.config import ConfigError, StageConfig
from pretrain.mim.attention import ATTENTION_KERNELS
from pretrain.mim.model import MIM_ARCHS, MIM_TARGETS


@dataclass
class ModelConfig:
    """Settings layered on the arch; None keeps the arch's value.

    Args:
        drop_path: stochastic depth rate.
        layer_scale_init: layer-scale gamma init (0.1 base, 1e-5 large).
        early_layers: the aggregation head reads patch tokens after this many blocks.
        head_layers: blocks in the aggregation head.
        attention: attention kernel, `sdpa`, `flex` (CUDA; fused bias, fastest when compiled) or `explicit`.
        target: what a masked patch is predicted as: `codes` of the frozen tokenizer (BEiT v2) or its own
            normalised `pixels` (MAE's formulation, no tokenizer: the ablation baseline).
    """
    drop_path: float = 0.0
    layer_scale_init: float | None = None
    early_layers: int | None = None
    head_layers: int | None = None
    attention: str = "sdpa"
    target: str = "codes"

    def validate(self, prefix: str = "model") -> None:
        if not 0 <= self.drop_path < 1:
            raise ConfigError(f"config key '{prefix}.drop_path' = {self.drop_path} must be in [0, 1)")
        if self.layer_scale_init is not None and self.layer_scale_init < 0:
            raise ConfigError(f"config key '{prefix}.layer_scale_init' = {self.layer_scale_init} must be >= 0 "
                              f"(0 disables layer scale)")
        for key in ("early_layers", "head_layers"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ConfigError(f"config key '{prefix}.{key}' = {getattr(self, key)} must be >= 1")
        if self.target not in MIM_TARGETS:
            raise ConfigError(f"config key '{prefix}.target' = {self.target!r} must be one of {', '.join(MIM_TARGETS)}")
        if self.attention not in ATTENTION_KERNELS:
            raise ConfigError(f"config key '{prefix}.attention' = {self.attention!r} must be one of "
                              f"{', '.join(ATTENTION_KERNELS)}")


@dataclass
class MaskingConfig:
    """Block-wise masking; num_masked None keeps the arch's count (75 of 196 for 224 px)."""
    num_masked: int | None = None
    min_patches: int = 16
    min_aspect: float = 0.3

    def validate(self, prefix: str = "masking") -> None:
        if self.num_masked is not None and self.num_masked < 1:
            raise ConfigError(f"config key '{prefix}.num_masked' = {self.num_masked} must be >= 1")
        if self.min_patches < 1 or not 0 < self.min_aspect <= 1:
            raise ConfigError(f"config keys '{prefix}.min_patches' must be >= 1 and '{prefix}.min_aspect' in (0, 1]")


@dataclass
class MIMConfig(StageConfig):
    harmless_on_resume = frozenset({"model.attention"})   # the same function, another kernel
    arch: str = "beitv2_small_demo"
    tokenizer: str = ""          # frozen tokenizer checkpoint (ours or official)
    tokenizer_arch: str = ""     # only for arch-less files whose shapes are ambiguous
    # Start from these weights (an official `*_cls_pt` file or a `mim.pt`, same arch) instead of the random init,
    # e.g. to continue pretraining on other data; optimizer and schedule start fresh. A resumed run's own
    # checkpoint replaces them.
    init_weights: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)

    def validate(self) -> None:
        if self.arch not in MIM_ARCHS:
            raise ConfigError(f"config key 'arch' = {self.arch!r} must be one of {', '.join(MIM_ARCHS)}")
        if not self.tokenizer and self.model.target == "codes":
            raise ConfigError("config key 'tokenizer' is required: the path of a trained tokenizer checkpoint "
                              "(python -m pretrain.tokenizer train ... writes <output_dir>/tokenizer.pt)")


# The official recipe: global batch 2048 (16 ranks x 128 here), lr 1.5e-3 not batch-scaled, wd 0.05, clip 3.0,
# warm-up 10 epochs, cosine to 1e-5.
_OFFICIAL = {
    "data": {"source": "beton"},
    "optim": {"lr": 1.5e-3, "min_lr": 1e-5, "weight_decay": 0.05, "grad_clip": 3.0, "eps": 1e-8},
    "run": {"precision": "bf16", "micro_batch_size": 128, "ds_config": "ds_configs/zero1.json",
            "save_interval": 2000, "log_interval": 50},
}


def _official(arch: str, epochs: int, betas: list[float], drop_path: float, layer_scale: float, out: str) -> dict:
    from engine.config import merge
    return merge(_OFFICIAL, {"arch": arch, "optim.betas": betas, "schedule": {"epochs": epochs, "warmup_epochs": 10},
                             "model": {"drop_path": drop_path, "layer_scale_init": layer_scale},
                             "run.output_dir": out})


RECIPES = {
    "beitv2_base_300e": _official("beit_base_patch16_224_8k_vocab_cls_pt", 300, [0.9, 0.98], 0.0, 0.1,
                                  "runs/beitv2_base_300e"),
    "beitv2_base_1600e": _official("beit_base_patch16_224_8k_vocab_cls_pt", 1600, [0.9, 0.999], 0.1, 0.1,
                                   "runs/beitv2_base_1600e"),
    "beitv2_large_1600e": _official("beit_large_patch16_224_8k_vocab_cls_pt", 1600, [0.9, 0.999], 0.1, 1e-5,
                                    "runs/beitv2_large_1600e"),
    # Two CPU cores: the small ViT on Fashion-MNIST at 48 px against the demo tokenizer (6 x 6 codes, 14 masked).
    "beitv2_small_demo": {
        "arch": "beitv2_small_demo",
        "tokenizer": "runs/demo/tokenizer/tokenizer.pt",
        "masking": {"min_patches": 4},
        "data": {"source": "fashion_mnist", "limit": 12000},
        "optim": {"lr": 1.5e-3, "min_lr": 1e-5, "betas": [0.9, 0.98], "weight_decay": 0.05, "grad_clip": 3.0},
        "schedule": {"epochs": 2, "warmup_epochs": 0.2},
        # auto: bf16 matmuls on a CPU that computes them natively (AVX512-BF16, AMX), fp32 elsewhere.
        "run": {"precision": "auto", "micro_batch_size": 32, "ds_config": "ds_configs/zero2.json",
                "output_dir": "runs/demo/mim", "save_interval": 100, "log_interval": 10},
    },
    "beitv2_tiny_test": {
        "arch": "beitv2_tiny_test",
        "masking": {"min_patches": 2},
        "data": {"source": "fashion_mnist", "limit": 512, "num_workers": 0},
        "optim": {"lr": 2e-3, "min_lr": 1e-4, "weight_decay": 0.05, "grad_clip": 3.0},
        "schedule": {"total_steps": 8, "warmup_steps": 1},
        "run": {"precision": "fp32", "micro_batch_size": 8, "ds_config": "ds_configs/zero2.json",
                "output_dir": "runs/mim_tiny", "save_interval": 4, "log_interval": 1, "progress_bar": False},
    },
}
