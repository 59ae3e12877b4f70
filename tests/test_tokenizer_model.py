"""Tokenizer model: official key layout, official-format loading, save/load round trip, clear load errors."""
import json
import os

import pytest
import torch

from pretrain.tokenizer import build_tokenizer, load_tokenizer, save_tokenizer
from pretrain.tokenizer.model import ARCHS, _infer_arch
from pretrain.tokenizer.teachers import TeacherConfig, TeacherError, build_teacher

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = os.path.join(ROOT, "..", "shared", "reference", "official_state_dict_keys.json")
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
