"""Fine-tune classifier: every checkpoint route into it, its one-line errors, relative position table resizing,
layer-wise lr decay groups, mixup / cutmix targets, and top-k counting on one and on two (uneven) ranks."""
import json
import math
import os

import numpy as np
import pytest
import torch
from timm.models.beit import Beit, checkpoint_filter_fn
from torch import nn

from engine.parallel.ds_setup import layer_decay_param_groups
from finetune.classify.evaluate import classification_metrics
from finetune.classify.mixup import Mixup
from finetune.model import build_classifier, load_classifier, save_classifier
from pretrain.mim import build_mim_model, export_to_timm, save_mim_model
from tests.conftest import ROOT
from tests.dist_util import run_ranks
from tests.test_mim_model import tiny

OFFICIAL_KEYS = os.path.join(ROOT, "reference", "official_state_dict_keys.json")
TINY = "beitv2_tiny_test"   # 32 px, 8 px patches (4 x 4 grid), width 64, 3 blocks, 2 heads
TINY_KW = dict(img_size=32, patch_size=8, embed_dim=64, depth=3, num_heads=2, init_values=0.1)
TABLE = "rel_pos_bias.relative_position_bias_table"
NUM_CLASSES = 10


def tiny_mim(**overrides):
    """A tiny MIM model whose zero-initialised tensors (shared table, q/v biases, final norm) hold other values,
    so that a route that drops, shares or re-initialises them the wrong way shows."""
    model = tiny(**overrides)   # shared table and q/v biases already drawn
    with torch.no_grad():
        model.norm.weight.fill_(2.0)   # must not reach fc_norm: official fine-tuning starts it fresh
        model.norm.bias.fill_(0.5)
    return model.eval()


def tiny_timm(num_classes: int = NUM_CLASSES) -> Beit:
    """timm's BEiT in the fine-tune layout with random tables, q/v biases and a head of ordinary size."""
    torch.manual_seed(1)
    model = Beit(**TINY_KW, num_classes=num_classes, use_abs_pos_emb=False, use_rel_pos_bias=True,
                 global_pool="avg")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("relative_position_bias_table"):
                p.normal_()
            elif name.endswith(("q_bias", "v_bias")):
                p.normal_(std=0.1)
        model.head.weight.normal_(std=0.5)
        model.head.bias.normal_(std=0.5)
        model.fc_norm.weight.normal_(1.0, 0.2)
    return model.eval()


def images(b: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


def logits(model, x):
    with torch.no_grad():
        return model.eval()(x)


def one_line_value_error(fn, path) -> str:
    with pytest.raises(ValueError) as err:
        fn()
    msg = str(err.value)
    assert "\n" not in msg, msg
    assert str(path) in msg, msg
    return msg


@pytest.fixture(scope="module")
def mim_file(tmp_path_factory):
    model = tiny_mim()
    path = tmp_path_factory.mktemp("mim") / "mim.pt"
    save_mim_model(model, path)
    return model, path


# ---- checkpoint routes ------------------------------------------------------------------------------------------

def test_mim_file_route(mim_file):
    mim, path = mim_file
    torch.manual_seed(5)
    fresh = build_classifier(TINY, NUM_CLASSES)
    torch.manual_seed(5)
    model = build_classifier(TINY, NUM_CLASSES, path)
    sd, src = model.state_dict(), mim.state_dict()

    assert not any(k.startswith(("mask_token", "lm_head", "cls_pt_layers", "rel_pos_bias", "norm.")) for k in sd)
    assert sd.keys() == fresh.state_dict().keys()
    for i in range(3):
        assert torch.equal(sd[f"blocks.{i}.attn.relative_position_bias_table"], src[TABLE])
    backbone = [k for k in sd if k.startswith(("cls_token", "patch_embed.", "blocks."))
                and not k.endswith("relative_position_bias_table")]
    assert set(backbone) == {k for k in src if k.startswith(("cls_token", "patch_embed.", "blocks."))}
    assert len(backbone) == 3 + 3 * 15   # cls_token, patch_embed weight and bias; 15 tensors per block
    for k in backbone:
        assert torch.equal(sd[k], src[k]), k
    # fc_norm is a unit LayerNorm (not the pretraining norm); the head is the model's own 0.001-scaled init.
    assert torch.equal(sd["fc_norm.weight"], torch.ones(64)) and torch.equal(sd["fc_norm.bias"], torch.zeros(64))
    head = model.head.weight
    assert head.abs().max() < 0.01 and head.abs().max() > 0
    assert 0.5 * 0.02 * 0.001 < head.std() < 1.5 * 0.02 * 0.001
    assert torch.equal(model.head.bias, torch.zeros(NUM_CLASSES))
    assert torch.equal(head, fresh.head.weight)
    # The backbone computes what the MIM encoder computes.
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), mim.forward_features(x)[0])
        pooled = mim.forward_features(x)[0][:, 1:].mean(1)
        expected = model.head(torch.nn.functional.layer_norm(pooled, (64,), eps=1e-6))
        torch.testing.assert_close(model(x), expected)


def test_official_pretraining_dict_route(mim_file, tmp_path):
    mim, mim_path = mim_file
    sd = dict(mim.state_dict())
    sd["rel_pos_bias.relative_position_index"] = torch.zeros(17, 17, dtype=torch.long)   # as official files
    path = tmp_path / "beitv2_tiny_pt.pth"
    torch.save({"model": sd}, path)
    torch.manual_seed(5)
    ours = build_classifier(TINY, NUM_CLASSES, mim_path).state_dict()
    torch.manual_seed(5)
    official = build_classifier(TINY, NUM_CLASSES, path).state_dict()
    assert official.keys() == ours.keys()
    for k in ours:
        assert torch.equal(official[k], ours[k]), k


def test_official_finetuned_dict_route(tmp_path):
    ref = tiny_timm()
    sd = dict(ref.state_dict())
    for i in range(3):   # official fine-tuned releases carry the index buffers: they are dropped
        sd[f"blocks.{i}.attn.relative_position_index"] = ref.blocks[i].attn.relative_position_index.clone()
    path = tmp_path / "beitv2_tiny_ft.pth"
    torch.save({"model": sd}, path)
    model = build_classifier(TINY, NUM_CLASSES, path)
    assert model.state_dict().keys() == ref.state_dict().keys()
    for k, v in ref.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    x = images(3)
    torch.testing.assert_close(logits(model, x), logits(ref, x))


def test_timm_file_route(tmp_path):
    ref = tiny_timm()
    path = tmp_path / "timm_beit.pth"
    torch.save(ref.state_dict(), path)
    model = build_classifier(TINY, NUM_CLASSES, path)
    for k, v in ref.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    x = images(3, seed=1)
    torch.testing.assert_close(logits(model, x), logits(ref, x))


def test_exported_safetensors_route(mim_file, tmp_path):
    mim, mim_path = mim_file
    path = tmp_path / "tiny.safetensors"
    export_to_timm(mim, path)
    torch.manual_seed(5)
    exported = build_classifier(TINY, NUM_CLASSES, path)
    torch.manual_seed(5)
    direct = build_classifier(TINY, NUM_CLASSES, mim_path)
    for k, v in direct.state_dict().items():
        assert torch.equal(exported.state_dict()[k], v), k
    for i in range(3):
        assert torch.equal(exported.blocks[i].attn.relative_position_bias_table,
                           mim.rel_pos_bias.relative_position_bias_table)
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(exported.forward_features(x), mim.forward_features(x)[0])


def test_classifier_file_round_trip(mim_file, tmp_path):
    _, mim_path = mim_file
    model = build_classifier(TINY, NUM_CLASSES, mim_path, drop_path_rate=0.1)
    with torch.no_grad():
        model.head.weight.normal_()
        model.head.bias.normal_()
        model.fc_norm.weight.normal_(1.0, 0.3)
    path = tmp_path / "classifier.pt"
    save_classifier(model, path)
    loaded = load_classifier(path)
    assert loaded.num_classes == NUM_CLASSES and not loaded.training
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    x = images(3, seed=2)
    assert torch.equal(logits(loaded, x), logits(model, x))
    # Also an ordinary backbone route (fine-tune layout, same head size).
    again = build_classifier(TINY, NUM_CLASSES, path)
    assert torch.equal(logits(again, x), logits(model, x))


def test_new_head_replaces_a_head_of_another_size(tmp_path):
    ref = tiny_timm(num_classes=7)
    path = tmp_path / "ft7.pth"
    torch.save({"model": ref.state_dict()}, path)
    model = build_classifier(TINY, 5, path, new_head=True)
    assert model.head.weight.shape == (5, 64)
    assert model.head.weight.abs().max() < 0.01 and torch.equal(model.head.bias, torch.zeros(5))
    for k, v in ref.state_dict().items():
        if not k.startswith("head."):
            assert torch.equal(model.state_dict()[k], v), k


def test_base_layout_matches_official_finetuned_keys():
    with open(OFFICIAL_KEYS) as f:
        official = json.load(f)["finetune/beit_base_patch16_224"]
    with torch.device("meta"):
        ours = {k: list(v.shape) for k, v in build_classifier("beit_base_patch16_224", 1000).state_dict().items()}
        alias = {k: list(v.shape) for k, v in build_classifier("beitv2_base_patch16_224", 1000).state_dict().items()}
    dropped = {k for k in official if k.endswith("relative_position_index")}
    assert len(dropped) == 12
    assert ours == {k: v for k, v in official.items() if k not in dropped}
    assert alias == ours


# ---- bad inputs -------------------------------------------------------------------------------------------------

def test_tokenizer_files_are_one_line_errors(tmp_path, tiny_tokenizer_file):
    one_line_value_error(lambda: build_classifier(TINY, NUM_CLASSES, tiny_tokenizer_file), tiny_tokenizer_file)
    path = tmp_path / "plain_tokenizer.pth"
    torch.save({"model": {"encoder.patch_embed.proj.weight": torch.zeros(4, 3, 8, 8),
                          "quantize.embedding.weight": torch.zeros(8, 4)}}, path)
    msg = one_line_value_error(lambda: build_classifier(TINY, NUM_CLASSES, path), path)
    assert "tokenizer" in msg


def test_head_of_another_size_is_a_one_line_error_saying_how_to_fix(tmp_path):
    path = tmp_path / "ft10.pth"
    torch.save({"model": tiny_timm().state_dict()}, path)
    msg = one_line_value_error(lambda: build_classifier(TINY, 5, path), path)
    assert "new_head" in msg and "num_classes=10" in msg


def test_file_that_fits_nothing_names_the_keys(tmp_path):
    path = tmp_path / "random.pth"
    torch.save({"some_random_key": torch.zeros(3)}, path)
    msg = one_line_value_error(lambda: build_classifier(TINY, NUM_CLASSES, path), path)
    assert "missing" in msg and "cls_token" in msg and "some_random_key" in msg


def test_checkpoint_of_another_width_names_wrong_shapes(tmp_path):
    path = tmp_path / "narrow.pt"
    save_mim_model(tiny_mim(embed_dim=32), path)   # same depth, grid and heads; width 32 instead of 64
    msg = one_line_value_error(lambda: build_classifier(TINY, NUM_CLASSES, path), path)
    assert "wrong shapes" in msg and "(1, 1, 32) vs (1, 1, 64)" in msg


def test_checkpoint_of_another_arch_is_a_one_line_error(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "small_demo.pt"
    save_mim_model(build_mim_model("beitv2_small_demo"), path)   # width 192, 6 blocks, 3 heads, 6 x 6 grid
    msg = one_line_value_error(lambda: build_classifier(TINY, NUM_CLASSES, path), path)
    assert "wrong shapes" in msg


# ---- relative position tables of another grid -------------------------------------------------------------------

def test_same_size_filter_is_identity():
    ref = tiny_timm()
    model = build_classifier(TINY, NUM_CLASSES)
    out = checkpoint_filter_fn(dict(ref.state_dict()), model)
    assert out.keys() == ref.state_dict().keys()
    for k, v in ref.state_dict().items():
        assert torch.equal(out[k], v), k


def test_resize_32_to_48_px(mim_file):
    mim, path = mim_file
    src = mim.rel_pos_bias.relative_position_bias_table.detach()   # 7 x 7 offsets + 3 cls rows, 2 heads
    assert src.shape == (7 * 7 + 3, 2)
    same = build_classifier(TINY, NUM_CLASSES, path, img_size=32)
    assert torch.equal(same.blocks[0].attn.relative_position_bias_table, src)

    model = build_classifier(TINY, NUM_CLASSES, path, img_size=48)   # 6 x 6 grid: 11 x 11 offsets
    for blk in model.blocks:
        table = blk.attn.relative_position_bias_table.detach()
        assert table.shape == ((2 * 6 - 1) ** 2 + 3, 2)
        assert torch.equal(table[-3:], src[-3:])   # cls-to-token, token-to-cls, cls-to-cls
        # Offsets 0 and +-1 are points of the geometric sampling grid in both tables: their values carry over.
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                new_row, old_row = (dy + 5) * 11 + (dx + 5), (dy + 3) * 7 + (dx + 3)
                torch.testing.assert_close(table[new_row], src[old_row], rtol=0, atol=1e-6)
        assert torch.equal(table[5 * 11 + 5], src[3 * 7 + 3])   # offset (0, 0)
        # The outermost offsets land (up to the bisection tolerance) on the old outermost ones.
        for (ny, nx), (oy, ox) in (((0, 0), (0, 0)), ((10, 10), (6, 6)), ((0, 10), (0, 6))):
            torch.testing.assert_close(table[ny * 11 + nx], src[oy * 7 + ox], rtol=0, atol=1e-3)
    out = logits(model, images(2, size=48))
    assert out.shape == (2, NUM_CLASSES) and torch.isfinite(out).all()


# ---- layer-wise lr decay ----------------------------------------------------------------------------------------

def test_layer_decay_groups():
    model = build_classifier(TINY, NUM_CLASSES)
    groups = layer_decay_param_groups(model, 0.5, model.no_weight_decay())
    names = {id(p): n for n, p in model.named_parameters()}
    seen = {}
    for g in groups:
        for p in g["params"]:
            assert id(p) not in seen, names[id(p)]
            seen[id(p)] = (g["lr_scale"], g["wd_scale"])
    assert set(seen) == {id(p) for p in model.parameters() if p.requires_grad}

    def layer_id(name):
        if name.startswith(("cls_token", "patch_embed.")):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        assert name.startswith(("fc_norm.", "head.")), name
        return 4

    for name, p in model.named_parameters():
        lr_scale, wd_scale = seen[id(p)]
        assert lr_scale == pytest.approx(0.5 ** (4 - layer_id(name))), name
        no_decay = p.ndim <= 1 or name.endswith(".bias") or name == "cls_token"
        assert wd_scale == (0.0 if no_decay else 1.0), name
        if name.endswith("relative_position_bias_table") or name.endswith(("qkv.weight", "fc1.weight")):
            assert wd_scale == 1.0, name


# ---- mixup / cutmix ---------------------------------------------------------------------------------------------

def smooth_onehot(y: torch.Tensor, classes: int, smoothing: float) -> torch.Tensor:
    off = smoothing / classes
    on = 1.0 - smoothing + off
    out = torch.full((len(y), classes), off)
    out[torch.arange(len(y)), y] = on
    return out


def mix_batch(b: int = 4):
    g = torch.Generator().manual_seed(3)
    return torch.randn(b, 3, 16, 12, generator=g), torch.tensor([0, 3, 3, 4][:b])


def test_mixup_only_targets_and_images():
    x, y = mix_batch()
    mix = Mixup(num_classes=5, mixup=0.8, cutmix=0.0, smoothing=0.1)
    lam, box = mix.draw(np.random.default_rng(7), 16, 12)
    assert box is None and 0.0 < lam < 1.0
    out, target = mix(x, y, np.random.default_rng(7))
    torch.testing.assert_close(out, lam * x + (1 - lam) * x.flip(0))
    torch.testing.assert_close(target.sum(1), torch.ones(4))
    expected = lam * smooth_onehot(y, 5, 0.1) + (1 - lam) * smooth_onehot(y.flip(0), 5, 0.1)
    torch.testing.assert_close(target, expected)
    assert torch.equal(x, mix_batch()[0])   # the input is not changed in place


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_cutmix_only_box_and_lambda(seed):
    x, y = mix_batch()
    h, w = x.shape[-2:]
    mix = Mixup(num_classes=5, mixup=0.0, cutmix=1.0, smoothing=0.0)
    lam, box = mix.draw(np.random.default_rng(seed), h, w)
    out, target = mix(x, y, np.random.default_rng(seed))
    y1, y2, x1, x2 = box
    assert 0 <= y1 <= y2 <= h and 0 <= x1 <= x2 <= w
    assert lam == pytest.approx(1 - (y2 - y1) * (x2 - x1) / (h * w))
    inside = torch.zeros(h, w, dtype=torch.bool)
    inside[y1:y2, x1:x2] = True
    assert torch.equal(out[..., inside], x.flip(0)[..., inside])
    assert torch.equal(out[..., ~inside], x[..., ~inside])
    torch.testing.assert_close(target, lam * smooth_onehot(y, 5, 0.0) + (1 - lam) * smooth_onehot(y.flip(0), 5, 0.0))
    torch.testing.assert_close(target.sum(1), torch.ones(4))


def test_cutmix_box_is_not_empty_for_some_seed():
    # The per-seed checks above would pass with an empty box everywhere; make sure boxes are drawn at all.
    mix = Mixup(num_classes=5, mixup=0.0, cutmix=1.0)
    areas = [(b[1] - b[0]) * (b[3] - b[2]) for b in (mix.draw(np.random.default_rng(s), 16, 12)[1] for s in range(5))]
    assert max(areas) > 0


def test_mixup_is_a_function_of_the_rng():
    x, y = mix_batch()
    mix = Mixup(num_classes=5, mixup=0.8, cutmix=1.0, switch_prob=0.5, smoothing=0.1)
    a = mix(x, y, np.random.default_rng(11))
    b = mix(x, y, np.random.default_rng(11))
    c = mix(x, y, np.random.default_rng(12))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0]) and not torch.equal(a[1], c[1])


def test_no_mixing_gives_smoothed_one_hot():
    x, y = mix_batch()
    out, target = Mixup(num_classes=5, mixup=0.0, cutmix=0.0, smoothing=0.2)(x, y, np.random.default_rng(0))
    assert torch.equal(out, x)
    torch.testing.assert_close(target, smooth_onehot(y, 5, 0.2))


# ---- top-k counting ---------------------------------------------------------------------------------------------

# Five images over 7 classes whose "pixels" are the logits; the label's rank is 1, 3, 7, 5, 6.
ROWS = [[0.1, 0.2, 3.0, 0.3, -1.0, 0.5, 0.0],
        [1.0, 2.0, 0.0, 1.5, -0.5, 0.3, 0.2],
        [0.5, 0.4, 0.3, 0.2, 0.1, -2.0, 0.0],
        [4.0, 3.0, 2.0, 1.0, 1.5, 0.5, 0.0],
        [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 0.5]]
LABELS = [2, 0, 5, 3, 6]


class LogitsInImages(nn.Module):
    """Returns the logits its input carries ([B, 1, 1, C] -> [B, C])."""

    def forward(self, x):
        return x.flatten(1)


def _batches(rows):
    return [{"image": torch.tensor([ROWS[i] for i in part]).view(len(part), 1, 1, 7),
             "label": torch.tensor([LABELS[i] for i in part])} for part in rows]


def _hand_metrics():
    ce = [math.log(sum(math.exp(v) for v in row)) - row[y] for row, y in zip(ROWS, LABELS)]
    return {"images": 5, "top1": 1 / 5, "top5": 3 / 5, "loss": sum(ce) / 5}


def _assert_metrics(got, expected):
    assert got["images"] == expected["images"]
    assert got["top1"] == pytest.approx(expected["top1"], abs=1e-12)
    assert got["top5"] == pytest.approx(expected["top5"], abs=1e-12)
    assert got["loss"] == pytest.approx(expected["loss"], rel=1e-6)


def test_classification_metrics_by_hand():
    model = LogitsInImages().train()
    got = classification_metrics(model, _batches([[0, 1, 2], [3, 4]]))
    _assert_metrics(got, _hand_metrics())
    assert model.training   # its mode is restored
    # Fewer than 5 classes: top-5 counts every image.
    few = [{"image": torch.tensor([[[[0.0, 1.0, 2.0]]], [[[2.0, 1.0, 0.0]]]]), "label": torch.tensor([0, 0])}]
    got = classification_metrics(LogitsInImages(), few)
    assert got["top1"] == pytest.approx(0.5) and got["top5"] == 1.0
    ce = (math.log(1 + math.e + math.e ** 2) - 0.0 + math.log(1 + math.e + math.e ** 2) - 2.0) / 2
    assert got["loss"] == pytest.approx(ce, rel=1e-6)


def _two_rank_worker(rank, world, out_dir):
    """One spawn for both collective checks (starting two ranks costs most of this file's time)."""
    from engine.parallel.distributed import all_gather_uneven
    shard = [[0, 1], [2]] if rank == 0 else [[3, 4]]   # 3 images on rank 0, 2 on rank 1
    metrics = classification_metrics(LogitsInImages(), _batches(shard))
    parts = [torch.arange(6, dtype=torch.float32).view(3, 2), torch.tensor([[100.0, 101.0]])]   # 3 rows and 1
    gathered = all_gather_uneven(parts[rank].clone())
    torch.save({"metrics": metrics, "gathered": gathered}, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("ranks")
    run_ranks(_two_rank_worker, 2, str(out_dir))
    return [torch.load(out_dir / f"rank{r}.pt") for r in (0, 1)]


def test_classification_metrics_on_two_uneven_ranks(two_rank_results):
    one_process = classification_metrics(LogitsInImages(), _batches([[0, 1, 2, 3, 4]]))
    _assert_metrics(one_process, _hand_metrics())
    for rank, result in enumerate(two_rank_results):   # every rank gets the totals of all 5 images
        assert result["metrics"]["images"] == 5, rank
        _assert_metrics(result["metrics"], one_process)


def test_all_gather_uneven_on_two_ranks(two_rank_results):
    expected = torch.cat([torch.arange(6, dtype=torch.float32).view(3, 2), torch.tensor([[100.0, 101.0]])])
    for rank, result in enumerate(two_rank_results):
        assert torch.equal(result["gathered"], expected), (rank, result["gathered"])


def test_cls_features_run_the_last_mlp_on_the_cls_row_only(tmp_path):
    """A probe of the CLS token reads one row of the last block: its MLP runs on that row alone and the feature is
    the whole forward's (to float rounding: a one-row product may take another kernel); mean pooling reads every
    patch row."""
    from data_tools.gpu_augment import normalize
    from finetune.features import FrozenFeatures
    mim = tiny().eval()
    save_mim_model(mim, tmp_path / "mim.pt")
    x01 = torch.rand(3, 3, 32, 32)
    for pooling, rows in (("cls", (3, 1)), ("mean", (3, 17))):
        feats = FrozenFeatures(str(tmp_path / "mim.pt"), pooling=pooling)
        seen = []
        feats.vit.blocks[-1].mlp.fc1.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[:-1]))
        got = feats(x01)
        assert seen == [rows], pooling
        with torch.no_grad():
            tokens = mim.forward_features(normalize(x01))[0]
            want = mim.norm(tokens[:, 0] if pooling == "cls" else tokens[:, 1:].mean(1))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=pooling)
