"""`evaluate` and `encode` through the real command line, on held-out Fashion-MNIST images (Debian package)."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from pretrain.tokenizer import load_tokenizer
from tests.conftest import ROOT

pytestmark = pytest.mark.usefixtures("fashion_mnist_available")


def cli(*args):
    proc = subprocess.run([sys.executable, "-m", "pretrain.tokenizer", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_evaluate_reports_usage_perplexity_and_teacher_cosine(tiny_tokenizer_file, tmp_path):
    out = tmp_path / "eval.json"
    cli("evaluate", tiny_tokenizer_file, '--teacher={"name": "efficientnet_lite0", "input_size": 64}',
        '--data_cfg={"eval_images": 96}', f"--out={out}")
    result = json.loads(out.read_text())
    assert result["images"] == 96 and result["num_codes"] == 64
    assert 0 < result["codebook_usage"] <= 1
    assert 1 <= result["perplexity"] <= 64
    assert -1 <= result["teacher_cosine"] <= 1


def test_encode_writes_the_token_ids_of_the_test_images_and_a_png(tiny_tokenizer_file, tmp_path):
    from PIL import Image
    ids_path, png = tmp_path / "ids.npy", tmp_path / "ids.png"
    cli("encode", tiny_tokenizer_file, f"--out={ids_path}", "--count=10", f"--png={png}")
    ids = np.load(ids_path)
    assert ids.shape == (10, 4, 4) and ids.min() >= 0 and ids.max() < 64
    from pretrain.tokenizer.data import images_for_encoding
    expected = load_tokenizer(str(tiny_tokenizer_file)).get_codebook_indices(images_for_encoding("", "test", 10, 32))
    assert np.array_equal(ids.reshape(10, -1), expected.numpy())
    from pretrain.tokenizer.pictures import code_colours, token_map_picture
    colours = code_colours(load_tokenizer(str(tiny_tokenizer_file)).quantize.embedding.weight)
    picture = token_map_picture(images_for_encoding("", "test", 10, 32), ids, colours)
    with Image.open(png) as im:   # each image beside its token map, 224 px tiles, 4 pairs a row at most: 3 rows
        assert (np.asarray(im.convert("RGB")) == picture.image).all()
    assert len(picture.tiles) == 20 and len({top for top, _, _, _ in picture.tiles}) == 3


def test_encode_a_folder_and_bad_input(tmp_path, tiny_tokenizer_file):
    from PIL import Image
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, mode in enumerate(["RGB", "L", "RGBA"]):   # synthetic images of different modes and sizes
        Image.new(mode, (40 + i, 30)).save(folder / f"{i}.png")
    cli("encode", tiny_tokenizer_file, f"--out={tmp_path / 'f.npy'}", f"--images={folder}")
    assert np.load(tmp_path / "f.npy").shape == (3, 4, 4)
    proc = subprocess.run([sys.executable, "-m", "pretrain.tokenizer", "encode", str(tiny_tokenizer_file),
                           f"--out={tmp_path / 'x.npy'}", f"--images={tmp_path / 'nope'}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == (
        f"error: image folder not found: {tmp_path / 'nope'}")


def test_encode_reads_images_as_convert_does_and_names_a_bad_file(tmp_path):
    """16-bit PNGs keep their grey levels (not saturated white); a zero-byte, a corrupt file or a symlink loop is a
    one-line error naming it (synthetic images)."""
    from PIL import Image

    from pretrain.tokenizer.data import images_for_encoding
    folder = tmp_path / "imgs"
    folder.mkdir()
    ramp = np.tile(np.arange(0, 64, dtype=np.uint16) * 1024, (32, 1))   # 16-bit grey ramp 0..64512
    Image.fromarray(ramp).save(folder / "a16.png")   # uint16: a 16-bit grey PNG
    Image.fromarray((ramp >> 8).astype(np.uint8), "L").save(folder / "b8.png")
    pixels = images_for_encoding(str(folder), "test", 1, 32)
    assert pixels.shape == (2, 3, 32, 32)
    assert torch.allclose(pixels[0], pixels[1], atol=1 / 255)   # the same image at 16 and at 8 bits
    assert pixels[0].max() < 1.0 and pixels[0].mean() < 0.6     # a ramp, not saturated white
    for name, make in [("empty.png", lambda p: p.write_bytes(b"")),
                       ("corrupt.jpg", lambda p: p.write_bytes(b"\xff\xd8\xff" + b"junk" * 50)),
                       ("loop.png", lambda p: p.symlink_to(p))]:
        bad = folder / name
        make(bad)
        with pytest.raises(ValueError) as err:
            images_for_encoding(str(folder), "test", 1, 32)
        assert str(bad) in str(err.value) and len(str(err.value).splitlines()) == 1
        bad.unlink()


@pytest.mark.parametrize("module", ["pretrain.tokenizer", "pretrain.mim"])
def test_train_help_lists_recipes_and_keys(module):
    proc = subprocess.run([sys.executable, "-m", module, "train", "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = proc.stdout + proc.stderr   # fire writes help to stderr when there is no terminal
    assert "Recipes:" in text and "--run.micro_batch_size=8" in text and "--optim.lr=" in text


@pytest.mark.parametrize("args,message", [
    (['--teacher={"nme": "clip_b16"}'], "error: unknown config key 'teacher.nme'; valid keys here:"),
    (['--data_cfg={"eval_image": 5}'], "error: unknown config key 'data_cfg.eval_image'; valid keys here:"),
    (["--data_cfg=5"], "error: --data_cfg must be a JSON object"),
    (['--data_cfg={"source": "beton"}'], "error: evaluation needs data.eval_path"),
    (["--batch_size=0"], "error: --batch_size must be a whole number >= 1 (got 0)"),
    (["--batch_size=abc"], "error: --batch_size must be an integer, got 'abc'"),
])
@pytest.mark.slow
def test_evaluate_rejects_bad_settings_in_one_line(tiny_tokenizer_file, args, message):
    proc = subprocess.run([sys.executable, "-m", "pretrain.tokenizer", "evaluate", str(tiny_tokenizer_file), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(message)


def test_encode_needs_a_positive_count(tiny_tokenizer_file, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pretrain.tokenizer", "encode", str(tiny_tokenizer_file),
                           f"--out={tmp_path / 'x.npy'}", "--count=0"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == "error: --count=0: give the number of images to encode (>= 1)"
    assert not (tmp_path / "x.npy").exists()


def test_an_output_that_cannot_be_written_is_one_line(tiny_tokenizer_file, tmp_path, capsys):
    # In process, through the same entry point as `python -m pretrain.tokenizer`; the ids are written atomically,
    # with np.save's suffix rule (an --out without .npy gets it).
    from engine.config.cli import run_cli
    from pretrain.tokenizer.train import encode
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")
    assert run_cli({"encode": encode}, ["encode", str(tiny_tokenizer_file), f"--out={blocker}/ids.npy",
                                        "--count=2"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"error: cannot write {blocker}/ids.npy (")
    assert run_cli({"encode": encode}, ["encode", str(tiny_tokenizer_file), f"--out={tmp_path / 'ids'}",
                                        "--count=2"]) == 0
    assert np.load(tmp_path / "ids.npy").shape[0] == 2 and sorted(p.name for p in tmp_path.iterdir()) == [
        "file", "ids.npy"]
