"""Pictures: token maps coloured by the codebook's geometry, [CLS] attention maps (`mim visualize`), and the
pictures both pretraining stages write to tensorboard; each stands on its own (engine.reporting.pictures: tiles >= 224
px upsampled by nearest neighbour, titled, the input beside its map, a colour bar or legend, no blank tiles). Tiny
archs, in process, 32 px images."""
import glob
import io
import os
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from engine.reporting.pictures import TILE, ColourBar, Legend, Tile, balanced_columns, nearest, render, tile_side
from pretrain.mim.model import build_mim_model, load_mim_model
from pretrain.mim.visualize import (attention_figure, attention_grid, attention_maps, block_names, cls_attention,
                                    visualize)
from pretrain.tokenizer.pictures import code_colours, token_map_picture
from tests.conftest import cli_error
from tests.picture_checks import assert_nearest_blocks, assert_stands_on_its_own, region

pytestmark = pytest.mark.usefixtures("fashion_mnist_available")

TINY_RUN = {"run.save_interval": 2, "schedule.total_steps": 4, "data.limit": 64, "run.progress_bar": False,
            "run.ds_config": "ds_configs/zero0.json"}


def tb_events(folder) -> tuple[dict, dict]:
    """`({tag: [(step, value)]}, {tag: [(step, PIL image)]})` from a run's tensorboard event files, read as raw
    records (length, crc, tensorboardX's Event protobuf, crc): tensorboard itself is not installed."""
    from tensorboardX.proto.event_pb2 import Event
    scalars, images = {}, {}
    for path in sorted(glob.glob(os.path.join(folder, "events.out.tfevents.*"))):
        data, pos = open(path, "rb").read(), 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for v in event.summary.value:
                if v.HasField("image"):
                    with Image.open(io.BytesIO(v.image.encoded_image_string)) as im:
                        images.setdefault(v.tag, []).append((event.step, im.convert("RGB")))
                else:
                    scalars.setdefault(v.tag, []).append((event.step, v.simple_value))
    return scalars, images


def fashion_pixels(count: int, side: int = 32) -> torch.Tensor:
    from pretrain.tokenizer.data import images_for_encoding
    return images_for_encoding("", "test", count, side)


def as_uint8(pixels: torch.Tensor) -> np.ndarray:
    return (pixels.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)


# ---- the layout --------------------------------------------------------------------------------------------

def test_a_grid_is_sized_to_its_groups_with_titled_tiles_and_a_key():
    rng = np.random.default_rng(0)
    groups = [[Tile(rng.integers(0, 256, (TILE, TILE, 3), dtype=np.uint8), f"image {i}"),
               Tile(rng.integers(0, 256, (TILE, TILE, 3), dtype=np.uint8), f"map {i}")] for i in range(7)]
    picture = render(groups, 4, "seven pairs", ColourBar("viridis", 0, 1, "value"), "a note")
    assert_stands_on_its_own(picture, 7, 2)
    for box, tile in zip(picture.tiles, [t for g in groups for t in g]):
        assert (region(picture.image, box) == tile.pixels).all()   # placed unresampled
    # 7 groups at most 4 a row: 4 + 3 on two rows, nothing drawn in the cell the last row leaves free
    tops = sorted({top for top, _, _, _ in picture.tiles})
    assert len(tops) == 2 and [t[0] for t in picture.tiles].count(tops[1]) == 6
    last = max(left + w for top, left, _, w in picture.tiles if top == tops[1])
    free = picture.image[tops[1]:tops[1] + TILE, last + 1:max(left + w for _, left, _, w in picture.tiles)]
    assert (free == 255).all()   # background, not a black or empty tile
    assert [balanced_columns(n, 4) for n in (1, 4, 5, 7, 8, 9)] == [1, 4, 3, 4, 4, 3]
    legend = render(groups[:1], 4, "one pair", Legend("codes", [((255, 0, 0), "code 1"), ((0, 0, 255), "code 2")]))
    assert_stands_on_its_own(legend, 1, 2)
    swatches = region(legend.image, legend.key)
    assert ((swatches == (255, 0, 0)).all(-1)).sum() >= 14 * 14 and ((swatches == (0, 0, 255)).all(-1)).sum() >= 14 * 14
    # small images become tiles of a whole multiple of their side, by nearest neighbour
    assert [tile_side(s) for s in (28, 32, 112, 224, 300)] == [224, 224, 224, 224, 300]
    small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    assert (nearest(small, 224)[::56, ::56] == small).all()
    assert_nearest_blocks(nearest(small, 224), 56)


# ---- token map colours ---------------------------------------------------------------------------------------

def test_code_colours_follow_the_codebook_geometry():
    g = torch.Generator().manual_seed(0)
    codebook = torch.randn(64, 16, generator=g)
    a = codebook[0]
    codebook[1] = a + 0.05 * torch.randn(16, generator=g)   # a near neighbour of code 0
    codebook[2] = -a                                        # the farthest a unit vector can be
    codebook[3] = 3 * a                                     # the same direction: the same code after l2-norm
    colours = code_colours(codebook).astype(int)
    assert colours.shape == (64, 3) and colours.min() == 0 and colours.max() == 255
    assert (colours[3] == colours[0]).all()
    near, far = np.abs(colours[1] - colours[0]).sum(), np.abs(colours[2] - colours[0]).sum()
    assert near < 30 < far, (near, far)
    # Over all pairs: colour distance grows with cosine distance (a projection keeps most of the order).
    unit = torch.nn.functional.normalize(codebook, dim=1).double()
    code_d = torch.cdist(unit, unit).flatten().numpy()
    colour_d = np.linalg.norm(colours[:, None] - colours[None], axis=-1).flatten()
    assert np.corrcoef(code_d, colour_d)[0, 1] > 0.4
    # Deterministic, dtype-free and permutation-invariant: a code's colour depends on the codebook as a set.
    assert (code_colours(codebook.double().numpy()) == colours).all()
    perm = torch.randperm(64, generator=g)
    assert (code_colours(codebook[perm]) == colours[perm.numpy()]).all()
    # A 2-d codebook has no third component: that channel is flat grey.
    assert (code_colours(torch.randn(10, 2, generator=g))[:, 2] == 128).all()


def test_encode_png_shows_each_image_beside_its_token_map(tiny_tokenizer_file, tmp_path):
    from pretrain.tokenizer import load_tokenizer
    from pretrain.tokenizer.train import encode
    encode(str(tiny_tokenizer_file), str(tmp_path / "ids.npy"), count=5, png=str(tmp_path / "ids.png"))
    ids = np.load(tmp_path / "ids.npy")
    colours = code_colours(load_tokenizer(str(tiny_tokenizer_file)).quantize.embedding.weight)
    pixels = fashion_pixels(5)   # what encode read: the first 5 test images at the tokenizer's 32 px
    picture = token_map_picture(pixels, ids, colours)
    with Image.open(tmp_path / "ids.png") as im:
        assert (np.asarray(im.convert("RGB")) == picture.image).all()   # the png is this picture
    assert_stands_on_its_own(picture, 5, 2)
    images, side = as_uint8(pixels), tile_side(32)
    assert len({top for top, _, _, _ in picture.tiles}) == 2   # 5 pairs at most 4 a row: 3 + 2
    for i in range(5):
        image_tile, map_tile = (region(picture.image, box) for box in picture.tiles[2 * i:2 * i + 2])
        assert (image_tile == nearest(images[i], side)).all()   # the input, upsampled, beside its map
        assert_nearest_blocks(image_tile, side // 32)
        assert (map_tile == nearest(colours[ids[i]], side)).all()   # one square of colours[id] per token
        assert_nearest_blocks(map_tile, side // ids.shape[1])
    text = picture.image[:picture.tiles[0][0]]   # titles above the tiles: dark text on white
    assert (text < 100).all(-1).sum() > 200


# ---- attention maps -----------------------------------------------------------------------------------------

def test_cls_attention_is_the_row_the_block_attends_with():
    """Its [CLS] row, applied to the values, gives the attention module's own [CLS] output (fused kernel)."""
    torch.manual_seed(0)
    model = build_mim_model("beitv2_tiny_test").eval()
    seen = {}
    attn = model.cls_pt_layers[-1].attn
    attn.register_forward_pre_hook(lambda m, args, kwargs: seen.update(x=args[0], **kwargs), with_kwargs=True)
    with torch.no_grad():
        model.forward_features(torch.randn(2, 3, 32, 32))
        x, bias = seen["x"], seen["shared_rel_pos_bias"]
        probs = cls_attention(attn, x, bias)
        assert probs.shape == (2, 2, 17) and torch.allclose(probs.sum(-1), torch.ones(2, 2))
        qkv = torch.nn.functional.linear(x, attn.qkv.weight, torch.cat((attn.q_bias, attn.k_bias, attn.v_bias)))
        v = qkv.reshape(2, 17, 3, 2, 32)[:, :, 2].transpose(1, 2)   # [B, heads, N, head_dim]
        cls_out = attn.proj((probs.unsqueeze(2) @ v).transpose(1, 2).reshape(2, 64))
        assert torch.allclose(cls_out, attn(x, shared_rel_pos_bias=bias)[:, 0], atol=1e-5)
    backbone, head = attention_maps(model, torch.rand(2, 3, 32, 32))
    assert backbone.shape == head.shape == (2, 2, 4, 4)
    assert not model.blocks[-1].attn._forward_pre_hooks and len(attn._forward_pre_hooks) == 1   # its hooks are gone


@pytest.fixture(scope="module")
def mim_run(tmp_path_factory, tiny_tokenizer_file):
    """A 4-step tiny MIM run (pictures at its step-2 checkpoint)."""
    from pretrain.mim.train import train
    out = tmp_path_factory.mktemp("mim") / "run"
    train("beitv2_tiny_test", tokenizer=str(tiny_tokenizer_file), **{"run.output_dir": str(out), **TINY_RUN})
    return out


def test_visualize_writes_one_picture_per_image(mim_run, tmp_path):
    from engine.config.cli import run_cli
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, mode in enumerate(["RGB", "L", "RGBA"]):
        Image.new(mode, (40 + 10 * i, 30), color=80 * i).save(folder / f"{i}.png")
    assert run_cli({"visualize": visualize}, ["visualize", str(mim_run), f"--images={folder}",
                                              f"--out={tmp_path / 'out'}"]) == 0
    assert sorted(os.listdir(tmp_path / "out")) == ["0.png", "1.png", "2.png"]
    result = visualize(str(mim_run / "mim.pt"), f"{folder / '0.png'},{folder / '1.png'}", str(tmp_path / "two"))
    assert result["images"] == 2 and result["heads"] == 2 and result["tile"] == tile_side(32)
    with Image.open(tmp_path / "two" / "1.png") as im:
        assert list(im.size) == result["png_size"]
        picture = np.asarray(im.convert("RGB"))
    # Two rows (last backbone block, aggregation head) of input, head mean, 2 heads; the first tile of each row
    # is the image itself (grey 80), the others the maps blended over it.
    model = load_mim_model(str(mim_run / "mim.pt")).eval()
    grey = torch.full((1, 3, 32, 32), 80 / 255)
    layout = attention_figure(grey[0], *(m[0] for m in attention_maps(model, grey)), names=block_names(model))
    assert picture.shape == layout.image.shape and len(layout.tiles) == 2 * 4
    for row in (0, 4):
        assert (region(picture, layout.tiles[row]) == 80).all()
        assert all((region(picture, box) != 80).any() for box in layout.tiles[row + 1:row + 4])


def test_attention_pictures_stand_on_their_own(mim_run, tmp_path):
    """Real images: `mim visualize`'s picture and the training runs' one, tile by tile."""
    model = load_mim_model(str(mim_run / "mim.pt")).eval()
    pixels = fashion_pixels(3)
    backbone, head = attention_maps(model, pixels)
    side = tile_side(32)
    for i in range(3):
        picture = attention_figure(pixels[i], backbone[i], head[i], names=block_names(model))
        assert_stands_on_its_own(picture, 2, 1 + 1 + 2)   # 2 rows: input, head mean, 2 heads
        for row in (0, 4):
            assert (region(picture.image, picture.tiles[row]) == nearest(as_uint8(pixels)[i], side)).all()
            for box in picture.tiles[row + 1:row + 4]:
                assert_nearest_blocks(region(picture.image, box), side // 32)
    grid = attention_grid(model, pixels)   # the tensorboard picture: input, the two head means, 2 images a row
    assert_stands_on_its_own(grid, 3, 3)
    assert len({top for top, _, _, _ in grid.tiles}) == 2
    for i in range(3):
        assert (region(grid.image, grid.tiles[3 * i]) == nearest(as_uint8(pixels)[i], side)).all()
        for box in grid.tiles[3 * i + 1:3 * i + 3]:   # a map: one square per patch (side // 4), over the image
            tile = region(grid.image, box).astype(int)
            under = nearest(as_uint8(pixels)[i], side).astype(int)
            colour = (tile - 0.4 * under) / 0.6   # alpha 0.6: what the colour map gave, flat on each patch
            squares = colour.reshape(4, side // 4, 4, side // 4, 3)
            assert np.abs(squares - squares[:, :1, :, :1]).max() < 3   # rounding of the blend and the image


def test_visualize_bad_image_is_a_one_line_error(mim_run, tmp_path, capsys):
    commands = {"visualize": visualize}
    missing = tmp_path / "nope.png"
    assert cli_error(capsys, commands, "visualize", str(mim_run), f"--images={missing}",
                     f"--out={tmp_path / 'o'}") == f"error: image not found: {missing}"
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff" + b"junk" * 50)
    err = cli_error(capsys, commands, "visualize", str(mim_run), f"--images={bad}", f"--out={tmp_path / 'o'}")
    assert err.startswith(f"error: {bad}: ") and err.endswith("fix or remove it")
    assert not (tmp_path / "o").exists()


# ---- tensorboard --------------------------------------------------------------------------------------------

def test_mim_training_logs_attention_pictures(mim_run):
    scalars, images = tb_events(mim_run / "tb")
    assert [s for s, _ in scalars["train/loss"]] == [1, 2, 3, 4]   # the pictures' file purges no scalars
    assert [s for s, _ in images["pictures/attention"]] == [2, 4]  # the checkpoint steps (save_interval 2), the end
    # The layout of 4 fixed 32 px images: re-rendered from any 4 images of that size, the tiles sit at the same
    # places, each an upsampled image (flat 7 px squares), none blank.
    model = load_mim_model(str(mim_run / "mim.pt")).eval()
    layout = attention_grid(model, fashion_pixels(4))
    logged = np.asarray(images["pictures/attention"][-1][1])
    assert logged.shape == layout.image.shape
    assert_stands_on_its_own(type(layout)(logged, layout.tiles, layout.key), 4, 3)
    for box in layout.tiles:
        assert_nearest_blocks(region(logged, box), tile_side(32) // 32)


def test_tokenizer_training_logs_token_map_pictures(tmp_path):
    from pretrain.tokenizer import load_tokenizer
    from pretrain.tokenizer.train import train
    train("vqkd_tiny_test", **{"run.output_dir": str(tmp_path / "run"), **TINY_RUN})
    scalars, images = tb_events(tmp_path / "run" / "tb")
    assert [s for s, _ in scalars["train/loss"]] == [1, 2, 3, 4]
    assert [s for s, _ in images["pictures/token_maps"]] == [2, 4]   # and the trained weights at the last step
    logged = np.asarray(images["pictures/token_maps"][-1][1])
    model = load_tokenizer(str(tmp_path / "run" / "tokenizer.pt"))
    pixels = fashion_pixels(4)
    ids = model.get_codebook_indices(pixels).view(-1, *model.grid).numpy()
    layout = token_map_picture(pixels, ids, code_colours(model.quantize.embedding.weight), columns=2)
    assert logged.shape == layout.image.shape   # 4 fixed images beside their maps, 2 pairs a row, a legend
    assert len({top for top, _, _, _ in layout.tiles}) == 2
    assert_stands_on_its_own(type(layout)(logged, layout.tiles, layout.key), 4, 2)
    side = tile_side(32)
    for i in range(4):
        assert_nearest_blocks(region(logged, layout.tiles[2 * i]), side // 32)   # the image
        token_map = region(logged, layout.tiles[2 * i + 1])
        assert_nearest_blocks(token_map, side // model.grid[0])   # one flat square per token
        assert len(np.unique(token_map.reshape(-1, 3), axis=0)) <= model.grid[0] * model.grid[1]
