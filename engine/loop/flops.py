"""Matmul FLOPs of the ViT pieces every stage is built from, for MFU (one multiply-add counts as 2 FLOPs).

Training costs about 3x the forward pass (the backward computes gradients of activations and of weights).
"""
from __future__ import annotations

TRAIN_FACTOR = 3


def vit_blocks_flops(width: int, depth: int, tokens: int, mlp_ratio: float = 4.0) -> float:
    """Forward FLOPs of `depth` transformer blocks on `tokens` tokens: qkv + projection (4 d^2), MLP
    (2 r d^2) per token, and the two attention matmuls (2 n^2 d)."""
    per_block = 2 * tokens * (4 * width * width + 2 * mlp_ratio * width * width) + 4 * tokens * tokens * width
    return depth * per_block


def patch_embed_flops(num_patches: int, in_chans: int, patch_size: int, width: int) -> float:
    """Forward FLOPs of the patch-embedding convolution (a matmul per patch)."""
    return 2 * num_patches * in_chans * patch_size * patch_size * width


def linear_flops(rows: int, d_in: int, d_out: int) -> float:
    """Forward FLOPs of a linear layer applied to `rows` vectors."""
    return 2 * rows * d_in * d_out
