"""BEiT v2 classifier in the fine-tune layout (timm's `Beit`), its named architectures, and the routes every kind of
backbone checkpoint takes into it.

Routes (`backbone_state_dict`):
- pretraining layout (our `mim.pt`, an official `*_cls_pt` release): the shared relative position table is copied
  into every block; the pretraining-only tensors (`mask_token`, `lm_head`, `cls_pt_layers`, and the final `norm`,
  which official fine-tuning does not use) are dropped; `fc_norm` and `head` start fresh.
- fine-tune layout (an official fine-tuned release, a timm `beitv2_*` file, our exported safetensors, our
  `classifier.pt`): loaded as it is. A head for another number of classes is an error unless `new_head=True`.
Relative position tables of another grid size are resized by timm's `checkpoint_filter_fn` (the official geometric
sampling grid, with linear interpolation between its points: the cubic `scipy.interpolate.interp2d` that the official
code calls no longer exists in scipy).
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import torch
from timm.models.beit import Beit, checkpoint_filter_fn

from engine.config.registry import build_from_registry, load_registered
from engine.loop.flops import TRAIN_FACTOR, linear_flops, patch_embed_flops, vit_blocks_flops
from engine.storage.weights import load_strict, read_weights_file, save_weights_file
from pretrain.mim.export import to_timm_state_dict
from pretrain.mim.model import FILE_FORMAT as MIM_FILE_FORMAT

__all__ = ["CLS_ARCHS", "BeitClassifier", "backbone_state_dict", "build_classifier", "load_classifier",
           "save_classifier"]

FILE_FORMAT = "beitv2-ds/classifier/1"
_PRETRAINING_ONLY = ("mask_token", "lm_head.", "cls_pt_layers.", "norm.")


class BeitClassifier(Beit):
    """timm's BEiT with relative position tables in every block, no absolute position embedding, mean pooling of
    the patch tokens through `fc_norm`, and a head initialised at 0.001 x its truncated-normal init (the official
    fine-tuning model).

    Args:
        img_size: Input side in pixels.
        patch_size: Patch side in pixels.
        in_chans: Input channels.
        num_classes: Head outputs.
        embed_dim: Transformer width.
        depth: Number of blocks.
        num_heads: Attention heads.
        mlp_ratio: MLP hidden width as a multiple of `embed_dim`.
        init_values: Layer-scale init (0.1 base, 1e-5 large); None disables layer scale.
        drop_path_rate: Stochastic depth, linear over the blocks.
        head_init_scale: Scale of the new head's init.
    """

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, num_classes: int = 1000,
                 embed_dim: int = 768, depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0,
                 init_values: float | None = 0.1, drop_path_rate: float = 0.0, head_init_scale: float = 0.001):
        self_kwargs = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        super().__init__(img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=num_classes,
                         global_pool="avg", embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                         mlp_ratio=mlp_ratio, drop_path_rate=drop_path_rate, init_values=init_values,
                         use_abs_pos_emb=False, use_rel_pos_bias=True, head_init_scale=head_init_scale)
        self.arch_kwargs: dict[str, Any] = self_kwargs

    @property
    def img_size(self) -> int:
        return self.patch_embed.img_size[0]

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Official fine-tuning decays the relative position tables (timm's BEiT exempts them); only the CLS token
        is exempt by name, 1-d parameters and biases by rule."""
        return {"cls_token"}

    def flops_per_image(self) -> float:
        """Approximate training FLOPs per image (forward + backward = 3x forward), for MFU."""
        d, n = self.embed_dim, self.patch_embed.num_patches
        fwd = (patch_embed_flops(n, self.in_chans, self.patch_embed.patch_size[0], d)
               + vit_blocks_flops(d, len(self.blocks), n + 1, self.arch_kwargs["mlp_ratio"])
               + linear_flops(1, d, self.num_classes))
        return TRAIN_FACTOR * fwd


_BASE = dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, init_values=0.1)
_LARGE = dict(img_size=224, patch_size=16, embed_dim=1024, depth=24, num_heads=16, init_values=1e-5)
# Named architectures (keyword arguments of `BeitClassifier`); the pretraining and timm names of the same backbone
# are aliases, so a MIM run's `arch` names its classifier.
CLS_ARCHS: dict[str, dict[str, Any]] = {
    "beit_base_patch16_224": _BASE,
    "beit_large_patch16_224": _LARGE,
    "beitv2_base_patch16_224": _BASE,
    "beitv2_large_patch16_224": _LARGE,
    "beit_base_patch16_224_8k_vocab_cls_pt": _BASE,
    "beit_large_patch16_224_8k_vocab_cls_pt": _LARGE,
    # The CPU demo's backbone (`beitv2_small_demo` MIM arch): 48 px, 8 px patches, 6 blocks.
    "beitv2_small_demo": dict(img_size=48, patch_size=8, embed_dim=192, depth=6, num_heads=3, init_values=0.1),
    # Tests (`beitv2_tiny_test` MIM arch): 32 px, 8 px patches, 3 blocks.
    "beitv2_tiny_test": dict(img_size=32, patch_size=8, embed_dim=64, depth=3, num_heads=2, init_values=0.1),
}


def _note(msg: str) -> None:
    from engine.parallel import distributed as dist_utils
    dist_utils.log_main(msg)


def backbone_state_dict(sd: Mapping[str, torch.Tensor], model: BeitClassifier, source: str,
                        new_head: bool = False) -> dict[str, torch.Tensor]:
    """`sd` (any checkpoint route, see the module doc) as a state dict of `model`, ready for a strict load.

    Raises:
        ValueError: a tokenizer file, or a head for another number of classes without `new_head` (one line).
    """
    if any(k.startswith(("quantize.", "encoder.", "decoder.")) for k in sd):
        raise ValueError(f"{source} is a VQ-KD tokenizer checkpoint, not a backbone: pass a MIM checkpoint "
                         f"(mim.pt), an official BEiT v2 release or a fine-tuned classifier")
    sd = dict(sd)
    if "rel_pos_bias.relative_position_bias_table" in sd and "norm.weight" in sd:   # pretraining layout
        dropped = sorted({k.split(".")[0] for k in sd if k.startswith(_PRETRAINING_ONLY)})
        sd = to_timm_state_dict(sd)
        _note(f"{source}: pretraining checkpoint; shared relative position table copied into every block; dropped "
              f"{', '.join(dropped)}; fc_norm and head start fresh")
    head = sd.get("head.weight")
    if head is not None and model.num_classes == 0:   # a backbone without a head (frozen features)
        sd.pop("head.weight"), sd.pop("head.bias", None)
    elif head is not None and head.shape[0] != model.num_classes:
        if not new_head:
            raise ValueError(f"{source} has a head for {head.shape[0]} classes and the model has "
                             f"{model.num_classes}: give num_classes={head.shape[0]} to use it, or new_head=true "
                             f"(--model.new_head=true) to start a fresh head")
        sd.pop("head.weight"), sd.pop("head.bias", None)
        _note(f"{source}: its {head.shape[0]}-class head replaced by a fresh {model.num_classes}-class head")
    own = model.state_dict()
    for key in ("fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"):
        if key not in sd and key in own:   # a backbone-only file: these start as the model initialised them
            sd[key] = own[key]
    # timm's filter drops `relative_position_index` and resizes tables to the model's grid; it looks up each table's
    # block, so blocks the model lacks go around it, for the strict load to name them.
    beyond = {k: v for k, v in sd.items() if k.startswith("blocks.") and int(k.split(".")[1]) >= len(model.blocks)}
    return {**checkpoint_filter_fn({k: v for k, v in sd.items() if k not in beyond}, model), **beyond}


def build_classifier(arch: str | Mapping[str, Any], num_classes: int, checkpoint: str | os.PathLike | None = None,
                     new_head: bool = False, **overrides: Any) -> BeitClassifier:
    """A BEiT classifier in the fine-tune layout, in eval mode, optionally initialised from a checkpoint.

    Args:
        arch: A key of `CLS_ARCHS` (official names `beit_base_patch16_224`, `beit_large_patch16_224`, timm's
            `beitv2_*_patch16_224`, or our pretraining arch names), or saved `arch_kwargs`.
        num_classes: Head outputs.
        checkpoint: Any backbone route (see the module doc); None keeps the random init.
        new_head: Replace a checkpoint's head of another number of classes by a fresh one.
        **overrides: `BeitClassifier` settings, e.g. `drop_path_rate=0.1`, `img_size=384`.

    Raises:
        ValueError: an unknown arch, a file that fits no route (naming the keys that do not fit).
    """
    model = build_from_registry(BeitClassifier, CLS_ARCHS, arch, {**overrides, "num_classes": num_classes},
                                "classifier")
    if checkpoint is not None:
        path = os.fspath(checkpoint)
        sd, _ = read_weights_file(path, "BEiT backbone", (FILE_FORMAT, MIM_FILE_FORMAT))
        name = arch if isinstance(arch, str) else "(saved arch)"
        load_strict(model, backbone_state_dict(sd, model, path, new_head), path, f"classifier arch {name}")
    return model.eval()


def load_classifier(path: str | os.PathLike, **overrides: Any) -> BeitClassifier:
    """A classifier written by `save_classifier` (a fine-tune run's `classifier.pt`), with its own arch."""
    return load_registered(BeitClassifier, CLS_ARCHS, os.fspath(path), "classifier", FILE_FORMAT, overrides,
                           "use build_classifier(arch, num_classes, checkpoint) (evaluate: --arch and --num_classes)")


def save_classifier(model: BeitClassifier, path: str | os.PathLike,
                    state_dict: Mapping[str, torch.Tensor] | None = None) -> None:
    """Write `{"model", "arch", "format"}` atomically (fp32, CPU); `load_classifier` reads it back."""
    arch = {k: v for k, v in model.arch_kwargs.items() if k != "drop_path_rate"}
    save_weights_file(path, state_dict if state_dict is not None else model.state_dict(), arch, FILE_FORMAT)
