"""Segmentation fine-tune step speed through the real training loop: images/s, MFU and peak memory per variant.

Each variant runs `finetune.segment.train.train` (DeepSpeed engine, layer-wise lr decay, the mmseg training pipeline on
the device (`SegTrainAug`: resize, cat_max_ratio crop, flip, photometric distortion), UperNet decode + auxiliary
losses, logging, then the held-out mIoU on 8 images) for 2 x `warmup` steps and reports the second log interval, so
the device-side augmentation is inside the timed steps. The data are synthetic (`data.source=synthetic`): square
canvases of random pixels with random label maps, their side the recipe's short image-scale side (512 for ADE20K),
trained at the arch's recipe (crop, image scale, augmentation; 512 px crops for base and large) from random weights
(`init=random`: nothing to learn). A variant that fails is recorded with its error and the others still run; the
JSON is rewritten after every variant. DeepSpeed's autocast mode sets process-wide state, so list the `lean*`
variants after the DeepSpeed-bf16 ones.

Ours is the fused attention kernel (`fused`: SDPA) in the backbone; the baseline is the official formulation's
attention (`--model.attention=explicit`: softmax in Python, no fused kernel) at the same precision, same data and
same augmentation. Ratios compare variants measured in one run on one machine. MFU uses
`BeitSegmenter.flops_per_image()` and a known device peak (none on a CPU: null there). Writes JSON.

    python -m bench.segment --arch=upernet_beitv2_base --batch=16 --precision=bf16 --zero=1 --warmup=10
    python -m bench.segment --arch=upernet_beitv2_large --batch=16 --precision=bf16 --zero=1 --warmup=10
"""
from __future__ import annotations

import gc
import sys
import tempfile

from bench.common import device_info, run_stage_variants, stage_overrides, stage_variant_names, write_json
from engine.config.cli import run_cli
from engine.config.schema import resolve
from finetune.segment.config import RECIPES, SegmentConfig
from finetune.segment.model import SEG_ARCHS

# Each segmenter arch with the recipe that trains it (crop, image scale, augmentation, layer decay).
RECIPE_FOR = {"upernet_beitv2_base": "upernet_beitv2_base_ade20k",
              "upernet_beitv2_large": "upernet_beitv2_large_ade20k",
              "upernet_beitv2_small_demo": "upernet_beitv2_small_demo_mosaics",
              "upernet_beitv2_tiny_test": "upernet_beitv2_tiny_test"}
EVAL_IMAGES = 8   # the stage's held-out evaluation after training: kept small, it is not measured


def main(arch: str = "", batch: int = 0, precision: str = "", zero: int = 1, warmup: int = 10,
         variants: str = "baseline,fused,ckpt,compile", out: str = "bench_segment.json"):
    """Benchmark one arch/batch/precision/ZeRO stage; defaults: the official base segmenter (512 px crops) at batch
    16 (the recipe's global batch on one device) in bf16 on GPU, the test segmenter at batch 8 in fp32 on CPU."""
    names = stage_variant_names(variants, zero, warmup, batch, arch, SEG_ARCHS, "segmenter")
    from engine.parallel import distributed as dist_utils
    from finetune.segment.train import build_model, train
    device = dist_utils.init()
    cuda = device.type == "cuda"
    arch = arch or ("upernet_beitv2_base" if cuda else "upernet_beitv2_tiny_test")
    batch = batch or (16 if cuda else 8)
    precision = precision or ("bf16" if cuda else "fp32")
    recipe = RECIPE_FOR[arch]
    work = tempfile.mkdtemp(prefix="bench_segment_")
    # Synthetic square canvases of the recipe's short image-scale side (512 for ADE20K, about its images' size).
    canvas = min(RECIPES[recipe].get("augment", {}).get("scale", SegmentConfig().augment.scale))
    overrides = {name: {**stage_overrides(arch=arch, batch=batch, precision=precision, zero=zero, warmup=warmup,
                                          eval_images=EVAL_IMAGES, output_dir=f"{work}/{name}", variant=name),
                        "mosaic_size": canvas} for name in names}
    # Every variant's config is checked before the first one runs: a bad flag is one line, not a run later.
    configs = {name: resolve(SegmentConfig, RECIPES, recipe, flags) for name, flags in overrides.items()}
    first = configs[names[0]]
    flops_per_image = build_model(first).flops_per_image()
    gc.collect()
    results, base_name = run_stage_variants(train, recipe, overrides, configs, warmup, device, out,
                                            dist_utils.is_main())
    result = {"arch": arch, "recipe": recipe, "crop": first.crop, "canvas": canvas, "batch_per_rank": batch,
              "precision": precision, "zero": zero, "world_size": dist_utils.world_size(), **device_info(device),
              "warmup_steps": warmup, "synthetic": True, "flops_per_image": flops_per_image,
              "baseline_variant": base_name, "variants": results}
    if dist_utils.is_main():
        write_json(result, out)
    return result


if __name__ == "__main__":
    sys.exit(run_cli(main))
