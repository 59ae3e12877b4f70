"""Typed configuration and named recipes of the MIM pretraining stage."""
from __future__ import annotations

from dataclasses import dataclass, field

from engine.config.schema import ConfigError, StageConfig, key
from pretrain.mim.attention import ATTENTION_KERNELS
from pretrain.mim.model import MIM_ARCHS, MIM_TARGETS


@dataclass
class ModelConfig:
    """Settings layered on the arch; None keeps the arch's value."""
    drop_path: float = key(0.0, "stochastic depth rate", ge=0, lt=1)
    layer_scale_init: float | None = key(None, "layer-scale gamma init (0.1 base, 1e-5 large; 0 is off)", ge=0,
                                         note="0 disables layer scale")
    early_layers: int | None = key(None, "the aggregation head reads patch tokens after this many blocks", ge=1)
    head_layers: int | None = key(None, "blocks in the aggregation head", ge=1)
    attention: str = key("sdpa", "attention kernel: sdpa, explicit, or flex (CUDA; fused bias, fastest compiled)",
                         choices=ATTENTION_KERNELS)
    target: str = key("codes", "a masked patch is predicted as the frozen tokenizer's codes (BEiT v2) or as its own "
                      "normalised pixels (MAE's formulation, no tokenizer: the ablation baseline)", choices=MIM_TARGETS)
    aggregation: bool = key(True, "the patch-aggregation head and its loss; false: the masked-token loss of the "
                            "final layer only (the paper's ablation of the head)")


@dataclass
class MaskingConfig:
    """Block-wise masking."""
    num_masked: int | None = key(None, "patches masked per image; null: the arch's (75 of 196 at 224 px)", ge=1)
    min_patches: int = key(16, "smallest masked block, in patches", ge=1)
    min_aspect: float = key(0.3, "smallest aspect ratio of a block (the largest is its inverse)", gt=0, le=1)


@dataclass
class MIMConfig(StageConfig):
    harmless_on_resume = frozenset({"model.attention"})   # the same function, another kernel
    read_while_training = ("tokenizer",)   # its codes are every step's targets
    arch: str = key("beitv2_small_demo", "the model", choices=MIM_ARCHS)
    tokenizer: str = key("", "frozen tokenizer checkpoint (ours or official); needed for model.target=codes")
    tokenizer_arch: str = key("", "the tokenizer's arch, only for arch-less files whose shapes are ambiguous")
    # A resumed run's own checkpoint replaces them.
    init_weights: str = key("", "start from these weights (an official *_cls_pt file or a mim.pt, same arch), e.g. "
                            "to continue pretraining on other data; optimizer and schedule start fresh")
    model: ModelConfig = field(default_factory=ModelConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)

    def rules(self, prefix: str) -> None:
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
    from engine.config.schema import merge
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
    # Global batch 64 on one process using every core (1.1-1.2x the images/s of a rank per core on 2 cores, and a
    # shorter start: bench/demo_step.py); for DEMO_NPROC=N, scripts/demo.sh runs N ranks, micro-batch 64/N, ZeRO-2.
    "beitv2_small_demo": {
        "arch": "beitv2_small_demo",
        "tokenizer": "runs/demo/tokenizer/tokenizer.pt",
        "masking": {"min_patches": 4},
        "data": {"source": "fashion_mnist", "limit": 12000},
        "optim": {"lr": 1.5e-3, "min_lr": 1e-5, "betas": [0.9, 0.98], "weight_decay": 0.05, "grad_clip": 3.0},
        # The final [CLS] token's linear probe gains with length (docs/demo.md: 2 epochs +7, 6 epochs +12, 8 epochs
        # +13 to +16 points over random weights); 8 epochs take about 11 min on 2 cores with native bf16.
        "schedule": {"epochs": 8, "warmup_epochs": 0.8},
        # auto: bf16 matmuls on a CPU that computes them natively (AVX512-BF16, AMX), fp32 elsewhere.
        "run": {"precision": "auto", "micro_batch_size": 64, "ds_config": "ds_configs/zero0.json",
                "output_dir": "runs/demo/mim", "save_interval": 250, "log_interval": 10},
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
