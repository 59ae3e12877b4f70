"""Pictures: token maps coloured by the codebook's geometry, [CLS] attention maps (`mim visualize`), and the
pictures both pretraining stages write to tensorboard. Tiny archs, in process, 32 px."""
import glob
import io
import os
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from pretrain.mim.model import build_mim_model
from pretrain.mim.visualize import attention_maps, cls_attention, visualize
from pretrain.tokenizer.pictures import code_colours
from tests.conftest import cli_error

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


def test_encode_png_colours_each_token_by_its_code(tiny_tokenizer_file, tmp_path):
    from pretrain.tokenizer import load_tokenizer
    from pretrain.tokenizer.train import encode
    encode(str(tiny_tokenizer_file), str(tmp_path / "ids.npy"), count=3, png=str(tmp_path / "ids.png"))
    ids = np.load(tmp_path / "ids.npy")
    colours = code_colours(load_tokenizer(str(tiny_tokenizer_file)).quantize.embedding.weight)
    with Image.open(tmp_path / "ids.png") as im:
        grid = np.asarray(im.convert("RGB"))
    for i in range(3):   # image i's token map is the right half of pair i; one 8 px square per token
        token_map = grid[:32, 64 * i + 32:64 * i + 64]
        assert (token_map[4::8, 4::8] == colours[ids[i]]).all()


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
    from engine.cli import run_cli
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, mode in enumerate(["RGB", "L", "RGBA"]):
        Image.new(mode, (40 + 10 * i, 30), color=80 * i).save(folder / f"{i}.png")
    assert run_cli({"visualize": visualize}, ["visualize", str(mim_run), f"--images={folder}",
                                              f"--out={tmp_path / 'out'}"]) == 0
    # Two rows (last backbone block, aggregation head) of 1 + 2 heads tiles, 32 px each.
    assert sorted(os.listdir(tmp_path / "out")) == ["0.png", "1.png", "2.png"]
    for name in ("0.png", "1.png", "2.png"):
        with Image.open(tmp_path / "out" / name) as im:
            assert im.size == (3 * 32, 2 * 32)
    result = visualize(str(mim_run / "mim.pt"), f"{folder / '0.png'},{folder / '1.png'}", str(tmp_path / "two"))
    assert result["images"] == 2 and result["png_size"] == [96, 64] and result["heads"] == 2
    with Image.open(tmp_path / "two" / "1.png") as im:   # the first tile of each row is the image itself
        assert (np.asarray(im)[:, :32] == 80).all() and (np.asarray(im)[:, 32:] != 80).any()


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
    assert images["pictures/attention"][0][1].size == (3 * 32, 4 * 2 * 32)   # 4 fixed images, 2 rows each


def test_tokenizer_training_logs_token_map_pictures(tmp_path):
    from pretrain.tokenizer.train import train
    train("vqkd_tiny_test", **{"run.output_dir": str(tmp_path / "run"), **TINY_RUN})
    scalars, images = tb_events(tmp_path / "run" / "tb")
    assert [s for s, _ in scalars["train/loss"]] == [1, 2, 3, 4]
    assert [s for s, _ in images["pictures/token_maps"]] == [2, 4]   # and the trained weights at the last step
    picture = np.asarray(images["pictures/token_maps"][0][1])
    assert picture.shape == (32, 4 * 2 * 32, 3)   # 4 fixed images, each beside its token map
    assert len(np.unique(picture[:, 32:64].reshape(-1, 3), axis=0)) <= 16   # a map: one colour per token
