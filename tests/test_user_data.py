"""The user's data is the data (issue 23): a path given by the user switches the source to that file and is read
whole; every train command says what it reads and its resolved config before it starts (`--dry_run` stops there);
`num_classes` comes from the data's record and a label beyond it is a one-line error naming the file; YAML numbers.

Two tiny .beton files from `convert imagefolder`: 40 images in 3 class folders, and a file list whose labels reach 12.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from data_tools.config import DataConfig
from engine.config.cli import run_cli
from engine.config.schema import ConfigError, config_section, merge, resolve
from tests.conftest import cli_error

N = 40


@pytest.fixture(scope="module")
def betons(tmp_path_factory):
    """(3 classes in folders, 40 images; a file list with labels 0, 1 and 12, 40 images), both with convert's
    record."""
    from data_tools import convert
    root = tmp_path_factory.mktemp("userdata")
    rng = np.random.default_rng(0)
    lines = []
    for i in range(N):
        d = root / "src" / f"kind{i % 3}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(d / f"{i:03d}.png")
        lines.append(f"src/kind{i % 3}/{i:03d}.png {(0, 1, 12)[i % 3]}")
    (root / "list.txt").write_text("\n".join(lines) + "\n")
    folders, listed = str(root / "folders.beton"), str(root / "listed.beton")
    for src, out in ((root / "src", folders), (root / "list.txt", listed)):
        assert convert.main(["imagefolder", str(src), out, "--mode=raw", "--progress=False", "--workers=1"]) == 0
    return folders, listed


def _tokenizer(recipe="vqkd_tiny_test", **flags):
    from pretrain.tokenizer.config import RECIPES, TokenizerConfig
    return resolve(TokenizerConfig, RECIPES, recipe, flags)


def test_a_path_given_by_the_user_switches_the_source_and_is_read_whole(betons, tmp_path):
    folders, _ = betons
    # The complaint: the recipe's fashion_mnist won over the flag; now the flag's file is the data, whole (the
    # recipe's limit 512 is for Fashion-MNIST).
    cfg = _tokenizer(**{"data.train_path": folders})
    assert (cfg.data.source, cfg.data.train_path, cfg.data.limit) == ("beton", folders, 0)
    from data_tools.ffcv_loader import FFCVSource
    from data_tools.gpu_augment import MimAug
    from pretrain.tokenizer.config import RECIPES, TokenizerConfig
    small = {"r": merge(RECIPES["vqkd_tiny_test"], {"data.limit": 8})}   # a recipe limit below the file's 40
    cfg = resolve(TokenizerConfig, small, "r", {"data.train_path": folders})
    source = __import__("data_tools.sources", fromlist=["x"]).train_source(cfg.data, cfg.run, MimAug(size=32),
                                                                           torch.device("cpu"))
    assert isinstance(source, FFCVSource) and source.plan.num_samples == N
    # A limit the user sets is kept, whatever its layer: a flag, or the --config file that names the path.
    assert _tokenizer(**{"data.train_path": folders, "data.limit": 16}).data.limit == 16
    yaml_file = tmp_path / "mine.yaml"
    yaml_file.write_text(f"data:\n  train_path: {folders}\n  limit: 24\n")
    cfg = _tokenizer(config=str(yaml_file))
    assert (cfg.data.source, cfg.data.limit) == ("beton", 24)
    # A saved config.json of a Fashion-MNIST run sets source=fashion_mnist; a path flag over it still wins.
    saved = tmp_path / "config.json"
    saved.write_text(json.dumps({"data": {"source": "fashion_mnist", "limit": 512}}))
    cfg = _tokenizer(config=str(saved), **{"data.train_path": folders})
    assert (cfg.data.source, cfg.data.limit) == ("beton", 0)
    # A source set later than the path is the user's choice (the path is then unused).
    assert _tokenizer(config=str(yaml_file), **{"data.source": "synthetic"}).data.source == "synthetic"
    # Both in one layer, contradicting: one line naming both keys.
    with pytest.raises(ConfigError, match=r"^data.train_path=\S+ and data.source=synthetic are both set by flag: "
                                          r"a path is read with data.source=beton; drop data.source"):
        _tokenizer(**{"data.train_path": folders, "data.source": "synthetic"})
    # An evaluation command's --data_cfg: the run was on Fashion-MNIST (eval_images 256), the new file is read whole.
    data = config_section(DataConfig, {"source": "fashion_mnist", "eval_images": 256}, {"eval_path": folders},
                          "data_cfg")
    assert (data.source, data.eval_images) == ("beton", 0)
    assert config_section(DataConfig, {"source": "beton", "eval_path": "a.beton", "eval_images": 64},
                          {"eval_images": 32}, "data_cfg").eval_images == 32


def test_yaml_reads_the_numbers_people_write(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 1e-3\n  min_lr: 5E-5\n  eps: 1.0e-8\nrun:\n  seed: 7\n")
    cfg = _tokenizer(config=str(path))
    assert (cfg.optim.lr, cfg.optim.min_lr, cfg.optim.eps, cfg.run.seed) == (0.001, 5e-5, 1e-8, 7)


def _commands(stage):
    import importlib
    group = {"tokenizer": "pretrain.tokenizer", "mim": "pretrain.mim", "classify": "finetune.classify",
             "segment": "finetune.segment"}[stage]
    return importlib.import_module(f"{group}.__main__").COMMANDS


@pytest.mark.parametrize("stage,recipe,extra", [
    ("tokenizer", "vqkd_tiny_test", ["--data.train_path={folders}"]),
    ("mim", "beitv2_tiny_test", ["--data.train_path={folders}", "--tokenizer=tok.pt"]),
    ("classify", "beitv2_tiny_test_ft", ["--data.train_path={folders}", "--data.eval_path={folders}"]),
    ("segment", "upernet_beitv2_tiny_test", []),
])
def test_dry_run_says_what_the_run_reads_and_exits_0_without_a_model(betons, tmp_path, capsys, monkeypatch, stage,
                                                                     recipe, extra):
    folders, _ = betons
    from engine.parallel import distributed

    def no_start(*args):
        raise AssertionError("a dry run starts nothing")
    monkeypatch.setattr(distributed, "init", no_start)   # every stage's first step after its config
    out = tmp_path / "run"
    argv = ["train", recipe, "--dry_run", f"--run.output_dir={out}", *(a.format(folders=folders) for a in extra)]
    assert run_cli(_commands(stage), argv) == 0
    captured = capsys.readouterr()
    err = captured.err
    if extra:
        assert f"data train: beton {folders}: {N} of {N} images, 3 classes (kind0, kind1, kind2)" in err
        assert '* data.source = "beton"   [flag: beton, as data.train_path is given]' in err
        assert f"  data.limit = 0   [0 (all of {folders}): the " in err   # the recipe's limit, not applied
    else:
        assert "data train: fashion_mnist mosaics (built in, training): 64 images, 11 classes" in err
        assert '* data.limit = 64   [recipe upernet_beitv2_tiny_test]' in err
    assert f'* run.output_dir = "{out}"   [flag]' in err
    assert "    run.seed = 0\n" in err   # every key, those at their default too
    assert json.loads(captured.out)["dry_run"] is True
    assert not out.exists()


def test_num_classes_comes_from_the_data_and_labels_beyond_it_name_the_file(betons, tmp_path, capsys):
    folders, listed = betons
    with open(listed + ".json") as f:
        assert json.load(f)["num_classes"] == 13   # convert records it: the file list's largest label + 1
    commands = _commands("classify")
    # The recipe's 10 classes give way to the data's (3 class folders).
    assert run_cli(commands, ["train", "beitv2_tiny_test_ft", "--dry_run", f"--data.train_path={folders}",
                              f"--data.eval_path={folders}", f"--run.output_dir={tmp_path / 'a'}"]) == 0
    assert f"* num_classes = 3   [the data: {folders}]" in capsys.readouterr().err
    # A label the data holds beyond the user's num_classes: one line naming the file and the label, before a model.
    err = cli_error(capsys, commands, "train", "beitv2_tiny_test_ft", f"--data.train_path={listed}",
                    f"--data.eval_path={folders}", "--num_classes=5", f"--run.output_dir={tmp_path / 'b'}")
    assert err == (f"error: {listed}: label 12 is outside num_classes=5 (flag); set num_classes to at least 13 "
                   f"(the data's classes)")
    # evaluate: the checkpoint's head has 10 classes.
    from finetune.model import build_classifier, save_classifier
    ckpt = tmp_path / "classifier.pt"
    save_classifier(build_classifier("beitv2_tiny_test", 10), str(ckpt))
    err = cli_error(capsys, commands, "evaluate", str(ckpt), f'--data_cfg={{"eval_path": "{listed}"}}')
    assert err.startswith(f"error: {listed}: label 12 is outside num_classes=10 (the head of {ckpt})")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_labels_without_a_record_are_checked_on_the_device(betons, tmp_path, capsys):
    """A .beton without convert's record: k-NN and the probe check the labels they read (all ranks alike), the
    evaluation and the fine-tuning step count them on the device; each names the file and the label."""
    _, listed = betons
    bare = tmp_path / "bare.beton"
    os.link(listed, bare)   # the same file, no record beside it
    commands = _commands("classify")
    data = f'--data_cfg={{"train_path": "{bare}", "eval_path": "{bare}", "num_workers": 0}}'
    for command in ("knn", "linear_probe"):
        err = cli_error(capsys, commands, command, "random", "--arch=beitv2_tiny_test", data, "--num_classes=5",
                        "--eval_crop=1.0", "--batch_size=8")
        assert err == f"error: {bare}: label 12 is outside num_classes=5 (--num_classes); pass --num_classes=13 or more"
    err = cli_error(capsys, commands, "train", "beitv2_tiny_test_ft", f"--data.train_path={bare}",
                    f"--data.eval_path={bare}", "--num_classes=5", "--schedule.total_steps=2",
                    f"--run.output_dir={tmp_path / 'run'}")
    assert err.startswith(f"error: {bare}: label 12 is outside the model's 5 classes (0..4), by step 1; set "
                          f"num_classes to the data's class count")
    from engine.loop.labels import LabelRange
    from finetune.classify.evaluate import classification_metrics

    class Stub(torch.nn.Module):   # logits are the image's pixels
        num_classes = 3

        def forward(self, x):
            return x.flatten(1)
    batches = [{"image": torch.eye(3)[[0, 1, 2, 1]], "label": torch.tensor([0, 1, 2, 2])}]
    got = classification_metrics(Stub(), batches, class_names=["a", "b", "c"])
    assert got["per_class"] == [{"class": "a", "images": 1, "top1": 1.0}, {"class": "b", "images": 1, "top1": 1.0},
                                {"class": "c", "images": 2, "top1": 0.5}]
    batches[0]["label"] = torch.tensor([0, 7, 2, 1])
    with pytest.raises(ConfigError, match=r"^my.beton: label 7 is outside the model's 3 classes \(0..2\); set "):
        classification_metrics(Stub(), batches, source="my.beton")
    guard = LabelRange(3, "my.beton", log_interval=2)
    assert guard(torch.tensor([0, 5, 1])).tolist() == [0, 0, 1]   # the step stays valid until the check
    with pytest.raises(ConfigError, match=r"^my.beton: label 5 is outside the model's 3 classes \(0..2\), by step 1"):
        guard.after_step(1)
