"""Python API: load a model, get its preprocessing, and turn images into features or token ids.

    from engine.api import load_model, preprocessing, preprocess, features, encode

    model = load_model("runs/mim/mim.pt")     # any of ours or an official release, a run folder, an exported folder
    preprocessing(model)                      # {"input_size", "mean", "std", "crop_pct", "interpolation", ...}
    x = preprocess(["a.jpg", pil_image, uint8_array], model)   # [N, 3, H, W]: what evaluation feeds the model
    f = features(model, ["a.jpg", ...])       # [N, D] one vector per image
    ids = encode(load_model("runs/tok/tokenizer.pt"), ["a.jpg", ...])   # [N, h, w] token ids

What `load_model` reads (files are read weights-only; one line names a file it cannot use):
- a MIM checkpoint (our `mim.pt`, an official `*_cls_pt` release) -> `BeitV2MIM`;
- a VQ-KD tokenizer (our `tokenizer.pt`, an official `vqkd_*` release) -> `VQKD`;
- a classifier (our `classifier.pt`; an official fine-tuned release or a timm `beitv2_*` file with `arch=`) ->
  `BeitClassifier` (timm's `Beit`: `model(x)` gives the logits);
- a run's output folder (its classifier.pt, mim.pt or tokenizer.pt), or a folder written by `beitv2 mim export` /
  `beitv2 classify export` (-> timm's `Beit`, as `timm.create_model("local-dir:FOLDER", pretrained=True)`).

Images are file paths, PIL images, or uint8 arrays (`[H, W]` grey, `[H, W, 3]` RGB, or a stack `[N, H, W(, 3)]`).
`preprocess` is the evaluation view of the stages (`data_tools.gpu_augment.EvalAug`): the short side resized to
`size / crop_pct`, the centre `size` x `size` crop (area-averaged bilinear), grey repeated to RGB, normalised.
"""
from __future__ import annotations

import json
import os
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch import nn

__all__ = ["encode", "features", "load_model", "preprocess", "preprocessing"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_RUN_FILES = ("classifier.pt", "mim.pt", "tokenizer.pt")   # what a run folder holds, in the order looked for


def _data_config(size: int, mean, std, crop_pct: float) -> dict[str, Any]:
    return {"input_size": (3, int(size), int(size)), "mean": tuple(float(m) for m in mean),
            "std": tuple(float(s) for s in std), "crop_pct": float(crop_pct), "crop_mode": "center",
            "interpolation": "bilinear"}


def load_model(source: str | os.PathLike, arch: str | None = None, num_classes: int | None = None,
               device: str | torch.device = "cpu") -> nn.Module:
    """The model in `source`, in eval mode on `device`, with its preprocessing as `model.data_config`.

    Args:
        source: a checkpoint file, a run's output folder, or an exported folder (see the module doc).
        arch: the arch of a file that does not record it (official fine-tuned releases: `beit_base_patch16_224`,
            `beitv2_large_patch16_224`, ...; official tokenizers and MIM files are recognised by their shapes).
        num_classes: with `arch`, the head size of a classifier file (default: the file's head).

    Raises:
        FileNotFoundError / ValueError: nothing loadable at `source` (one line naming it).
    """
    path = os.fspath(source)
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "model.safetensors")) and _is_timm_config(path):
            return _load_exported(path, device)
        found = [os.path.join(path, n) for n in _RUN_FILES if os.path.isfile(os.path.join(path, n))]
        if not found:
            raise FileNotFoundError(f"{path} holds neither an export (model.safetensors + config.json) nor a run's "
                                    f"{', '.join(_RUN_FILES)}")
        path = found[0]
    elif not os.path.isfile(path):
        raise FileNotFoundError(f"model not found: {path}")
    from finetune.features import checkpoint_kind
    kind = checkpoint_kind(path)
    saved = _saved_run_config(path)
    if kind == "tokenizer":
        from pretrain.tokenizer import load_tokenizer
        model = load_tokenizer(path, arch=arch)
        # The tokenizer reads RGB in [0, 1] (it rescales to [-1, 1] itself); its stages encode whole images.
        model.data_config = _data_config(model.img_size, (0.0,) * 3, (1.0,) * 3, 1.0)
    elif kind == "mim":
        from pretrain.mim import load_mim_model
        model = load_mim_model(path, arch=arch)
        model.data_config = _data_config(model.patch_embed.img_size[0], IMAGENET_MEAN, IMAGENET_STD, 0.875)
    else:
        from engine.storage.weights import read_weights_file
        from finetune.model import FILE_FORMAT, build_classifier, load_classifier
        sd, saved_arch = read_weights_file(path, "classifier", FILE_FORMAT)
        if arch or not isinstance(saved_arch, dict):   # an official or timm file: its arch from its shapes
            head = sd.get("head.weight")
            if num_classes is None:
                num_classes = 0 if head is None else int(head.shape[0])
            arch, overrides = (arch, {}) if arch else _classifier_arch(sd, path)
            model = build_classifier(arch, num_classes, path, **overrides)
        else:
            model = load_classifier(path)
        augment = saved.get("augment") if isinstance(saved.get("augment"), dict) else {}
        model.data_config = _data_config(model.img_size, IMAGENET_MEAN, IMAGENET_STD,
                                         augment.get("eval_crop", 0.875))
    model.data_config["source"] = path
    return model.to(device).eval()


def _classifier_arch(sd: dict, path: str) -> tuple[str, dict]:
    """(the registered classifier arch of these weights' shape, the img_size override) of a file without an arch."""
    import math

    from finetune.model import CLS_ARCHS
    try:
        width, _, patch, _ = sd["patch_embed.proj.weight"].shape
        rows, heads = sd["blocks.0.attn.relative_position_bias_table"].shape
        depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    except (KeyError, ValueError):
        raise ValueError(f"{path} is not a BEiT classifier in the fine-tune layout (needs patch_embed and per-block "
                         f"relative position tables); pass arch=") from None
    shape = dict(patch_size=patch, embed_dim=width, depth=depth, num_heads=heads)
    for name, kwargs in CLS_ARCHS.items():
        if all(kwargs.get(k) == v for k, v in shape.items()):
            return name, {"img_size": (math.isqrt(rows - 3) + 1) // 2 * patch}
    raise ValueError(f"{path}: no registered classifier arch has the shape {shape}; pass arch=")


def _is_timm_config(folder: str) -> bool:
    try:
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
            return "architecture" in json.load(f)
    except (OSError, ValueError):
        return False


def _saved_run_config(path: str) -> dict:
    from engine.config.schema import saved_run_config
    try:
        saved = saved_run_config(path)
    except ValueError:   # an unreadable config.json beside a file: the file is still a model
        return {}
    return saved if isinstance(saved, dict) else {}


def _load_exported(folder: str, device) -> nn.Module:
    import timm
    model = timm.create_model(f"local-dir:{folder}", pretrained=True)
    model.data_config = {**timm.data.resolve_data_config({}, model=model), "source": folder}
    return model.to(device).eval()


def preprocessing(model: nn.Module) -> dict[str, Any]:
    """The preprocessing `model` expects, as timm's `resolve_data_config` gives it: `input_size` (C, H, W), `mean`,
    `std` (of RGB in [0, 1]), `crop_pct` (the centre crop's share of the short side), `crop_mode`, `interpolation`."""
    cfg = getattr(model, "data_config", None)
    if isinstance(cfg, dict):
        return dict(cfg)
    if getattr(model, "pretrained_cfg", None):   # a timm model built elsewhere
        import timm
        return timm.data.resolve_data_config({}, model=model)
    from pretrain.tokenizer import VQKD
    if isinstance(model, VQKD):
        return _data_config(model.img_size, (0.0,) * 3, (1.0,) * 3, 1.0)
    return _data_config(model.patch_embed.img_size[0], IMAGENET_MEAN, IMAGENET_STD, 0.875)


ImageLike = Any   # str | os.PathLike | PIL.Image.Image | np.ndarray


def _as_arrays(images: ImageLike | Iterable[ImageLike]) -> list[np.ndarray]:
    """uint8 arrays `[H, W]` or `[H, W, 3]`, one per image."""
    from PIL import Image
    if isinstance(images, (str, os.PathLike, Image.Image)):
        images = [images]
    elif isinstance(images, np.ndarray):
        images = [images] if images.ndim == 2 or (images.ndim == 3 and images.shape[-1] in (3, 4)) else list(images)
    out = []
    for i, image in enumerate(images):
        if isinstance(image, (str, os.PathLike)):
            from data_tools.convert import BadImage, load_rgb
            if not os.path.isfile(image):
                raise FileNotFoundError(f"image not found: {image}")
            try:
                image = load_rgb(os.fspath(image), max_side=4096)
            except BadImage as e:
                raise ValueError(f"{image}: {e}") from None
        elif isinstance(image, Image.Image):
            image = np.asarray(image.convert("RGB") if image.mode not in ("L", "RGB") else image)
        image = np.asarray(image)
        if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[-1] in (1, 3, 4))):
            raise ValueError(f"image {i}: expected uint8 [H, W], [H, W, 3] or [H, W, 4], got {image.dtype} "
                             f"{list(image.shape)}")
        out.append(image[..., :3] if image.ndim == 3 else image)
    if not out:
        raise ValueError("no images given")
    return out


@torch.no_grad()
def preprocess(images: ImageLike | Sequence[ImageLike], model_or_config: nn.Module | dict) -> torch.Tensor:
    """Images as the model's input: float `[N, 3, H, W]` on the CPU (see the module doc for what is done)."""
    from data_tools.gpu_augment import center_crop_boxes, crop_resize, to_rgb_float
    cfg = model_or_config if isinstance(model_or_config, dict) else preprocessing(model_or_config)
    size = int(cfg["input_size"][-1])
    mean = torch.tensor(cfg["mean"], dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"], dtype=torch.float32).view(1, 3, 1, 1)
    views = []
    for image in _as_arrays(images):
        x = torch.from_numpy(np.array(image, dtype=np.uint8))   # a copy: the caller's array may be read-only
        x = x.permute(2, 0, 1) if x.dim() == 3 else x.unsqueeze(0)
        sizes = torch.tensor([[x.shape[1], x.shape[2]]])
        x = to_rgb_float(x.unsqueeze(0))
        views.append(crop_resize(x, center_crop_boxes(sizes, float(cfg["crop_pct"])), size) / 255.0)
    return (torch.cat(views) - mean) / std


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def features(model: nn.Module, images: ImageLike | Sequence[ImageLike], pooling: str = "default",
             batch_size: int = 64) -> torch.Tensor:
    """One feature vector per image, float32 `[N, D]` on the CPU.

    Args:
        model: from `load_model`.
        images: paths, PIL images or uint8 arrays.
        pooling: `default` (a MIM model: its CLS token through the final norm, as `classify knn` and
            `linear_probe` pool; a classifier or an export: timm's pre-logits, the mean patch token through
            `fc_norm`; a tokenizer: its encoder's mean patch token through `fc_norm`), `cls` or `mean` (the CLS
            token or the mean patch token, through the final norm).
        batch_size: images per forward pass.
    """
    from pretrain.mim import BeitV2MIM
    from pretrain.tokenizer import VQKD
    if pooling not in ("default", "cls", "mean"):
        raise ValueError(f"pooling must be 'default', 'cls' or 'mean', got {pooling!r}")
    x_all = preprocess(images, model)
    out = []
    for x in x_all.split(batch_size):
        x = x.to(_device(model))
        if isinstance(model, BeitV2MIM):
            tokens, norm = model.forward_features(x)[0], model.norm
            pooled = tokens[:, 1:].mean(1) if pooling == "mean" else tokens[:, 0]
            out.append(norm(pooled))
            continue
        vit = model.encoder if isinstance(model, VQKD) else model
        if isinstance(model, VQKD):
            x = x * 2 - 1   # preprocess gave [0, 1]; the encoder reads [-1, 1]
        tokens = vit.forward_features(x)
        if pooling == "default":
            out.append(vit.forward_head(tokens, pre_logits=True))
        else:
            pooled = tokens[:, 1:].mean(1) if pooling == "mean" else tokens[:, 0]
            out.append(vit.fc_norm(pooled) if not isinstance(vit.fc_norm, nn.Identity) else vit.norm(pooled))
    return torch.cat(out).float().cpu()


@torch.no_grad()
def encode(tokenizer: nn.Module, images: ImageLike | Sequence[ImageLike], batch_size: int = 64) -> torch.Tensor:
    """Token ids of each image: int64 `[N, h, w]` (the tokenizer's code grid) on the CPU.

    Args:
        tokenizer: a VQ-KD tokenizer from `load_model`.
        images: paths, PIL images or uint8 arrays.
    """
    from pretrain.tokenizer import VQKD
    if not isinstance(tokenizer, VQKD):
        raise ValueError(f"encode needs a VQ-KD tokenizer (load_model of a tokenizer.pt), got "
                         f"{type(tokenizer).__name__}; features(model, images) gives a backbone's features")
    x_all = preprocess(images, tokenizer)
    ids = [tokenizer.get_codebook_indices(x.to(_device(tokenizer))).cpu() for x in x_all.split(batch_size)]
    return torch.cat(ids).view(-1, *tokenizer.grid)
