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


def _outputs_and_grads(arch: str, batch: int, kernel: str, dtype: torch.dtype, compiled: bool, device: str):
    """Logits and every parameter gradient (fp32) of the MIM model with `kernel`; same weights and inputs on
    every call (seeded), with a non-zero relative position bias so that adding it is part of what is compared."""
    torch.manual_seed(0)
    model = build_mim_model(arch)
    with torch.no_grad():
        model.rel_pos_bias.relative_position_bias_table.normal_(std=0.5)
    model = model.to(device=device, dtype=dtype)
    model.set_attention(kernel)
    size = model.patch_embed.img_size[0]
    images = torch.randn(batch, 3, size, size).to(device=device, dtype=dtype)
    mask = torch.zeros(batch, model.num_patches, dtype=torch.bool, device=device)
    mask[:, torch.randperm(model.num_patches)[:model.num_masked_patches]] = True
    logits, agg = (torch.compile(model) if compiled else model)(images, mask)
    (logits.float().logsumexp(-1).mean() + agg.float().logsumexp(-1).mean()).backward()
    return logits.detach().float(), {n: p.grad.float() for n, p in model.named_parameters()}


def _errors(run, ref) -> dict:
    """Relative errors of `run` against `ref`: output, worst parameter gradient, relative-position-bias gradient."""
    (out, grads), (out_ref, grads_ref) = run, ref
    rel = lambda a, b: ((a - b).norm() / b.norm().clamp_min(1e-12)).item()  # noqa: E731
    bias = "rel_pos_bias.relative_position_bias_table"
    return {"output": rel(out, out_ref), "max_grad": max(rel(grads[n], g) for n, g in grads_ref.items()),
            "bias_grad": rel(grads[bias], grads_ref[bias])}


def flex_matches_sdpa(arch: str = "beit_base_patch16_224_8k_vocab_cls_pt", batch: int = 8,
                      dtype: torch.dtype = torch.float32, compiled: bool = False,
                      kernels: tuple[str, str] = ("sdpa", "flex"), device: str = "cuda") -> dict:
    """Does `kernels[1]` (flex) compute what `kernels[0]` (SDPA, the reference) computes, gradients included?

    In fp32 both must agree to 1e-4 (1e-3 for gradients). In a 16-bit dtype both are compared with the reference
    kernel in fp32, and the new kernel's error may be at most twice the reference kernel's own 16-bit error.
    """
    ref = _outputs_and_grads(arch, batch, kernels[0], torch.float32, False, device)
    new = _errors(_outputs_and_grads(arch, batch, kernels[1], dtype, compiled, device), ref)
    if dtype == torch.float32:
        ok = new["output"] < 1e-4 and new["max_grad"] < 1e-3 and new["bias_grad"] < 1e-3
        floor = None
    else:
        floor = _errors(_outputs_and_grads(arch, batch, kernels[0], dtype, compiled, device), ref)
        ok = all(new[k] <= 2 * floor[k] + 1e-3 for k in new)
    return {"check": f"{kernels[1]}_matches_{kernels[0]}", "dtype": str(dtype), "compiled": compiled,
            "errors": new, "reference_kernel_errors": floor, "ok": ok}


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
