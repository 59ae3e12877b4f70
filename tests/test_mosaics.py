"""data_tools.mosaics: determinism, exact labels, the ADE20K folder -> .beton -> FFCV round trip, the command line.

Label geometry is checked with synthetic "garments" (squares drawn in the test, so where each one's pixels are is
known exactly); real Fashion-MNIST mosaics are checked for plausible ids only.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from data_tools import mosaics
from data_tools.mosaics import BACKGROUND, FIRST_GARMENT, OTHER, make_mosaics, make_scenes, mosaic_arrays

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = dict(height=40, width_range=(40, 56), garments=(2, 4))


def squares(solid: int = 255, faint: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic source: garment k (class k, 0..9) is a 28x28 image with a 12x12 square of intensity `solid` at
    rows/cols 8..19, inside a 20x20 frame of intensity `faint` (rows/cols 4..23); 0 elsewhere."""
    img = np.zeros((28, 28), np.uint8)
    img[4:24, 4:24] = faint
    img[8:20, 8:20] = solid
    return np.repeat(img[None], 10, axis=0), np.arange(10)


def expected_annotation(scene: mosaics.Scene, labels: np.ndarray, solid: tuple[slice, slice],
                        frame: tuple[slice, slice] | None) -> np.ndarray:
    """Labels painted from the known square geometry, bottom garment first (a later one covers an earlier one)."""
    h, w = scene.background.shape[:2]
    ann = np.full((h, w), BACKGROUND, np.uint8)
    for g in scene.garments:
        def at(box):
            return slice(g.top + box[0].start, g.top + box[0].stop), slice(g.left + box[1].start, g.left + box[1].stop)
        if frame is not None:
            ann[at(frame)] = OTHER
        ann[at(solid)] = FIRST_GARMENT + labels[g.index]
    return ann


# ------------------------------------------------------------------------------------------------------ generation
def test_deterministic_and_slices_reproduce_the_full_set():
    src = squares()
    full = make_mosaics("training", 6, source=src, **SMALL)
    again = make_mosaics("training", 6, source=src, **SMALL)
    part = make_mosaics("training", 2, start=3, source=src, **SMALL)
    for (a, b), (c, d) in zip(full, again):
        np.testing.assert_array_equal(a, c)
        np.testing.assert_array_equal(b, d)
    for (a, b), (c, d) in zip(full[3:5], part):
        np.testing.assert_array_equal(a, c)
        np.testing.assert_array_equal(b, d)
    other_seed = make_mosaics("training", 1, seed=1, source=src, **SMALL)[0][0]
    other_split = make_mosaics("validation", 1, source=src, **SMALL)[0][0]
    assert not np.array_equal(full[0][0], other_seed) and not np.array_equal(full[0][0], other_split)
    widths = {img.shape[1] for img, _ in full}
    assert all(img.shape[0] == 40 and 40 <= img.shape[1] <= 56 for img, _ in full) and len(widths) > 1


def test_labels_are_the_visible_squares():
    """Opaque squares at scale 1 (no resampling): each class id covers exactly the visible part of its squares,
    background elsewhere; the topmost square shows its tint, and pixels no garment touches show the background."""
    images, labels = squares()
    scenes = make_scenes("training", 6, num_source=10, scale=(1.0, 1.0), **SMALL)
    pairs = make_mosaics("training", 6, scale=(1.0, 1.0), source=(images, labels), **SMALL)
    solid = (slice(8, 20), slice(8, 20))
    for scene, (img, ann) in zip(scenes, pairs):
        assert 2 <= len(scene.garments) <= 4
        np.testing.assert_array_equal(ann, expected_annotation(scene, labels, solid, None))
        top = scene.garments[-1]
        box = (slice(top.top + 8, top.top + 20), slice(top.left + 8, top.left + 20))
        np.testing.assert_array_equal(img[box], np.broadcast_to(np.rint(top.tint).astype(np.uint8), (12, 12, 3)))
        untouched = ann == BACKGROUND
        np.testing.assert_array_equal(img[untouched], np.rint(scene.background[untouched]).astype(np.uint8))


def test_faint_edges_are_other_unless_covered_and_resized_squares():
    images, labels = squares(faint=20)
    scenes = make_scenes("validation", 6, num_source=10, scale=(1.0, 1.0), **SMALL)
    pairs = make_mosaics("validation", 6, scale=(1.0, 1.0), source=(images, labels), **SMALL)
    for scene, (_, ann) in zip(scenes, pairs):
        want = expected_annotation(scene, labels, (slice(8, 20), slice(8, 20)), (slice(4, 24), slice(4, 24)))
        np.testing.assert_array_equal(ann, want)
        assert (ann == OTHER).any()
    # resized garments: a fully solid 28x28 image stays a solid square of the drawn size at any scale
    full = np.full((10, 28, 28), 255, np.uint8)
    scenes = make_scenes("training", 6, num_source=10, scale=(1.0, 1.8), **SMALL)
    pairs = make_mosaics("training", 6, scale=(1.0, 1.8), source=(full, labels), **SMALL)
    for scene, (_, ann) in zip(scenes, pairs):
        assert any(g.height != 28 for g in scene.garments)
        want = np.full(ann.shape, BACKGROUND, np.uint8)
        for g in scene.garments:
            want[g.top:g.top + g.height, g.left:g.left + g.width] = FIRST_GARMENT + labels[g.index]
        np.testing.assert_array_equal(ann, want)


def test_real_fashion_mnist_mosaics(fashion_mnist_available):
    pairs = make_mosaics("validation", 6)
    for img, ann in pairs:
        assert img.dtype == ann.dtype == np.uint8 and img.shape == ann.shape + (3,) and ann.shape[0] == 96
        ids = set(np.unique(ann).tolist())
        assert BACKGROUND in ids and ids & set(range(FIRST_GARMENT, FIRST_GARMENT + 10)) and max(ids) <= 11
        assert img[ann == BACKGROUND].std() > 10          # a gradient with noise, not a flat colour
    assert any(OTHER in np.unique(ann) for _, ann in pairs)
    images, anns = mosaic_arrays("validation", 3, size=48, start=2)
    assert images.shape == (3, 48, 48, 3) and anns.shape == (3, 48, 48)
    assert mosaics.NUM_CLASSES == len(mosaics.CLASS_NAMES) == 11 and mosaics.CLASS_NAMES[0] == "background"


def test_grey_palette_renders_the_same_scenes_in_grey():
    """palette="grey": the colour mosaics' annotations unchanged, every pixel the mean of the colour one's channels
    (to rounding), and garments still stand out from the background (grey tints are >= TINT_MIN, backgrounds <=
    BACKGROUND_MAX)."""
    src = squares()
    colour = make_mosaics("training", 4, source=src, **SMALL)
    grey = make_mosaics("training", 4, source=src, palette="grey", **SMALL)
    for (ci, ca), (gi, ga) in zip(colour, grey):
        np.testing.assert_array_equal(ga, ca)
        assert (gi[..., 0] == gi[..., 1]).all() and (gi[..., 1] == gi[..., 2]).all()
        assert np.abs(gi[..., 0].astype(np.float32) - ci.astype(np.float32).mean(axis=2)).max() <= 1.0
        garment, background = gi[..., 0][ga >= FIRST_GARMENT], gi[..., 0][ga == BACKGROUND]
        assert garment.size and background.size and garment.mean() > background.mean() + 50
    images, _ = mosaic_arrays("training", 2, size=40, source=src, palette="grey")
    assert (images[..., 0] == images[..., 2]).all()


def test_bad_arguments_are_one_line_errors():
    src = squares()
    with pytest.raises(mosaics.MosaicError, match="split must be one of training, validation"):
        make_mosaics("train", 1, source=src)
    with pytest.raises(mosaics.MosaicError, match="--width_range must be two ints"):
        make_mosaics("training", 1, width_range=(50, 40), source=src)
    with pytest.raises(mosaics.MosaicError, match="labels must be garment classes"):
        make_mosaics("training", 1, source=(src[0], src[1] + 5))
    with pytest.raises(mosaics.MosaicError, match="--palette must be one of colour, grey, got 'gray'"):
        make_mosaics("training", 1, source=src, palette="gray")


# ------------------------------------------------------------------------------------------------------ ADE20K files
ADE = dict(height=40, width_range=(40, 60))


@pytest.fixture(scope="module")
def ade_folder(tmp_path_factory, fashion_mnist_available):
    root = tmp_path_factory.mktemp("ade")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mosaics, "CHUNK", 4)            # written in chunks of 4: the files must not show it
        meta = mosaics.write_ade20k(str(root / "mosaics"), train=6, val=3, **ADE)
    return root, meta


def _png(src, split: str, i: int) -> np.ndarray:
    return np.asarray(Image.open(src / "annotations" / split / f"mosaic_{i:06d}.png"))


def test_write_ade20k_layout(ade_folder):
    root, meta = ade_folder
    src = root / "mosaics"
    assert sorted(os.listdir(root)) == ["mosaics"]                  # no temporary folder left beside it
    assert json.loads((src / "classes.json").read_text()) == meta
    assert meta["num_classes"] == 11 and meta["class_names"] == list(mosaics.CLASS_NAMES)
    assert meta["counts"] == {"training": 6, "validation": 3} and meta["reduce_zero_label"] is True
    for split, n in (("training", 6), ("validation", 3)):
        names = [f"mosaic_{i:06d}" for i in range(n)]
        assert sorted(os.listdir(src / "images" / split)) == [f + ".jpg" for f in names]
        assert sorted(os.listdir(src / "annotations" / split)) == [f + ".png" for f in names]
        for i, (img, ann) in enumerate(make_mosaics(split, n, **ADE)):   # the PNGs hold exactly what was drawn
            assert Image.open(src / "annotations" / split / f"mosaic_{i:06d}.png").mode == "L"
            np.testing.assert_array_equal(_png(src, split, i), ann)
            jpg = np.asarray(Image.open(src / "images" / split / f"mosaic_{i:06d}.jpg"))
            assert jpg.shape == img.shape and np.abs(jpg.astype(int) - img).mean() < 4


def test_write_ade20k_refuses_a_non_empty_folder(tmp_path, fashion_mnist_available):
    out = tmp_path / "data"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(mosaics.OutputPathError, match=f"{out} exists and is not empty; pass --force"):
        mosaics.write_ade20k(str(out), train=1, val=1, height=32, width_range=(32, 32))
    assert os.listdir(out) == ["keep.txt"] and os.listdir(tmp_path) == ["data"]
    mosaics.write_ade20k(str(out), train=2, val=1, height=32, width_range=(32, 32), force=True)
    assert sorted(os.listdir(out)) == ["annotations", "classes.json", "images"] and os.listdir(tmp_path) == ["data"]
    assert len(os.listdir(out / "images" / "training")) == 2


def test_ade20k_round_trip_through_convert_and_ffcv(ade_folder):
    """The folder converts with data_tools.convert and FFCV decodes each label map exactly (one test: FFCV's numba
    compilation takes most of its time)."""
    from data_tools import convert
    from data_tools.ffcv_loader import FFCVSource, RawAug

    root, _ = ade_folder
    src = root / "mosaics"
    out = str(root / "train.beton")
    convert.ade20k(str(src), out, split="training", progress=False)
    seen = []
    for batch in FFCVSource(out, RawAug(), micro_batch_size=2, num_workers=0).eval_batches():
        for img, label, (h, w), i in zip(batch["image"], batch["label"], batch["size"].tolist(),
                                         batch["index"].tolist()):
            ann = _png(src, "training", i)
            assert (h, w) == ann.shape
            np.testing.assert_array_equal(label[:h, :w].numpy(), ann)
            jpg = np.asarray(Image.open(src / "images" / "training" / f"mosaic_{i:06d}.jpg"))
            # the converter re-encodes the JPEG (quality 90, chroma subsampled): close, not equal
            assert np.abs(img[:, :h, :w].permute(1, 2, 0).numpy().astype(int) - jpg).mean() < 10
            seen.append(i)
    assert seen == list(range(6))


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT, DS_ACCELERATOR="cpu")
    return subprocess.run([sys.executable, "-m", "data_tools.mosaics", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli(tmp_path, fashion_mnist_available):
    out = tmp_path / "ade"
    r = _cli(str(out), "--train=3", "--val=2", "--height=32", "--width_range=32,40", "--seed=5")
    assert r.returncode == 0, r.stderr
    assert len(r.stderr.strip().splitlines()) == 2 and "3 training mosaics" in r.stderr
    assert len(os.listdir(out / "images" / "training")) == 3
    assert len(os.listdir(out / "annotations" / "validation")) == 2
    assert json.loads((out / "classes.json").read_text())["seed"] == 5

    r = _cli(str(tmp_path / "bad"), "--train=-1")
    assert r.returncode == 1 and r.stderr == "mosaics: error: --train must be a whole number >= 1, got -1\n"
    assert not (tmp_path / "bad").exists()


def test_cli_type_errors_in_process(tmp_path, capsys):
    for bad, message in (("--height=abc", "--height must be an integer, got 'abc'"),
                         ("--width_range=9", "--width_range must be two ints lo,hi with 1 <= lo <= hi, got 9"),
                         ("--force=maybe", "--force must be true or false, got 'maybe'")):
        assert mosaics.main([str(tmp_path / "bad"), bad]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "bad").exists()
