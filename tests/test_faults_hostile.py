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
