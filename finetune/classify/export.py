"""`beitv2 classify export`: a fine-tuned classifier as a folder that describes itself (engine.storage.hub_export),
loadable with `timm.create_model("local-dir:FOLDER", pretrained=True)`, or as one timm-layout .safetensors file."""
from __future__ import annotations

import os

from torch import nn

from engine.config.schema import ConfigError, saved_run_config

__all__ = ["export", "export_classifier_folder"]


def export(checkpoint: str, out: str, arch: str = "", num_classes: int = 0) -> dict:
    """Export a classifier for timm: a folder (weights, config.json, model card), or one .safetensors file.

    A folder (any name not ending in .safetensors) gets model.safetensors, config.json (timm architecture, its
    model_args, the run's evaluation preprocessing and class names) and README.md (a model card: data, recipe, steps,
    commit and the run's eval.json), for `timm.create_model("local-dir:FOLDER", pretrained=True)`.

    Args:
        checkpoint: a fine-tune run's `classifier.pt` (or its output directory); with `arch`, any classifier-layout
            file, e.g. an official fine-tuned release.
        out: output folder, or a path ending in .safetensors for the weights alone (timm's `Beit` layout).
        arch: classifier arch for files that do not record theirs (official: beit_base_patch16_224, ...).
        num_classes: head size, with `arch`.
    """
    from safetensors.torch import save_file

    from engine.storage.files import write_atomically
    from finetune.classify.evaluate import OFFICIAL_EVAL_CROP
    from finetune.model import build_classifier, load_classifier

    if os.path.isdir(checkpoint):
        checkpoint = os.path.join(checkpoint, "classifier.pt")
    if arch and num_classes < 1:
        raise ConfigError("--arch needs --num_classes (the head size of the checkpoint)")
    if out.endswith((".pt", ".pth", ".bin", ".ckpt")):
        raise ValueError(f"export writes safetensors: give a folder (weights, config.json and a model card) or a "
                         f"path ending in .safetensors, not {out}")
    model = build_classifier(arch, num_classes, checkpoint) if arch else load_classifier(checkpoint)
    state_dict = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()
                  if not k.endswith("relative_position_index")}
    result = {"checkpoint": checkpoint, "out": out, "num_classes": model.num_classes}
    if out.endswith(".safetensors"):
        write_atomically(out, lambda tmp: save_file(state_dict, tmp, metadata={"format": "pt"}))
        return result
    saved = saved_run_config(checkpoint)
    augment = saved.get("augment") if isinstance(saved.get("augment"), dict) else {}
    crop = float(augment.get("eval_crop", OFFICIAL_EVAL_CROP))
    return {**result, **export_classifier_folder(model, out, checkpoint, crop)}


def export_classifier_folder(model: nn.Module, out: str | os.PathLike, source: str, crop_pct: float = 0.875) -> dict:
    """A `BeitClassifier` as a folder for `timm.create_model("local-dir:OUT", pretrained=True)`
    (engine.storage.hub_export); `source` is the checkpoint it came from (its run folder's config.json, metrics and
    eval.json fill the card)."""
    from engine.storage.hub_export import beit_model_args, write_timm_folder

    kwargs = model.arch_kwargs
    state_dict = {k: v for k, v in model.state_dict().items() if not k.endswith("relative_position_index")}
    run = os.path.basename(os.path.dirname(os.path.abspath(source))) or source
    return write_timm_folder(
        out, state_dict, beit_model_args(kwargs, model.num_classes),
        title=f"BEiT v2 classifier ({run})",
        what=(f"A fine-tuned BEiT v2 image classifier ({model.num_classes} classes; {kwargs['embed_dim']} wide, "
              f"{kwargs['depth']} blocks, {kwargs['img_size']} px, {kwargs['patch_size']} px patches). `model(x)` "
              f"gives the logits, `model.forward_features(x)` the tokens; config.json's `label_names` name the "
              f"classes when the run recorded them."),
        source=source, crop_pct=crop_pct)
