"""VQ-KD tokenizer speed and memory: training-step and inference images/s, and the quantizer's share of a step.

Baseline in the same run: the official formulation on the same weights and inputs, i.e. explicit-softmax attention
in every ViT block and the quantizer's full [N, K] distances plus an N x K one-hot for the codebook's counts and
sums. Both the whole training step and the quantizer alone are timed against it, so the ratios show what the fused
attention and dropping the one-hot buy. Peak memory is per model on CUDA; on the CPU it is the process's peak RSS
so far. Writes JSON.

    python -m bench.tokenizer --arch=vqkd_encoder_base_decoder_3x768x12_clip --batch=64 --precision=bf16
"""
from __future__ import annotations

import copy
import sys

import torch
import torch.nn.functional as F

from bench.common import device_info, peak_gib, reset_peak, time_it, write_json
from engine.config.cli import check_counts, run_cli
from engine.parallel import distributed as dist_utils
from engine.parallel.ds_setup import COMPUTE_DTYPES
from pretrain.tokenizer import VQKD, build_tokenizer
from pretrain.tokenizer.quantizer import NormEMAQuantizer


class OneHotQuantizer(NormEMAQuantizer):
    """The official quantizer's arithmetic (baseline only): same codes and update, costlier tensors."""

    def nearest(self, flat: torch.Tensor) -> torch.Tensor:
        w = self.embedding.weight
        return (flat.pow(2).sum(1, keepdim=True) + w.pow(2).sum(1) - 2 * flat @ w.t()).argmin(dim=1)

    def _counts_and_sums(self, flat: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        onehot = F.one_hot(indices, self.num_codes).type(flat.dtype)
        counts, sums = onehot.sum(0), onehot.t() @ flat
        return dist_utils.all_reduce_sum_(counts), dist_utils.all_reduce_sum_(sums)


def official_formulation(model: VQKD) -> VQKD:
    """A copy of `model` (same weights and buffers) that computes the same function the official way."""
    baseline = copy.deepcopy(model)
    baseline.quantize.__class__ = OneHotQuantizer   # same state; only the arithmetic differs
    for module in baseline.modules():
        if hasattr(module, "fused_attn"):   # timm's attention: False picks its explicit softmax
            module.fused_attn = False
    return baseline


def main(arch: str = "", batch: int = 0, precision: str = "", iters: int = 5, out: str = "bench_tokenizer.json"):
    """Benchmark one arch/batch/precision; defaults: the official base arch on GPU, the demo arch on CPU."""
    check_counts(iters=iters, **({"batch": batch} if batch else {}))   # 0: the default for the device
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    arch = arch or ("vqkd_encoder_base_decoder_3x768x12_clip" if device.type == "cuda" else "vqkd_small_demo")
    batch = batch or (64 if device.type == "cuda" else 32)
    precision = precision or ("bf16" if device.type == "cuda" else "fp32")
    if precision not in COMPUTE_DTYPES:
        raise SystemExit(f"error: --precision must be one of {', '.join(COMPUTE_DTYPES)}")
    dtype = COMPUTE_DTYPES[precision]
    torch.manual_seed(0)
    model = build_tokenizer(arch, kmeans_init=False).to(device)
    baseline = official_formulation(model)
    images = torch.rand(batch, 3, model.img_size, model.img_size, device=device)
    target = torch.randn(batch, model.num_patches, model.teacher_dim, device=device)

    def autocast():
        return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    # Like with like: both compute the same loss on the same weights before any update (eval: no EMA step).
    with torch.no_grad(), autocast():
        loss_diff = abs(model.eval()(images, target)[0].item() - baseline.eval()(images, target)[0].item())

    def train_step_of(m: VQKD):
        opt = torch.optim.AdamW(m.parameters(), lr=1e-4)

        def train_step():
            with autocast():
                loss, _ = m(images, target)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return train_step

    def infer():
        with torch.inference_mode(), autocast():
            model.get_codebook_indices(images)

    timings, peaks = {}, {}
    for name, m in (("ours", model), ("official", baseline)):
        m.train()
        reset_peak(device)
        timings[name] = time_it(train_step_of(m), device, iters=iters)
        peaks[name] = peak_gib(device)
    model.eval()
    t_infer = time_it(infer, device, iters=iters)

    z = torch.randn(batch, model.num_patches, model.code_dim, device=device)
    t_quant = time_it(lambda: model.quantize.train()(z), device, iters=iters)
    t_onehot = time_it(lambda: baseline.quantize.train()(z), device, iters=iters)

    t_step = timings["ours"]
    result = {"arch": arch, "batch": batch, "precision": precision, **device_info(device),
              "train_images_per_s": batch / t_step, "inference_images_per_s": batch / t_infer,
              "train_peak_mem_gib": peaks["ours"],
              "official_train_images_per_s": batch / timings["official"],
              "official_train_peak_mem_gib": peaks["official"],
              "train_step_speedup_vs_official": timings["official"] / t_step,
              "official_loss_difference": loss_diff,
              "quantizer_ms": 1e3 * t_quant, "quantizer_share_of_train_step": t_quant / t_step,
              "one_hot_baseline_quantizer_ms": 1e3 * t_onehot, "quantizer_speedup_vs_one_hot": t_onehot / t_quant,
              "train_step_flops_per_image": model.flops_per_image()}
    return write_json(result, out)


if __name__ == "__main__":
    sys.exit(run_cli(main))
