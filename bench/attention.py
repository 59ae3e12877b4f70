"""Attention with a learned relative-position bias (BEiT v2's shape): SDPA backends and FlexAttention against
the explicit softmax baseline, forward + backward, same run. Writes JSON.

    python -m bench.attention --batch=128 --tokens=197 --heads=12 --head_dim=64
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, flex_attention as flex, sdpa_kernel

from bench.common import device_info, time_it, write_json
from engine.config.cli import check_counts, run_cli


def main(batch: int = 128, tokens: int = 197, heads: int = 12, head_dim: int = 64, dtype: str = "bf16",
         out: str = "bench_attention.json"):
    check_counts(batch=batch, tokens=tokens, heads=heads, head_dim=head_dim)
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if dtype not in dtypes:
        raise ValueError(f"--dtype must be one of {', '.join(dtypes)} (got {dtype!r})")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dt = dtypes[dtype]
    q, k, v = (torch.randn(batch, heads, tokens, head_dim, device=device, dtype=dt, requires_grad=True)
               for _ in range(3))
    bias = torch.randn(1, heads, tokens, tokens, device=device, dtype=dt, requires_grad=True)
    grad = torch.randn(batch, heads, tokens, head_dim, device=device, dtype=dt)

    def explicit():
        attn = (q * head_dim ** -0.5) @ k.transpose(-2, -1) + bias
        (attn.softmax(-1) @ v).backward(grad)

    def fused(backend):
        def run():
            with sdpa_kernel([backend]):
                F.scaled_dot_product_attention(q, k, v, attn_mask=bias.expand(batch, -1, -1, -1)).backward(grad)
        return run

    flex_attention = torch.compile(flex.flex_attention, dynamic=False)

    def flex_bias():   # the bias added inside the fused kernel, its gradient computed there too
        table = bias[0]

        def add_bias(score, b, h, q_idx, kv_idx):
            return score + table[h, q_idx, kv_idx]
        flex_attention(q, k, v, score_mod=add_bias).backward(grad)

    results = {"explicit_ms": 1e3 * time_it(explicit, device)}
    try:
        results["flex_ms"] = 1e3 * time_it(flex_bias, device)
    except Exception as e:  # noqa: BLE001 - e.g. no FlexAttention backward on this device
        results["flex_ms"] = None
        results["flex_error"] = (str(e).strip().splitlines() or [type(e).__name__])[-1][:200]
    for name, backend in (("efficient", SDPBackend.EFFICIENT_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                          ("math", SDPBackend.MATH)):
        try:
            results[f"{name}_ms"] = 1e3 * time_it(fused(backend), device)
        except RuntimeError as e:   # a backend that does not support this case
            results[f"{name}_ms"] = None
            results[f"{name}_error"] = (str(e).splitlines() or [type(e).__name__])[0][:200]
    return write_json({"batch": batch, "tokens": tokens, "heads": heads, "head_dim": head_dim, "dtype": dtype,
                       **device_info(device), **results}, out)


if __name__ == "__main__":
    sys.exit(run_cli(main))
