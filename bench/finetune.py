"""Classification fine-tune step speed through the real training loop: images/s, MFU and peak memory per variant.

Each variant runs `finetune.classify.train.train` (DeepSpeed engine, layer-wise lr decay, the fine-tuning
augmentation and mixup/cutmix on the device, logging, then the held-out evaluation on 64 images) for 2 x `warmup`
steps on synthetic images with synthetic labels (`init=random`: nothing to learn) and reports the second log
interval. A variant that fails is recorded with its error and the others still run; the JSON is rewritten after every
variant. DeepSpeed's autocast mode sets process-wide state, so list the `lean*` variants after the DeepSpeed-bf16
ones.

The baseline is the official formulation's attention (`--model.attention=explicit`: softmax in Python, no fused
kernel) at the same precision. Ratios compare variants measured in one run on one machine. Writes JSON.

    python -m bench.finetune --arch=beit_base_patch16_224 --batch=128 --precision=bf16 --zero=1 --warmup=10
"""
from __future__ import annotations

import gc
import sys
import tempfile

from bench.common import device_info, run_stage_variants, stage_overrides, stage_variant_names, write_json
from engine.config.cli import run_cli
from engine.config.schema import resolve
from finetune.classify.config import RECIPES, ClassifyConfig
from finetune.model import CLS_ARCHS

EVAL_IMAGES = 64   # the stage's held-out evaluation after training: kept small, it is not measured


def main(arch: str = "", batch: int = 0, precision: str = "", zero: int = 1, warmup: int = 10,
         variants: str = "baseline,fused,ckpt,compile", out: str = "bench_finetune.json"):
    """Benchmark one arch/batch/precision/ZeRO stage; defaults: the official base arch at batch 128 in bf16 on GPU,
    the test arch at batch 16 in fp32 on CPU."""
    names = stage_variant_names(variants, zero, warmup, batch, arch, CLS_ARCHS, "classifier")
    from engine.parallel import distributed as dist_utils
    from finetune.classify.train import build_model, train
    device = dist_utils.init()
    cuda = device.type == "cuda"
    arch = arch or ("beit_base_patch16_224" if cuda else "beitv2_tiny_test")
    batch = batch or (128 if cuda else 16)
    precision = precision or ("bf16" if cuda else "fp32")
    recipe = "beitv2_base_ft_from_300e" if cuda else "beitv2_tiny_test_ft"
    work = tempfile.mkdtemp(prefix="bench_finetune_")
    overrides = {name: stage_overrides(arch=arch, batch=batch, precision=precision, zero=zero, warmup=warmup,
                                       eval_images=EVAL_IMAGES, output_dir=f"{work}/{name}", variant=name)
                 for name in names}
    # Every variant's config is checked before the first one runs: a bad flag is one line, not a run later.
    configs = {name: resolve(ClassifyConfig, RECIPES, recipe, flags) for name, flags in overrides.items()}
    flops_per_image = build_model(configs[names[0]]).flops_per_image()
    gc.collect()
    results, base_name = run_stage_variants(train, recipe, overrides, configs, warmup, device, out,
                                            dist_utils.is_main())
    result = {"arch": arch, "recipe": recipe, "batch_per_rank": batch, "precision": precision, "zero": zero,
              "world_size": dist_utils.world_size(), **device_info(device), "warmup_steps": warmup,
              "flops_per_image": flops_per_image, "baseline_variant": base_name, "variants": results}
    if dist_utils.is_main():
        write_json(result, out)
    return result


if __name__ == "__main__":
    sys.exit(run_cli(main))
