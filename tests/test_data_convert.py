"""data_tools.convert and data_tools.fashion_mnist: round trips, the bad-input zoo, the skip threshold, overwrite rules.

Every image here is synthetic (gradients drawn in the test). Betons are read back with a plain numpy reader (no numba)
so these tests stay fast; the FFCV loader's own decoding is covered in test_data_loader.py.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os

import numpy as np
import pytest
from PIL import Image

from data_tools import convert
from data_tools.fashion_mnist import load_fashion_mnist, read_idx

QUIET = ["--progress=False", "--workers=2"]


def gradient(h: int, w: int, shift: int = 0) -> np.ndarray:
    """A smooth RGB image (JPEG-friendly, so lossy round trips have a tight bound)."""
    y, x = np.mgrid[:h, :w]
    return np.stack([x * 200 // w + 20, y * 200 // h + 30, (x + y + shift) % 64 + 100], -1).astype(np.uint8)


def read_beton(path: str) -> dict[str, list]:
    """{field: [values]} of a .beton from data_tools.convert, decoded with numpy/cv2 only."""
    import cv2
    from ffcv.reader import Reader

    from data_tools.ffcv_ops import LabelMapField
    r = Reader(path, custom_handlers={"annotation": LabelMapField})
    raw = np.fromfile(path, np.uint8)
    sizes = dict(zip(r.alloc_table["ptr"].tolist(), r.alloc_table["size"].tolist()))
    out: dict[str, list] = {}
    for f, name in enumerate(r.field_names):
        meta, vals = r.metadata[f"f{f}"], []
        for m in meta:
            if name == "label":
                vals.append(int(m))
                continue
            data = raw[int(m["data_ptr"]):int(m["data_ptr"]) + sizes[int(m["data_ptr"])]]
            h, w = int(m["height"]), int(m["width"])
            if name == "annotation":
                vals.append(data.reshape(h, w))
            elif m["mode"] == 1:
                vals.append(data.reshape(h, w, 3))
            else:
                vals.append(cv2.cvtColor(cv2.imdecode(data, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB))
        out[name] = vals
    return out


@pytest.fixture(scope="module")
def good_folder(tmp_path_factory) -> tuple[str, dict[str, tuple[np.ndarray, int]]]:
    """3 classes x 3 synthetic gradient PNGs of different sizes."""
    root = tmp_path_factory.mktemp("good")
    truth = {}
    for c, cls in enumerate(["cat", "dog", "eel"]):
        os.makedirs(root / cls)
        for i in range(3):
            img = gradient(20 + 7 * i, 30 + 5 * c, shift=10 * i)
            path = str(root / cls / f"{i}.png")
            Image.fromarray(img).save(path)
            truth[path] = (img, c)
    return str(root), truth


def run(*argv: str) -> int:
    return convert.main([str(a) for a in argv])


def test_raw_round_trip_is_exact(good_folder, tmp_path):
    src, truth = good_folder
    out = tmp_path / "raw.beton"
    assert run("imagefolder", src, out, "--mode=raw", "--max_side=0", *QUIET) == 0
    got = read_beton(str(out))
    expected = [truth[p] for p in sorted(truth)]   # class folders and files in sorted order
    assert len(got["image"]) == len(expected) == 9
    for img, (ref, label), got_label in zip(got["image"], expected, got["label"]):
        np.testing.assert_array_equal(img, ref)
        assert got_label == label
    side = json.load(open(str(out) + ".json"))
    assert side["num_samples"] == 9 and side["num_skipped"] == 0
    assert side["class_names"] == ["cat", "dog", "eel"] and side["counts"] == {"cat": 3, "dog": 3, "eel": 3}
    assert side["settings"]["mode"] == "raw"
    assert side["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()


def test_jpeg_round_trip_within_tolerance_and_file_list(good_folder, tmp_path):
    src, truth = good_folder
    listing = tmp_path / "list.txt"
    paths = sorted(truth)
    listing.write_text("# path label\n" + "".join(f"{os.path.relpath(p, src)} {7 + i % 2}\n"
                                                  for i, p in enumerate(paths)))
    out = tmp_path / "jpg.beton"
    assert run("imagefolder", listing, out, "--mode=jpg", "--quality=95", f"--root={src}", *QUIET) == 0
    got = read_beton(str(out))
    assert got["label"] == [7 + i % 2 for i in range(len(paths))]
    for img, p in zip(got["image"], paths):
        assert img.shape == truth[p][0].shape
        assert np.abs(img.astype(int) - truth[p][0]).mean() < 2.0
    assert json.load(open(str(out) + ".json"))["class_names"] is None


def test_refuses_to_overwrite_without_force(good_folder, tmp_path, capsys):
    src, _ = good_folder
    out = tmp_path / "x.beton"
    assert run("imagefolder", src, out, "--mode=raw", *QUIET) == 0
    before = out.read_bytes()
    # It ends with what it wrote: images, classes, skipped files, size on disk and the whole sha256.
    record = json.load(open(str(out) + ".json"))
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == (f"wrote {out}: {record['num_samples']} images, {record['num_classes']} classes, 0 skipped, "
                    f"{len(before) / 2 ** 20:.1f} MiB, sha256 {record['sha256']}")   # FFCV writes 8 MiB pages
    assert run("imagefolder", src, out, "--mode=jpg", *QUIET) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"convert: error: {out} exists; pass --force to overwrite it"]
    assert out.read_bytes() == before
    for no in ("--force=false", "--force=0"):   # fire alone would pass the string 'false', a true value
        assert run("imagefolder", src, out, "--mode=jpg", no, *QUIET) == 1 and out.read_bytes() == before
    assert run("imagefolder", src, out, "--mode=jpg", "--force=maybe", *QUIET) == 1
    assert (capsys.readouterr().err.strip().splitlines()[-1]
            == "convert: error: --force must be true or false, got 'maybe'")
    assert run("imagefolder", src, out, "--mode=jpg", "--force", *QUIET) == 0
    assert out.read_bytes() != before
    assert json.load(open(str(out) + ".json"))["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert sorted(os.listdir(tmp_path)) == ["x.beton", "x.beton.json"]   # no temporary files left


@pytest.mark.parametrize("option,message", [
    ("--max_side=abc", "--max_side must be an integer, got 'abc'"),
    ("--workers=1.5", "--workers must be an integer, got 1.5"),
    ("--quality=True", "--quality must be an integer, got True"),
    ("--max_skip_fraction=lots", "--max_skip_fraction must be a number, got 'lots'"),
    ("--mode=png", "--mode must be jpg or raw, got 'png'"),
])
def test_a_bad_option_value_is_one_line(good_folder, tmp_path, capsys, option, message):
    assert run("imagefolder", good_folder[0], tmp_path / "x.beton", *QUIET, option) == 1
    assert capsys.readouterr().err.strip().splitlines() == [f"convert: error: {message}"]
    assert not (tmp_path / "x.beton").exists()


def test_an_output_folder_that_cannot_be_made_is_one_line(good_folder, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the output folder should go")
    assert run("imagefolder", good_folder[0], blocker / "sub" / "x.beton", *QUIET) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"convert: error: cannot create the output folder {blocker}/sub")


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> tuple[str, dict[str, np.ndarray], dict[str, str]]:
    """Synthetic bad-input zoo: (folder, expected RGB of the convertible files, expected reason of the others)."""
    root = tmp_path_factory.mktemp("zoo")
    d = root / "only_class"
    os.makedirs(d)
    base = gradient(24, 32)
    expect, skip = {}, {}

    Image.fromarray(base).save(d / "plain.png")
    expect["plain.png"] = base
    Image.fromarray(base).convert("CMYK").save(d / "cmyk.jpg", quality=98)
    expect["cmyk.jpg"] = base                                              # within JPEG tolerance
    pal = Image.fromarray(base).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal.info["transparency"] = 0
    pal.save(d / "palette.png", transparency=0)
    pal_rgb = np.asarray(pal.convert("RGB")).copy()
    pal_rgb[np.asarray(pal) == 0] = 255                                    # transparent index -> white background
    expect["palette.png"] = pal_rgb
    gray = base[:, :, 0]
    Image.fromarray(gray, "L").save(d / "gray.png")
    expect["gray.png"] = np.repeat(gray[:, :, None], 3, 2)
    g16 = (np.arange(24 * 32).reshape(24, 32) * 85).astype(np.uint16)
    Image.fromarray(g16).save(d / "gray16.png")
    expect["gray16.png"] = np.repeat(np.round(g16 / 257.0).astype(np.uint8)[:, :, None], 3, 2)
    alpha = np.linspace(0, 255, 32, dtype=np.uint8)[None, :].repeat(24, 0)
    Image.fromarray(np.dstack([base, alpha]), "RGBA").save(d / "alpha.png")
    a = alpha[:, :, None] / 255.0
    expect["alpha.png"] = np.round(base * a + 255 * (1 - a)).astype(np.uint8)
    Image.fromarray(gradient(200, 300)).save(d / "big.jpg", quality=98)   # shrunk to max_side=64 -> 64 x 43
    expect["big.jpg"] = np.asarray(Image.fromarray(gradient(200, 300)).resize((64, 43), Image.Resampling.LANCZOS))

    Image.fromarray(base).save(d / "truncated.jpg", quality=95)
    data = (d / "truncated.jpg").read_bytes()
    (d / "truncated.jpg").write_bytes(data[:len(data) // 2])
    skip["truncated.jpg"] = "truncated or corrupt"
    (d / "empty.jpg").write_bytes(b"")
    skip["empty.jpg"] = "empty file"
    (d / "notes.jpg").write_text("this is not an image\n")
    skip["notes.jpg"] = "not an image"
    Image.fromarray(gradient(300, 400)).save(d / "huge.png")               # 120,000 px > --max_pixels=100000
    skip["huge.png"] = "too large"
    (d / ".DS_Store").write_bytes(b"\0\1")
    return str(root), expect, skip


ZOO_OPTS = ["--mode=raw", "--max_side=64", "--max_pixels=100000"]


def test_zoo_converted_or_reported(zoo, tmp_path):
    src, expect, skip = zoo
    out = tmp_path / "zoo.beton"
    assert run("imagefolder", src, out, *ZOO_OPTS, "--max_skip_fraction=0.5", *QUIET) == 0
    got = read_beton(str(out))
    names = sorted(expect)
    assert len(got["image"]) == len(names)
    for name, img in zip(names, got["image"]):
        tol = 3.0 if name.endswith(".jpg") else 0.51
        assert img.dtype == np.uint8 and img.shape == expect[name].shape, name
        assert np.abs(img.astype(float) - expect[name]).mean() <= tol, name
    rows = [line.split("\t") for line in (tmp_path / "zoo.beton.skipped.tsv").read_text().splitlines()[1:]]
    reported = {os.path.basename(p): reason for p, reason in rows}
    assert set(reported) == set(skip) | {".DS_Store"}
    for name, reason in skip.items():
        assert reason in reported[name], (name, reported[name])
    side = json.load(open(str(out) + ".json"))
    assert (side["num_inputs"], side["num_samples"], side["num_skipped"], side["num_ignored"]) == (11, 7, 4, 1)


def test_zoo_over_threshold_fails_with_one_line(zoo, tmp_path, capsys):
    src, _, _ = zoo
    out = tmp_path / "zoo.beton"
    assert run("imagefolder", src, out, *ZOO_OPTS, "--max_skip_fraction=0.3", *QUIET) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "4 of 11 inputs (36.4%) could not be read" in err[0] and "--max_skip_fraction=0.3" in err[0]
    assert str(out) + ".skipped.tsv" in err[0]
    assert sorted(os.listdir(tmp_path)) == ["zoo.beton.skipped.tsv"]    # report kept, no beton, no temp file


def test_ade20k_pairs(tmp_path):
    src = tmp_path / "ADEChallengeData2016"
    (src / "images" / "training").mkdir(parents=True)
    (src / "annotations" / "training").mkdir(parents=True)
    labels = {}
    for i, name in enumerate(["a", "b", "c", "d"]):
        Image.fromarray(gradient(30 + i, 40)).save(src / "images" / "training" / f"{name}.jpg", quality=95)
        lab = (np.arange((30 + i) * 40).reshape(30 + i, 40) % 151).astype(np.uint8)
        if name == "c":
            continue                                                       # no annotation
        if name == "d":
            lab = lab[:-1]                                                 # size mismatch
        Image.fromarray(lab, "L").save(src / "annotations" / "training" / f"{name}.png")
        labels[name] = lab
    out = tmp_path / "ade.beton"
    assert run("ade20k", src, out, "--max_skip_fraction=0.5", *QUIET) == 0
    got = read_beton(str(out))
    assert len(got["annotation"]) == 2
    for name, img, lab in zip("ab", got["image"], got["annotation"]):
        np.testing.assert_array_equal(lab, labels[name])
        assert np.abs(img.astype(int) - gradient(*lab.shape)).mean() < 2.0
    report = (tmp_path / "ade.beton.skipped.tsv").read_text()
    assert "c.jpg\tno annotation" in report and "d.jpg\tannotation is 40x32, its image 40x33" in report


def _write_idx(path: str, arr: np.ndarray, code: int) -> None:
    header = bytes([0, 0, code, arr.ndim]) + np.array(arr.shape, ">u4").tobytes()
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(arr.dtype.newbyteorder(">")).tobytes())


def test_read_idx_and_errors(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(str(tmp_path / "x.gz"), arr, 0x08)
    np.testing.assert_array_equal(read_idx(str(tmp_path / "x.gz")), arr)
    ints = np.array([1, -2, 70000], np.int32)
    _write_idx(str(tmp_path / "i.gz"), ints, 0x0C)
    np.testing.assert_array_equal(read_idx(str(tmp_path / "i.gz")), ints)
    data = gzip.open(tmp_path / "x.gz").read()
    with gzip.open(tmp_path / "short.gz", "wb") as f:
        f.write(data[:-5])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        read_idx(str(tmp_path / "short.gz"))
    with pytest.raises(FileNotFoundError, match=r"nowhere/train-images-idx3-ubyte.gz not found: .*"
                                                r"apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("train", data_dir=str(tmp_path / "nowhere"))


def test_fashion_mnist_package(fashion_mnist_available):
    images, labels = load_fashion_mnist("test")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.dtype == np.int64 and np.bincount(labels).tolist() == [1000] * 10


def test_fashion_mnist_conversion(fashion_mnist_available, tmp_path):
    assert run("fashion_mnist", tmp_path, *QUIET) == 0
    for split, n in (("train", 60000), ("test", 10000)):
        side = json.load(open(tmp_path / f"{split}.beton.json"))
        assert side["num_samples"] == n and len(side["class_names"]) == 10
    got = read_beton(str(tmp_path / "test.beton"))
    images, labels = load_fashion_mnist("test")
    assert got["label"] == labels.tolist()
    for i in (0, 1234, 9999):
        np.testing.assert_array_equal(got["image"][i], np.repeat(images[i][:, :, None], 3, 2))
