"""timm BEiT blocks evaluated for some rows only, where a loss or a probe reads a few tokens of the last block: the
MIM model's last blocks (CLS + masked patches), the tokenizer's encoder as the MIM step calls it (masked patches), and
a [CLS] probe (one row). `embed_tokens` is the part of timm's `Beit.forward_features` before the blocks, for the
callers that then run the blocks themselves."""
from __future__ import annotations

import torch
from timm.models.beit import Block


def block_at_rows(blk: Block, x: torch.Tensor, shared_rel_pos_bias: torch.Tensor | None, keep: torch.Tensor
                  ) -> torch.Tensor:
    """timm's BEiT `Block.forward` that returns only the rows `keep` (`[B, R]` token indices): equal to
    `blk(x).gather(1, keep)`, but the MLP runs on the R kept rows instead of all N.

    The attention reads every token, so it runs whole; after it, LayerNorm, MLP, layer scale and drop path act on
    each token alone (drop path draws one number per image, whatever the row count, so the random stream is the
    same as `blk(x)`'s).
    """
    attn = blk.attn(blk.norm1(x), shared_rel_pos_bias=shared_rel_pos_bias)
    x = x + blk.drop_path1(attn if blk.gamma_1 is None else blk.gamma_1 * attn)
    x = x.gather(1, keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    mlp = blk.mlp(blk.norm2(x))
    return x + blk.drop_path2(mlp if blk.gamma_2 is None else blk.gamma_2 * mlp)


def embed_tokens(vit, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What timm's `Beit.forward_features` feeds its first block: `([B, 1 + N, D]` tokens with the CLS token and the
    absolute position embedding where the model has one, the shared relative position bias or None). `vit`: a timm
    `Beit`, the tokenizer's encoder, or the MIM model (same attribute names)."""
    x = vit.patch_embed(x)
    x = torch.cat((vit.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
    if getattr(vit, "pos_embed", None) is not None:
        x = x + vit.pos_embed
    if getattr(vit, "pos_drop", None) is not None:
        x = vit.pos_drop(x)
    bias = vit.rel_pos_bias() if getattr(vit, "rel_pos_bias", None) is not None else None
    return x, bias
