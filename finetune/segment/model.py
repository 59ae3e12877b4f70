"""Segmenters on a BEiT v2 backbone, in plain PyTorch with mmseg's key names: UperNet (the official ADE20K model,
`decoder="upernet"`) and the linear probe of a frozen backbone (`decoder="linear"`).

- Backbone (`BeitFeaturePyramid`): the fine-tune layout of `finetune.model` (relative position tables in every block,
  resized to the crop's grid), taking the patch tokens after four blocks, turned into strides 4, 8, 16 and 32 by the
  official neck (patch 16: two stride-2 transposed convolutions with batch norm and GELU between, one transposed
  convolution, identity, 2x2 max-pool; patch 8: one transposed convolution, identity, two max-pools).
- `UperHead`: pyramid pooling (scales 1, 2, 3, 6) on the last level, FPN fusion of all four, one 3x3 conv over their
  concatenation; `FCNHead` on the stride-16 level as the auxiliary head (loss weight 0.4 in the recipes).
Convolution blocks are conv + batch norm + ReLU with mmcv's `ConvModule` names (`conv`, `bn`), so an mmseg state
dict of this model has the same keys. Batch norm is synchronised across ranks on GPUs (`convert_sync_batchnorm`,
as the official SyncBN); torch's SyncBatchNorm needs an accelerator, so CPU ranks normalise with their own batch and
average the running statistics after every step (finetune.segment.train.AverageBatchNormStats).
- `LinearHead` (decoder "linear", the linear segmentation protocol of iBOT and DINOv2): the backbone stays frozen (no
  neck, eval mode, no gradients) and only batch norm + a 1x1 classifier over the patch-token maps of the read blocks
  (concatenated) is trained. It measures what the frozen features hold per patch, without a head of millions of
  weights that can learn the task from any features given enough steps.
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from engine.config.registry import build_from_registry, load_registered
from engine.loop.flops import TRAIN_FACTOR, patch_embed_flops, vit_blocks_flops
from engine.storage.weights import load_strict, read_weights_file, save_weights_file
from finetune.model import CLS_ARCHS, FILE_FORMAT as CLS_FILE_FORMAT, BeitClassifier, backbone_state_dict
from pretrain.mim.model import FILE_FORMAT as MIM_FILE_FORMAT

__all__ = ["SEG_ARCHS", "BeitSegmenter", "build_segmenter", "load_segmenter", "save_segmenter"]

FILE_FORMAT = "beitv2-ds/segmenter/1"
IGNORE_INDEX = 255


class ConvBNReLU(nn.Sequential):
    """mmcv's ConvModule with batch norm and ReLU (bias-free conv, kaiming fan-out init as mmcv)."""

    def __init__(self, cin: int, cout: int, kernel: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.activate = nn.ReLU(inplace=True)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")


class _SegHead(nn.Module):
    """What mmseg's decode heads share: dropout, then a 1x1 classifier initialised N(0, 0.01)."""

    def __init__(self, channels: int, num_classes: int, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        nn.init.normal_(self.conv_seg.weight, std=0.01)
        nn.init.zeros_(self.conv_seg.bias)

    def classify(self, x: Tensor) -> Tensor:
        return self.conv_seg(self.dropout(x))


def _resize(x: Tensor, size: Sequence[int]) -> Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class UperHead(_SegHead):
    """UperNet's decoder: PPM on the last level, lateral 1x1 + top-down sums, 3x3 FPN convs, fused 3x3 conv."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, pool_scales: Sequence[int] = (1, 2, 3, 6),
                 levels: int = 4, dropout: float = 0.1):
        super().__init__(channels, num_classes, dropout)
        self.psp_modules = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvBNReLU(in_channels, channels))
                                         for s in pool_scales)
        self.bottleneck = ConvBNReLU(in_channels + len(pool_scales) * channels, channels, 3)
        self.lateral_convs = nn.ModuleList(ConvBNReLU(in_channels, channels) for _ in range(levels - 1))
        self.fpn_convs = nn.ModuleList(ConvBNReLU(channels, channels, 3) for _ in range(levels - 1))
        self.fpn_bottleneck = ConvBNReLU(levels * channels, channels, 3)

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        top = feats[-1]
        pooled = [_resize(m(top), top.shape[2:]) for m in self.psp_modules]
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, feats)]
        laterals.append(self.bottleneck(torch.cat([top, *pooled], 1)))
        for i in range(len(laterals) - 1, 0, -1):   # top-down: each level adds the coarser one, upsampled
            laterals[i - 1] = laterals[i - 1] + _resize(laterals[i], laterals[i - 1].shape[2:])
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals)] + [laterals[-1]]
        size = outs[0].shape[2:]
        fused = self.fpn_bottleneck(torch.cat([outs[0]] + [_resize(o, size) for o in outs[1:]], 1))
        return self.classify(fused)


class LinearHead(_SegHead):
    """The linear probe's decoder: batch norm of the stride-p patch-token maps (concatenated), a 1x1 classifier."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__(in_channels, num_classes, dropout=0.0)
        self.bn = nn.BatchNorm2d(in_channels)

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        return self.classify(self.bn(torch.cat(list(feats), 1)))


class FCNHead(_SegHead):
    """mmseg's FCN head as the auxiliary classifier: `num_convs` 3x3 conv blocks, then the classifier."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, num_convs: int = 1, dropout: float = 0.1):
        super().__init__(channels, num_classes, dropout)
        self.convs = nn.Sequential(*(ConvBNReLU(in_channels if i == 0 else channels, channels, 3)
                                     for i in range(num_convs)))

    def forward(self, x: Tensor) -> Tensor:
        return self.classify(self.convs(x))


class BeitFeaturePyramid(BeitClassifier):
    """The BEiT backbone of the segmenter: patch tokens after the blocks `out_indices` (0-based) as maps of strides
    4, 8, 16, 32 (see the module doc), or all at the patch stride without the neck. No final norm, pooling or head
    (official).

    Args:
        out_indices: Block indices whose outputs are returned: four with the neck, one or more without.
        neck: Turn the four maps into the pyramid; without it they stay at the patch stride.
        **kwargs: `BeitClassifier` arguments (img_size is the training crop).
    """

    def __init__(self, out_indices: Sequence[int] = (3, 5, 7, 11), neck: bool = True, **kwargs: Any):
        super().__init__(num_classes=0, **kwargs)
        self.fc_norm, self.head = nn.Identity(), nn.Identity()   # unused here: no parameters without gradients
        count = "4" if neck else "1 or more"
        if (len(out_indices) != 4 if neck else not out_indices) or not all(0 <= i < len(self.blocks)
                                                                           for i in out_indices):
            raise ValueError(f"out_indices {tuple(out_indices)} must be {count} block indices in "
                             f"[0, {len(self.blocks)})")
        self.out_indices = tuple(int(i) for i in out_indices)
        d, p = self.embed_dim, self.patch_embed.patch_size[0]
        if not neck:
            self.fpn1 = self.fpn2 = self.fpn3 = self.fpn4 = None
            return

        def up() -> nn.ConvTranspose2d:
            return nn.ConvTranspose2d(d, d, kernel_size=2, stride=2)

        if p == 16:
            self.fpn1 = nn.Sequential(up(), nn.BatchNorm2d(d), nn.GELU(), up())
            self.fpn2, self.fpn3, self.fpn4 = nn.Sequential(up()), nn.Identity(), nn.MaxPool2d(2)
        elif p == 8:
            self.fpn1, self.fpn2 = nn.Sequential(up()), nn.Identity()
            self.fpn3, self.fpn4 = nn.MaxPool2d(2), nn.MaxPool2d(4)
        else:
            raise ValueError(f"the segmentation neck needs patch size 16 or 8, got {p}")

    def forward(self, x: Tensor) -> list[Tensor]:   # type: ignore[override]
        b = x.shape[0]
        hp, wp = self.patch_embed.grid_size
        x = self.pos_drop(torch.cat([self.cls_token.expand(b, -1, -1), self.patch_embed(x)], 1))
        kept: dict[int, Tensor] = {}
        for i, blk in enumerate(self.blocks):
            x = checkpoint(blk, x, use_reentrant=False) if self.grad_checkpointing and self.training else blk(x)
            if i in self.out_indices:
                kept[i] = x[:, 1:].transpose(1, 2).reshape(b, -1, hp, wp)
            if self.fpn1 is None and i == max(self.out_indices):
                break   # no block above the last one read is needed
        if self.fpn1 is None:
            return [kept[i] for i in self.out_indices]
        return [fpn(kept[i]) for fpn, i in zip((self.fpn1, self.fpn2, self.fpn3, self.fpn4), self.out_indices)]


DECODERS = ("upernet", "linear")


class BeitSegmenter(nn.Module):
    """BEiT backbone + a decoder: UperNet decode head + FCN auxiliary head (official ADE20K model), or the linear
    probe of the frozen backbone.

    Args:
        backbone: A key of `finetune.model.CLS_ARCHS` (the backbone's shape).
        num_classes: Classes predicted per pixel (150 for ADE20K with reduce_zero_label).
        img_size: Training crop side; the backbone's position tables are sized for it.
        out_indices: Blocks whose outputs feed the pyramid (base 3, 5, 7, 11; large 7, 11, 15, 23), or the linear
            head (their maps concatenated; the last block alone by default in the linear archs).
        channels: UperNet width (768 base, 1024 large).
        aux_channels: FCN auxiliary head width (256).
        drop_path_rate: Stochastic depth of the backbone (UperNet; the frozen backbone runs in eval mode).
        dropout: Dropout before both classifiers (UperNet).
        decoder: `upernet` (fine-tunes the backbone) or `linear` (trains batch norm + a 1x1 classifier only).
    """

    def __init__(self, backbone: str = "beit_base_patch16_224", num_classes: int = 150, img_size: int = 512,
                 out_indices: Sequence[int] = (3, 5, 7, 11), channels: int = 768, aux_channels: int = 256,
                 drop_path_rate: float = 0.0, dropout: float = 0.1, decoder: str = "upernet"):
        super().__init__()
        if backbone not in CLS_ARCHS:
            raise ValueError(f"unknown backbone {backbone!r}; choose one of {', '.join(CLS_ARCHS)}")
        if decoder not in DECODERS:
            raise ValueError(f"unknown segmentation decoder {decoder!r}; choose one of {', '.join(DECODERS)}")
        self.arch_kwargs: dict[str, Any] = dict(backbone=backbone, num_classes=num_classes, img_size=img_size,
                                                out_indices=list(out_indices), channels=channels,
                                                aux_channels=aux_channels, drop_path_rate=drop_path_rate,
                                                dropout=dropout, decoder=decoder)
        shape = {**CLS_ARCHS[backbone], "img_size": img_size}
        self.frozen_backbone = decoder == "linear"
        self.backbone = BeitFeaturePyramid(out_indices, neck=not self.frozen_backbone, drop_path_rate=drop_path_rate,
                                           **shape)
        d = self.backbone.embed_dim
        if self.frozen_backbone:
            self.backbone.requires_grad_(False)
            self.decode_head: nn.Module = LinearHead(d * len(out_indices), num_classes)
            self.auxiliary_head: nn.Module | None = None
        else:
            self.decode_head = UperHead(d, channels, num_classes, dropout=dropout)
            self.auxiliary_head = FCNHead(d, aux_channels, num_classes, dropout=dropout)
        self.num_classes = num_classes

    @property
    def img_size(self) -> int:
        return self.backbone.img_size

    def train(self, mode: bool = True) -> "BeitSegmenter":
        super().train(mode)
        if self.frozen_backbone:   # no stochastic depth or dropout in a frozen backbone
            self.backbone.eval()
        return self

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """Logits of the decode head (stride 4; the linear head: the patch stride) and the auxiliary head (stride
        16; None for the linear probe), before upsampling."""
        if self.auxiliary_head is None:
            with torch.no_grad():
                feats = self.backbone(x)
            return self.decode_head(feats), None
        feats = self.backbone(x)
        return self.decode_head(feats), self.auxiliary_head(feats[2])

    def predict(self, x: Tensor) -> Tensor:
        """Decode-head logits at the input's resolution (inference)."""
        return _resize(self.decode_head(self.backbone(x)), x.shape[2:])

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.backbone.set_grad_checkpointing(enable)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """Layer ids for layer-wise lr decay: embeddings 0, backbone block i at i + 1, the neck and heads last
        (mmseg's LayerDecayOptimizerConstructor of the official code)."""
        return dict(stem=r"^backbone\.(?:cls_token|pos_embed|patch_embed|rel_pos_bias)",
                    blocks=[(r"^backbone\.blocks\.(\d+)", None)])

    def flops_per_image(self) -> float:
        """Approximate training FLOPs per crop (forward + backward = 3x forward), for MFU: backbone, neck, heads;
        the linear probe: the frozen backbone's forward up to the last block read, 3x the linear head's."""
        bb = self.backbone
        d, n, p = bb.embed_dim, bb.patch_embed.num_patches, bb.patch_embed.patch_size[0]
        hp = bb.patch_embed.grid_size[0]
        blocks = max(bb.out_indices) + 1 if self.frozen_backbone else len(bb.blocks)
        fwd = patch_embed_flops(n, bb.in_chans, p, d) + vit_blocks_flops(d, blocks, n + 1, bb.arch_kwargs["mlp_ratio"])
        if self.frozen_backbone:
            return fwd + TRAIN_FACTOR * 2 * self.decode_head.conv_seg.in_channels * self.num_classes * n
        sides = [hp * p // s for s in (4, 8, 16, 32)]   # the pyramid's map sides
        # Neck: a 2x2 stride-2 transposed conv costs 2 * d * d FLOPs per output pixel.
        ups = (2 * sides[1] ** 2 + sides[0] ** 2) if p == 16 else sides[0] ** 2
        fwd += 2 * d * d * ups
        c, k, aux = self.decode_head.conv_seg.in_channels, self.num_classes, self.auxiliary_head.conv_seg.in_channels
        conv = lambda cin, cout, kk, side: 2 * cin * cout * kk * kk * side * side   # noqa: E731
        fwd += sum(conv(d, c, 1, s) for s in (1, 2, 3, 6))                                  # PPM
        fwd += conv(d + 4 * c, c, 3, sides[3])                                             # PPM bottleneck
        fwd += sum(conv(d, c, 1, s) + conv(c, c, 3, s) for s in sides[:3])                 # laterals + FPN convs
        fwd += conv(4 * c, c, 3, sides[0]) + conv(c, k, 1, sides[0])                       # fusion + classifier
        fwd += conv(d, aux, 3, sides[2]) + conv(aux, k, 1, sides[2])                       # auxiliary head
        return TRAIN_FACTOR * fwd


_OFFICIAL_BASE = dict(backbone="beit_base_patch16_224", img_size=512, out_indices=(3, 5, 7, 11), channels=768,
                      aux_channels=256)
# Named segmenters (keyword arguments of `BeitSegmenter` without num_classes).
SEG_ARCHS: dict[str, dict[str, Any]] = {
    "upernet_beitv2_base": _OFFICIAL_BASE,
    "upernet_beitv2_large": dict(_OFFICIAL_BASE, backbone="beit_large_patch16_224", out_indices=(7, 11, 15, 23),
                                 channels=1024),
    # The linear probe of the frozen backbone: its last block's patch tokens.
    "linear_beitv2_base": dict(backbone="beit_base_patch16_224", img_size=512, out_indices=(11,), decoder="linear"),
    "linear_beitv2_large": dict(backbone="beit_large_patch16_224", img_size=512, out_indices=(23,),
                                decoder="linear"),
    # The CPU demo: the 6-block demo backbone (8 px patches) on 64 px crops, a narrow head.
    "upernet_beitv2_small_demo": dict(backbone="beitv2_small_demo", img_size=64, out_indices=(1, 2, 3, 5),
                                      channels=64, aux_channels=32),
    "linear_beitv2_small_demo": dict(backbone="beitv2_small_demo", img_size=64, out_indices=(5,), decoder="linear"),
    # Tests: the 3-block test backbone on 32 px crops.
    "upernet_beitv2_tiny_test": dict(backbone="beitv2_tiny_test", img_size=32, out_indices=(0, 1, 2, 2),
                                     channels=16, aux_channels=8),
    "linear_beitv2_tiny_test": dict(backbone="beitv2_tiny_test", img_size=32, out_indices=(1, 2), decoder="linear"),
}


def _note(msg: str) -> None:
    from engine.parallel import distributed as dist_utils
    dist_utils.log_main(msg)


def _segmenter_state_dict(sd: Mapping[str, Tensor], model: BeitSegmenter, source: str, new_head: bool
                          ) -> dict[str, Tensor]:
    """A segmenter file's state dict for `model`; heads of another class count only with `new_head`."""
    sd = dict(sd)
    theirs = sd["decode_head.conv_seg.weight"].shape[0]
    if theirs != model.num_classes:
        if not new_head:
            raise ValueError(f"{source} segments {theirs} classes and the model has {model.num_classes}: give "
                             f"num_classes={theirs}, or new_head=true (--model.new_head=true) for fresh classifiers")
        for key in [k for k in sd if k.startswith(("decode_head.conv_seg.", "auxiliary_head.conv_seg."))]:
            sd[key] = model.state_dict()[key]
        _note(f"{source}: its {theirs}-class classifiers replaced by fresh {model.num_classes}-class ones")
    backbone = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    resized = backbone_state_dict(backbone, model.backbone, source)   # position tables to this crop's grid
    return {**{k: v for k, v in sd.items() if not k.startswith("backbone.")},
            **{f"backbone.{k}": v for k, v in resized.items()}}


def _backbone_only(sd: Mapping[str, Tensor], model: BeitSegmenter, source: str) -> dict[str, Tensor]:
    """A backbone checkpoint (any classifier route) for the backbone; neck and heads keep their fresh init."""
    routed = backbone_state_dict(sd, model.backbone, source, new_head=True)
    routed = {k: v for k, v in routed.items() if not k.startswith(("fc_norm.", "head.", "norm."))}
    own = model.state_dict()
    fresh = {k: v for k, v in own.items() if not k.startswith("backbone.")}
    neck = {k: v for k, v in own.items() if k.startswith("backbone.fpn")}
    return {**fresh, **neck, **{f"backbone.{k}": v for k, v in routed.items()}}


def build_segmenter(arch: str | Mapping[str, Any], num_classes: int, checkpoint: str | os.PathLike | None = None,
                    new_head: bool = False, **overrides: Any) -> BeitSegmenter:
    """A UperNet BEiT segmenter, in eval mode, optionally initialised from a checkpoint.

    Args:
        arch: A key of `SEG_ARCHS`, or saved `arch_kwargs`.
        num_classes: Classes per pixel.
        checkpoint: A backbone in any route `build_classifier` takes (MIM `mim.pt`, official `*_cls_pt` or
            fine-tuned release, timm file, exported safetensors, `classifier.pt`): the backbone is loaded, the
            neck and heads start fresh. Or a `segmenter.pt`: everything is loaded.
        new_head: With a `segmenter.pt` of another class count, start fresh classifiers instead of failing.
        **overrides: `BeitSegmenter` settings, e.g. `drop_path_rate=0.15`, `img_size=640`.

    Raises:
        ValueError: an unknown arch, a tokenizer file, a class-count mismatch, keys that fit nothing (one line).
    """
    model = build_from_registry(BeitSegmenter, SEG_ARCHS, arch, {**overrides, "num_classes": num_classes},
                                "segmenter")
    if checkpoint is not None:
        path = os.fspath(checkpoint)
        sd, _ = read_weights_file(path, "BEiT backbone or segmenter", (FILE_FORMAT, CLS_FILE_FORMAT, MIM_FILE_FORMAT))
        linear_file = "decode_head.bn.weight" in sd
        if "decode_head.conv_seg.weight" in sd and linear_file != model.frozen_backbone:
            # A segmenter with the other decoder: its backbone only (e.g. the linear probe of a fine-tuned UperNet).
            sd = _backbone_only({k[len("backbone."):]: v for k, v in sd.items()
                                 if k.startswith("backbone.") and not k.startswith("backbone.fpn")}, model, path)
        elif "decode_head.conv_seg.weight" in sd:
            sd = _segmenter_state_dict(sd, model, path, new_head)
        else:
            sd = _backbone_only(sd, model, path)
        name = arch if isinstance(arch, str) else "(saved arch)"
        load_strict(model, sd, path, f"segmenter arch {name}")
    return model.eval()


def load_segmenter(path: str | os.PathLike, **overrides: Any) -> BeitSegmenter:
    """A segmenter written by `save_segmenter` (a segmentation run's `segmenter.pt`), with its own arch."""
    return load_registered(BeitSegmenter, SEG_ARCHS, os.fspath(path), "segmenter", FILE_FORMAT, overrides,
                           "use build_segmenter(arch, num_classes, checkpoint) (evaluate: --arch and --num_classes)")


def save_segmenter(model: BeitSegmenter, path: str | os.PathLike,
                   state_dict: Mapping[str, Tensor] | None = None) -> None:
    """Write `{"model", "arch", "format"}` atomically (fp32, CPU); `load_segmenter` reads it back."""
    arch = {k: v for k, v in model.arch_kwargs.items() if k != "drop_path_rate"}
    save_weights_file(path, state_dict if state_dict is not None else model.state_dict(), arch, FILE_FORMAT)
