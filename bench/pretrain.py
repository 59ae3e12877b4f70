"""MIM pretraining step speed through the real training loop: images/s, MFU and peak memory per variant.

Each variant runs `pretrain.mim.train` (DeepSpeed engine, frozen tokenizer, masks, logging) for 2 x `warmup`
steps on synthetic images and reports the second half; `--profile` adds a torch.profiler table of the last
variant, over 3 steps after its measured interval (one profiler per process: a second one crashes torch on CPU). A
variant that fails is recorded with its error and the others still run; the JSON is rewritten after every variant.
DeepSpeed's autocast mode sets process-wide state, so list the `lean*` variants after the DeepSpeed-bf16 ones. The
baseline is the official formulation's attention (explicit softmax, no fused kernel, eager); the tokenizer's share is
timed on its own. Writes JSON.

    python -m bench.pretrain --arch=beit_base_patch16_224_8k_vocab_cls_pt --batch=128 --precision=bf16
"""
from __future__ import annotations

import gc
import json
import os
import sys
import tempfile

import torch

from bench.common import add_speedups, device_info, time_it, write_json
from engine.config.cli import check_counts, run_cli
from engine.config.schema import resolve
from pretrain.mim.config import RECIPES, MIMConfig
from pretrain.tokenizer import build_tokenizer, save_tokenizer

TOKENIZER_FOR = {"beit_base_patch16_224_8k_vocab_cls_pt": "vqkd_encoder_base_decoder_3x768x12_clip",
                 "beit_large_patch16_224_8k_vocab_cls_pt": "vqkd_encoder_base_decoder_3x768x12_clip",
                 "beitv2_small_demo": "vqkd_small_demo", "beitv2_tiny_test": "vqkd_tiny_test"}
VARIANTS = {
    "baseline": {"model.attention": "explicit"},
    "fused": {},
    "fused_ckpt": {"run.grad_checkpointing": True},
    "fused_compile": {"run.compile": True},
    "explicit_compile": {"model.attention": "explicit", "run.compile": True},   # inductor fuses the softmax instead
    "flex_compile": {"model.attention": "flex", "run.compile": True},
    # The lean step: fp32 weights under bf16 autocast at ZeRO-0, no host sync between log points.
    "lean": {"run.precision": "bf16_autocast", "run.ds_config": "ds_configs/zero0.json"},
    "lean_compile": {"run.precision": "bf16_autocast", "run.ds_config": "ds_configs/zero0.json", "run.compile": True},
    "lean_flex_compile": {"run.precision": "bf16_autocast", "run.ds_config": "ds_configs/zero0.json",
                          "run.compile": True, "model.attention": "flex"},
    # ... with the compiled graphs (model and tokenizer) replayed as CUDA graphs: one launch per graph.
    "lean_flex_cudagraphs": {"run.precision": "bf16_autocast", "run.ds_config": "ds_configs/zero0.json",
                             "run.compile": True, "run.compile_mode": "reduce-overhead", "model.attention": "flex"},
}


def _tokenizer_ms(cfg, batch: int, device: torch.device) -> float:
    """The frozen tokenizer exactly as the stage builds it for `cfg` (precision, compile), one batch."""
    from pretrain.mim.train import build_model, frozen_tokenizer
    with torch.device("meta"):   # only for the number of masked patches, whose codes the step asks for
        k = build_model(cfg).num_masked_patches
    tok, _ = frozen_tokenizer(cfg, device, k)
    images = torch.rand(batch, 3, tok.img_size, tok.img_size, device=device)
    rows = torch.arange(k, device=device)[None].expand(batch, -1)

    def encode():
        with torch.inference_mode():
            tok.get_codebook_indices(images, rows)
    return 1e3 * time_it(encode, device)


def main(arch: str = "", batch: int = 0, precision: str = "", zero: int = 1, warmup: int = 10,
         variants: str = "baseline,fused,fused_ckpt,fused_compile", profile: bool = False,
         out: str = "bench_pretrain.json"):
    check_counts(warmup=warmup, **({"batch": batch} if batch else {}))   # batch 0: the default for the device
    from engine.parallel import distributed as dist_utils
    from pretrain.mim.train import train
    device = dist_utils.init()
    cuda = device.type == "cuda"
    arch = arch or ("beit_base_patch16_224_8k_vocab_cls_pt" if cuda else "beitv2_tiny_test")
    batch = batch or (128 if cuda else 16)
    precision = precision or ("bf16" if cuda else "fp32")
    work = tempfile.mkdtemp(prefix="bench_pretrain_")
    tok_path = os.path.join(work, "tokenizer.pt")
    torch.manual_seed(0)
    save_tokenizer(build_tokenizer(TOKENIZER_FOR[arch], kmeans_init=False), tok_path)

    results, configs = {}, {}
    names = variants.split(",") if isinstance(variants, str) else list(variants)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"error: unknown variant '{unknown[0]}'; choose from {', '.join(VARIANTS)}")
    if arch not in TOKENIZER_FOR:
        raise SystemExit(f"error: no benchmark tokenizer for arch '{arch}'; choose from {', '.join(TOKENIZER_FOR)}")
    recipe = "beitv2_base_300e" if cuda else "beitv2_tiny_test"
    for name in names:
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        overrides = {"tokenizer": tok_path, "data.source": "synthetic", "data.limit": batch * 4,
                     "run.output_dir": os.path.join(work, name), "run.micro_batch_size": batch,
                     "run.precision": precision, "run.ds_config": f"ds_configs/zero{zero}.json",
                     "run.log_interval": warmup, "run.save_interval": 10 ** 9, "run.save_final": False,
                     "run.progress_bar": False,
                     "schedule.total_steps": 2 * warmup, "schedule.warmup_steps": 1, **VARIANTS[name]}
        if profile and name == names[-1]:   # profiled after the measured interval, so the numbers stay clean
            overrides.update({"run.profile_steps": 3, "schedule.total_steps": 2 * warmup + 3})
        configs[name] = resolve(MIMConfig, RECIPES, recipe, {**overrides, "arch": arch})
        try:
            train(recipe, arch=arch, **overrides)
        except Exception as e:  # noqa: BLE001 - one failing variant must not cost the others' numbers
            results[name] = {"error": f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"}
            write_json({"partial": True, "variants": results}, out if dist_utils.is_main() else "")
            continue
        with open(os.path.join(work, name, "metrics.jsonl")) as f:
            last = next(row for row in map(json.loads, f) if row["step"] == 2 * warmup)
        results[name] = {k: last.get(k) for k in ("images_per_s", "mfu", "peak_mem_gib", "loss")}
        results[name].update(precision=overrides["run.precision"], ds_config=overrides["run.ds_config"])
        prof = os.path.join(work, name, "profile.json")
        if os.path.exists(prof):
            with open(prof) as f:
                results[name]["profile_top_ops"] = json.load(f)[:12]
        # Written after every variant, so that a run cut short (a lease ending) keeps what it measured.
        write_json({"partial": True, "variants": results}, out if dist_utils.is_main() else "")
        gc.collect()
    base_name, measured = add_speedups(results)
    best = max(measured, key=lambda k: measured[k]["images_per_s"])
    tok_ms = _tokenizer_ms(configs[best], batch, device)
    result = {"arch": arch, "batch_per_rank": batch, "precision": precision, "zero": zero,
              "world_size": dist_utils.world_size(), **device_info(device), "baseline_variant": base_name,
              "variants": results, "tokenizer_ms_per_batch": tok_ms,
              "tokenizer_share_of_best_step": tok_ms / 1e3 / (batch / measured[best]["images_per_s"])}
    if dist_utils.is_main():
        write_json(result, out)
    return result


if __name__ == "__main__":
    sys.exit(run_cli(main))
