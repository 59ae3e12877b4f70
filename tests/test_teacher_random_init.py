"""`--teacher.random_init=true`: the tokenizer distils a randomly initialised teacher (the paper's ablation of the
ImageNet-trained teacher). The weights differ from the trained ones, depend only on the seed, and a tiny run trains.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from engine.config.schema import resolve
from pretrain.tokenizer.config import RECIPES, TokenizerConfig
from pretrain.tokenizer.teachers import TeacherConfig, build_teacher

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def weights(teacher):
    return {k: v.clone() for k, v in teacher.net.state_dict().items() if v.is_floating_point()}


def test_a_random_teacher_differs_from_the_trained_one_and_depends_only_on_the_seed():
    trained = weights(build_teacher(TeacherConfig(input_size=64)))
    torch.manual_seed(123)   # the global random state plays no part
    a = build_teacher(TeacherConfig(input_size=64, random_init=True), seed=7)
    torch.manual_seed(456)
    b = build_teacher(TeacherConfig(input_size=64, random_init=True), seed=7)
    c = build_teacher(TeacherConfig(input_size=64, random_init=True), seed=8)
    wa, wb, wc = weights(a), weights(b), weights(c)
    assert wa.keys() == trained.keys()
    convs = [k for k, v in wa.items() if v.ndim == 4]
    assert convs and all(not torch.equal(wa[k], trained[k]) for k in convs)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(not torch.equal(wa[k], wc[k]) for k in convs)
    assert not a.training and not any(p.requires_grad for p in a.parameters())
    with torch.no_grad():
        features = a(torch.rand(2, 3, 32, 32), (4, 4))
    assert features.shape == (2, 16, a.out_dim) and torch.isfinite(features).all() and features.std() > 0
    cfg = resolve(TokenizerConfig, RECIPES, "vqkd_tiny_test", {"teacher.random_init": True})
    assert cfg.teacher.random_init is True
    assert resolve(TokenizerConfig, RECIPES, "vqkd_tiny_test", {}).teacher.random_init is False


TRAIN = """
import sys
from pretrain.tokenizer.train import train
train("vqkd_tiny_test", **{"teacher.random_init": True, "data.limit": 64, "run.output_dir": sys.argv[1],
                           "run.ds_config": "ds_configs/zero0.json", "schedule.total_steps": 3,
                           "run.save_interval": 1000})
"""


@pytest.mark.usefixtures("fashion_mnist_available")
def test_a_tiny_tokenizer_trains_against_a_random_teacher(tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", TRAIN, str(out)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out / "metrics.jsonl") as f:
        rows = [r for r in map(json.loads, f) if r["split"] == "train"]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(0 < r["loss"] < 10 for r in rows), rows
    with open(out / "config.json") as f:
        assert json.load(f)["teacher"]["random_init"] is True
    assert (out / "tokenizer.pt").exists()


def test_a_random_vit_teacher_keeps_none_of_its_trained_weights(tmp_path):
    """A timm ViT's position embedding and class token belong to no module with `reset_parameters`: the model's
    own init draws them, so every parameter leaves its trained value (not only the layers')."""
    import timm
    from safetensors.torch import save_file
    trained = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0)
    with torch.no_grad():
        for p in trained.parameters():   # "trained" values no init would draw
            p.fill_(0.5)
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, str(path))
    cfg = TeacherConfig(name="timm", timm_model="vit_tiny_patch16_224", weights=str(path), input_size=224,
                        random_init=True)
    random = build_teacher(cfg, seed=3)
    drawn = dict(random.net.named_parameters())
    assert {"pos_embed", "cls_token"} <= drawn.keys()
    assert [k for k, v in drawn.items() if (v == 0.5).all()] == []
    assert torch.equal(build_teacher(cfg, seed=3).net.pos_embed, random.net.pos_embed)


def test_a_timm_checkpoint_of_another_shape_is_one_line(tmp_path):
    import timm
    from safetensors.torch import save_file

    from pretrain.tokenizer.teachers import TeacherError
    small = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32)
    path = tmp_path / "vit32.safetensors"
    save_file({k: v.contiguous() for k, v in small.state_dict().items()}, str(path))
    with pytest.raises(TeacherError, match=r"does not fit timm model 'vit_tiny_patch16_224': size mismatch for "
                                           r"pos_embed") as err:
        build_teacher(TeacherConfig(name="timm", timm_model="vit_tiny_patch16_224", weights=str(path)))
    assert "\n" not in str(err.value)
