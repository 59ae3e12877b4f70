"""Frozen features of a backbone for linear probing and k-NN: one vector per image, streamed to disk.

`FrozenFeatures` reads images in [0, 1] and gives `[B, D]` from any of: a MIM checkpoint (ours or an official
`*_cls_pt` release; also `random`, the same arch untrained), a tokenizer's encoder, or a classifier-layout file.
Pooling: `cls` (the CLS token), `mean` (mean of the patch tokens), both through the backbone's final norm, or
`agg_cls` (the CLS token out of the patch-aggregation head, MIM checkpoints only). `layer` picks the block
(1..depth; 0 = the last).
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

import numpy as np
import torch
from timm.models.beit import Block as BeitBlock
from torch import nn

from data_tools.gpu_augment import normalize
from engine.storage.files import OutputPathError, write_text_atomically
from engine.storage.weights import read_weights_file
from pretrain.block_rows import block_at_rows, embed_tokens

POOLINGS = ("cls", "mean", "agg_cls")


def checkpoint_kind(path: str) -> str:
    """`tokenizer`, `mim` or `classifier`: what a weights file of ours, an official release or a timm file holds,
    told by its keys (the quantizer; the shared position bias with the MIM head; a patch embedding).

    Raises:
        ValueError: none of them (one line naming the file).
    """
    from finetune.model import FILE_FORMAT as CLS_FORMAT
    from pretrain.mim.model import FILE_FORMAT as MIM_FORMAT
    from pretrain.tokenizer.model import FILE_FORMAT as TOK_FORMAT
    sd, _ = read_weights_file(path, "model", (MIM_FORMAT, TOK_FORMAT, CLS_FORMAT))
    if any(k.startswith("quantize.") for k in sd):
        return "tokenizer"
    if "rel_pos_bias.relative_position_bias_table" in sd and "lm_head.weight" in sd:
        return "mim"
    if "patch_embed.proj.weight" in sd:
        return "classifier"
    raise ValueError(f"{path} is not a BEiT v2 model (no patch_embed, quantize or rel_pos_bias weights): pass a "
                     f"mim.pt, tokenizer.pt, classifier.pt, an official release or an exported folder")


class FrozenFeatures(nn.Module):
    """Images in [0, 1] `[B, 3, H, W]` -> features `[B, D]` (fp32) of a frozen backbone; see the module doc.

    Args:
        checkpoint: a backbone file, or `random` (with `arch`, a MIM arch name).
        arch: MIM arch for `random`; classifier arch for classifier-layout files that do not record theirs.
        layer: block whose output is pooled (1..depth); 0 = the last.
        pooling: `cls`, `mean` or `agg_cls`.
    """

    def __init__(self, checkpoint: str, arch: str = "", layer: int = 0, pooling: str = "cls"):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"--pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
        if checkpoint == "random":
            from pretrain.mim import build_mim_model
            if not arch:
                raise ValueError("checkpoint 'random' needs --arch (a MIM arch, e.g. beitv2_small_demo)")
            self.kind, model = "mim", build_mim_model(arch)
        else:
            self.kind = checkpoint_kind(checkpoint)
            model = self._load(checkpoint, arch)
        self.model = model.eval().requires_grad_(False)
        self.vit = model.encoder if self.kind == "tokenizer" else model
        # The final norm the backbone was trained with: the MIM model's `norm`, the encoders' `fc_norm`.
        self.norm = model.norm if self.kind == "mim" else self.vit.fc_norm
        depth = len(self.vit.blocks)
        if not 0 <= layer <= depth:
            raise ValueError(f"--layer must be in 1..{depth} (0 = the last block), got {layer}")
        if pooling == "agg_cls" and (self.kind != "mim" or layer not in (0, depth) or not len(model.cls_pt_layers)):
            raise ValueError("--pooling=agg_cls needs a MIM checkpoint (it has the aggregation head) and the last "
                             "layer")
        self.layer, self.pooling = layer or depth, pooling
        self.img_size = self.vit.patch_embed.img_size[0]
        self.dim = self.vit.embed_dim

    def _load(self, path: str, arch: str) -> nn.Module:
        if self.kind == "tokenizer":
            from pretrain.tokenizer import load_tokenizer
            return load_tokenizer(path)
        if self.kind == "mim":
            from pretrain.mim import load_mim_model
            return load_mim_model(path)
        from finetune.model import build_classifier, load_classifier
        return build_classifier(arch, 0, path) if arch else load_classifier(path)

    def _tokens(self, x01: torch.Tensor) -> torch.Tensor:
        """Tokens `[B, 1 + N, D]` after block `layer` (the aggregation head's output for `agg_cls`; for `cls`
        pooling of a BEiT backbone only the CLS row, `[B, 1, D]`)."""
        if self.kind == "mim":
            x = normalize(x01)
            if self.pooling == "agg_cls":
                return self.model.forward_features(x)[1]
        else:   # the tokenizer's encoder reads [-1, 1]; classifiers read ImageNet-normalised pixels
            x = x01 * 2 - 1 if self.kind == "tokenizer" else normalize(x01)
        vit = self.vit
        x, bias = embed_tokens(vit, x)
        for i, blk in enumerate(vit.blocks[:self.layer]):
            if i + 1 == self.layer and self.pooling == "cls" and isinstance(blk, BeitBlock):
                # Only the CLS row is read: the last block's MLP runs on it alone (same values, 1/N of the rows).
                return block_at_rows(blk, x, bias, keep=torch.zeros_like(x[:, :1, 0], dtype=torch.long))
            x = blk(x, shared_rel_pos_bias=bias)
        return x

    @torch.no_grad()
    def forward(self, x01: torch.Tensor) -> torch.Tensor:
        tokens = self._tokens(x01)
        pooled = tokens[:, 1:].mean(1) if self.pooling == "mean" else tokens[:, 0]
        return self.norm(pooled).float()


class FeatureFile:
    """Features and labels of one rank's shard, appended batch by batch to `<prefix>.f32` / `<prefix>.labels` and
    read back memory-mapped, so a split of any size never sits in memory whole. `<prefix>.done` (written last,
    atomically) records the number of images and marks a complete file, which later runs reuse only when both files
    have the sizes it implies (a truncated or swapped file is computed again)."""

    def __init__(self, prefix: str, dim: int):
        self.prefix, self.dim = prefix, dim

    @property
    def complete(self) -> bool:
        try:
            with open(self.prefix + ".done") as f:
                n = int(f.read().strip())
            return n >= 0 and os.path.getsize(self.prefix + ".f32") == n * self.dim * 4 \
                and os.path.getsize(self.prefix + ".labels") == n * 8
        except (OSError, ValueError):
            return False

    def write(self, batches: Iterator[tuple[torch.Tensor, torch.Tensor]]) -> int:
        """Compute and store; a full or unwritable folder is one line naming it (nothing partial is left)."""
        n = 0
        names = [self.prefix + ext for ext in (".done", ".f32", ".labels")]
        try:
            os.makedirs(os.path.dirname(self.prefix) or ".", exist_ok=True)
            if os.path.exists(names[0]):
                os.remove(names[0])   # the old record must not vouch for the files being rewritten
            with open(names[1], "wb") as f, open(names[2], "wb") as g:
                for feats, labels in batches:
                    f.write(feats.detach().cpu().numpy().astype(np.float32).tobytes())
                    g.write(labels.detach().cpu().numpy().astype(np.int64).tobytes())
                    n += len(labels)
            write_text_atomically(names[0], str(n))
        except (OSError, OutputPathError) as e:
            for name in names:
                with contextlib.suppress(OSError):
                    os.remove(name)
            cause = e.__cause__ if isinstance(e, OutputPathError) and isinstance(e.__cause__, OSError) else e
            why = getattr(cause, "strerror", None) or str(cause)
            raise OutputPathError(f"cannot write the features to {os.path.dirname(self.prefix) or '.'} ({why}); "
                                  f"free space there or pass another --cache_dir (none: a temporary folder)") from None
        return n

    def read(self) -> tuple[np.ndarray, np.ndarray]:
        """(features [n, dim] float32, labels [n] int64), memory-mapped."""
        if os.path.getsize(self.prefix + ".f32") == 0:
            return np.zeros((0, self.dim), np.float32), np.zeros(0, np.int64)
        # Copy-on-write: writable, never written.
        feats = np.memmap(self.prefix + ".f32", dtype=np.float32, mode="c").reshape(-1, self.dim)
        return feats, np.memmap(self.prefix + ".labels", dtype=np.int64, mode="c")


def extract(model: FrozenFeatures, batches, prefix: str, device: torch.device) -> FeatureFile:
    """Run `model` over labelled `batches` and stream this rank's features to disk under `prefix`, unless a
    complete file is there already (then `batches` is never read)."""
    out = FeatureFile(prefix, model.dim)
    if not out.complete:
        model.to(device)
        out.write((model(b["image"]), b["label"]) for b in batches)
    return out
