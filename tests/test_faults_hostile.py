"""Hostile inputs of the second hardening round (issue 23): files crafted to run code, to hang or to crash a run,
and caches that must not serve stale results. Each case is a one-line error (or the right result), never a
traceback, a hang or a number computed from the wrong data."""
import pickle
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn


# ------------------------------------------------------------------------------- teacher weights (TorchScript)
class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)
        self.hp = nn.Parameter(torch.arange(4, dtype=torch.float16))
        self.register_buffer("steps", torch.tensor([7], dtype=torch.int64))
        self.seq = nn.Sequential(nn.Linear(2, 2), nn.GELU())

    def forward(self, x):
        return self.seq(self.fc(x))


class _RunsCodeAtLoad(nn.Module):
    """A TorchScript module whose `__setstate__` (compiled from the archive and run by `torch.jit.load`) prints."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(2))

    def forward(self, x):
        return x * self.w

    @torch.jit.export
    def __getstate__(self):
        return (self.w, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[torch.Tensor, bool]):
        print("THE ARCHIVE'S CODE RAN")
        self.w = state[0]
        self.training = state[1]


class _Payload:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def test_a_torchscript_teacher_archive_gives_the_tensors_jit_load_gives(tmp_path):
    from pretrain.tokenizer.teachers import load_state_dict
    path = tmp_path / "tiny.pt"
    torch.jit.script(_Tiny()).save(str(path))
    expected = torch.jit.load(str(path)).state_dict()
    got = load_state_dict(str(path))
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        assert got[key].dtype == value.dtype and torch.equal(got[key], value), key


def test_a_torchscript_teacher_whose_code_runs_at_load_is_refused_unrun(tmp_path, capfd):
    from pretrain.tokenizer.teachers import TeacherConfig, TeacherError, build_teacher
    path = tmp_path / "ViT-B-16.pt"
    torch.jit.script(_RunsCodeAtLoad()).save(str(path))
    with pytest.raises(TeacherError) as err:
        build_teacher(TeacherConfig(name="clip_b16", weights=str(path)))
    assert "THE ARCHIVE'S CODE RAN" not in capfd.readouterr().out
    message = str(err.value)
    assert "\n" not in message and str(path) in message and "__setstate__" in message and "not run" in message


def test_a_torchscript_teacher_whose_pickle_holds_code_is_refused_unrun(tmp_path):
    from pretrain.tokenizer.teachers import TeacherError, load_state_dict
    plain, path, marker = tmp_path / "tiny.pt", tmp_path / "planted.pt", tmp_path / "ran"
    torch.jit.script(_Tiny()).save(str(plain))
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(path, "w") as dst:
        for name in src.namelist():
            data = src.read(name)
            dst.writestr(name, pickle.dumps({"fc": _Payload(marker)}, protocol=2)
                         if name.endswith("/data.pkl") else data)
    with pytest.raises(TeacherError) as err:
        load_state_dict(str(path))
    assert not marker.exists(), "the planted code ran"
    assert str(err.value) == (f"{path} is a TorchScript archive that holds more than weights (it names "
                              f"__builtin__.exec); it was not run. Save the model's state_dict (torch.save) or "
                              f"safetensors instead")


# ----------------------------------------------------------------------------------------------- config files
def _alias_bomb() -> str:
    """~1 KB of YAML: nine aliases of nine over eleven levels, 9^11 values once expanded."""
    lines = ["a0: &a0 [1, 2, 3, 4, 5, 6, 7, 8, 9]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 12)]
    return "\n".join(lines + ["run: {output_dir: *a11}"]) + "\n"


@pytest.mark.parametrize("name,content,message", [
    ("bomb.yaml", _alias_bomb(), "config file {path} uses a YAML alias (*a0 at line 2); config files hold plain "
                                 "values: write each value out"),
    ("deep.json", '{"run": ' + "[" * 100_000 + "]" * 100_000 + "}",
     "config file {path} is nested more than 32 levels deep; config keys have a few levels"),
    ("deep.yaml", "run:\n" + "".join("  " * i + f"k{i}:\n" for i in range(1, 40)) + "  " * 40 + "v: 1\n",
     "config file {path} is nested more than 32 levels deep; config keys have a few levels"),
    ("brackets.yaml", "run: " + "[" * 20_000 + "]" * 20_000 + "\n", "config file {path} is "),
])
@pytest.mark.timeout(120)
@pytest.mark.slow
def test_config_files_that_bomb_or_nest_deeply_are_one_line_errors(tmp_path, name, content, message):
    import subprocess
    import sys

    from tests.conftest import ROOT
    path = tmp_path / name
    path.write_text(content)
    proc = subprocess.run([sys.executable, "-m", "engine.main", "tokenizer", "train", "vqkd_tiny_test",
                           f"--config={path}", f"--run.output_dir={tmp_path / 'run'}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=90)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert err[-1].startswith("error: " + message.format(path=path)), err[-1]
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------------------------- convert
class _Dies:
    """Samples for FFCV's writer; sample 40 stops its worker: a label int64 cannot hold, or SIGKILL."""

    def __init__(self, how: str):
        self.how = how

    def __len__(self):
        return 64

    def __getitem__(self, i):
        import os
        import signal

        import numpy as np
        if i == 40 and self.how == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        return np.zeros((8, 8, 3), np.uint8), (2 ** 70 if i == 40 and self.how == "label" else i)


@pytest.mark.parametrize("how,cause", [("label", "OverflowError: Python int too large to convert to C long"),
                                       ("sigkill", "killed by signal 9")])
@pytest.mark.timeout(120)
def test_convert_stops_in_one_line_when_a_writer_process_dies(tmp_path, how, cause):
    from ffcv.fields import IntField, RGBImageField

    from data_tools.convert import ConvertError, _write_beton
    out = tmp_path / "x.beton"
    with pytest.raises(ConvertError) as err:
        _write_beton(str(out), {"image": RGBImageField(write_mode="raw"), "label": IntField()}, _Dies(how), 2, 4,
                     "writing", False)
    assert str(err.value) == (f"writing {out} failed: a writer process stopped ({cause}); nothing was written "
                              f"under {out}")
    assert list(tmp_path.iterdir()) == []   # no temporary left


def test_a_file_list_label_above_int64_is_one_line(tmp_path, capsys):
    from PIL import Image

    from data_tools import convert
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    listing = tmp_path / "list.txt"
    listing.write_text(f"a.png 0\na.png {2 ** 64}\n")
    assert convert.main(["imagefolder", str(listing), str(tmp_path / "x.beton"), "--progress=False"]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        f"convert: error: {listing}:2: label {2 ** 64} is above {2 ** 63 - 1}, the largest a .beton stores (int64); "
        f"number the classes 0..C-1"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "list.txt"]


@pytest.mark.timeout(120)
def test_convert_onto_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, capsys, small_tmpfs):
    """A real 64 KiB tmpfs: FFCV's worker fails writing its first 8 MiB page; the parent used to wait forever."""
    from PIL import Image

    from data_tools import convert
    (tmp_path / "src" / "cat").mkdir(parents=True)
    for i in range(4):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(tmp_path / "src" / "cat" / f"{i}.png")
    out = small_tmpfs / "x.beton"
    assert convert.main(["imagefolder", str(tmp_path / "src"), str(out), "--progress=False", "--mode=raw"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"convert: error: cannot write {out} (No space left on device); pick a writable location"]
    assert list(small_tmpfs.iterdir()) == []


# ----------------------------------------------------------------------------------- .beton headers and kinds
@pytest.fixture(scope="module")
def betons(tmp_path_factory) -> dict:
    """{"cls": a classification .beton (8 RGB 32 px images, 2 classes, raw), "seg": a segmentation one (8 images
    with label maps)}, written by data_tools.convert."""
    import numpy as np
    from PIL import Image

    from data_tools import convert
    root = tmp_path_factory.mktemp("betons")
    images, annotations = root / "ade" / "images" / "training", root / "ade" / "annotations" / "training"
    images.mkdir(parents=True)
    annotations.mkdir(parents=True)
    for i in range(8):
        Image.new("RGB", (32, 32), (20 * i, 0, 0)).save(images / f"{i}.jpg")
        Image.fromarray((np.arange(32 * 32).reshape(32, 32) % 11).astype(np.uint8), "L").save(annotations / f"{i}.png")
        (root / "cls" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (32, 32), (0, 20 * i, 0)).save(root / "cls" / f"c{i % 2}" / f"{i}.png")
    out = {"cls": root / "cls.beton", "seg": root / "seg.beton"}
    assert convert.main(["imagefolder", str(root / "cls"), str(out["cls"]), "--progress=False", "--mode=raw"]) == 0
    assert convert.main(["ade20k", str(root / "ade"), str(out["seg"]), "--progress=False"]) == 0
    return out


def _crafted(src: Path, dst: Path, how: str) -> Path:
    """A copy of the classification .beton `src` with one header or metadata value changed."""
    import shutil

    import numpy as np
    from ffcv.types import FieldDescType, HeaderType

    from data_tools.beton_header import _metadata_type
    shutil.copy(src, dst)
    header = np.fromfile(dst, HeaderType, count=1)[0].copy()
    meta_at = HeaderType.itemsize + 2 * FieldDescType.itemsize
    first = np.fromfile(dst, _metadata_type(["image", "label"]), count=1, offset=meta_at)[0].copy()
    if how == "pointer":
        first["f0"]["data_ptr"] = dst.stat().st_size + 4096
    elif how == "huge":
        first["f0"]["height"] = first["f0"]["width"] = 60000
    elif how == "raw_size":
        first["f0"]["height"] = 33
    elif how == "samples":
        header["num_samples"] = 2 ** 40
    elif how == "fields":
        header["num_fields"] = 60000
    elif how == "table":
        header["alloc_table_ptr"] = dst.stat().st_size + 24
    with open(dst, "r+b") as f:
        f.write(header.tobytes())
        f.seek(meta_at)
        f.write(first.tobytes())
    return dst


@pytest.mark.parametrize("how,problem", [
    ("pointer", "sample 0 of field 'image' points at byte {end}, not at data of the file"),
    ("huge", "field 'image' claims images up to 60000 x 60000 pixels (sample 0: 60000 x 60000), a canvas over "
             "178956970 pixels"),
    ("raw_size", "sample 0 of field 'image' is 33 x 32 pixels but holds 3072 bytes"),
    ("samples", "its header declares 1099511627776 samples (26388279066624 bytes of metadata), more than its "
                "{size} bytes hold"),
    ("fields", "its header declares 60000 fields, convert writes 1 to 3"),
    ("table", "its allocation table pointer {end} is outside bytes {meta_end}..{size} or cuts a row"),
])
def test_a_crafted_beton_header_is_one_line_before_anything_is_allocated(betons, tmp_path, how, problem):
    from data_tools.beton_header import BetonHeaderError
    from data_tools.ffcv_loader import FFCVSource, RawAug
    path = _crafted(betons["cls"], tmp_path / f"{how}.beton", how)
    size = path.stat().st_size
    with pytest.raises(BetonHeaderError) as err:
        FFCVSource(str(path), RawAug(), micro_batch_size=2, num_workers=1)
    end = size + (4096 if how == "pointer" else 24)
    meta_end = 24 + 2 * 1041 + 8 * 24   # header, 2 field descriptors, 8 metadata rows
    problem = problem.format(end=end, size=size, meta_end=meta_end)
    assert str(err.value) == f"{path} is not a readable .beton: {problem}; rewrite it with python -m data_tools.convert"


def test_the_betons_convert_writes_pass_the_header_check(betons):
    from data_tools.beton_header import check_beton
    assert check_beton(str(betons["cls"])) == ["image", "label"]
    assert check_beton(str(betons["seg"])) == ["image", "annotation"]


def _data(**paths):
    from data_tools.config import DataConfig
    return DataConfig(source="beton", num_workers=1, **{k: str(v) for k, v in paths.items()})


SEG_TO_CLS = ("{path} is a segmentation .beton (image, annotation: label maps); classification needs class labels: "
              "convert a class-folder tree or a file list with python -m data_tools.convert imagefolder")


def test_a_beton_of_the_other_kind_is_one_line_where_each_stage_opens_it(betons):
    from data_tools.beton_header import BetonHeaderError
    from data_tools.ffcv_loader import RawAug
    from data_tools.gpu_augment import EvalAug
    from data_tools.sources import eval_batches, labelled_batches, segmentation_source, train_source
    from engine.config.schema import RunConfig
    seg, cls = betons["seg"], betons["cls"]
    run = RunConfig(micro_batch_size=2)
    with pytest.raises(BetonHeaderError) as err:    # classification training (finetune.classify.train)
        train_source(_data(train_path=seg), run, EvalAug(32), "cpu", wants="labels")
    assert str(err.value) == SEG_TO_CLS.format(path=seg)
    with pytest.raises(BetonHeaderError) as err:    # evaluate, k-NN, linear probe
        next(labelled_batches(_data(eval_path=seg), "test", EvalAug(32), 4, "cpu"))
    assert str(err.value) == SEG_TO_CLS.format(path=seg)
    with pytest.raises(BetonHeaderError) as err:    # segmentation training and evaluation
        segmentation_source(_data(train_path=cls), "training", RawAug(), "cpu", size=32)
    assert str(err.value) == (f"{cls} is a classification .beton (image, label: class ids); segmentation needs "
                              f"label maps: convert a segmentation data set with python -m data_tools.convert ade20k")
    for source in (lambda: train_source(_data(train_path=seg), run, EvalAug(32), "cpu"),   # pretraining
                   lambda: next(eval_batches(_data(eval_path=seg), 32, 4, "cpu"))):
        with pytest.raises(BetonHeaderError, match=f"^{seg} is a segmentation .beton .*; this stage reads images "
                                                   f"with class labels or none"):
            source()
    # the right kinds still open
    assert segmentation_source(_data(train_path=seg), "training", RawAug(), "cpu", size=32).plan.num_samples == 8
    assert next(labelled_batches(_data(eval_path=cls), "test", EvalAug(32), 4, "cpu"))["label"].shape == (4,)


@pytest.mark.timeout(600)
def test_classify_train_on_a_segmentation_beton_is_one_line(betons, tmp_path):
    import subprocess
    import sys

    from tests.conftest import ROOT
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "engine.main", "classify", "train", "beitv2_tiny_test_ft",
                           f"--data.train_path={betons['seg']}", f"--data.eval_path={betons['cls']}",
                           f"--run.output_dir={out}", "--schedule.total_steps=2"], cwd=ROOT, capture_output=True,
                          text=True, timeout=500)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == "error: " + SEG_TO_CLS.format(path=betons["seg"])


# ------------------------------------------------------------------------------ k-NN / probe feature cache
def _tokenizer_file(path: Path, sign: int) -> Path:
    """A random `vqkd_tiny_test` tokenizer; `sign` -1: its weights negated (another model, a file of the same
    size)."""
    from pretrain.tokenizer import build_tokenizer, save_tokenizer
    torch.manual_seed(0)
    model = build_tokenizer("vqkd_tiny_test", kmeans_init=False)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(sign)
    save_tokenizer(model, str(path))
    return path


def _knn(checkpoint, betons, cache=None, **kw):
    from finetune.classify.probe import knn
    data = {"source": "beton", "train_path": str(betons["cls"]), "eval_path": str(betons["test"]), "num_workers": 1}
    return knn(str(checkpoint), data_cfg=data, k=3, eval_crop=1.0, cache_dir=str(cache or ""), **kw)


@pytest.fixture
def knn_data(betons, tmp_path):
    """The classification .beton as training data (a copy: tests rewrite it) and a held-out copy."""
    import shutil
    shutil.copy(betons["cls"], tmp_path / "train.beton")
    shutil.copy(betons["cls"], tmp_path / "test.beton")
    return {"cls": tmp_path / "train.beton", "test": tmp_path / "test.beton"}


def _same_stat_times(path: Path, stat) -> None:
    import os
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_a_beton_rewritten_in_place_with_new_labels_is_not_served_from_the_cache(knn_data, tmp_path):
    import numpy as np
    from ffcv.types import FieldDescType, HeaderType

    from data_tools.beton_header import _metadata_type
    ckpt, cache = _tokenizer_file(tmp_path / "tok.pt", 1), tmp_path / "cache"
    _knn(ckpt, knn_data, cache)
    path, before = knn_data["cls"], knn_data["cls"].stat()
    row = _metadata_type(["image", "label"])
    at = HeaderType.itemsize + 2 * FieldDescType.itemsize
    meta = np.fromfile(path, row, count=8, offset=at).copy()
    meta["f1"] = 1 - meta["f1"]                     # every label flipped, in place: same inode, same size
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(meta.tobytes())
    _same_stat_times(path, before)                  # and the old mtime
    assert path.stat().st_size == before.st_size and path.stat().st_mtime_ns == before.st_mtime_ns
    again = _knn(ckpt, knn_data, cache)
    assert again == _knn(ckpt, knn_data)            # what the new labels give, computed without the cache
    assert len(list(cache.glob("*/train_rank0of1.done"))) == 2


def test_another_checkpoint_copied_over_the_old_one_is_not_served_from_the_cache(knn_data, tmp_path):
    import shutil
    (tmp_path / "other").mkdir()   # the same file name: torch.save names the archive's records after it
    ckpt, other = _tokenizer_file(tmp_path / "tok.pt", 1), _tokenizer_file(tmp_path / "other" / "tok.pt", -1)
    assert ckpt.stat().st_size == other.stat().st_size
    cache = tmp_path / "cache"
    _knn(ckpt, knn_data, cache)
    before = ckpt.stat()
    shutil.copyfile(other, ckpt)
    _same_stat_times(ckpt, before)
    again, fresh = _knn(ckpt, knn_data, cache), _knn(other, knn_data)
    assert {**again, "checkpoint": ""} == {**fresh, "checkpoint": ""}
    assert len(list(cache.glob("*/train_rank0of1.done"))) == 2


@pytest.mark.parametrize("name", ["train_rank0of1.f32", "test_rank0of1.labels"])
def test_a_truncated_cached_file_is_computed_again(knn_data, tmp_path, name):
    ckpt, cache = _tokenizer_file(tmp_path / "tok.pt", 1), tmp_path / "cache"
    first = _knn(ckpt, knn_data, cache)
    (cached,) = cache.glob(f"*/{name}")
    size = cached.stat().st_size
    with open(cached, "r+b") as f:
        f.truncate(size - 8)
    assert _knn(ckpt, knn_data, cache) == first
    assert cached.stat().st_size == size


def test_an_unwritable_cache_dir_is_one_line_and_the_features_are_computed(knn_data, tmp_path, capsys):
    ckpt = _tokenizer_file(tmp_path / "tok.pt", 1)
    expected = _knn(ckpt, knn_data)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    capsys.readouterr()
    assert _knn(ckpt, knn_data, blocker / "cache") == expected
    notes = [line for line in capsys.readouterr().err.splitlines() if "--cache_dir" in line]
    assert notes == [f"note: --cache_dir {blocker / 'cache'} cannot be written (Not a directory); computing the "
                     f"features without a cache"]


def test_a_full_or_read_only_cache_dir_is_one_line(knn_data, tmp_path, capsys, small_tmpfs):
    import os
    import subprocess

    from engine.storage.files import OutputPathError
    from finetune.features import FeatureFile
    ckpt = _tokenizer_file(tmp_path / "tok.pt", 1)
    expected = _knn(ckpt, knn_data)
    fd = os.open(small_tmpfs / "filler", os.O_WRONLY | os.O_CREAT)   # the disk is full
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError:
        pass
    finally:
        os.close(fd)
    with pytest.raises(OutputPathError) as err:     # writing features there: one line, nothing left
        FeatureFile(str(small_tmpfs / "x" / "train"), 4).write(iter([(torch.ones(64, 4), torch.zeros(64))]))
    assert str(err.value) == (f"cannot write the features to {small_tmpfs / 'x'} (No space left on device); free "
                              f"space there or pass another --cache_dir (none: a temporary folder)")
    assert sorted(p.name for p in small_tmpfs.rglob("*")) == ["filler", "x"]
    capsys.readouterr()
    assert _knn(ckpt, knn_data, small_tmpfs / "cache") == expected
    assert f"note: --cache_dir {small_tmpfs / 'cache'} cannot be written (No space left on device)" in \
        capsys.readouterr().err
    (small_tmpfs / "filler").unlink()
    subprocess.run(["mount", "-o", "remount,ro", str(small_tmpfs)], check=True)
    assert _knn(ckpt, knn_data, small_tmpfs / "cache2") == expected
    assert f"note: --cache_dir {small_tmpfs / 'cache2'} cannot be written (Read-only file system)" in \
        capsys.readouterr().err
