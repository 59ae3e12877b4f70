"""VQ-KD visual tokenizer (BEiT v2): ViT encoder -> l2-normalised EMA codebook -> ViT decoder -> teacher features.

The encoder and decoder are timm `Beit` models with absolute position embeddings, no relative position bias and
no layer scale, which gives exactly the official key layout (`encoder.blocks.0.attn.q_bias`, ...).
"""
from __future__ import annotations

import math
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm
from timm.models.beit import Beit
from torch import nn

from engine.config.registry import build_from_registry
from engine.loop.flops import TRAIN_FACTOR, linear_flops, patch_embed_flops, vit_blocks_flops
from engine.storage.weights import load_strict, read_weights_file, save_weights_file
from pretrain.block_rows import block_at_rows, embed_tokens
from pretrain.tokenizer.quantizer import NormEMAQuantizer, l2norm

FILE_FORMAT = "beitv2-ds/tokenizer/1"


def _vit(img_size: int, patch_size: int, in_chans: int, width: int, depth: int, heads: int, mlp_ratio: float,
         drop_path: float) -> Beit:
    return Beit(img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=0, global_pool="avg",
                embed_dim=width, depth=depth, num_heads=heads, mlp_ratio=mlp_ratio, drop_path_rate=drop_path,
                norm_layer=partial(LayerNorm, eps=1e-6), init_values=None, use_abs_pos_emb=True,
                use_rel_pos_bias=False)


def _task_layer(width: int, out_dim: int) -> nn.Sequential:
    layer = nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, out_dim))
    for m in layer:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
    return layer


def _fp32_mlp(layer: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """Run Linear-Tanh-Linear in fp32 whatever the weights' or autocast's dtype (the quantizer is sensitive)."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        x = x.float()
        for m in layer:
            x = F.linear(x, m.weight.float(), m.bias.float()) if isinstance(m, nn.Linear) else m(x)
    return x


class VQKD(nn.Module):
    """Vector-quantized knowledge-distillation tokenizer.

    Args:
        img_size: input side in pixels.
        patch_size: encoder patch size; the code grid is img_size / patch_size per side.
        encoder_width, encoder_depth, encoder_heads: encoder ViT.
        decoder_width, decoder_depth, decoder_heads: decoder ViT over the code grid (patch size 1).
        mlp_ratio: MLP expansion in both ViTs.
        num_codes, code_dim: codebook size (8192 x 32 officially).
        teacher_dim: output size of the decoder head (512 CLIP, 768 DINO, 112 EfficientNet-Lite0).
        beta: commitment loss weight.
        decay: codebook EMA decay.
        kmeans_init: k-means initialisation on the first training batch.
        dead_code_threshold, restart_interval: dead-code restart (0 disables, the official behaviour).
        drop_path: stochastic depth in the encoder.
        seed: seed for the quantizer's rank-synchronised draws.
    """

    def __init__(self, img_size: int = 224, patch_size: int = 16, encoder_width: int = 768, encoder_depth: int = 12,
                 encoder_heads: int = 12, decoder_width: int = 768, decoder_depth: int = 3, decoder_heads: int = 12,
                 mlp_ratio: float = 4.0, num_codes: int = 8192, code_dim: int = 32, teacher_dim: int = 512,
                 beta: float = 1.0, decay: float = 0.99, kmeans_init: bool = True, dead_code_threshold: float = 0.0,
                 restart_interval: int = 100, drop_path: float = 0.0, seed: int = 0):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        self.arch_kwargs = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        self.img_size, self.patch_size = img_size, patch_size
        self.grid = (img_size // patch_size, img_size // patch_size)
        self.num_codes, self.code_dim, self.teacher_dim = num_codes, code_dim, teacher_dim
        self.encoder = _vit(img_size, patch_size, 3, encoder_width, encoder_depth, encoder_heads, mlp_ratio,
                            drop_path)
        self.decoder = _vit(self.grid[0], 1, code_dim, decoder_width, decoder_depth, decoder_heads, mlp_ratio, 0.0)
        self.quantize = NormEMAQuantizer(num_codes, code_dim, beta=beta, decay=decay, kmeans_init=kmeans_init,
                                         dead_code_threshold=dead_code_threshold, restart_interval=restart_interval,
                                         seed=seed)
        self.encode_task_layer = _task_layer(encoder_width, code_dim)
        self.decode_task_layer = _task_layer(decoder_width, teacher_dim)

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    def no_weight_decay(self) -> set[str]:
        return {"encoder.cls_token", "encoder.pos_embed", "decoder.cls_token", "decoder.pos_embed"}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.encoder.set_grad_checkpointing(enable)
        self.decoder.set_grad_checkpointing(enable)

    def _patch_tokens(self, vit: Beit, x: torch.Tensor) -> torch.Tensor:
        tokens = vit.forward_features(x)
        return vit.fc_norm(tokens[:, vit.num_prefix_tokens:])

    def encoder_rows(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """The encoder's patch tokens at `rows` (`[B, R]` patch indices) as `_patch_tokens` gives them, `[B, R, D]`:
        timm's `Beit.forward_features` with the last block's MLP on those rows alone (the MIM step reads only the
        masked patches' codes)."""
        vit = self.encoder
        x, bias = embed_tokens(vit, x)
        for blk in vit.blocks[:-1]:
            x = blk(x, shared_rel_pos_bias=bias)
        x = block_at_rows(vit.blocks[-1], x, bias, keep=rows + vit.num_prefix_tokens)
        return vit.fc_norm(vit.norm(x))

    def encode(self, images: torch.Tensor):
        """images: RGB in [0, 1], [B, 3, H, W]. Returns (z_q [B, N, code_dim], commitment loss, codes [B, N], stats)."""
        x = images.to(self.encoder.patch_embed.proj.weight.dtype) * 2 - 1
        z = _fp32_mlp(self.encode_task_layer, self._patch_tokens(self.encoder, x))
        return self.quantize(z)

    def decode(self, z_q: torch.Tensor) -> torch.Tensor:
        """Quantized codes [B, N, code_dim] -> predicted teacher features [B, N, teacher_dim]."""
        b, n, c = z_q.shape
        grid = z_q.transpose(1, 2).reshape(b, c, *self.grid).to(self.decoder.patch_embed.proj.weight.dtype)
        return self.decode_task_layer(self._patch_tokens(self.decoder, grid))

    def forward(self, images: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Training step: images in [0, 1] and teacher features [B, N, teacher_dim] -> (loss, metrics)."""
        z_q, commit_loss, _, stats = self.encode(images)
        rec = self.decode(z_q)
        cosine = F.cosine_similarity(rec.float(), target.float(), dim=-1).mean()
        rec_loss = 1 - cosine
        loss = rec_loss + commit_loss
        return loss, {"rec_loss": rec_loss.detach(), "commit_loss": commit_loss.detach(),
                      "teacher_cosine": cosine.detach(), **stats}

    @torch.no_grad()
    def get_codebook_indices(self, images: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids [B, num_patches] for RGB images in [0, 1]; never updates the codebook. With `rows` (`[B, R]`
        patch indices), the ids of those patches only, [B, R], for less work: the same ids.

        Only the nearest-code search: no straight-through output, loss or statistics (this runs every MIM step).
        """
        was_training = self.training
        if was_training:   # drop path off; a frozen tokenizer is already in eval mode
            self.eval()
        try:
            x = images.to(self.encoder.patch_embed.proj.weight.dtype) * 2 - 1
            tokens = self._patch_tokens(self.encoder, x) if rows is None else self.encoder_rows(x, rows)
            z = _fp32_mlp(self.encode_task_layer, tokens)
            with torch.autocast(device_type=z.device.type, enabled=False):
                flat = l2norm(z.float()).reshape(-1, self.quantize.code_dim)
                return self.quantize.nearest(flat).view(z.shape[:-1])
        finally:
            if was_training:
                self.train()

    def flops_per_image(self, teacher_flops: float = 0.0) -> float:
        """Approximate training FLOPs per image (forward + backward = 3x forward), for MFU."""
        n, mlp = self.num_patches + 1, self.arch_kwargs["mlp_ratio"]
        enc, dec = self.encoder, self.decoder
        fwd = (vit_blocks_flops(enc.embed_dim, len(enc.blocks), n, mlp)
               + vit_blocks_flops(dec.embed_dim, len(dec.blocks), n, mlp)
               + patch_embed_flops(self.num_patches, 3, self.patch_size, enc.embed_dim)
               + linear_flops(self.num_patches, self.code_dim, self.num_codes))   # code distances
        return TRAIN_FACTOR * fwd + teacher_flops


_BASE = dict(img_size=224, patch_size=16, encoder_width=768, encoder_depth=12, encoder_heads=12, decoder_width=768,
             decoder_heads=12, num_codes=8192, code_dim=32)
ARCHS: dict[str, dict[str, Any]] = {
    "vqkd_encoder_base_decoder_1x768x12_clip": dict(_BASE, decoder_depth=1, teacher_dim=512),
    "vqkd_encoder_base_decoder_3x768x12_clip": dict(_BASE, decoder_depth=3, teacher_dim=512),
    "vqkd_encoder_base_decoder_1x768x12_dino": dict(_BASE, decoder_depth=1, teacher_dim=768),
    # Small tokenizer for the CPU demo: 48 px, 8 px patches (6 x 6 codes), EfficientNet-Lite0 teacher at 96 px.
    "vqkd_small_demo": dict(img_size=48, patch_size=8, encoder_width=192, encoder_depth=4, encoder_heads=3,
                            decoder_width=192, decoder_depth=1, decoder_heads=3, num_codes=512, code_dim=32,
                            teacher_dim=112),
    # Tiny tokenizer for tests.
    "vqkd_tiny_test": dict(img_size=32, patch_size=8, encoder_width=64, encoder_depth=2, encoder_heads=2,
                           decoder_width=64, decoder_depth=1, decoder_heads=2, num_codes=64, code_dim=16,
                           teacher_dim=112),
}


def build_tokenizer(arch: str, **overrides) -> VQKD:
    """Build a tokenizer from a named architecture; keyword overrides replace its settings."""
    return build_from_registry(VQKD, ARCHS, arch, overrides, "tokenizer")


# Tensors in official files that our model does not keep: the teacher and its input scaling, loss modules,
# and the EmbeddingEMA statistics the official update never reads.
_DROP_PREFIXES = ("teacher", "scaling", "loss")
_LEGACY_KEYS = ("quantize.embedding.cluster_size", "quantize.embedding.embed_avg")
_OUR_EXTRA_BUFFERS = ("quantize.num_updates", "quantize.num_restarted")


def _infer_arch(sd: dict, path: str) -> dict:
    """Architecture of an official (or arch-less) tokenizer file, from its tensor shapes."""
    try:
        enc_depth = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.blocks."))
        dec_depth = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("decoder.blocks."))
        width = sd["encoder.cls_token"].shape[-1]
        dec_width = sd["decoder.cls_token"].shape[-1]
        patch = sd["encoder.patch_embed.proj.weight"].shape[-1]
        num_patches = sd["encoder.pos_embed"].shape[1] - 1
        codes, code_dim = sd["quantize.embedding.weight"].shape
        teacher_dim = sd["decode_task_layer.2.weight"].shape[0]
    except (KeyError, ValueError):
        raise ValueError(f"{path} is not a VQ-KD tokenizer checkpoint (expected encoder/decoder/quantize keys)") \
            from None
    shape = dict(img_size=int(math.isqrt(num_patches)) * patch, patch_size=patch, encoder_width=width,
                 encoder_depth=enc_depth, decoder_width=dec_width, decoder_depth=dec_depth, num_codes=codes,
                 code_dim=code_dim, teacher_dim=teacher_dim)
    # The weights do not record the head count (a guess such as width // 64 silently builds another function):
    # only a registered architecture of exactly these shapes says it.
    for arch in ARCHS.values():
        if all(arch.get(k) == v for k, v in shape.items()):
            return dict(arch)
    raise ValueError(f"{path} records no arch and its shapes ({shape}) match no registered tokenizer, so its head "
                     f"count is unknown: pass the arch (--tokenizer_arch=NAME, load_tokenizer(path, arch=NAME))")


def read_tokenizer_file(path: str) -> tuple[dict, dict | None]:
    """(state_dict, arch kwargs or None) from an official or our tokenizer file, without unpickling objects."""
    sd, arch = read_weights_file(path, "VQ-KD tokenizer", FILE_FORMAT)
    return {k: v for k, v in sd.items() if not k.startswith(_DROP_PREFIXES) and k not in _LEGACY_KEYS}, arch


def load_tokenizer(path: str, arch: str | None = None, **overrides) -> VQKD:
    """Load a frozen tokenizer in eval mode from an official release or one of our files.

    Args:
        path: checkpoint (`{"model": ...}`, `{"state_dict": ...}`, a bare state dict, or safetensors).
        arch: architecture name; by default the file's own, else inferred from the shapes (official releases).
    """
    sd, saved_arch = read_tokenizer_file(path)
    if arch is not None:
        model = build_tokenizer(arch, **overrides)
    else:
        try:
            model = VQKD(**{**(saved_arch or _infer_arch(sd, path)), **overrides})
        except TypeError as e:
            raise ValueError(f"{path}: its saved arch does not build a VQ-KD tokenizer ({e})") from None
    for key in _OUR_EXTRA_BUFFERS:   # official files predate these counters
        sd.setdefault(key, model.state_dict()[key])
    sd["quantize.embedding.initted"] = sd.get("quantize.embedding.initted", torch.ones(1)).float().view(1)
    load_strict(model, sd, path, f"tokenizer arch {arch or '(inferred)'}")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def save_tokenizer(model: VQKD, path: str, state_dict: dict | None = None) -> None:
    """Write `{"model", "arch", "format"}` atomically; loads back with `load_tokenizer` (weights only)."""
    save_weights_file(path, state_dict if state_dict is not None else model.state_dict(), dict(model.arch_kwargs),
                      FILE_FORMAT)
