"""Hostile inputs of the second hardening round (issue 23): files crafted to run code, to hang or to crash a run,
and caches that must not serve stale results. Each case is a one-line error (or the right result), never a
traceback, a hang or a number computed from the wrong data."""
import pickle
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.test_faults_security import small_tmpfs  # noqa: F401 - a fixture: a real 64 KiB tmpfs


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
