"""Tokenizer model: official key layout, official-format loading, save/load round trip, clear load errors."""
import json
import os

import pytest
import torch

from pretrain.tokenizer import build_tokenizer, load_tokenizer, save_tokenizer
from pretrain.tokenizer.model import ARCHS, _infer_arch
from pretrain.tokenizer.teachers import (EfficientNetLite0Teacher, TeacherConfig, TeacherError, build_teacher,
                                         randomly_initialise)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = os.path.join(ROOT, "reference", "official_state_dict_keys.json")
OFFICIAL = "tokenizer/vqkd_encoder_base_decoder_3x768x12_clip"


def _official_style(model) -> dict:
    """Our state dict dressed as an official release file: legacy EMA tensors, teacher and scaling keys."""
    sd = {k: v.clone() for k, v in model.state_dict().items()
          if k not in ("quantize.num_updates", "quantize.num_restarted")}
    sd["quantize.embedding.cluster_size"] = torch.zeros(model.num_codes)
    sd["quantize.embedding.embed_avg"] = sd["quantize.embedding.weight"].clone()
    sd["teacher_model.visual.proj"] = torch.zeros(768, 512)
    sd["scaling_layer.shift"] = torch.zeros(1, 3, 1, 1)
    return {"model": sd}


def test_base_arch_has_the_official_keys_and_shapes():
    with open(KEYS) as f:
        official = json.load(f)[OFFICIAL]
    model = build_tokenizer("vqkd_encoder_base_decoder_3x768x12_clip")
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    legacy = {"quantize.embedding.cluster_size", "quantize.embedding.embed_avg"}
    counters = {"quantize.num_updates", "quantize.num_restarted"}
    assert set(official) - set(ours) == legacy
    assert set(ours) - set(official) == counters
    assert all(ours[k] == official[k] for k in official if k in ours)
    # Shapes alone identify the official architecture.
    inferred = _infer_arch({k: torch.empty(v) for k, v in official.items()}, "official")
    expected = ARCHS["vqkd_encoder_base_decoder_3x768x12_clip"]
    assert {k: inferred[k] for k in expected if k in inferred} == {k: expected[k] for k in inferred}


def test_official_format_file_loads_and_gives_the_same_codes(tmp_path):
    torch.manual_seed(0)
    model = build_tokenizer("vqkd_tiny_test", kmeans_init=False).eval()
    path = tmp_path / "official.pth"
    torch.save(_official_style(model), path)
    loaded = load_tokenizer(str(path), arch="vqkd_tiny_test")
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    images = torch.rand(3, 3, 32, 32)
    codes = loaded.get_codebook_indices(images)
    assert codes.shape == (3, 16) and codes.dtype == torch.long
    assert torch.equal(codes, model.get_codebook_indices(images))


def test_save_load_round_trip_gives_identical_codes(tmp_path):
    torch.manual_seed(1)
    model = build_tokenizer("vqkd_tiny_test", kmeans_init=True).train()
    model(torch.rand(4, 3, 32, 32), torch.randn(4, 16, 112))   # k-means init + one EMA update
    save_tokenizer(model, str(tmp_path / "tok.pt"))
    loaded = load_tokenizer(str(tmp_path / "tok.pt"))            # arch read from the file
    images = torch.rand(5, 3, 32, 32)
    assert torch.equal(loaded.get_codebook_indices(images), model.get_codebook_indices(images))
    assert torch.equal(loaded.quantize.num_updates, model.quantize.num_updates)


def test_get_codebook_indices_does_not_touch_the_codebook():
    model = build_tokenizer("vqkd_tiny_test", kmeans_init=False).train()
    before = model.quantize.embedding.weight.clone()
    model.get_codebook_indices(torch.rand(2, 3, 32, 32))
    assert torch.equal(before, model.quantize.embedding.weight) and model.training


def test_codes_of_some_patches_run_the_last_mlp_on_them_alone():
    """The MIM step asks for the masked patches' codes only: the same tokens and ids as the whole grid's, with the
    encoder's last MLP on those rows (counted on the real modules) and every earlier block on all of them."""
    torch.manual_seed(0)
    model = build_tokenizer("vqkd_tiny_test", kmeans_init=False).eval()
    images = torch.rand(3, 3, 32, 32)
    rows = torch.stack([torch.randperm(model.num_patches)[:6].sort().values for _ in range(3)])
    seen = []
    hooks = [blk.mlp.fc1.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[:2]))
             for blk in model.encoder.blocks]
    try:
        codes = model.get_codebook_indices(images, rows)
    finally:
        for h in hooks:
            h.remove()
    assert seen == [(3, 1 + model.num_patches)] * (len(model.encoder.blocks) - 1) + [(3, 6)]
    whole = model.get_codebook_indices(images)
    assert codes.shape == (3, 6) and torch.equal(codes, whole.gather(1, rows))
    x = images * 2 - 1
    tokens = model._patch_tokens(model.encoder, x).gather(1, rows[..., None].expand(-1, -1, model.encoder.embed_dim))
    torch.testing.assert_close(model.encoder_rows(x, rows), tokens)
    assert len(whole.unique()) > 4   # codes that differ between patches: the gather above checks something


def test_mismatched_checkpoint_is_a_one_line_error(tmp_path):
    model = build_tokenizer("vqkd_tiny_test")
    save_tokenizer(model, str(tmp_path / "tok.pt"))
    with pytest.raises(ValueError, match="does not match tokenizer arch vqkd_small_demo") as err:
        load_tokenizer(str(tmp_path / "tok.pt"), arch="vqkd_small_demo")
    assert "\n" not in str(err.value)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_tokenizer(str(tmp_path / "missing.pt"))
    torch.save({"model": {"foo": torch.zeros(1)}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="is not a VQ-KD tokenizer"):
        load_tokenizer(str(tmp_path / "other.pt"))


def test_unknown_arch_and_override_are_rejected():
    with pytest.raises(ValueError, match="unknown tokenizer arch"):
        build_tokenizer("vqkd_huge")
    with pytest.raises(ValueError, match="unknown tokenizer setting 'code_dims'"):
        build_tokenizer("vqkd_tiny_test", code_dims=8)


def test_missing_teacher_file_names_the_path():
    with pytest.raises(TeacherError, match="/nope/clip.pt") as err:
        build_teacher(TeacherConfig(name="clip_b16", weights="/nope/clip.pt"))
    assert "download" in str(err.value)


def test_efficientnet_teacher_gives_features_on_the_tokenizer_grid():
    teacher = build_teacher(TeacherConfig(name="efficientnet_lite0", input_size=64))
    feats = teacher(torch.rand(2, 3, 32, 32), (4, 4))
    assert feats.shape == (2, 16, 112) and torch.isfinite(feats).all()
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    # Different images give different features: the weights are real, not a constant function.
    assert (feats[0] - feats[1]).abs().mean() > 1e-3


@pytest.mark.parametrize("random_init", [False, True])
def test_efficientnet_teacher_fused_for_inference_computes_the_same_function(random_init):
    """Folded BatchNorm, padding inside the convolutions and channels-last change the speed, not the features: the
    frozen teacher equals the library's net as loaded (or as randomly re-drawn: the fold comes after the init)."""
    fused = build_teacher(TeacherConfig(name="efficientnet_lite0", input_size=64, random_init=random_init), seed=3)
    plain = EfficientNetLite0Teacher(input_size=64)
    if random_init:
        randomly_initialise(plain, 3)
    plain.eval()
    used = [fused.net._bn0, *fused.net._blocks[:fused.stop]]   # the stem and the blocks the features come from
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for part in used for m in part.modules())
    assert sum(isinstance(m, torch.nn.ZeroPad2d) for m in fused.modules()) \
        < sum(isinstance(m, torch.nn.ZeroPad2d) for m in plain.modules())
    x = torch.rand(4, 3, 32, 32)
    got, want = fused(x, (4, 4)), plain(x, (4, 4))
    scale = want.abs().max()   # a random teacher's features are ~1e-6
    assert (want[0] - want[1]).abs().mean() > 1e-3 * scale   # a function of the image, not a constant
    torch.testing.assert_close(got / scale, want / scale, atol=1e-5, rtol=1e-4)


def test_dino_teacher_loads_a_local_timm_layout_file(tmp_path):
    import timm
    net = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)
    torch.save(net.state_dict(), tmp_path / "dino.pth")
    teacher = build_teacher(TeacherConfig(name="dino_b16", weights=str(tmp_path / "dino.pth"), input_size=224))
    x = torch.rand(1, 3, 224, 224)
    feats = teacher(x, (14, 14))
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        ref = net.forward_features((x - mean) / std)[:, 1:]
    torch.testing.assert_close(feats, ref)


def _openai_clip_visual(width=768, layers=12, patch=16, out_dim=512, grid=14) -> dict:
    """A CLIP ViT-B/16 image tower in OpenAI's key layout with random weights (plus a text-tower key)."""
    g = torch.Generator().manual_seed(0)

    def r(*shape, std=0.02):
        return torch.randn(*shape, generator=g) * std
    sd = {"visual.class_embedding": r(width), "visual.positional_embedding": r(grid * grid + 1, width),
          "visual.conv1.weight": r(width, 3, patch, patch), "visual.proj": r(width, out_dim, std=0.05),
          "token_embedding.weight": r(10, 4)}
    for name in ("ln_pre", "ln_post"):
        sd[f"visual.{name}.weight"], sd[f"visual.{name}.bias"] = 1 + r(width, std=0.1), r(width, std=0.1)
    for i in range(layers):
        p = f"visual.transformer.resblocks.{i}."
        for ln in ("ln_1", "ln_2"):
            sd[p + ln + ".weight"], sd[p + ln + ".bias"] = 1 + r(width, std=0.1), r(width, std=0.1)
        sd[p + "attn.in_proj_weight"], sd[p + "attn.in_proj_bias"] = r(3 * width, width), r(3 * width)
        sd[p + "attn.out_proj.weight"], sd[p + "attn.out_proj.bias"] = r(width, width), r(width)
        sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"] = r(4 * width, width), r(4 * width)
        sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"] = r(width, 4 * width), r(width)
    return sd


def _openai_clip_patch_tokens(sd: dict, x: torch.Tensor, heads: int = 12) -> torch.Tensor:
    """OpenAI's VisionTransformer forward, written out: ln_post on all tokens, then `@ proj`; patch tokens."""
    import torch.nn.functional as F
    v = {k[len("visual."):]: t for k, t in sd.items() if k.startswith("visual.")}
    x = F.conv2d(x, v["conv1.weight"], stride=16).flatten(2).transpose(1, 2)
    x = torch.cat([v["class_embedding"].expand(x.shape[0], 1, -1), x], 1) + v["positional_embedding"]
    ln = lambda t, n: F.layer_norm(t, t.shape[-1:], v[n + ".weight"], v[n + ".bias"], 1e-5)  # noqa: E731
    x = ln(x, "ln_pre")
    b, n, d = x.shape
    for i in range(12):
        p = f"transformer.resblocks.{i}."
        q, k, val = F.linear(ln(x, p + "ln_1"), v[p + "attn.in_proj_weight"], v[p + "attn.in_proj_bias"]).chunk(3, -1)
        q, k, val = (t.view(b, n, heads, d // heads).transpose(1, 2) for t in (q, k, val))
        attn = ((q @ k.transpose(-2, -1)) / (d // heads) ** 0.5).softmax(-1) @ val
        x = x + F.linear(attn.transpose(1, 2).reshape(b, n, d), v[p + "attn.out_proj.weight"],
                         v[p + "attn.out_proj.bias"])
        h = F.linear(ln(x, p + "ln_2"), v[p + "mlp.c_fc.weight"], v[p + "mlp.c_fc.bias"])
        x = x + F.linear(h * torch.sigmoid(1.702 * h), v[p + "mlp.c_proj.weight"], v[p + "mlp.c_proj.bias"])
    return (ln(x, "ln_post") @ v["proj"])[:, 1:]


def test_clip_teacher_reads_openai_layout_and_matches_the_openai_forward(tmp_path):
    sd = _openai_clip_visual()
    torch.save(sd, tmp_path / "ViT-B-16.pt")
    teacher = build_teacher(TeacherConfig(name="clip_b16", weights=str(tmp_path / "ViT-B-16.pt")))
    images = torch.rand(1, 3, 224, 224)
    feats = teacher(images, (14, 14))
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    with torch.no_grad():
        ref = _openai_clip_patch_tokens(sd, (images - mean) / std)
    assert feats.shape == (1, 196, 512)
    torch.testing.assert_close(feats, ref, atol=1e-4, rtol=1e-4)


def test_timm_teacher_reads_the_named_layer(tmp_path):
    import timm
    net = timm.create_model("resnet18", pretrained=False, num_classes=0)
    torch.save(net.state_dict(), tmp_path / "r18.pth")
    teacher = build_teacher(TeacherConfig(name="timm", timm_model="resnet18", weights=str(tmp_path / "r18.pth"),
                                          layer="layer3", input_size=64))
    assert teacher.out_dim == 256
    feats = teacher(torch.rand(2, 3, 64, 64), (4, 4))     # layer3 is stride 16: 64 px -> 4 x 4, no resampling
    assert feats.shape == (2, 16, 256)
    with pytest.raises(TeacherError, match="has no module 'layer9'"):
        build_teacher(TeacherConfig(name="timm", timm_model="resnet18", weights=str(tmp_path / "r18.pth"),
                                    layer="layer9"))


def test_codebook_indices_are_the_codes_of_encode_without_touching_the_codebook():
    torch.manual_seed(0)
    tok = build_tokenizer("vqkd_tiny_test", kmeans_init=False).train()
    before = tok.quantize.embedding.weight.clone()
    images = torch.rand(4, 3, 32, 32)
    codes = tok.get_codebook_indices(images)
    assert tok.training and torch.equal(tok.quantize.embedding.weight, before)
    with torch.no_grad():
        assert torch.equal(codes, tok.eval().encode(images)[2])


def test_a_file_that_is_not_a_tokenizer_is_a_one_line_error(tmp_path):
    from pretrain.mim import build_mim_model, save_mim_model
    save_mim_model(build_mim_model("beitv2_tiny_test"), tmp_path / "mim.pt")
    torch.save(torch.ones(3), tmp_path / "tensor.pt")
    (tmp_path / "junk.safetensors").write_text("junk")
    for name, message in (("mim.pt", "is a 'beitv2-ds/mim/1' file, not a VQ-KD tokenizer"),
                          ("tensor.pt", "does not hold a state dict"),
                          ("junk.safetensors", "cannot read")):
        with pytest.raises(ValueError, match=message):
            load_tokenizer(str(tmp_path / name))


def test_an_arch_less_file_loads_only_as_the_registered_arch_of_its_shapes(tmp_path):
    # vqkd_tiny_test has 2 heads of width 32: guessing width // 64 = 1 head would load and give other codes.
    torch.manual_seed(0)
    model = build_tokenizer("vqkd_tiny_test", kmeans_init=False).eval()
    torch.save(_official_style(model), tmp_path / "tiny.pth")
    loaded = load_tokenizer(str(tmp_path / "tiny.pth"))
    assert loaded.encoder.blocks[0].attn.num_heads == 2
    images = torch.rand(4, 3, model.img_size, model.img_size)
    assert torch.equal(loaded.get_codebook_indices(images), model.get_codebook_indices(images))
    other = build_tokenizer("vqkd_tiny_test", num_codes=32, kmeans_init=False)   # no registered arch is shaped so
    torch.save(_official_style(other), tmp_path / "other.pth")
    with pytest.raises(ValueError, match="match no registered tokenizer.*--tokenizer_arch") as err:
        load_tokenizer(str(tmp_path / "other.pth"))
    assert "\n" not in str(err.value)
