"""BEiT v2 masked-image-modeling backbone with the patch-aggregation head, built from timm's BEiT pieces.

State-dict keys and shapes equal the official `beit_*_patch16_224_8k_vocab_cls_pt` checkpoints, apart from
`rel_pos_bias.relative_position_index`, which timm derives instead of storing (loading drops it).

Static shapes: `forward(images, mask)` runs the LM head on a fixed number of masked patches per image, found by
index arithmetic instead of boolean indexing, so the step has no data-dependent shape and no host sync.
"""
from __future__ import annotations

import inspect
import math
import os
from functools import partial
from typing import Any, Mapping

import torch
import torch.nn as nn
from timm.layers import PatchEmbed, calculate_drop_path_rates, trunc_normal_
from timm.models.beit import Block, RelativePositionBias
from torch.utils.checkpoint import checkpoint

from engine.config.registry import build_from_registry
from engine.loop.flops import TRAIN_FACTOR, linear_flops, patch_embed_flops, vit_blocks_flops
from engine.storage.weights import load_strict, read_weights_file, save_weights_file
from pretrain.block_rows import block_at_rows
from pretrain.mim.attention import set_attention_kernel

__all__ = ["MIM_ARCHS", "MIM_TARGETS", "BeitV2MIM", "build_mim_model", "gather_masked", "load_mim_model",
           "block_at_rows", "masked_positions", "patch_pixel_targets", "read_mim_file", "save_mim_model"]

FILE_FORMAT = "beitv2-ds/mim/1"
# What the heads predict for a masked patch: the frozen tokenizer's code (BEiT v2) or the patch's own normalised
# pixels (MAE's formulation, the paper's ablation baseline for VQ-KD targets).
MIM_TARGETS = ("codes", "pixels")


def masked_positions(mask: torch.Tensor, num_masked: int) -> torch.Tensor:
    """Indices of the masked patches of each image, ascending, as a `[B, num_masked]` LongTensor.

    A stable descending sort of the 0/1 mask lists the masked positions first, each group in its original
    order; the count is a Python int, so the shape is static (no `nonzero`, no host sync).

    Args:
        mask: Bool `[B, N]`, with exactly `num_masked` True values in every row (not checked: that would sync).
        num_masked: Masked patches per image.
    """
    return torch.argsort(mask.to(torch.uint8), dim=1, descending=True, stable=True)[:, :num_masked]


def gather_masked(x: torch.Tensor, mask: torch.Tensor, num_masked: int) -> torch.Tensor:
    """Rows of `x` at the masked positions, flattened: equals `x[mask]` when every row has `num_masked` True.

    Args:
        x: `[B, N]` (e.g. tokenizer codes) or `[B, N, C]` (e.g. patch tokens).
        mask: Bool `[B, N]`.
        num_masked: Masked patches per image.

    Returns:
        `[B * num_masked]` or `[B * num_masked, C]`, image-major, positions ascending within an image.
    """
    index = masked_positions(mask, num_masked)
    if x.dim() == 3:
        index = index.unsqueeze(-1).expand(-1, -1, x.shape[-1])
    return x.gather(1, index).flatten(0, 1)


def patch_pixel_targets(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Each patch's pixels normalised by their own mean and variance (MAE's `norm_pix_loss` target).

    Args:
        images: `[B, C, H, W]` float, H and W multiples of `patch_size`.

    Returns:
        `[B, num_patches, patch_size**2 * C]`, patches in `patch_embed`'s (row-major) order.
    """
    b, c, h, w = images.shape
    p = patch_size
    x = images.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), -1)
    mean, var = x.mean(-1, keepdim=True), x.var(-1, keepdim=True)
    return (x - mean) / (var + 1e-6).sqrt()


class BeitV2MIM(nn.Module):
    """BEiT v2 pretraining model: ViT with a shared relative position bias, a mask token, a patch-aggregation
    head (`cls_pt_layers`) and a shared LM head over the tokenizer's codebook.

    `forward(images, mask)` returns `(logits, aggregation_logits)`, each `[B * num_masked, vocab_size]`: the
    LM head applied to the final patch tokens and to the aggregation head's patch tokens at the masked
    positions (image-major, ascending position), i.e. `lm_head(norm(tokens))[mask]`.
    """

    def __init__(
            self,
            img_size: int = 224,
            patch_size: int = 16,
            in_chans: int = 3,
            embed_dim: int = 768,
            depth: int = 12,
            num_heads: int = 12,
            mlp_ratio: float = 4.0,
            init_values: float = 0.1,
            early_layers: int = 9,
            head_layers: int = 2,
            vocab_size: int = 8192,
            num_masked_patches: int = 75,
            drop_path_rate: float = 0.0,
            init_std: float = 0.02,
            attention: str = "sdpa",
            target: str = "codes",
    ):
        """
        Args:
            img_size: Input image size (square).
            patch_size: Patch size.
            in_chans: Number of input channels.
            embed_dim: Transformer width.
            depth: Number of backbone blocks.
            num_heads: Attention heads.
            mlp_ratio: MLP hidden width as a multiple of `embed_dim`.
            init_values: Initial layer-scale gamma (0.1 base, 1e-5 large); 0 disables layer scale.
            early_layers: The aggregation head reads the patch tokens after this many backbone blocks
                (9 base, 21 large).
            head_layers: Blocks in the aggregation head (`cls_pt_layers`); 0: no aggregation head (the ablation
                of the paper's patch aggregation: `forward` returns `(logits, None)`).
            vocab_size: Tokenizer codebook size (LM head outputs).
            num_masked_patches: Default masked patches per image for `forward` (the static count).
            drop_path_rate: Stochastic depth rate; linear over `max(depth, early_layers + head_layers)` slots,
                the head taking slots `early_layers ...` as in the official code.
            init_std: Std of the truncated-normal init (truncated at +-std).
            attention: Attention kernel: `sdpa` (`F.scaled_dot_product_attention`, the bias as mask), `flex`
                (FlexAttention adding the bias in the kernel; CUDA for training) or `explicit` (softmax in
                Python, for debugging and attention maps). All three compute the same function.
            target: `codes` (the head gives `vocab_size` logits per masked patch) or `pixels` (it regresses the
                patch's `patch_size**2 * in_chans` normalised pixels, see `patch_pixel_targets`; `vocab_size` is
                unused).
        """
        super().__init__()
        self.arch_kwargs: dict[str, Any] = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        if img_size % patch_size:
            raise ValueError(f"img_size={img_size} must be a multiple of patch_size={patch_size}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} must be divisible by num_heads={num_heads}")
        if not 1 <= early_layers <= depth or head_layers < 0:
            raise ValueError(f"need 1 <= early_layers ({early_layers}) <= depth ({depth}) and head_layers "
                             f"({head_layers}) >= 0")
        if target not in MIM_TARGETS:
            raise ValueError(f"target={target!r} must be one of {', '.join(MIM_TARGETS)}")
        num_patches = (img_size // patch_size) ** 2
        if not 1 <= num_masked_patches <= num_patches:
            raise ValueError(f"num_masked_patches={num_masked_patches} must be in [1, {num_patches}]")
        self.embed_dim = embed_dim
        self.early_layers = early_layers
        self.num_masked_patches = num_masked_patches
        self.grad_checkpointing = False

        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                                      embed_dim=embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.rel_pos_bias = RelativePositionBias(window_size=self.patch_embed.grid_size, num_heads=num_heads)
        dpr = calculate_drop_path_rates(drop_path_rate, max(depth, early_layers + head_layers))
        block = partial(Block, dim=embed_dim, num_heads=num_heads, qkv_bias=True, mlp_ratio=mlp_ratio,
                        init_values=init_values, norm_layer=partial(nn.LayerNorm, eps=1e-6))
        self.blocks = nn.ModuleList([block(drop_path=dpr[i]) for i in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        # The same head for either target (so files, exports and fine-tuning treat both alike), sized for it.
        self.lm_head = nn.Linear(embed_dim, vocab_size if target == "codes" else patch_size ** 2 * in_chans)
        self._init_weights(init_std)
        # Created after the init pass, as in the official code: the aggregation blocks keep PyTorch's default
        # Linear init and only get the depth rescale below.
        self.cls_pt_layers = nn.ModuleList([block(drop_path=dpr[early_layers + i]) for i in range(head_layers)])
        self._rescale(self.cls_pt_layers, first_layer_id=early_layers + 1)
        self.set_attention(attention)

    @torch.no_grad()
    def _init_weights(self, std: float) -> None:
        """Truncated normal (+-std) for tokens, Linear and Conv weights; zero biases; unit LayerNorms."""
        init = partial(trunc_normal_, std=std, a=-std, b=std)
        init(self.cls_token)
        init(self.mask_token)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                init(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # Shared bias table starts at zero, q/v biases at zero, gammas at init_values: timm already does that.
        self._rescale(self.blocks, first_layer_id=1)

    @staticmethod
    @torch.no_grad()
    def _rescale(blocks: nn.ModuleList, first_layer_id: int) -> None:
        """Divide each block's residual-branch output weights by sqrt(2 * layer_id) (BEiT init)."""
        for layer_id, blk in enumerate(blocks, start=first_layer_id):
            blk.attn.proj.weight.div_(math.sqrt(2.0 * layer_id))
            blk.mlp.fc2.weight.div_(math.sqrt(2.0 * layer_id))

    def set_attention(self, kernel: str) -> None:
        """Switch every block's attention kernel (`sdpa`, `flex` or `explicit`); weights are untouched."""
        set_attention_kernel((*self.blocks, *self.cls_pt_layers), kernel)
        self.arch_kwargs["attention"] = kernel

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass (non-reentrant activation checkpointing)."""
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Parameter names exempt from weight decay by name, as the official model lists them (`cls_token`;
        it would list `pos_embed`, which this model does not have). 1-d parameters and biases are exempt by
        rule in the optimizer; the official recipe does decay `mask_token` and the relative position table."""
        return {"cls_token"}

    @property
    def num_patches(self) -> int:
        """Patches per image."""
        return self.patch_embed.num_patches

    def _block(self, blk: Block, x: torch.Tensor, bias: torch.Tensor, keep: torch.Tensor | None = None
               ) -> torch.Tensor:
        run = blk if keep is None else partial(block_at_rows, blk, keep=keep)
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(run, x, shared_rel_pos_bias=bias, use_reentrant=False)
        return run(x, shared_rel_pos_bias=bias)

    def forward_features(self, images: torch.Tensor, mask: torch.Tensor | None = None,
                         keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Backbone and aggregation-head tokens, before the final norm (None for a model without the head).

        Args:
            images: `[B, C, H, W]`, normalised.
            mask: Optional bool `[B, num_patches]`; True patches are replaced by the mask token.
            keep: Optional `[B, R]` token indices (0 is the CLS token, which the aggregation head reads and so must
                come first): the only rows the caller reads. The last backbone block (unless the head reads its
                patch tokens) and the last head block then run their MLP, two thirds of a block's FLOPs, on these
                rows alone; the attention still reads every token.

        Returns:
            `(tokens, aggregation_tokens)`, each `[B, 1 + num_patches, embed_dim]` with the CLS token first, or
            `[B, R, embed_dim]`, the rows `keep`, when it is given.
        """
        x = self.patch_embed(images)
        if mask is not None:
            # Replace before the CLS token is prepended, so that mask indices are patch indices.
            x = torch.where(mask.unsqueeze(-1), self.mask_token, x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        bias = self.rel_pos_bias()
        depth, has_head = len(self.blocks), len(self.cls_pt_layers) > 0
        early = x
        for i, blk in enumerate(self.blocks):
            last = i + 1 == depth and not (has_head and self.early_layers == depth)
            x = self._block(blk, x, bias, keep if last else None)
            if i + 1 == self.early_layers:
                early = x
        if keep is not None and has_head and self.early_layers == depth:
            x = x.gather(1, keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        if not has_head:
            return x, None
        # The head sees the final CLS token with the early patch tokens (the paper's patch aggregation).
        agg = torch.cat([x[:, :1], early[:, 1:]], dim=1)
        for i, blk in enumerate(self.cls_pt_layers):
            agg = self._block(blk, agg, bias, keep if i + 1 == len(self.cls_pt_layers) else None)
        return x, agg

    def forward(self, images: torch.Tensor, mask: torch.Tensor, num_masked: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (or, with `target="pixels"`, pixel predictions) of the masked patches from the backbone and from
        the aggregation head.

        Args:
            images: `[B, C, H, W]`, normalised.
            mask: Bool `[B, num_patches]` with the same number of True values in every row.
            num_masked: That number; defaults to `num_masked_patches`. A Python int, so shapes stay static.

        Returns:
            `(logits, aggregation_logits)`, each `[B * num_masked, vocab_size]`, image-major with positions
            ascending: the rows of `lm_head(norm(tokens))[mask]`; `aggregation_logits` is None without the head.
        """
        k = self.num_masked_patches if num_masked is None else num_masked
        masked = masked_positions(mask, k) + 1   # token indices: the CLS token is row 0
        x, agg = self.forward_features(images, mask, keep=torch.cat([torch.zeros_like(masked[:, :1]), masked], 1))
        if agg is None:
            return self.lm_head(self.norm(x[:, 1:].flatten(0, 1))), None
        # Norm and LM head only on the masked tokens (they act per token), both streams in one matmul.
        picked = torch.cat([x[:, 1:], agg[:, 1:]]).flatten(0, 1)
        logits = self.lm_head(self.norm(picked))
        return logits[:x.shape[0] * k], logits[x.shape[0] * k:]

    def flops_per_image(self, num_masked: int | None = None) -> float:
        """Approximate training FLOPs per image (forward + backward = 3x forward) of this model, for MFU.

        Args:
            num_masked: Masked patches per image (LM-head rows); defaults to `num_masked_patches`.
        """
        k = self.num_masked_patches if num_masked is None else num_masked
        d, depth, has_head = self.embed_dim, len(self.blocks) + len(self.cls_pt_layers), len(self.cls_pt_layers) > 0
        hidden = int(self.arch_kwargs["mlp_ratio"] * d)
        # `forward` skips the MLP of the unread rows in the last head block and the last backbone block.
        pruned_blocks = int(has_head) + int(not has_head or self.early_layers < len(self.blocks))
        rows_skipped = (self.num_patches - k) * pruned_blocks
        fwd = (patch_embed_flops(self.num_patches, self.patch_embed.proj.in_channels,
                                 self.patch_embed.patch_size[0], d)
               + vit_blocks_flops(d, depth, self.num_patches + 1, self.arch_kwargs["mlp_ratio"])
               - 2 * linear_flops(rows_skipped, d, hidden)
               + linear_flops((2 if has_head else 1) * k, d, self.lm_head.out_features))
        return TRAIN_FACTOR * fwd


# Named architectures: keyword arguments of `BeitV2MIM` (defaults are the official base model).
MIM_ARCHS: dict[str, dict[str, Any]] = {
    "beit_base_patch16_224_8k_vocab_cls_pt": dict(
        embed_dim=768, depth=12, num_heads=12, init_values=0.1, early_layers=9),
    "beit_large_patch16_224_8k_vocab_cls_pt": dict(
        embed_dim=1024, depth=24, num_heads=16, init_values=1e-5, early_layers=21),
    # CPU demo, matching the `vqkd_small_demo` tokenizer: 64 px, 8 px patches (8 x 8), 512 codes.
    "beitv2_small_demo": dict(
        img_size=48, patch_size=8, embed_dim=192, depth=6, num_heads=3, early_layers=4, head_layers=2,
        vocab_size=512, num_masked_patches=14),
    # Tests, matching the `vqkd_tiny_test` tokenizer: 32 px, 8 px patches (4 x 4), 64 codes.
    "beitv2_tiny_test": dict(
        img_size=32, patch_size=8, embed_dim=64, depth=3, num_heads=2, early_layers=2, head_layers=2,
        vocab_size=64, num_masked_patches=6),
}

def build_mim_model(arch: str | Mapping[str, Any] = "beit_base_patch16_224_8k_vocab_cls_pt",
                    **overrides: Any) -> BeitV2MIM:
    """Build a MIM model from a named architecture (or a dict of `BeitV2MIM` arguments) plus overrides.

    Args:
        arch: A key of `MIM_ARCHS`, or the `arch_kwargs` of a saved model.
        **overrides: `BeitV2MIM` arguments replacing the architecture's, e.g. `vocab_size=1024`,
            `drop_path_rate=0.1`, `attention="explicit"`.

    Raises:
        ValueError: unknown architecture name or override key.
    """
    return build_from_registry(BeitV2MIM, MIM_ARCHS, _kernel_from_switch(arch), _kernel_from_switch(overrides),
                               "MIM")


def _kernel_from_switch(kwargs: str | Mapping[str, Any]) -> str | Mapping[str, Any]:
    """Settings (or files) from when the attention kernel was the on/off switch `fused_attn`."""
    if isinstance(kwargs, str) or "fused_attn" not in kwargs:
        return kwargs
    return {**{k: v for k, v in kwargs.items() if k != "fused_attn"},
            "attention": "sdpa" if kwargs["fused_attn"] else "explicit"}


def read_mim_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], Any]:
    """`(state_dict, saved arch or None)` from an official or our file, without unpickling objects.

    Accepts `{"model"|"module"|"state_dict": sd, ...}`, a bare state dict, or safetensors (an `arch` JSON entry
    in its metadata is honoured). `relative_position_index` buffers are dropped (timm derives them).
    """
    sd, arch = read_weights_file(path, "BEiT v2 MIM model", FILE_FORMAT)
    return {k: v for k, v in sd.items() if not k.endswith("relative_position_index")}, arch


def _infer_arch(sd: Mapping[str, torch.Tensor], path: str) -> dict[str, Any]:
    """Architecture of an arch-less file from its shapes; `early_layers` is not in the weights, so the
    backbone must match a registered architecture."""
    try:
        width, chans, patch, _ = sd["patch_embed.proj.weight"].shape
        rows, heads = sd["rel_pos_bias.relative_position_bias_table"].shape
        vocab = sd["lm_head.weight"].shape[0]
        mlp_ratio = sd["blocks.0.mlp.fc1.weight"].shape[0] / width
        depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
        head_layers = 1 + max((int(k.split(".")[1]) for k in sd if k.startswith("cls_pt_layers.")), default=-1)
    except (KeyError, ValueError):
        raise ValueError(f"{path} is not a BEiT v2 MIM checkpoint (expected patch_embed, rel_pos_bias, blocks, "
                         f"cls_pt_layers and lm_head keys)") from None
    grid = (math.isqrt(rows - 3) + 1) // 2   # rows = (2 * grid - 1) ** 2 + 3
    shape = dict(img_size=grid * patch, patch_size=patch, embed_dim=width, depth=depth, num_heads=heads)
    defaults = {k: p.default for k, p in inspect.signature(BeitV2MIM.__init__).parameters.items() if k != "self"}
    for name, arch in MIM_ARCHS.items():
        kwargs = {**defaults, **arch}
        if all(kwargs[k] == v for k, v in shape.items()):
            has_gamma = "blocks.0.gamma_1" in sd
            init_values = (kwargs["init_values"] or 0.1) if has_gamma else 0.0
            return dict(arch, in_chans=chans, mlp_ratio=mlp_ratio, vocab_size=vocab, head_layers=head_layers,
                        init_values=init_values)
    raise ValueError(f"{path}: no registered MIM arch has backbone {shape}; pass arch= (early_layers is not "
                     f"stored in the weights)")


def load_mim_model(path: str | os.PathLike, arch: str | Mapping[str, Any] | None = None,
                    **overrides: Any) -> BeitV2MIM:
    """Load a MIM model from an official release or one of our files (strict, weights only).

    Args:
        path: Checkpoint file (`.pth`/`.pt` via `torch.load(weights_only=True)`, or `.safetensors`).
        arch: Architecture name or kwargs; by default the file's own `arch` entry, else inferred from shapes.
        **overrides: Non-shape settings to change, e.g. `drop_path_rate`, `attention`, `num_masked_patches`.

    Raises:
        ValueError: unreadable file, or weights that do not match the architecture (one line: the file and
            the first missing, unexpected and mis-shaped keys).
    """
    sd, saved_arch = read_mim_file(path)
    arch = arch if arch is not None else saved_arch if saved_arch is not None else _infer_arch(sd, os.fspath(path))
    model = build_mim_model(arch, **overrides)
    name = arch if isinstance(arch, str) else "(arch from file)"
    return load_strict(model, sd, os.fspath(path), f"MIM arch {name}")


def save_mim_model(model: BeitV2MIM, path: str | os.PathLike,
                    state_dict: Mapping[str, torch.Tensor] | None = None) -> None:
    """Write `{"model", "arch", "format"}` atomically (fp32, CPU); `load_mim_model` reads it back.

    Args:
        model: The model (its `arch_kwargs` are saved).
        path: Output file.
        state_dict: Weights to save instead of `model.state_dict()` (e.g. consolidated from ZeRO shards).
    """
    # The kernel is a run-time choice (flex trains on CUDA only), not part of the architecture.
    arch = {k: v for k, v in model.arch_kwargs.items() if k != "attention"}
    save_weights_file(path, state_dict if state_dict is not None else model.state_dict(), arch, FILE_FORMAT)
