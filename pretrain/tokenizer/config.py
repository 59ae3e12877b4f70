"""Typed configuration and named recipes of the VQ-KD tokenizer stage."""
from __future__ import annotations

from dataclasses import dataclass, field

from engine.config.schema import StageConfig, key
from pretrain.tokenizer.model import ARCHS
from pretrain.tokenizer.teachers import TeacherConfig


@dataclass
class QuantizerConfig:
    """Codebook settings layered on the arch (defaults are the official ones)."""
    decay: float = key(0.99, "EMA decay of the codebook", gt=0, lt=1)
    beta: float = key(1.0, "weight of the commitment loss", ge=0)
    kmeans_init: bool = key(True, "initialise the codebook by k-means on the first batch")
    dead_code_threshold: float = key(0.0, "> 0: restart the codes whose EMA usage (vectors per step) falls below it",
                                     ge=0, note="0 is off")
    restart_interval: int = key(100, "EMA updates between dead-code checks", ge=1)


@dataclass
class TokenizerConfig(StageConfig):
    read_while_training = ("teacher.weights",)   # its features are every step's targets
    arch: str = key("vqkd_small_demo", "the tokenizer", choices=ARCHS)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)


RECIPES = {
    # The official recipe: 100 epochs, global batch 512, CLIP ViT-B/16 teacher.
    "vqkd_base_clip": {
        "arch": "vqkd_encoder_base_decoder_3x768x12_clip",
        "teacher": {"name": "clip_b16", "input_size": 224},
        "data": {"source": "beton"},
        "optim": {"lr": 2e-4, "min_lr": 1e-5, "betas": [0.9, 0.99], "weight_decay": 1e-4},
        "schedule": {"epochs": 100, "warmup_epochs": 10},
        "run": {"precision": "bf16", "micro_batch_size": 64, "ds_config": "ds_configs/zero1.json",
                "output_dir": "runs/vqkd_base_clip", "save_interval": 2000, "log_interval": 50},
    },
    # Two CPU cores, real data (Fashion-MNIST) and a real ImageNet teacher (EfficientNet-Lite0), minutes.
    # Global batch 64 on one process using every core (1.1-1.2x the images/s of a rank per core on 2 cores, and a
    # shorter start: bench/demo_step.py); for DEMO_NPROC=N, scripts/demo.sh runs N ranks, micro-batch 64/N, ZeRO-2.
    "vqkd_small_demo": {
        "arch": "vqkd_small_demo",
        "teacher": {"name": "efficientnet_lite0", "input_size": 96},
        "quantizer": {"dead_code_threshold": 0.5, "restart_interval": 20},
        "data": {"source": "fashion_mnist", "limit": 12000, "eval_images": 2000},
        "optim": {"lr": 1e-3, "min_lr": 1e-5, "betas": [0.9, 0.99], "weight_decay": 1e-4, "grad_clip": 1.0},
        "schedule": {"epochs": 2, "warmup_epochs": 0.1},
        # auto: bf16 matmuls on a CPU that computes them natively (AVX512-BF16, AMX), fp32 elsewhere.
        "run": {"precision": "auto", "micro_batch_size": 64, "ds_config": "ds_configs/zero0.json",
                "output_dir": "runs/demo/tokenizer", "save_interval": 100, "log_interval": 10},
    },
    # Tests: a few steps of the tiny arch.
    "vqkd_tiny_test": {
        "arch": "vqkd_tiny_test",
        "teacher": {"name": "efficientnet_lite0", "input_size": 64},
        "data": {"source": "fashion_mnist", "limit": 512, "eval_images": 256, "num_workers": 0},
        "optim": {"lr": 2e-3, "min_lr": 1e-4, "grad_clip": 1.0},
        "schedule": {"total_steps": 8, "warmup_steps": 1},
        "run": {"precision": "fp32", "micro_batch_size": 8, "ds_config": "ds_configs/zero1.json",
                "output_dir": "runs/tiny", "save_interval": 4, "log_interval": 1, "progress_bar": False},
    },
}
