"""Correctness checks that need CUDA, run by `bench/gpu_mfu.sh` before it measures: FlexAttention's fused
relative-position bias must give SDPA's outputs and gradients (CPU tests cover the forward only, as FlexAttention
has no CPU backward). Prints one JSON line per check and exits non-zero on a mismatch.

    python -m bench.gpu_checks
"""
from __future__ import annotations

import json
import sys

import torch

from pretrain.mim import build_mim_model


def flex_matches_sdpa(arch: str = "beit_base_patch16_224_8k_vocab_cls_pt", batch: int = 8,
                      dtype: torch.dtype = torch.float32, compiled: bool = False,
                      kernels: tuple[str, str] = ("sdpa", "flex"), device: str = "cuda") -> dict:
    """Outputs and every parameter gradient of the MIM model under two attention kernels (by default `sdpa`, the
    reference, and `flex`), same weights and inputs."""
    torch.manual_seed(0)
    model = build_mim_model(arch).to(device=device, dtype=dtype)
    with torch.no_grad():   # the bias table starts at zero; give it values so that adding it is tested
        model.rel_pos_bias.relative_position_bias_table.normal_(std=0.5)
    size = model.patch_embed.img_size[0]
    images = torch.randn(batch, 3, size, size, device=device, dtype=dtype)
    mask = torch.zeros(batch, model.num_patches, dtype=torch.bool, device=device)
    mask[:, torch.randperm(model.num_patches)[:model.num_masked_patches]] = True
    results = {}
    for kernel in kernels:
        model.set_attention(kernel)
        model.zero_grad(set_to_none=True)
        forward = torch.compile(model) if compiled else model
        logits, agg = forward(images, mask)
        (logits.float().logsumexp(-1).mean() + agg.float().logsumexp(-1).mean()).backward()
        results[kernel] = (logits.detach().float(), {n: p.grad.float() for n, p in model.named_parameters()})
    (out_s, grad_s), (out_f, grad_f) = (results[k] for k in kernels)
    out_err = ((out_f - out_s).norm() / out_s.norm()).item()
    grad_err = max(((grad_f[n] - g).norm() / g.norm().clamp_min(1e-12)).item() for n, g in grad_s.items())
    bias_name = "rel_pos_bias.relative_position_bias_table"
    bias_err = ((grad_f[bias_name] - grad_s[bias_name]).norm() / grad_s[bias_name].norm()).item()
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    return {"check": f"{kernels[1]}_matches_{kernels[0]}", "dtype": str(dtype), "compiled": compiled,
            "output_rel_err": out_err,
            "max_grad_rel_err": grad_err, "bias_grad_rel_err": bias_err,
            "ok": out_err < tol and grad_err < 10 * tol}


def main() -> int:
    if not torch.cuda.is_available():
        print("bench.gpu_checks needs CUDA", file=sys.stderr)
        return 2
    ok = True
    for dtype, compiled in ((torch.float32, False), (torch.bfloat16, True)):
        result = flex_matches_sdpa(dtype=dtype, compiled=compiled)
        print(json.dumps(result))
        ok &= result["ok"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
