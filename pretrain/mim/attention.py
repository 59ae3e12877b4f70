"""Kernel choice for BEiT's attention with the shared relative position bias.

timm's BEiT `Attention` knows two kernels: `F.scaled_dot_product_attention` with the bias as a dense mask (on
CUDA that bias rules out the flash kernel and falls back to the memory-efficient one) and the explicit softmax.
`flex` adds FlexAttention: the bias is added inside the fused kernel by a `score_mod`, and its gradient is
computed there too, so no `[B, H, N, N]` score or bias-gradient tensor is ever written to memory.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models.beit import Attention
from torch.nn.attention.flex_attention import flex_attention

ATTENTION_KERNELS = ("sdpa", "explicit", "flex")

_compiled_flex = None


def _flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, score_mod) -> torch.Tensor:
    """FlexAttention, compiled once on CUDA (eager flex is a slow reference that materialises the scores).
    Inside an outer `torch.compile` the plain function is traced into that graph instead."""
    global _compiled_flex
    if q.device.type != "cuda" or torch.compiler.is_compiling():
        return flex_attention(q, k, v, score_mod=score_mod)
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex(q, k, v, score_mod=score_mod)


class RelPosAttention(Attention):
    """timm's BEiT attention (same parameters, buffers and state-dict keys) with a selectable kernel.

    Only the `flex` path is new; `sdpa` and `explicit` are timm's own forward with `fused_attn` set.
    """

    kernel: str = "sdpa"

    def forward(self, x: torch.Tensor, shared_rel_pos_bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.kernel != "flex":
            self.fused_attn = self.kernel == "sdpa"
            return super().forward(x, shared_rel_pos_bias=shared_rel_pos_bias)
        if x.device.type == "cpu" and torch.is_grad_enabled():
            raise RuntimeError("attention='flex' trains on CUDA only (FlexAttention has no CPU backward); use "
                               "attention='sdpa' on the CPU")
        B, N, C = x.shape
        qkv = F.linear(x, self.qkv.weight, torch.cat((self.q_bias, self.k_bias, self.v_bias)))
        q, k, v = qkv.reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        bias = shared_rel_pos_bias.to(q.dtype)   # [H, N, N], shared by every block

        def add_bias(score, b, h, q_idx, kv_idx):
            return score + bias[h, q_idx, kv_idx]

        x = _flex(q, k, v, add_bias).transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))


def set_attention_kernel(blocks, kernel: str) -> None:
    """Switch timm BEiT blocks to `kernel` (one of `ATTENTION_KERNELS`), keeping their weights.

    The flex path supports what BEiT v2 uses: q/v biases, one shared bias, no attention dropout.
    """
    if kernel not in ATTENTION_KERNELS:
        raise ValueError(f"unknown attention kernel '{kernel}'; choose one of {', '.join(ATTENTION_KERNELS)}")
    for blk in blocks:
        attn = blk.attn
        if kernel == "flex" and (attn.q_bias is None or attn.relative_position_bias_table is not None
                                 or attn.attn_drop.p > 0):
            raise ValueError("attention='flex' needs q/v biases, the shared relative position bias and no "
                             "attention dropout")
        attn.__class__ = RelPosAttention   # same module state; only the forward differs
        attn.kernel = kernel
