"""data_tools.ffcv_loader and the device augmentations: sharding, resume, FFCV decoding, augmentation semantics.

Images are synthetic. Ranks are simulated in one process (rank=0/1, world_size=2). One FFCV Loader (one numba
compilation, ~15 s) is shared by every FFCV test through the loader cache.
"""
from __future__ import annotations

from itertools import islice

import numpy as np
import pytest
import torch
from PIL import Image

from data_tools import gpu_augment as ga
from data_tools.ffcv_loader import (ArraySource, FFCVSource, RawAug, ShardPlan, page_blocked_permutation,
                                    uniform_permutation)
from data_tools.gpu_segment import SegTrainAug

N, SIDE, CLASSES = 45, 16, 3
PLAN = dict(micro_batch_size=3, grad_accum_steps=2, seed=7)     # world 2 -> global batch 12, 3 steps per epoch


def index_images(n: int = N, side: int = SIDE) -> np.ndarray:
    """uint8 [n, side, side, 3]: image i is a gradient whose blue channel is i, so pixels identify the sample."""
    y, x = np.mgrid[:side, :side]
    base = np.stack([x * 255 // side, y * 255 // side, np.zeros_like(x)], -1)
    out = np.repeat(base[None], n, 0).astype(np.uint8)
    out[..., 2] = np.arange(n, dtype=np.uint8)[:, None, None]
    return out


LABELS = np.arange(N) % CLASSES


def take(source, start: int, count: int) -> list[dict]:
    return list(islice(source.micro_batches(start), count))


def array_source(rank: int = 0, world: int = 2, aug=None) -> ArraySource:
    return ArraySource(index_images(), LABELS, aug=aug or ga.MimAug(8), rank=rank, world_size=world, **PLAN)


# --------------------------------------------------------------------------------------------------- order and plan
def test_plan_shards_are_disjoint_and_cover_the_used_part():
    plans = [ShardPlan(103, 4, 3, 2, r, seed=1) for r in range(2)]
    assert plans[0].global_batch == 24 and plans[0].steps_per_epoch == 4
    perm = uniform_permutation(103, 1, 0)
    got = [p.rank_indices(perm, 0) for p in plans]
    assert len(set(got[0]) & set(got[1])) == 0
    assert sorted(np.concatenate(got)) == sorted(perm[:96])
    for p, g in zip(plans, got):                      # resuming at step 2 yields the tail of the same order
        np.testing.assert_array_equal(p.rank_indices(perm, 2), g[2 * 12:])
    assert not np.array_equal(uniform_permutation(103, 1, 1), perm)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        ShardPlan(20, 4, 3, 2, 0)


def test_page_blocked_order_is_a_permutation_touching_few_pages():
    pages = np.repeat(np.arange(40), 25)               # 40 pages of 25 samples
    order = page_blocked_permutation(pages, seed=3, epoch=0, pages_per_block=4)
    assert sorted(order) == list(range(1000))
    for start in range(0, 1000, 100):                  # each block of 100 samples comes from exactly 4 pages
        assert len(np.unique(pages[order[start:start + 100]])) == 4
    np.testing.assert_array_equal(order, page_blocked_permutation(pages, 3, 0, 4))
    assert not np.array_equal(order, page_blocked_permutation(pages, 3, 1, 4))


# ------------------------------------------------------------------------------------------------------ ArraySource
def _check_two_ranks(sources, steps: int) -> None:
    seen = []
    for src in sources:
        batches = take(src, 0, steps * PLAN["grad_accum_steps"])
        idx = np.concatenate([b["index"].numpy() for b in batches])
        labels = np.concatenate([b["label"].cpu().numpy() for b in batches])
        np.testing.assert_array_equal(labels, LABELS[idx])
        seen.append(idx)
    assert len(set(seen[0]) & set(seen[1])) == 0
    assert len(np.concatenate(seen)) == steps * 12 and len(set(np.concatenate(seen))) == steps * 12


def _check_resume(make) -> None:
    full = take(make(), 0, 14)                          # 7 steps: more than two epochs of 3 steps
    resumed = take(make(), 4, 6)                        # restart inside epoch 1, at its second step
    for a, b in zip(full[8:], resumed):
        assert torch.equal(a["index"], b["index"])
        assert torch.equal(a["image"], b["image"])     # augmentation is keyed by (seed, step, rank, micro)
    first_epoch = np.concatenate([b["index"].numpy() for b in full[:6]])
    second_epoch = np.concatenate([b["index"].numpy() for b in full[6:12]])
    assert not np.array_equal(first_epoch, second_epoch)


def test_array_source_two_ranks_disjoint_and_covering():
    src = array_source(0)
    assert src.steps_per_epoch == 3
    _check_two_ranks([array_source(0), array_source(1)], steps=3)


def test_array_source_resume_inside_epoch_is_exact():
    _check_resume(lambda: array_source(1))


def test_array_source_raw_pixels_follow_the_index():
    src = array_source(aug=RawAug())
    for b in src.eval_batches():
        np.testing.assert_array_equal(b["image"][:, 2, 0, 0].numpy(), b["index"].numpy())


# ------------------------------------------------------------------------------------------------------- FFCVSource
@pytest.fixture(scope="module")
def beton(tmp_path_factory) -> str:
    from data_tools import convert
    root = tmp_path_factory.mktemp("ffcv")
    images = index_images()
    for i, img in enumerate(images):
        d = root / "src" / f"class{LABELS[i]}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(d / f"{i:03d}.png")
    out = str(root / "idx.beton")
    assert convert.main(["imagefolder", str(root / "src"), out, "--mode=raw", "--progress=False"]) == 0
    return out


def _beton_order() -> np.ndarray:
    """Dataset index -> image number: convert stores class folders in order, files sorted within each."""
    return np.concatenate([np.flatnonzero(LABELS == c) for c in range(CLASSES)])


def ffcv_source(path: str, rank: int = 0, aug=None) -> FFCVSource:
    return FFCVSource(path, aug or ga.MimAug(8), rank=rank, world_size=2, num_workers=1, **PLAN)


def test_ffcv_decodes_exact_pixels_and_labels(beton):
    src = ffcv_source(beton, aug=RawAug())
    number = _beton_order()
    count = 0
    for b in src.eval_batches():
        for img, size, i, label in zip(b["image"], b["size"], b["index"], b["label"]):
            assert size.tolist() == [SIDE, SIDE]
            ref = index_images()[number[i]]
            np.testing.assert_array_equal(img.permute(1, 2, 0).numpy(), ref)
            assert int(label) == LABELS[number[i]]
            count += 1
    assert count == len(range(0, N, 2))                 # rank 0 of 2: every other sample


def test_ffcv_leaves_torch_threads_as_the_caller_set_them(beton, monkeypatch):
    """FFCV's Loader sets torch's intra-op thread count to its num_workers (a 1-worker loader halved the demo's
    segmentation speed on 2 cores); the source keeps the caller's count. A fresh Loader: the shared one may exist."""
    from data_tools import ffcv_loader
    monkeypatch.setattr(ffcv_loader, "_LOADERS", {})
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        src = FFCVSource(beton, RawAug(), micro_batch_size=4, num_workers=1)
        batch = next(src.micro_batches())
        assert batch["image"].shape[0] == 4 and len(ffcv_loader._LOADERS) == 1   # a Loader was built here
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_ffcv_jpeg_canvas_of_variable_sizes(tmp_path):
    """JPEG decoding onto a canvas: the image top-left within JPEG tolerance, one edge-replicated row and column."""
    from data_tools import convert
    shapes = [(20, 31), (33, 18), (27, 27), (12, 40)]
    for i, (h, w) in enumerate(shapes):
        (tmp_path / "src" / "c").mkdir(parents=True, exist_ok=True)
        Image.fromarray(index_images(1, 64)[0, :h, :w]).save(tmp_path / "src" / "c" / f"{i}.png")
    out = str(tmp_path / "var.beton")
    assert convert.main(["imagefolder", str(tmp_path / "src"), out, "--quality=95", "--progress=False"]) == 0
    src = FFCVSource(out, RawAug(), micro_batch_size=2, num_workers=1)
    batches = list(src.eval_batches())
    assert [b["size"].tolist() for b in batches] == [[list(s) for s in shapes[:2]], [list(s) for s in shapes[2:]]]
    for b in batches:
        assert b["image"].shape[-2:] == (33, 40)
        for img, (h, w), i in zip(b["image"].int(), b["size"].tolist(), b["index"].tolist()):
            ref = torch.from_numpy(index_images(1, 64)[0, :h, :w]).permute(2, 0, 1).int()
            assert (img[:, :h, :w] - ref).abs().float().mean() < 2.0, i
            if w < 40:
                assert torch.equal(img[:, :h, w], img[:, :h, w - 1])
            if h < 33:
                assert torch.equal(img[:, h, :w], img[:, h - 1, :w])


def test_ffcv_two_ranks_disjoint_and_resume_exact(beton):
    number = _beton_order()
    seen = []
    for rank in range(2):
        batches = take(ffcv_source(beton, rank, aug=RawAug()), 0, 6)
        idx = np.concatenate([b["index"].numpy() for b in batches])
        blue = np.concatenate([b["image"][:, 2, 0, 0].numpy() for b in batches])
        np.testing.assert_array_equal(blue, number[idx])          # the pixels are those of the indexed sample
        seen.append(idx)
    assert len(seen[0]) == 18 and len(set(seen[0]) | set(seen[1])) == 36
    _check_resume(lambda: ffcv_source(beton, 1))


def test_ffcv_and_array_sources_agree(beton):
    """Same plan, same images (same size, raw): identical order and identical augmented pixels."""
    ordered = index_images()[_beton_order()]
    arr = ArraySource(ordered, LABELS[_beton_order()], aug=ga.MimAug(8), rank=1, world_size=2, **PLAN)
    for a, b in zip(take(arr, 2, 5), take(ffcv_source(beton, 1), 2, 5)):
        assert torch.equal(a["index"], b["index"]) and torch.equal(a["label"], b["label"])
        torch.testing.assert_close(a["image"], b["image"], rtol=0, atol=1e-6)


def test_ffcv_without_os_cache_quasi_random(beton):
    """os_cache=False: page-blocked order, still disjoint shards and an exact resume."""
    def make(rank: int) -> FFCVSource:
        return FFCVSource(beton, RawAug(), rank=rank, world_size=2, num_workers=1, os_cache=False, **PLAN)
    idx = [np.concatenate([b["index"].numpy() for b in take(make(r), 0, 6)]) for r in range(2)]
    assert len(set(idx[0]) | set(idx[1])) == 36
    full, resumed = take(make(0), 0, 6), take(make(0), 1, 4)
    for a, b in zip(full[2:], resumed):
        assert torch.equal(a["index"], b["index"]) and torch.equal(a["image"], b["image"])


# ---------------------------------------------------------------------------------------------------- augmentations
def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_random_resized_crop_boxes_stay_inside_and_follow_scale():
    sizes = torch.tensor([[40, 60], [60, 40], [30, 30], [3, 200]]).repeat(50, 1)
    boxes = ga.random_resized_crop_boxes(sizes, (0.2, 1.0), (3 / 4, 4 / 3), gen())
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= sizes[:, 1]).all() and (boxes[:, 3] <= sizes[:, 0]).all()
    normal = sizes[:, 0] != 3                           # the 3x200 image can only take the fallback crop
    frac = (w * h / (sizes[:, 0] * sizes[:, 1]))[normal]
    assert frac.min() >= 0.18 and frac.max() <= 1.0 and frac.std() > 0.1
    assert torch.equal(boxes[~normal][0], torch.tensor([98.0, 0.0, 102.0, 3.0]))   # centre, aspect clamped to 4/3


def test_crop_resize_of_the_whole_image_is_identity_and_flip_mirrors():
    x = torch.rand(2, 3, 12, 12) * 255
    torch.testing.assert_close(ga.crop_resize(x, torch.tensor([[0, 0, 12, 12.0]] * 2), 12), x)
    flipped = ga.random_flip(x, gen(), p=1.0)
    assert torch.equal(flipped, x.flip(-1))


def test_color_jitter_brightness_only_scales_each_image():
    x = torch.rand(16, 3, 8, 8) * 100 + 50
    y = ga.color_jitter(x, gen(), brightness=0.4, contrast=0.0, saturation=0.0)
    ratio = (y / x).flatten(1)
    assert torch.allclose(ratio.min(1).values, ratio.max(1).values, atol=1e-5)
    assert ratio.min() >= 0.6 and ratio.max() <= 1.4 and ratio[:, 0].std() > 0.05


def test_color_jitter_contrast_and_saturation_match_torchvision():
    # One op at a time, so each image's factor can be read back from the output and the result compared with
    # torchvision's functional op at that factor (values kept away from the clamp).
    import torchvision.transforms.functional as TF
    x = torch.rand(16, 3, 8, 8) * 80 + 90
    grey = ga.grayscale(x)
    y = ga.color_jitter(x, gen(1), brightness=0.0, contrast=0.4, saturation=0.0)
    mean = grey.mean((1, 2, 3), keepdim=True)
    f = ((y - mean).flatten(1) / (x - mean).flatten(1)).median(1).values
    assert f.min() >= 0.6 and f.max() <= 1.4 and f.std() > 0.05
    for xi, yi, fi in zip(x, y, f):
        torch.testing.assert_close(yi / 255, TF.adjust_contrast(xi / 255, fi.item()), atol=1e-5, rtol=0)
    y = ga.color_jitter(x, gen(2), brightness=0.0, contrast=0.0, saturation=0.4)
    f = ((y - grey).flatten(1) / (x - grey).flatten(1)).median(1).values
    assert f.min() >= 0.6 and f.max() <= 1.4 and f.std() > 0.05
    for xi, yi, fi in zip(x, y, f):
        torch.testing.assert_close(yi / 255, TF.adjust_saturation(xi / 255, fi.item()), atol=1e-5, rtol=0)


def test_mim_views_and_eval_aug():
    images = torch.from_numpy(index_images(4, 32)).permute(0, 3, 1, 2).contiguous()
    sizes = torch.full((4, 2), 32)
    x01 = ga.MimAug(16)(images, sizes, gen())
    model_view, tok_view = ga.mim_views(x01)
    assert tok_view.shape == (4, 3, 16, 16) and tok_view.min() >= 0 and tok_view.max() <= 1
    mean, std = torch.tensor(ga.IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(ga.IMAGENET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(model_view * std + mean, tok_view)
    ev = ga.EvalAug(16, crop_fraction=0.5, normalized=False)(images, sizes)   # centre 16x16 of 32x32, unscaled
    torch.testing.assert_close(ev, images[:, :, 8:24, 8:24].float() / 255)


def test_random_erasing_rectangle_area():
    x = torch.zeros(64, 3, 20, 20)
    y = ga.random_erasing(x, gen(), p=1.0)
    erased = (y != 0).any(1).float().mean((1, 2))
    assert erased.min() >= 0.015 and erased.max() <= 0.36
    assert (ga.random_erasing(x, gen(), p=0.0) == 0).all()


def test_rand_augment_ops_match_timm_pil():
    from timm.data import auto_augment as aa

    from data_tools.gpu_randaugment import FILL, OPS, _one_layer
    y, x = np.mgrid[:48, :64]
    img = (np.stack([x * 255 / 64, y * 255 / 48, (x + y) * 255 / 112], -1) * 0.8 + 20).astype(np.uint8)
    pil = Image.fromarray(img)
    lvl = 0.9
    kw = dict(resample=Image.Resampling.BILINEAR, fillcolor=tuple(int(v) for v in FILL))
    refs = {"AutoContrast": aa.auto_contrast(pil), "Equalize": aa.equalize(pil), "Invert": aa.invert(pil),
            "Rotate": aa.rotate(pil, lvl * 30, **kw), "PosterizeIncreasing": aa.posterize(pil, 4 - int(lvl * 4)),
            "SolarizeIncreasing": aa.solarize(pil, 256 - int(lvl * 256)),
            "SolarizeAdd": aa.solarize_add(pil, int(lvl * 110)), "ColorIncreasing": aa.color(pil, 1 + lvl * 0.9),
            "ContrastIncreasing": aa.contrast(pil, 1 + lvl * 0.9),
            "BrightnessIncreasing": aa.brightness(pil, 1 + lvl * 0.9),
            "SharpnessIncreasing": aa.sharpness(pil, 1 + lvl * 0.9), "ShearX": aa.shear_x(pil, lvl * 0.3, **kw),
            "ShearY": aa.shear_y(pil, lvl * 0.3, **kw), "TranslateXRel": aa.translate_x_rel(pil, lvl * 0.45, **kw),
            "TranslateYRel": aa.translate_y_rel(pil, lvl * 0.45, **kw)}
    t = torch.from_numpy(img).permute(2, 0, 1)[None].float()
    for k, name in enumerate(OPS):
        out = _one_layer(t, torch.tensor([k]), torch.tensor([lvl]), torch.tensor([lvl]))[0].permute(1, 2, 0)
        assert np.abs(out.numpy() - np.asarray(refs[name], dtype=float)).mean() < 1.0, name
    skipped = _one_layer(t, torch.tensor([-1]), torch.tensor([lvl]), torch.tensor([lvl]))
    assert torch.equal(skipped, t)


def test_finetune_train_aug_is_keyed_by_the_generator():
    images = torch.from_numpy(index_images(8, 32)).permute(0, 3, 1, 2).contiguous()
    sizes = torch.full((8, 2), 32)
    aug = ga.FinetuneTrainAug(24)
    a, b, c = aug(images, sizes, gen(1)), aug(images, sizes, gen(1)), aug(images, sizes, gen(2))
    assert a.shape == (8, 3, 24, 24) and torch.equal(a, b) and not torch.equal(a, c)


def test_segmentation_aug_keeps_image_and_label_aligned():
    palette = torch.tensor([[200, 30, 30], [30, 200, 30], [30, 30, 200], [200, 200, 30]], dtype=torch.uint8)
    labels = torch.zeros(4, 64, 80, dtype=torch.uint8)
    labels[:, :, 20:] = 1
    labels[:, 30:, :] = 2
    labels[:, 40:, 50:] = 3
    images = palette[labels.long()].permute(0, 3, 1, 2).contiguous()
    sizes = torch.tensor([[64, 80], [64, 80], [40, 60], [64, 80]])        # image 2 only fills part of its canvas
    aug = SegTrainAug(crop=32, scale=(128, 32), reduce_zero_label=False, photometric=False)
    img, lab = aug(images, labels, sizes, gen(3))
    assert img.shape == (4, 3, 32, 32) and lab.shape == (4, 32, 32) and lab.dtype == torch.int64
    mean, std = torch.tensor(ga.IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(ga.IMAGENET_STD).view(1, 3, 1, 1)
    rgb = (img * std + mean) * 255
    valid = lab != 255
    colour = palette[lab.clamp(max=3)].permute(0, 3, 1, 2).float()
    close = ((rgb - colour).abs().max(1).values < 40) & valid
    assert close.sum() >= 0.95 * valid.sum()            # only edge pixels (bilinear image, nearest label) differ
    assert (img.abs().sum(1)[~valid] == 0).all()        # padding: 0 in the image, 255 in the label
    reduced = SegTrainAug(crop=32, scale=(128, 32), photometric=False)(images, labels, sizes, gen(3))[1]
    assert torch.equal(reduced, torch.where(lab == 0, 255, torch.where(lab == 255, 255, lab - 1)))


def test_segmentation_crop_avoids_one_category_filling_it():
    # mmseg's cat_max_ratio: of up to 10 random crops, the first in which no category covers 75% or more is kept.
    # Synthetic map: class 1 everywhere but a 40x40 square of class 2; most 32x32 crops hold class 1 only.
    labels = torch.ones(200, 128, 128, dtype=torch.uint8)
    labels[:, 88:, 88:] = 2
    images = torch.zeros(200, 3, 128, 128, dtype=torch.uint8)
    sizes = torch.tensor([[128, 128]]).repeat(200, 1)

    def balanced_share(cat_max_ratio):
        aug = SegTrainAug(crop=32, scale=(128, 128), ratio_range=(1.0, 1.0), cat_max_ratio=cat_max_ratio,
                          reduce_zero_label=False, photometric=False)
        lab = aug(images, labels, sizes, gen(4))[1]
        share = torch.stack([(lab == c).float().mean((1, 2)) for c in (1, 2)], 1).max(1).values
        return (share < 0.75).float().mean().item()

    # Exactly: the share of the 97x97 crop offsets whose overlap with the square is between 25% and 75%.
    side = (torch.minimum(torch.arange(97) + 32, torch.tensor(128)) - torch.arange(97).clamp(min=88)).clamp(min=0)
    area = side.view(-1, 1) * side.view(1, -1) / 32 ** 2
    p = ((area > 0.25) & (area < 0.75)).float().mean().item()   # 0.067
    assert abs(balanced_share(1.0) - p) < 0.05                   # check off: crops pass by chance
    assert abs(balanced_share(0.75) - (1 - (1 - p) ** 10)) < 0.1  # 0.50: the first of 10 tries that passes


def test_generator_for_depends_on_every_key():
    def draw(*key: int) -> torch.Tensor:
        return torch.rand(4, generator=ga.generator_for(*key, device="cpu"))
    assert torch.equal(draw(0, 5, 1, 0), draw(0, 5, 1, 0))
    others = [draw(1, 5, 1, 0), draw(0, 6, 1, 0), draw(0, 5, 0, 0), draw(0, 5, 1, 1)]
    assert all(not torch.equal(draw(0, 5, 1, 0), o) for o in others)


def test_a_file_that_is_not_a_beton_is_a_one_line_error(tmp_path):
    from data_tools.ffcv_loader import FFCVSource
    from data_tools.gpu_augment import EvalAug
    (tmp_path / "empty.beton").write_bytes(b"")
    (tmp_path / "text.beton").write_text("not a beton at all, just some text that is long enough" * 20)
    for path in (tmp_path / "empty.beton", tmp_path / "text.beton", tmp_path):
        with pytest.raises(ValueError, match="not a readable .beton") as err:
            FFCVSource(str(path), EvalAug(size=32), micro_batch_size=2)
        assert "\n" not in str(err.value)


@pytest.mark.parametrize("os_cache", [True, False])
def test_ffcv_limit_reads_the_first_samples_only(beton, os_cache):
    def make(rank: int) -> FFCVSource:
        return FFCVSource(beton, RawAug(), rank=rank, world_size=2, num_workers=1, os_cache=os_cache, limit=24,
                          **PLAN)
    assert make(0).steps_per_epoch == 2   # 24 samples at a global batch of 12
    # One epoch: 2 steps x 2 micro-batches per rank.
    idx = [np.concatenate([b["index"].numpy() for b in take(make(r), 0, 4)]) for r in range(2)]
    assert sorted(np.concatenate(idx).tolist()) == list(range(24))
