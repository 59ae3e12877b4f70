"""`--model.aggregation=false`: MIM without the patch-aggregation head (the paper's ablation of the head). The model
has no head parameters and returns no aggregation logits; a training step's loss is the masked-token loss alone;
the checkpoint exports to timm and loads as a classifier backbone and for linear probing.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from engine.config.schema import resolve
from finetune.features import FrozenFeatures
from finetune.model import build_classifier
from pretrain.mim import build_mim_model
from pretrain.mim.config import RECIPES, MIMConfig
from pretrain.mim.export import export_to_timm
from pretrain.mim.model import load_mim_model, save_mim_model
from pretrain.mim.train import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_without_aggregation_the_model_has_no_head_and_the_same_backbone():
    cfg = resolve(MIMConfig, RECIPES, "beitv2_tiny_test", {"model.aggregation": False, "tokenizer": "t.pt"})
    torch.manual_seed(0)
    headless = build_model(cfg)
    torch.manual_seed(0)
    full = build_mim_model("beitv2_tiny_test")   # the head is created after the backbone's init: same backbone
    assert not any(name.startswith("cls_pt_layers") for name, _ in headless.named_parameters())
    assert any(name.startswith("cls_pt_layers") for name, _ in full.named_parameters())
    assert headless.arch_kwargs["head_layers"] == 0
    images, mask = torch.randn(2, 3, 32, 32), torch.zeros(2, 16, dtype=torch.bool)
    mask[:, [1, 5, 6]] = True
    with torch.no_grad():
        logits, agg = headless.eval()(images, mask, num_masked=3)
        ref, ref_agg = full.eval()(images, mask, num_masked=3)
    assert agg is None and ref_agg is not None
    torch.testing.assert_close(logits, ref)
    assert headless.flops_per_image() < full.flops_per_image()
    assert resolve(MIMConfig, RECIPES, "beitv2_tiny_test", {"tokenizer": "t.pt"}).model.aggregation is True


def test_a_headless_checkpoint_loads_exports_and_probes(tmp_path):
    torch.manual_seed(0)
    model = build_mim_model("beitv2_tiny_test", head_layers=0)
    save_mim_model(model, tmp_path / "mim.pt")
    back = load_mim_model(tmp_path / "mim.pt")
    assert len(back.cls_pt_layers) == 0
    sd = export_to_timm(back, tmp_path / "backbone.safetensors")
    assert not any(k.startswith("cls_pt_layers") for k in sd)
    classifier = build_classifier("beitv2_tiny_test", 10, tmp_path / "mim.pt", new_head=True)
    torch.testing.assert_close(classifier.patch_embed.proj.weight, model.patch_embed.proj.weight)
    features = FrozenFeatures(str(tmp_path / "mim.pt"), pooling="cls")
    assert features.dim == 64
    with pytest.raises(ValueError, match="--pooling=agg_cls needs a MIM checkpoint"):
        FrozenFeatures(str(tmp_path / "mim.pt"), pooling="agg_cls")


TRAIN = """
import sys
from pretrain.mim.train import train
tokenizer, out = sys.argv[1], sys.argv[2]
train("beitv2_tiny_test", tokenizer=tokenizer, **{
    "model.aggregation": False, "data.source": "synthetic", "data.limit": 64, "run.output_dir": out,
    "run.ds_config": "ds_configs/zero0.json", "run.log_interval": 1, "run.save_interval": 1000,
    "schedule.total_steps": 2})
"""


def test_one_training_step_is_the_masked_token_loss_only(tmp_path, tiny_tokenizer_file):
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", TRAIN, str(tiny_tokenizer_file), str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f if '"train"' in line]
    rows = [r for r in rows if r["split"] == "train"]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert "agg_loss" not in r and "agg_acc" not in r
        assert r["loss"] == pytest.approx(r["mim_loss"], rel=1e-5)
    model = load_mim_model(out / "mim.pt")
    assert len(model.cls_pt_layers) == 0 and model.arch_kwargs["head_layers"] == 0
