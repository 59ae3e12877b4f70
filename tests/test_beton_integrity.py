"""A damaged .beton stops the run instead of training on black images (project hardening issue, item 4;
data_tools.beton_check).

One small JPEG .beton (40 gradient images of two sizes, via data_tools.convert) is streamed whole and verified; then
the stored JPEG bytes of half its samples are overwritten in place (the header, metadata and allocation table stay
intact, as with bits rotted on a disk): its sha256 no longer matches convert's record, and its damaged images decode
black, which stops streaming with a one-line error. One FFCV Loader (one numba compilation) serves the whole test.
"""
from __future__ import annotations

from itertools import islice

import numpy as np
import pytest
import torch
from PIL import Image

from data_tools import beton_check, convert
from data_tools.beton_check import BetonIntegrityError
from data_tools.config import DataConfig
from data_tools.ffcv_loader import FFCVSource, RawAug
from data_tools.sources import train_source
from engine.config.schema import RunConfig

N = 40


def gradient(h: int, w: int, shift: int) -> np.ndarray:
    y, x = np.mgrid[:h, :w]
    return np.stack([x * 200 // w + 20, y * 200 // h + 30, (x + y + shift) % 64 + 100], -1).astype(np.uint8)


@pytest.fixture
def beton(tmp_path) -> str:
    for i in range(N):
        folder = tmp_path / "src" / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(gradient(16 if i % 3 else 12, 16, i)).save(folder / f"{i:02d}.png")   # canvas 16 x 16
    out = str(tmp_path / "tiny.beton")
    assert convert.main(["imagefolder", str(tmp_path / "src"), out, "--progress=False", "--workers=1"]) == 0
    return out


def damage_jpegs(path: str, samples) -> None:
    """Overwrite the stored JPEG bytes of `samples` with zeros, in place (the file keeps its layout)."""
    from ffcv.reader import Reader
    reader = Reader(path)
    meta = reader.metadata[f"f{reader.field_names.index('image')}"]
    size_at = dict(zip(reader.alloc_table["ptr"].tolist(), reader.alloc_table["size"].tolist()))
    with open(path, "r+b") as f:
        for i in samples:
            ptr = int(meta["data_ptr"][i])
            f.seek(ptr)
            f.write(bytes(size_at[ptr]))


def stream(path: str, steps: int) -> int:
    """`steps` micro-batches of the file (4 images, one rank: 10 per pass); the number of images read."""
    source = FFCVSource(path, RawAug(), micro_batch_size=4, num_workers=1)
    return sum(len(b["index"]) for b in islice(source.micro_batches(0), steps))


def test_a_damaged_beton_fails_verification_and_streaming_with_one_line_errors(beton, monkeypatch):
    monkeypatch.setattr(beton_check, "MIN_IMAGES", 16)   # a 40-image file: judge after 16 images, not 500
    monkeypatch.setattr(beton_check, "CHECK_EVERY", 2)
    run = RunConfig(micro_batch_size=4)
    data = DataConfig(source="beton", train_path=beton, verify=True)
    # Undamaged: the sha256 matches, and two whole passes (and their checks at the end) find no black image.
    assert train_source(data, run, RawAug(), torch.device("cpu")).steps_per_epoch == N // 4
    assert stream(beton, 2 * N // 4 + 1) == 2 * N + 4

    damage_jpegs(beton, range(0, N, 2))
    with pytest.raises(BetonIntegrityError) as err:   # before anything is read, let alone trained
        train_source(data, run, RawAug(), torch.device("cpu"))
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{beton} is damaged or was changed: its sha256 is ")
    assert message.endswith("re-convert it with python -m data_tools.convert, or pass --data.verify=false to train "
                            "on it as it is")

    # Unverified, its damaged samples decode black: stopped within the first pass (the counter read in passing)...
    with pytest.raises(BetonIntegrityError) as err:
        stream(beton, N // 4)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{beton}: ") and "images decoded so far" in message
    assert "are entirely black, more than 1%: its stored images look damaged; re-convert it" in message
    # ... or at the end of the pass, where the counter is read when no poll came before (when the next pass begins).
    monkeypatch.setattr(beton_check, "CHECK_EVERY", 10 ** 6)
    with pytest.raises(BetonIntegrityError, match=r": 20 of the 40 images decoded so far \(50.0%\) are entirely"):
        stream(beton, N // 4 + 1)


def test_verifying_a_beton_without_convert_s_record_is_a_one_line_error(tmp_path):
    path = tmp_path / "other.beton"
    path.write_bytes(b"not checked: the record is looked up first")
    with pytest.raises(BetonIntegrityError) as err:
        beton_check.verify_sha256(str(path))
    assert str(err.value) == (f"{path} cannot be verified: {path}.json is missing; re-convert it with python -m "
                              f"data_tools.convert, or pass --data.verify=false to train on it unverified")


@pytest.mark.parametrize("mode", ["raw", "jpg"])
def test_the_decoder_flags_black_images_inside_their_size_only(tmp_path, mode):
    # Three images on one 16 x 16 canvas: a bright 16-row one, a 12-row black one (below it the canvas keeps
    # whatever the slot held) and a 12-row one black but for its last pixel. Only the second one is black.
    folder = tmp_path / "src" / "c"
    folder.mkdir(parents=True)
    nearly = np.zeros((12, 16, 3), np.uint8)
    nearly[11, 15, 2] = 200
    for i, img in enumerate([np.full((16, 16, 3), 255, np.uint8), np.zeros((12, 16, 3), np.uint8), nearly]):
        Image.fromarray(img).save(folder / f"{i}.png")
    out = str(tmp_path / f"{mode}.beton")
    assert convert.main(["imagefolder", str(tmp_path / "src"), out, f"--mode={mode}", "--quality=100",
                         "--progress=False", "--workers=1"]) == 0
    source = FFCVSource(out, RawAug(), micro_batch_size=1, num_workers=1)
    batches = list(source.eval_batches(1))
    assert [tuple(b["image"].shape) for b in batches] == [(1, 3, 16, 16)] * 3   # the status row is cut off
    assert batches[0]["image"].min() == 255 and batches[1]["image"][0, :, :12].max() == 0
    assert (int(source.black_images.black), source.black_images.seen) == (1, 3)


def test_the_black_counter_adds_flags_across_batches():
    check = beton_check.BlackImages("x.beton", torch.device("cpu"))
    check.add(torch.tensor([1, 0, 0], dtype=torch.uint8))
    check.add(torch.tensor([1, 1], dtype=torch.uint8))
    assert (int(check.black), check.seen) == (3, 5)


def test_fashion_mnist_has_no_all_black_image(fashion_mnist_available):
    # The 1% threshold is for photos; a data set with black backgrounds must still have no all-zero image.
    from data_tools.fashion_mnist import load_fashion_mnist
    for split in ("train", "test"):
        images, _ = load_fashion_mnist(split)
        assert int((images.reshape(len(images), -1).max(1) == 0).sum()) == 0
