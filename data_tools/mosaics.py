"""Fashion-MNIST mosaics: a small real-image segmentation data set, written in the ADE20K folder layout.

    python -m data_tools.mosaics OUT_DIR --train=2000 --val=200 --height=96 --seed=0

Why: no segmentation data set installs offline, but Fashion-MNIST does (Debian's dataset-fashion-mnist). A mosaic is
a canvas with a smooth random colour gradient plus mild noise as background (not flat black, so a model has to learn
shapes rather than "non-zero = garment") on which a few Fashion-MNIST garments are pasted: each resized by a random
factor, tinted with a random colour and alpha-blended by its intensity, later garments covering earlier ones. The
per-pixel labels follow from the pasting, so they are exact, and everything is drawn from
`np.random.default_rng([seed, split id, mosaic index])`: any mosaic, or any slice of the set, is reproducible alone.
`palette="grey"` renders the same scenes in grey (each pixel's mean over the colour channels): the same garments at the
same places with the same labels, in the domain of Fashion-MNIST itself.

Annotation ids (ADE20K style; train with reduce_zero_label, which makes id 0 the ignore label and shifts the rest
down by one):
    0      "other", ignored: faint garment edge pixels (0 < intensity < THRESHOLD), neither clearly garment nor
           background
    1      background
    2..11  the ten Fashion-MNIST classes (class c -> id c + 2)
After reduce_zero_label the model sees NUM_CLASSES = 11 classes, named by CLASS_NAMES: 0 background, 1..10 garments.

`write_ade20k` writes OUT_DIR/images/{training,validation}/mosaic_NNNNNN.jpg, OUT_DIR/annotations/<split>/
mosaic_NNNNNN.png (mode L) and OUT_DIR/classes.json, the layout `python -m data_tools.convert ade20k` reads; split
"training" draws garments from Fashion-MNIST's train split, "validation" from its test split. `mosaic_arrays` gives
fixed-size mosaics as arrays for in-memory use.
"""
from __future__ import annotations

import functools
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from data_tools import fashion_mnist
from engine.storage.files import OutputPathError, writable_parent_problem

CLASS_NAMES = ("background", *fashion_mnist.CLASS_NAMES)   # index = class id after reduce_zero_label
NUM_CLASSES = len(CLASS_NAMES)                               # 11
OTHER, BACKGROUND, FIRST_GARMENT = 0, 1, 2                   # annotation ids as written
THRESHOLD = 48          # garment intensity (of 255) from which a pixel is labelled as the garment
# Garments light on a dim background, as Fashion-MNIST shows them (bright on black): a random backbone separates
# garment from background within a few steps, so short runs measure what matters (recognising the garment per pixel).
# The tints are a shift away from Fashion-MNIST's grey; palette "grey" removes it (the demo's choice, docs/demo.md).
BACKGROUND_MAX = 80     # background corner colours are drawn from 0..BACKGROUND_MAX per channel
TINT_MIN = 150          # garment tints from TINT_MIN..255 per channel
OPAQUE = 96             # garment intensity from which it fully covers what lies below (alpha ramps up to it)
MIN_CONTRAST = 80.0     # least RGB distance between a garment's tint and the background under it
NOISE_STD = 6.0         # background pixel noise (of 255)
CHUNK = 500             # mosaics held in memory at once by write_ade20k
# split -> (Fashion-MNIST split the garments come from, split id in the random key)
SPLITS = {"training": ("train", 0), "validation": ("test", 1)}
PALETTES = ("colour", "grey")


class MosaicError(ValueError):
    """A bad argument or an unusable source; reported as one line, exit status 1."""


@dataclass(frozen=True)
class Placement:
    """One garment of a mosaic: source image `index`, resized to height x width, pasted with its top-left corner at
    (top, left) in colour `tint`."""
    index: int
    top: int
    left: int
    height: int
    width: int
    tint: tuple[float, float, float]


@dataclass(frozen=True)
class Scene:
    """Everything random about one mosaic: its background (float32 [H, W, 3], 0..255) and garments, bottom first."""
    background: np.ndarray
    garments: tuple[Placement, ...]


# ------------------------------------------------------------------------------------------------------ arguments
def _pair(name: str, value, kind: type, low: float) -> tuple:
    """(lo, hi) of a range argument, both >= low and lo <= hi; a one-line MosaicError otherwise."""
    ok = isinstance(value, (tuple, list)) and len(value) == 2 and all(
        not isinstance(v, bool) and isinstance(v, (int, float) if kind is float else int) for v in value)
    if not ok or not low <= value[0] <= value[1]:
        raise MosaicError(f"--{name} must be two {kind.__name__}s lo,hi with {low} <= lo <= hi, got {value!r}")
    return kind(value[0]), kind(value[1])


def _count(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise MosaicError(f"--{name} must be a whole number >= {low}, got {value!r}")
    return value


def _split_id(split: str) -> int:
    if split not in SPLITS:
        raise MosaicError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    return SPLITS[split][1]


@functools.lru_cache(maxsize=2)
def _fashion_mnist(fm_split: str) -> tuple[np.ndarray, np.ndarray]:
    # Cached: reading the gzipped train split takes about half a second, and callers often ask per slice.
    try:
        return fashion_mnist.load_fashion_mnist(fm_split)
    except (FileNotFoundError, ValueError) as e:
        raise MosaicError(str(e)) from None


def _source(split: str, source: Optional[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, h, w], labels [N] in 0..9): `source`, checked, or the Fashion-MNIST split behind `split`."""
    if source is None:
        return _fashion_mnist(SPLITS[split][0])
    images, labels = np.asarray(source[0]), np.asarray(source[1])
    if images.dtype != np.uint8 or images.ndim != 3 or len(images) == 0 or labels.shape != (len(images),):
        raise MosaicError(f"source must be (uint8 images [N, h, w], labels [N]) with N >= 1, got "
                          f"{images.dtype} {images.shape} and {labels.shape}")
    if labels.min() < 0 or labels.max() >= NUM_CLASSES - 1:
        raise MosaicError(f"source labels must be garment classes 0..{NUM_CLASSES - 2}, got "
                          f"{labels.min()}..{labels.max()}")
    return images, labels


# ------------------------------------------------------------------------------------------------------ drawing
def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Bilinear blend of four random corner colours plus grey Gaussian pixel noise, float32 [H, W, 3] in 0..255."""
    corners = rng.uniform(0, BACKGROUND_MAX, size=(2, 2, 3)).astype(np.float32)
    v = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    u = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :, None]
    top = corners[0, 0] * (1 - u) + corners[0, 1] * u
    bottom = corners[1, 0] * (1 - u) + corners[1, 1] * u
    # Grey (luminance) noise, like a camera's: colour noise would be mostly lost to JPEG's chroma subsampling.
    noise = rng.standard_normal(size=(height, width, 1), dtype=np.float32) * np.float32(NOISE_STD)
    return np.clip(top * (1 - v) + bottom * v + noise, 0, 255)


def _tint(rng: np.random.Generator, under: np.ndarray) -> tuple[float, float, float]:
    """A random colour that stands out from `under` (the mean background below the garment): a garment the colour of
    its background has no visible shape to learn. Gives up after a few draws (keeps the last one)."""
    for _ in range(8):
        tint = rng.uniform(TINT_MIN, 255, size=3)
        if np.linalg.norm(tint - under) >= MIN_CONTRAST:
            break
    return float(tint[0]), float(tint[1]), float(tint[2])


def draw_scene(rng: np.random.Generator, num_source: int, source_hw: tuple[int, int], *, height: int,
               width_range: tuple[int, int], garments: tuple[int, int], scale: tuple[float, float]) -> Scene:
    """The random part of one mosaic; each garment lies fully inside the canvas (shrunk to fit if needed)."""
    width = int(rng.integers(width_range[0], width_range[1] + 1))
    background = _background(rng, height, width)
    placed = []
    for _ in range(int(rng.integers(garments[0], garments[1] + 1))):
        index = int(rng.integers(num_source))
        s = rng.uniform(scale[0], scale[1])
        h = int(np.clip(round(source_hw[0] * s), 1, height))
        w = int(np.clip(round(source_hw[1] * s), 1, width))
        top = int(rng.integers(0, height - h + 1))
        left = int(rng.integers(0, width - w + 1))
        tint = _tint(rng, background[top:top + h, left:left + w].mean(axis=(0, 1)))
        placed.append(Placement(index, top, left, h, w, tint))
    return Scene(background, tuple(placed))


def _palette(palette: str) -> str:
    if palette not in PALETTES:
        raise MosaicError(f"--palette must be one of {', '.join(PALETTES)}, got {palette!r}")
    return palette


def render(scene: Scene, images: np.ndarray, labels: np.ndarray, palette: str = "colour"
           ) -> tuple[np.ndarray, np.ndarray]:
    """(image uint8 [H, W, 3], annotation uint8 [H, W]) of a scene: garments pasted in order, each one's pixels
    alpha-blended by intensity (opaque from OPAQUE up) and labelled: id class+2 where intensity >= THRESHOLD,
    OTHER where it is fainter but not zero; a later garment overwrites both image and labels beneath it. Palette
    "grey" replaces each pixel by its channel mean after the pasting, so the labels do not depend on it (every tint
    has channels >= TINT_MIN and every background corner <= BACKGROUND_MAX: garments stay distinct in grey)."""
    canvas = scene.background.copy()
    ann = np.full(canvas.shape[:2], BACKGROUND, np.uint8)
    for g in scene.garments:
        src = images[g.index]
        if src.shape != (g.height, g.width):
            src = np.asarray(Image.fromarray(src).resize((g.width, g.height), Image.Resampling.BILINEAR))
        inten = src.astype(np.float32)[:, :, None]
        alpha = np.minimum(inten / OPAQUE, 1.0)
        # Shading by intensity keeps the garment's own texture (folds, prints) visible under the flat tint.
        colour = np.asarray(g.tint, np.float32) * (0.55 + 0.45 * inten / 255.0)
        box = (slice(g.top, g.top + g.height), slice(g.left, g.left + g.width))
        canvas[box] = canvas[box] * (1.0 - alpha) + colour * alpha
        region = ann[box]
        region[(src > 0) & (src < THRESHOLD)] = OTHER
        region[src >= THRESHOLD] = FIRST_GARMENT + int(labels[g.index])
    if _palette(palette) == "grey":
        canvas = np.repeat(canvas.mean(axis=2, keepdims=True), 3, axis=2)
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8), ann


def make_scenes(split: str, num: int, *, num_source: int, source_hw: tuple[int, int] = (28, 28), height: int = 96,
                width_range: tuple[int, int] = (96, 128), garments: tuple[int, int] = (1, 3),
                scale: tuple[float, float] = (1.5, 2.5), seed: int = 0, start: int = 0) -> list[Scene]:
    """The scenes of mosaics start..start+num-1 of `split`; mosaic i depends only on (seed, split, i)."""
    split_id = _split_id(split)
    _count("num", num, 0)
    _count("start", start, 0)
    _count("seed", seed, 0)
    _count("height", height, 1)
    width_range = _pair("width_range", width_range, int, 1)
    garments = _pair("garments", garments, int, 0)
    scale = _pair("scale", scale, float, 1e-3)
    return [draw_scene(np.random.default_rng([seed, split_id, start + i]), num_source, source_hw, height=height,
                       width_range=width_range, garments=garments, scale=scale) for i in range(num)]


def make_mosaics(split: str, num: int, *, height: int = 96, width_range: tuple[int, int] = (96, 128),
                 garments: tuple[int, int] = (1, 3), scale: tuple[float, float] = (1.5, 2.5), seed: int = 0,
                 start: int = 0, source: Optional[tuple[np.ndarray, np.ndarray]] = None, palette: str = "colour"
                 ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Mosaics start..start+num-1 of split 'training' or 'validation' as (image uint8 [H, W, 3], annotation uint8
    [H, W]) pairs, H = height, W drawn from width_range, each with garments[0]..garments[1] garments resized by a
    factor in `scale`. `source` = (images uint8 [N, h, w], labels [N] in 0..9) replaces the Fashion-MNIST split
    the garments come from (train for 'training', test for 'validation'); `palette` is "colour" or "grey"."""
    _split_id(split)
    _palette(palette)
    images, labels = _source(split, source)
    scenes = make_scenes(split, num, num_source=len(images), source_hw=images.shape[1:], height=height,
                         width_range=width_range, garments=garments, scale=scale, seed=seed, start=start)
    return [render(s, images, labels, palette) for s in scenes]


def mosaic_arrays(split: str, num: int, *, size: int = 64, garments: tuple[int, int] = (1, 3),
                  scale: tuple[float, float] = (1.5, 2.5), seed: int = 0, start: int = 0,
                  source: Optional[tuple[np.ndarray, np.ndarray]] = None, palette: str = "colour"
                  ) -> tuple[np.ndarray, np.ndarray]:
    """size x size mosaics stacked for in-memory use: (images uint8 [N, size, size, 3], annotations uint8
    [N, size, size]); mosaic i is make_mosaics' mosaic i with height = width = size."""
    pairs = make_mosaics(split, num, height=size, width_range=(size, size), garments=garments, scale=scale,
                         seed=seed, start=start, source=source, palette=palette)
    if not pairs:
        return np.zeros((0, size, size, 3), np.uint8), np.zeros((0, size, size), np.uint8)
    images, annotations = zip(*pairs)
    return np.stack(images), np.stack(annotations)


# ------------------------------------------------------------------------------------------------------ writing
def _check_out_dir(out_dir: str, force: bool) -> None:
    if os.path.isfile(out_dir):
        raise OutputPathError(f"{out_dir} is a file; the output must be a folder")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not force:
        raise OutputPathError(f"{out_dir} exists and is not empty; pass --force to replace it")
    problem = writable_parent_problem(out_dir)
    if problem:
        raise OutputPathError(problem)


def _write_pairs(root: str, split: str, pairs: Sequence[tuple[np.ndarray, np.ndarray]], start: int,
                 quality: int) -> np.ndarray:
    """JPEG images + PNG annotations of mosaics start.. of one split under `root`; returns the pixel count of each
    annotation id."""
    img_dir, ann_dir = os.path.join(root, "images", split), os.path.join(root, "annotations", split)
    os.makedirs(img_dir, exist_ok=True)
    os.makedirs(ann_dir, exist_ok=True)
    pixels = np.zeros(NUM_CLASSES + 1, np.int64)
    for i, (image, ann) in enumerate(pairs, start):
        name = f"mosaic_{i:06d}"
        # 4:4:4 (no chroma subsampling): garment outlines are sharp colour edges, and halving the colour resolution
        # would smear them across the label boundary.
        Image.fromarray(image, "RGB").save(os.path.join(img_dir, name + ".jpg"), quality=quality, subsampling=0)
        Image.fromarray(ann, "L").save(os.path.join(ann_dir, name + ".png"))   # PNG: lossless ids
        pixels += np.bincount(ann.reshape(-1), minlength=NUM_CLASSES + 1)
    return pixels


def _replace_dir(tmp: str, out_dir: str) -> None:
    """Move the finished folder `tmp` to `out_dir`, replacing what is there; the old content is deleted only after
    the new one has its final name."""
    old = None
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        old = f"{out_dir}.old{os.getpid()}"
        os.rename(out_dir, old)
    elif os.path.isdir(out_dir):
        os.rmdir(out_dir)
    try:
        os.rename(tmp, out_dir)
    except OSError:
        if old:
            os.rename(old, out_dir)    # put the old data set back rather than leave nothing under the name
        raise
    if old:
        shutil.rmtree(old, ignore_errors=True)


def write_ade20k(out_dir: str, train: int = 2000, val: int = 200, height: int = 96,
                 width_range: tuple[int, int] = (96, 128), seed: int = 0, quality: int = 95, force: bool = False,
                 garments: tuple[int, int] = (1, 3), scale: tuple[float, float] = (1.5, 2.5),
                 palette: str = "colour") -> dict:
    """Write `train` + `val` mosaics to OUT_DIR in the ADEChallengeData2016 layout (images/<split>/*.jpg,
    annotations/<split>/*.png, classes.json); returns classes.json's content.

    Written into a temporary sibling folder and renamed at the end, so OUT_DIR never holds a half data set. An
    existing non-empty OUT_DIR is an error unless --force."""
    counts = {"training": _count("train", train, 1), "validation": _count("val", val, 1)}
    _count("height", height, 1)
    _count("seed", seed, 0)
    if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
        raise MosaicError(f"--quality must be a whole number in 1..100, got {quality!r}")
    width_range = _pair("width_range", width_range, int, 1)
    garments = _pair("garments", garments, int, 0)
    scale = _pair("scale", scale, float, 1e-3)
    _palette(palette)
    out_dir = os.path.normpath(out_dir)
    _check_out_dir(out_dir, force)
    t0 = time.time()
    tmp = f"{out_dir}.tmp{os.getpid()}"
    if os.path.exists(tmp):          # left by a killed run of the same pid: nothing of it is worth keeping
        shutil.rmtree(tmp)
    try:
        pixels = {}
        for split, num in counts.items():
            pixels[split] = np.zeros(NUM_CLASSES + 1, np.int64)
            for start in range(0, num, CHUNK):     # in chunks: memory stays flat however many are asked for
                pairs = make_mosaics(split, min(CHUNK, num - start), height=height, width_range=width_range,
                                     garments=garments, scale=scale, seed=seed, start=start, palette=palette)
                pixels[split] += _write_pairs(tmp, split, pairs, start, quality)
        meta = {"class_names": list(CLASS_NAMES), "num_classes": NUM_CLASSES, "reduce_zero_label": True,
                "id_meaning": "0 other (ignored), 1 background, 2.. garments", "seed": seed, "counts": counts,
                "pixel_counts": {s: {"other": int(p[OTHER]), **{n: int(c) for n, c in zip(CLASS_NAMES, p[1:])}}
                                 for s, p in pixels.items()},
                "height": height, "width_range": list(width_range), "garments": list(garments),
                "scale": list(scale), "palette": palette, "threshold": THRESHOLD, "quality": quality,
                "source": {s: f"Fashion-MNIST {fm} split" for s, (fm, _) in SPLITS.items()}}
        with open(os.path.join(tmp, "classes.json"), "w") as f:
            json.dump(meta, f, indent=2)
        _replace_dir(tmp, out_dir)
    except OSError as e:
        raise OutputPathError(f"cannot write {out_dir} ({e.strerror or e}); pick a writable location") from None
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    seconds = time.time() - t0
    for split, num in counts.items():
        print(f"wrote {num} {split} mosaics ({height} x {width_range[0]}..{width_range[1]} pixels) to "
              f"{os.path.join(out_dir, 'images', split)} and annotations/{split} ({seconds:.1f}s for all)",
              file=sys.stderr)
    return meta


# A one-command stage: `beitv2 mosaics --out ...` (engine.main) calls it directly.
COMMANDS = write_ade20k


def main(argv: Optional[list[str]] = None) -> int:
    import fire

    from engine.config.cli import spell_flags, typed_command
    from engine.config.schema import ConfigError
    try:
        argv = spell_flags(write_ade20k, list(sys.argv[1:] if argv is None else argv))
        fire.Fire(typed_command(write_ade20k), command=argv, name="python -m data_tools.mosaics",
                  serialize=lambda result: None)
    except (ConfigError, MosaicError, OutputPathError) as e:
        print(f"mosaics: error: {e}", file=sys.stderr)
        return 1
    return 0


__all__ = ["CLASS_NAMES", "NUM_CLASSES", "PALETTES", "MosaicError", "Placement", "Scene", "THRESHOLD", "draw_scene",
           "make_mosaics", "make_scenes", "mosaic_arrays", "render", "write_ade20k"]

if __name__ == "__main__":
    sys.exit(main())
