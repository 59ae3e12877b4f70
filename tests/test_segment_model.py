"""Segmentation model and metrics: the neck's strides and widths, checkpoint routes into the segmenter, mmseg key
names, layer-decay ids, mIoU / mAcc / aAcc by hand, the confusion matrix on 2 uneven ranks, sliding windows."""
import math

import pytest
import torch
from torch import nn

from engine.parallel.ds_setup import layer_decay_param_groups
from finetune.model import build_classifier
from finetune.segment.metrics import (confusion_matrix, evaluate_segmenter, predict_image, segmentation_metrics,
                                  slide_logits, scaled_size)
from finetune.segment.model import BeitFeaturePyramid, build_segmenter, load_segmenter, save_segmenter
from pretrain.mim import save_mim_model
from tests.dist_util import run_ranks
from tests.test_finetune_model import tiny_mim

TINY = "upernet_beitv2_tiny_test"   # 3-block test backbone, 8 px patches, 32 px crops


@pytest.mark.parametrize("patch", [16, 8])
def test_the_neck_gives_strides_4_8_16_32_at_the_backbone_width(patch):
    torch.manual_seed(0)
    neck = BeitFeaturePyramid(out_indices=(0, 1, 1, 2), img_size=128, patch_size=patch, embed_dim=32, depth=3,
                              num_heads=2).eval()
    feats = neck(torch.randn(2, 3, 128, 128))
    assert [tuple(f.shape) for f in feats] == [(2, 32, 128 // s, 128 // s) for s in (4, 8, 16, 32)]
    # The stride-16 level (patch 16) / stride-8 level (patch 8) is the block's patch tokens themselves.
    tokens = {}
    neck.blocks[1].register_forward_hook(lambda m, i, o: tokens.setdefault("x", o))
    feats = neck(torch.ones(1, 3, 128, 128))
    grid = 128 // patch
    as_map = tokens["x"][:, 1:].transpose(1, 2).reshape(1, 32, grid, grid)
    assert torch.equal(feats[2 if patch == 16 else 1], as_map)


def test_a_segmenter_has_mmseg_key_names_and_official_layer_decay_ids():
    model = build_segmenter(TINY, 11)
    keys = set(model.state_dict())
    for key in ("backbone.fpn1.0.weight", "backbone.blocks.0.attn.relative_position_bias_table",
                "decode_head.psp_modules.3.1.conv.weight", "decode_head.psp_modules.0.1.bn.running_mean",
                "decode_head.bottleneck.conv.weight", "decode_head.lateral_convs.2.bn.weight",
                "decode_head.fpn_convs.0.conv.weight", "decode_head.fpn_bottleneck.conv.weight",
                "decode_head.conv_seg.weight", "auxiliary_head.convs.0.conv.weight", "auxiliary_head.conv_seg.bias"):
        assert key in keys, key
    assert not any(k.startswith(("backbone.fc_norm", "backbone.head", "backbone.norm.")) for k in keys)
    # mmseg's LayerDecayOptimizerConstructor: embeddings 0, block i at i + 1, neck and heads at depth + 1 (scale 1).
    d, depth = 0.5, len(model.backbone.blocks)
    scale = {}
    for group in layer_decay_param_groups(model, d):
        for p in group["params"]:
            scale[id(p)] = (group["lr_scale"], group["wd_scale"])
    for name, p in model.named_parameters():
        if name.startswith("backbone.blocks."):
            layer = int(name.split(".")[2]) + 1
        elif name.startswith(("backbone.cls_token", "backbone.patch_embed")):
            layer = 0
        else:
            layer = depth + 1
        no_decay = p.ndim == 1 or name.endswith(".bias")
        assert scale[id(p)] == (pytest.approx(d ** (depth + 1 - layer)), 0.0 if no_decay else 1.0), name


def test_backbone_routes_load_into_the_segmenter_and_a_segmenter_file_round_trips(tmp_path):
    mim = tmp_path / "mim.pt"
    save_mim_model(tiny_mim(), mim)
    # 64 px crops: the 4 x 4 tables of the 32 px checkpoint are resized to 8 x 8, as the classifier route does.
    seg = build_segmenter(TINY, 11, mim, img_size=64)
    cls = build_classifier("beitv2_tiny_test", 11, mim, img_size=64)
    seg_sd, cls_sd = seg.state_dict(), cls.state_dict()
    for key, value in cls_sd.items():
        if not key.startswith(("fc_norm", "head")):
            assert torch.equal(seg_sd[f"backbone.{key}"], value), key
    path = tmp_path / "segmenter.pt"
    save_segmenter(seg, path)
    again = load_segmenter(path)
    assert again.img_size == 64 and all(torch.equal(v, again.state_dict()[k]) for k, v in seg_sd.items())
    # A segmenter file as init loads everything; another class count is an error unless new_head.
    assert torch.equal(build_segmenter(TINY, 11, path, img_size=64).state_dict()["decode_head.conv_seg.weight"],
                       seg_sd["decode_head.conv_seg.weight"])
    with pytest.raises(ValueError, match=r"segments 11 classes and the model has 5.*new_head"):
        build_segmenter(TINY, 5, path, img_size=64)
    five = build_segmenter(TINY, 5, path, new_head=True, img_size=64).state_dict()
    assert five["decode_head.conv_seg.weight"].shape[0] == 5
    assert torch.equal(five["decode_head.fpn_bottleneck.conv.weight"], seg_sd["decode_head.fpn_bottleneck.conv.weight"])


def test_the_linear_probe_trains_batch_norm_and_a_1x1_classifier_on_the_frozen_blocks_it_reads(tmp_path):
    mim = tmp_path / "mim.pt"
    save_mim_model(tiny_mim(), mim)
    seg = build_segmenter("linear_beitv2_tiny_test", 11, mim).train()   # reads blocks 1 and 2 of 3
    assert {n for n, p in seg.named_parameters() if p.requires_grad} == {
        "decode_head.bn.weight", "decode_head.bn.bias", "decode_head.conv_seg.weight", "decode_head.conv_seg.bias"}
    assert not seg.backbone.training and seg.decode_head.training and seg.auxiliary_head is None
    assert not any(k.startswith("backbone.fpn") for k in seg.state_dict())
    # The backbone is the checkpoint's, as UperNet's is.
    upernet = build_segmenter(TINY, 11, mim).state_dict()
    for key, value in seg.state_dict().items():
        if key.startswith("backbone."):
            assert torch.equal(value, upernet[key]), key
    blocks = {}
    for i in (1, 2):
        seg.backbone.blocks[i].register_forward_hook(lambda m, inp, out, i=i: blocks.setdefault(i, out))
    x = torch.randn(4, 3, 32, 32)
    logits, aux = seg(x)
    assert aux is None and logits.shape == (4, 11, 4, 4)   # the patch stride: 8 px patches of a 32 px crop
    maps = torch.cat([blocks[i][:, 1:].transpose(1, 2).reshape(4, -1, 4, 4) for i in (1, 2)], 1)
    head = seg.decode_head
    assert torch.allclose(logits, head.conv_seg(head.bn(maps)), atol=1e-6)
    logits.square().mean().backward()
    assert all(p.grad is None for p in seg.backbone.parameters())
    assert head.conv_seg.weight.grad is not None and head.bn.weight.grad is not None
    # Half a training step's work: the frozen forward plus three times the small head.
    assert seg.flops_per_image() < build_segmenter(TINY, 11).flops_per_image() / 2
    # A segmenter file round-trips; UperNet's file gives the linear probe its backbone (and the other way round).
    path = tmp_path / "linear.pt"
    save_segmenter(seg, path)
    again = load_segmenter(path)
    assert again.frozen_backbone and all(torch.equal(v, again.state_dict()[k]) for k, v in seg.state_dict().items())
    upernet_file = tmp_path / "upernet.pt"
    save_segmenter(build_segmenter(TINY, 11, mim), upernet_file)
    from_upernet = build_segmenter("linear_beitv2_tiny_test", 11, upernet_file).state_dict()
    assert all(torch.equal(from_upernet[k], v) for k, v in seg.state_dict().items() if k.startswith("backbone."))
    to_upernet = build_segmenter(TINY, 11, path).state_dict()
    assert all(torch.equal(to_upernet[k], v) for k, v in seg.state_dict().items() if k.startswith("backbone."))
    with pytest.raises(ValueError, match="decoder 'mlp'.*upernet, linear"):
        build_segmenter("linear_beitv2_tiny_test", 11, decoder="mlp")
    with pytest.raises(ValueError, match=r"out_indices \(\) must be 1 or more"):
        build_segmenter("linear_beitv2_tiny_test", 11, out_indices=())


def test_a_tokenizer_file_is_not_a_backbone(tiny_tokenizer_file):
    with pytest.raises(ValueError, match="tokenizer"):
        build_segmenter(TINY, 11, tiny_tokenizer_file)


def test_miou_macc_aacc_by_hand_with_ignored_pixels_and_absent_classes():
    label = torch.tensor([0, 0, 1, 1, 255, 2, 255])
    pred = torch.tensor([0, 1, 1, 1, 3, 3, 0])
    cm = confusion_matrix(pred, label, 5)
    assert cm.sum() == 5 and cm[0, 0] == 1 and cm[0, 1] == 1 and cm[1, 1] == 2 and cm[2, 3] == 1
    m = segmentation_metrics(cm, ["a", "b", "c", "d", "e"])
    # IoU: a 1/2, b 2/3 (pred 3 px, label 2 px), c 0, d 0 (predicted, never labelled), e absent everywhere (skipped).
    assert m["mIoU"] == pytest.approx((1 / 2 + 2 / 3 + 0 + 0) / 4)
    # Acc: over classes with labelled pixels only (a 1/2, b 1, c 0); d and e have none.
    assert m["mAcc"] == pytest.approx((1 / 2 + 1 + 0) / 3)
    assert m["aAcc"] == pytest.approx(3 / 5) and m["pixels"] == 5
    table = {c["class"]: c for c in m["per_class"]}
    assert table["d"]["iou"] == 0 and table["d"]["acc"] is None and table["e"]["iou"] is None


def _pointwise():
    """A per-pixel linear map standing in for a segmenter: its output at a pixel does not depend on the window,
    so stitched windows must equal one pass over the whole image."""
    torch.manual_seed(0)
    return nn.Conv2d(3, 4, 1).eval()


def test_sliding_windows_stitch_back_to_the_whole_image():
    conv = _pointwise()
    image = torch.randn(1, 3, 45, 70)
    with torch.no_grad():
        whole = conv(image)
        assert torch.allclose(slide_logits(conv, image, 4, crop=32, stride=21), whole, atol=1e-6)
        # Smaller than one crop: padded, predicted, cut back.
        small = image[:, :, :20, :25]
        assert torch.allclose(slide_logits(conv, small, 4, crop=32, stride=21), conv(small), atol=1e-6)


def test_one_window_covering_the_image_equals_whole_image_inference():
    model = build_segmenter(TINY, 11)
    image = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(slide_logits(model.predict, image, 11, crop=32, stride=21), model.predict(image))
    assert scaled_size(500, 375, (2048, 512)) == (683, 512) and scaled_size(40, 40, (96, 96), 1.5) == (144, 144)
    probs = predict_image(model.predict, torch.randint(0, 256, (3, 40, 56), dtype=torch.uint8), 11, 32, 21,
                          (64, 48), ratios=(0.5, 1.0), flip=True)
    assert probs.shape == (11, 40, 56) and torch.allclose(probs.sum(0), torch.ones(40, 56), atol=1e-5)


def _eval_batches(rank: int, world: int, images, labels):
    """Raw canvases of this rank's shard (index % world == rank), as the loader's eval batches are."""
    idx = list(range(rank, len(images), world))
    for start in range(0, len(idx), 2):
        part = idx[start:start + 2]
        yield {"image": images[part], "label": labels[part], "size": torch.tensor([[40, 48]] * len(part))}


def _data():
    g = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (5, 3, 40, 48), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 12, (5, 40, 48), dtype=torch.uint8, generator=g)   # raw ids: 0 = ignored
    return images, labels


def _evaluate(rank: int, world: int) -> dict:
    torch.manual_seed(0)
    model = build_segmenter(TINY, 11)
    images, labels = _data()
    return evaluate_segmenter(model.predict, _eval_batches(rank, world, images, labels), 11, crop=32, stride=21,
                              scale=(48, 40))


def _evaluate_and_save(rank: int, world: int, path: str) -> None:
    result = _evaluate(rank, world)
    if rank == 0:
        torch.save(result, path)


def test_the_confusion_matrix_of_two_uneven_ranks_equals_one_process(tmp_path):
    one = _evaluate(0, 1)
    run_ranks(_evaluate_and_save, 2, str(tmp_path / "two.pt"))
    two = torch.load(tmp_path / "two.pt", weights_only=False)
    assert one["images"] == two["images"] == 5   # shards of 3 and 2 images
    assert one == two
    assert 0 < one["pixels"] < 5 * 40 * 48   # label 0 pixels ignored


def test_label_ids_outside_the_classes_are_a_one_line_error():
    images, labels = _data()
    model = build_segmenter(TINY, 5)
    with pytest.raises(ValueError, match=r"mosaics\.beton: label id \d+ is outside the model's 5 classes"):
        evaluate_segmenter(model.predict, _eval_batches(0, 1, images, labels), 5, crop=32, stride=21,
                           scale=(48, 40), source="mosaics.beton")


def test_poly_schedule_matches_mmcv():
    from engine.config.schema import OptimConfig
    from engine.loop.schedule import lr_at
    optim = OptimConfig(lr=1.0, min_lr=0.0)
    total, warmup = 100, 10
    # mmcv: poly(power 1) from iteration 0, multiplied by the linear warm-up factor during the warm-up.
    assert lr_at(0, optim, total, warmup, "poly") == 0
    assert lr_at(5, optim, total, warmup, "poly") == pytest.approx(0.95 * 0.5)
    assert lr_at(10, optim, total, warmup, "poly") == pytest.approx(0.9)
    assert lr_at(55, optim, total, warmup, "poly") == pytest.approx(0.45)
    assert lr_at(100, optim, total, warmup, "poly") == 0
    assert not math.isclose(lr_at(55, optim, total, warmup, "cosine"), 0.45)
