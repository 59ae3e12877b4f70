"""Classification fine-tune step speed through the real training loop: images/s, MFU and peak memory per variant.

Each variant runs `finetune.train.train` (DeepSpeed engine, layer-wise lr decay, the fine-tuning augmentation and
mixup/cutmix on the device, logging, then the held-out evaluation on 64 images) for 2 x `warmup` steps on synthetic
images with synthetic labels (`init=random`: nothing to learn) and reports the second log interval. A variant that
fails is recorded with its error and the others still run; the JSON is rewritten after every variant. DeepSpeed's
autocast mode sets process-wide state, so list the `lean*` variants after the DeepSpeed-bf16 ones.

The baseline is the official formulation's attention (`--model.attention=explicit`: softmax in Python, no fused
kernel) at the same precision. Ratios compare variants measured in one run on one machine. Writes JSON.

    python -m bench.finetune --arch=beit_base_patch16_224 --batch=128 --precision=bf16 --zero=1 --warmup=10
"""
from __future__ import annotations

import gc
import json
import os
import sys
import tempfile

import torch

from bench.common import add_speedups, device_info, write_json
from engine.cli import check_counts, run_cli
from engine.config import resolve
from finetune.config import RECIPES, ClassifyConfig
from finetune.model import CLS_ARCHS

VARIANTS = {
    "baseline": {"model.attention": "explicit"},
    "fused": {},
    "ckpt": {"run.grad_checkpointing": True},
    "compile": {"run.compile": True},
    # The lean step: fp32 weights under bf16 autocast at ZeRO-0, no host sync between log points.
    "lean": {"run.precision": "bf16_autocast", "run.ds_config": "ds_configs/zero0.json"},
    "lean_compile": {"run.precision": "bf16_autocast", "run.ds_config": "ds_configs/zero0.json", "run.compile": True},
}
ZERO_STAGES = (0, 1, 2, 3)
EVAL_IMAGES = 64   # the stage's held-out evaluation after training: kept small, it is not measured


def main(arch: str = "", batch: int = 0, precision: str = "", zero: int = 1, warmup: int = 10,
         variants: str = "baseline,fused,ckpt,compile", out: str = "bench_finetune.json"):
    """Benchmark one arch/batch/precision/ZeRO stage; defaults: the official base arch at batch 128 in bf16 on GPU,
    the test arch at batch 16 in fp32 on CPU."""
    check_counts(warmup=warmup, **({"batch": batch} if batch else {}))   # batch 0: the default for the device
    if isinstance(zero, bool) or zero not in ZERO_STAGES:
        raise ValueError(f"--zero must be one of {', '.join(map(str, ZERO_STAGES))} (got {zero!r})")
    names = variants.split(",") if isinstance(variants, str) else list(variants)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant '{unknown[0]}'; choose from {', '.join(VARIANTS)}")
    if arch and arch not in CLS_ARCHS:
        raise ValueError(f"unknown classifier arch '{arch}'; choose from {', '.join(CLS_ARCHS)}")
    from engine import distributed as dist_utils
    from finetune.train import build_model, train
    device = dist_utils.init()
    cuda = device.type == "cuda"
    arch = arch or ("beit_base_patch16_224" if cuda else "beitv2_tiny_test")
    batch = batch or (128 if cuda else 16)
    precision = precision or ("bf16" if cuda else "fp32")
    recipe = "beitv2_base_ft_from_300e" if cuda else "beitv2_tiny_test_ft"
    work = tempfile.mkdtemp(prefix="bench_finetune_")

    def overrides_for(name: str) -> dict:
        return {"arch": arch, "init": "random", "data.source": "synthetic", "data.limit": batch * 4,
                "data.eval_images": EVAL_IMAGES, "run.output_dir": os.path.join(work, name),
                "run.micro_batch_size": batch, "run.grad_accum_steps": 1, "run.precision": precision,
                "run.ds_config": f"ds_configs/zero{zero}.json", "run.log_interval": warmup,
                "run.save_interval": 10 ** 9, "run.save_final": False, "run.progress_bar": False,
                "run.profile_steps": 0, "schedule.total_steps": 2 * warmup, "schedule.warmup_steps": 1,
                **VARIANTS[name]}

    # Every variant's config is checked before the first one runs: a bad flag is one line, not a run later.
    configs = {name: resolve(ClassifyConfig, RECIPES, recipe, overrides_for(name)) for name in names}
    flops_per_image = build_model(configs[names[0]]).flops_per_image()
    gc.collect()

    results = {}
    for name in names:
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        overrides = overrides_for(name)
        try:
            train(recipe, **overrides)
            with open(os.path.join(work, name, "metrics.jsonl")) as f:
                last = next(row for row in map(json.loads, f) if row["step"] == 2 * warmup)
        except Exception as e:  # noqa: BLE001 - one failing variant must not cost the others' numbers
            results[name] = {"error": f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"}
            write_json({"partial": True, "variants": results}, out if dist_utils.is_main() else "")
            gc.collect()
            continue
        results[name] = {k: last.get(k) for k in ("images_per_s", "mfu", "peak_mem_gib", "loss")}
        results[name].update(precision=overrides["run.precision"], ds_config=overrides["run.ds_config"],
                             attention=configs[name].model.attention)
        # Written after every variant, so that a run cut short (a lease ending) keeps what it measured.
        write_json({"partial": True, "variants": results}, out if dist_utils.is_main() else "")
        gc.collect()
    base_name, measured = add_speedups(results)
    result = {"arch": arch, "recipe": recipe, "batch_per_rank": batch, "precision": precision, "zero": zero,
              "world_size": dist_utils.world_size(), **device_info(device), "warmup_steps": warmup,
              "flops_per_image": flops_per_image, "baseline_variant": base_name, "variants": results}
    if dist_utils.is_main():
        write_json(result, out)
    return result


if __name__ == "__main__":
    sys.exit(run_cli(main))
