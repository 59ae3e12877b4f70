"""VQ-KD tokenizer speed and memory: inference and training-step images/s, and the quantizer's share of a step.

Baseline in the same run: the official quantizer's formulation (an N x K one-hot for counts and sums), timed on
the same vectors, so the ratio shows what dropping the one-hot buys. Writes JSON.

    python -m bench.tokenizer --arch=vqkd_encoder_base_decoder_3x768x12_clip --batch=64 --precision=bf16
"""
from __future__ import annotations

import fire
import torch
import torch.nn.functional as F

from bench.common import device_info, peak_gib, reset_peak, time_it, write_json
from engine.ds_setup import COMPUTE_DTYPES
from pretrain.tokenizer import build_tokenizer



def one_hot_quantizer_step(weight: torch.Tensor, cluster: torch.Tensor, z: torch.Tensor, decay: float = 0.99):
    """The official update, one-hot and all (baseline only)."""
    flat = F.normalize(z.reshape(-1, weight.shape[1]), dim=-1)
    d = flat.pow(2).sum(1, keepdim=True) + weight.pow(2).sum(1) - 2 * flat @ weight.t()
    idx = d.argmin(1)
    onehot = F.one_hot(idx, weight.shape[0]).type(flat.dtype)
    bins = onehot.sum(0)
    cluster.mul_(decay).add_(bins, alpha=1 - decay)
    zero = bins == 0
    embed = F.normalize((flat.t() @ onehot / bins.masked_fill(zero, 1).unsqueeze(0)).t(), dim=-1)
    embed = torch.where(zero[:, None], weight, embed)
    weight.copy_(F.normalize(weight * decay + embed * (1 - decay), dim=-1))
    return idx


def main(arch: str = "", batch: int = 0, precision: str = "", iters: int = 5, out: str = "bench_tokenizer.json"):
    """Benchmark one arch/batch/precision; defaults: the official base arch on GPU, the demo arch on CPU."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    arch = arch or ("vqkd_encoder_base_decoder_3x768x12_clip" if device.type == "cuda" else "vqkd_small_demo")
    batch = batch or (64 if device.type == "cuda" else 32)
    precision = precision or ("bf16" if device.type == "cuda" else "fp32")
    if precision not in COMPUTE_DTYPES:
        raise SystemExit(f"error: --precision must be one of {', '.join(COMPUTE_DTYPES)}")
    dtype = COMPUTE_DTYPES[precision]
    model = build_tokenizer(arch, kmeans_init=False).to(device)
    images = torch.rand(batch, 3, model.img_size, model.img_size, device=device)
    target = torch.randn(batch, model.num_patches, model.teacher_dim, device=device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def autocast():
        return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def train_step():
        with autocast():
            loss, _ = model(images, target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def infer():
        with torch.inference_mode(), autocast():
            model.get_codebook_indices(images)

    model.train()
    reset_peak(device)
    t_step = time_it(train_step, device, iters=iters)
    peak_train = peak_gib(device)
    t_infer = time_it(infer, device, iters=iters)

    z = torch.randn(batch, model.num_patches, model.code_dim, device=device)
    quant = model.quantize.train()
    t_quant = time_it(lambda: quant(z), device, iters=iters)
    weight, cluster = quant.embedding.weight.clone(), quant.cluster_size.clone()
    t_onehot = time_it(lambda: one_hot_quantizer_step(weight, cluster, z), device, iters=iters)

    result = {"arch": arch, "batch": batch, "precision": precision, **device_info(device),
              "train_images_per_s": batch / t_step, "inference_images_per_s": batch / t_infer,
              "train_peak_mem_gib": peak_train,
              "quantizer_ms": 1e3 * t_quant, "quantizer_share_of_train_step": t_quant / t_step,
              "one_hot_baseline_quantizer_ms": 1e3 * t_onehot, "quantizer_speedup_vs_one_hot": t_onehot / t_quant,
              "train_step_flops_per_image": model.flops_per_image()}
    return write_json(result, out)


if __name__ == "__main__":
    fire.Fire(main)
