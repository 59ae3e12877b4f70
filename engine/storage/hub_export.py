"""Exports that describe themselves: a folder in the layout timm's `save_for_hf` writes, loadable with
`timm.create_model("local-dir:FOLDER", pretrained=True)` and by `engine.api.load_model(FOLDER)`:

- `model.safetensors`: the weights in timm's `Beit` layout (fp32);
- `config.json`: `architecture` (a timm `beitv2_*` name), `num_classes`, `num_features`, `model_args` (every argument
  that shapes the model: img_size, patch_size, embed_dim, depth, num_heads, init_values, use_rel_pos_bias, ...;
  timm builds from them, so an arch timm has no name for loads too) and `pretrained_cfg` (the preprocessing: input
  size, mean, std, crop_pct, interpolation), written by timm's own `save_config_for_hf`;
- `README.md`: a short model card (what it is, data, recipe, steps, commit, results when the run folder has them).

The weights are loaded into the timm model before anything is written, so a folder that timm cannot load is never
written; each file is written atomically (engine.storage.files).
"""
from __future__ import annotations

import json
import os
import subprocess
from typing import Any, Mapping

import torch

from engine.storage.files import write_atomically, write_text_atomically

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "beit_model_args", "run_facts", "timm_architecture", "write_timm_folder"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# timm's BEiT v2 entry points and the shape each one names; any other shape is built from `model_args`.
_TIMM_NAMES = {
    (16, 768, 12, 12): "beitv2_base_patch16_224",
    (16, 1024, 24, 16): "beitv2_large_patch16_224",
}
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def beit_model_args(arch: Mapping[str, Any], num_classes: int) -> dict[str, Any]:
    """timm `Beit` arguments of our BEiT layout (relative position bias in every block, no absolute position
    embedding, mean pooling through `fc_norm`) from one of our models' `arch_kwargs` (MIM or classifier)."""
    init_values = arch.get("init_values", 0.1)
    return dict(img_size=int(arch.get("img_size", 224)), patch_size=int(arch.get("patch_size", 16)),
                in_chans=int(arch.get("in_chans", 3)), num_classes=int(num_classes), global_pool="avg",
                embed_dim=int(arch.get("embed_dim", 768)), depth=int(arch.get("depth", 12)),
                num_heads=int(arch.get("num_heads", 12)), mlp_ratio=float(arch.get("mlp_ratio", 4.0)),
                qkv_bias=True, init_values=float(init_values) if init_values else None, use_abs_pos_emb=False,
                use_rel_pos_bias=True, use_shared_rel_pos_bias=False)


def timm_architecture(model_args: Mapping[str, Any]) -> str:
    """The timm entry point for `model_args`: `beitv2_base_patch16_224` / `beitv2_large_patch16_224` for their shapes,
    else `beitv2_base_patch16_224` (its `model_args` replace every shape argument)."""
    key = (model_args["patch_size"], model_args["embed_dim"], model_args["depth"], model_args["num_heads"])
    return _TIMM_NAMES.get(key, "beitv2_base_patch16_224")


def _git_commit() -> str:
    """The checkout's commit (`+dirty` with uncommitted changes), or '' outside a git checkout."""
    try:
        def git(*args: str) -> str:
            return subprocess.run(["git", *args], cwd=_ROOT, capture_output=True, text=True, timeout=10,
                                  check=True).stdout.strip()
        commit = git("rev-parse", "--short=12", "HEAD")
        return commit + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):
        return ""


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _last_step(metrics_jsonl: str) -> int | None:
    """The largest `step` in a run's metrics.jsonl (a torn last row is skipped), None without one."""
    last = None
    try:
        with open(metrics_jsonl, encoding="utf-8") as f:
            for line in f:
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                if isinstance(row, dict) and isinstance(row.get("step"), int):
                    last = max(row["step"], last or 0)
    except OSError:
        return None
    return last


def run_facts(checkpoint: str) -> dict[str, Any]:
    """What the run folder holding `checkpoint` says about it: `data`, `schedule`, `recipe settings` (its
    config.json), `steps` (metrics.jsonl), `results` (eval.json), `class_names` (eval.json's per-class rows).
    Empty for a file outside a run folder (an official release)."""
    folder = os.path.dirname(os.path.abspath(checkpoint))
    facts: dict[str, Any] = {}
    config = _read_json(os.path.join(folder, "config.json"))
    if isinstance(config, dict):
        facts["config"] = config
    steps = _last_step(os.path.join(folder, "metrics.jsonl"))
    if steps is not None:
        facts["steps"] = steps
    results = _read_json(os.path.join(folder, "eval.json"))
    if isinstance(results, dict):
        facts["results"] = {k: v for k, v in results.items() if isinstance(v, (int, float, str)) and k != "checkpoint"}
        rows = results.get("per_class")
        names = [r.get("class") for r in rows if isinstance(r, dict)] if isinstance(rows, list) else []
        if names and all(isinstance(n, str) for n in names) and not all(n.isdigit() for n in names):
            facts["class_names"] = names
    return facts


def _card(title: str, what: str, out_dir: str, source: str, facts: Mapping[str, Any], config: Mapping[str, Any],
          architecture: str, commit: str) -> str:
    """The README.md of an export: a short model card."""
    cfg = facts.get("config", {})
    data = cfg.get("data", {}) if isinstance(cfg.get("data"), dict) else {}
    where = data.get("train_path") or data.get("source") or "not recorded (not exported from a run folder)"
    pre = config["pretrained_cfg"]
    lines = [f"# {title}", "", what, "",
             "```python",
             "import timm",
             f'model = timm.create_model("local-dir:{out_dir}", pretrained=True)',
             "cfg = timm.data.resolve_data_config({}, model=model)   # input size, mean, std, crop",
             "```",
             "",
             "| | |", "|---|---|",
             f"| timm architecture | `{architecture}` with the `model_args` of config.json |",
             f"| input | {pre['input_size'][1]} x {pre['input_size'][2]} px, mean {list(pre['mean'])}, std "
             f"{list(pre['std'])}, crop_pct {pre.get('crop_pct')} |",
             f"| classes | {config['num_classes'] or 'none (a backbone: forward_features / num_classes=0)'} |",
             f"| exported from | `{source}` |",
             f"| data | {where} |"]
    if cfg:
        schedule = cfg.get("schedule", {}) if isinstance(cfg.get("schedule"), dict) else {}
        run = cfg.get("run", {}) if isinstance(cfg.get("run"), dict) else {}
        optim = cfg.get("optim", {}) if isinstance(cfg.get("optim"), dict) else {}
        recipe = {"arch": cfg.get("arch"), "epochs": schedule.get("epochs"), "lr": optim.get("lr"),
                  "micro_batch_size": run.get("micro_batch_size"), "precision": run.get("precision")}
        shown = ", ".join(f"{k} {v}" for k, v in recipe.items() if v is not None)
        lines.append(f"| recipe | {shown} (every setting: the run's config.json) |")
    if "steps" in facts:
        lines.append(f"| steps trained | {facts['steps']} |")
    if "results" in facts:
        shown = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in facts["results"].items())
        lines.append(f"| results (the run's eval.json) | {shown} |")
    lines.append(f"| code | beitv2-ds {('commit ' + commit) if commit else '(commit unknown)'} |")
    return "\n".join(lines) + "\n"


def write_timm_folder(out_dir: str | os.PathLike, state_dict: Mapping[str, torch.Tensor], model_args: dict[str, Any],
                      *, title: str, what: str, source: str, crop_pct: float = 0.875,
                      label_names: list[str] | None = None) -> dict[str, Any]:
    """Write `model.safetensors`, `config.json` and `README.md` into `out_dir` (made if needed).

    Args:
        state_dict: Weights in timm's `Beit` layout for `model_args`.
        model_args: timm `Beit` arguments (`beit_model_args`).
        title, what: The model card's title and first paragraph.
        source: The checkpoint the export comes from (the card names it; its run folder gives the facts).
        crop_pct: Evaluation centre-crop fraction (timm's crop_pct).
        label_names: Class names, one per head output (config.json's `label_names`).

    Returns:
        `{"out", "architecture", "num_classes", "num_features", "files"}`.

    Raises:
        ValueError: `out_dir` is a file, or the weights do not fit `model_args` (one line).
    """
    import timm
    from safetensors.torch import save_file
    from timm.models._hub import save_config_for_hf

    from engine.storage.weights import load_strict

    out_dir = os.fspath(out_dir)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"{out_dir} is a file: the export is a folder (model.safetensors, config.json, README.md); "
                         f"give a folder path, or a name ending in .safetensors for the weights alone")
    architecture = timm_architecture(model_args)
    model = timm.create_model(architecture, pretrained=False, **model_args)
    load_strict(model, dict(state_dict), source, f"timm {architecture} with model_args {model_args}")
    facts = run_facts(source)
    label_names = label_names or facts.get("class_names")
    if label_names is not None and len(label_names) != model_args["num_classes"]:
        label_names = None
    tensors = {k: v.detach().float().cpu().contiguous() if v.is_floating_point() else v.detach().cpu().contiguous()
               for k, v in model.state_dict().items()}
    # timm's pretrained_cfg of the entry point describes timm's hub weights (tag, license): ours replace them.
    pretrained_cfg = {"tag": "beitv2_ds", "mean": IMAGENET_MEAN, "std": IMAGENET_STD,
                      "crop_pct": crop_pct, "crop_mode": "center", "interpolation": "bilinear"}
    model_config: dict[str, Any] = {"pretrained_cfg": pretrained_cfg}
    if label_names:
        model_config["label_names"] = list(label_names)
    write_atomically(os.path.join(out_dir, "model.safetensors"),
                     lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    config: dict[str, Any] = {}

    def write_config(tmp: str) -> None:
        save_config_for_hf(model, tmp, model_config=model_config, model_args=model_args)
        with open(tmp, encoding="utf-8") as f:
            config.update(json.load(f))
        config["pretrained_cfg"].pop("license", None)   # the entry point's hub weights', not these
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps(config, indent=2) + "\n")

    write_atomically(os.path.join(out_dir, "config.json"), write_config)
    write_text_atomically(os.path.join(out_dir, "README.md"),
                          _card(title, what, out_dir, source, facts, config, architecture, _git_commit()))
    return {"out": out_dir, "architecture": architecture, "num_classes": model_args["num_classes"],
            "num_features": model.num_features, "files": ["model.safetensors", "config.json", "README.md"]}
