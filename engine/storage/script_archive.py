"""The tensors of a TorchScript archive, read without running anything from the file.

`torch.jit.load` compiles the archive's code and runs the `__setstate__` methods it defines while loading, so an
archive someone else wrote can run their code on this machine (OpenAI's CLIP release is such an archive). Here only
`data.pkl` is read, by an unpickler that builds nothing but tensors, containers and plain values: a TorchScript
object (`__torch__.*`) becomes an inert holder of its attributes, and every other global is refused. The tensor
storages come from the archive's `data/` records and every view is checked against its storage's size.

An archive whose code defines `__setstate__` (its objects need that code to be rebuilt) is refused, as is one whose
pickle names anything besides the few functions torch writes there.
"""
from __future__ import annotations

import collections
import functools
import io
import os
import pickle
import re
import warnings
import zipfile
from typing import Any

import torch


class ScriptArchiveError(ValueError):
    """A TorchScript archive that cannot be read without running its code, or that is damaged; one line."""


def is_script_archive(path: str) -> bool:
    """Whether `path` is a zip holding TorchScript code (`constants.pkl` beside `data.pkl`)."""
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("/constants.pkl") or n == "constants.pkl" for n in z.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


class _ScriptObject:
    """Stands for an object of a TorchScript class: holds the attributes it was pickled with, runs nothing."""

    _state: Any = None

    def __setstate__(self, state: Any) -> None:
        self._state = state


def _restore_type_tag(value: Any, type_str: Any = None) -> Any:   # torch.jit._pickle.restore_type_tag: a type hint
    return value


def _checked_view(flat: torch.Tensor, offset: int, size: tuple, stride: tuple, requires_grad: Any = False,
                  backward_hooks: Any = None, metadata: Any = None) -> torch.Tensor:
    """torch._utils._rebuild_tensor_v2, with the view checked against its storage (a crafted one cannot read past
    it); hooks and metadata are dropped."""
    ints = [offset, *size, *stride]
    if not isinstance(flat, torch.Tensor) or not all(isinstance(v, int) and v >= 0 for v in ints) \
            or len(size) != len(stride):
        raise ValueError("a tensor record is malformed")
    if 0 not in size and offset + sum((n - 1) * s for n, s in zip(size, stride)) >= flat.numel():
        raise ValueError(f"a tensor of shape {tuple(size)} reaches past its storage of {flat.numel()} elements")
    return flat.as_strided(tuple(size), tuple(stride), offset)


class _StorageType:
    """What a `torch.<Type>Storage` global stands for here: its dtype."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


@functools.lru_cache(maxsize=None)
def _storage_dtypes() -> dict[str, torch.dtype]:
    """{"FloatStorage": torch.float32, ...}: torch's legacy typed storages, the names archives use for dtypes."""
    out = {}
    with warnings.catch_warnings():   # TypedStorage's deprecation warning: nothing is built from these classes
        warnings.simplefilter("ignore")
        for name in dir(torch):
            cls = getattr(torch, name)
            if name.endswith("Storage") and isinstance(cls, type) and issubclass(cls, torch.storage._LegacyStorage):
                out[name] = cls.dtype
    return out


_FUNCTIONS = {
    ("torch._utils", "_rebuild_tensor_v2"): _checked_view,
    ("torch.jit._pickle", "restore_type_tag"): _restore_type_tag,
    ("collections", "OrderedDict"): collections.OrderedDict,
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str):
        super().__init__(io.BytesIO(data))
        self.archive, self.prefix = archive, prefix
        self.storages: dict[str, torch.Tensor] = {}
        self.classes: dict[str, type] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "__torch__" or module.startswith("__torch__."):
            qualname = f"{module}.{name}"
            if qualname not in self.classes:   # an inert class per TorchScript class: none of its code exists here
                self.classes[qualname] = type("ScriptObject", (_ScriptObject,), {"script_class": qualname})
            return self.classes[qualname]
        if (module, name) in _FUNCTIONS:
            return _FUNCTIONS[(module, name)]
        if module == "torch" and name in _storage_dtypes():
            return _StorageType(_storage_dtypes()[name])
        raise pickle.UnpicklingError(f"it names {module}.{name}")

    def persistent_load(self, pid: Any) -> torch.Tensor:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[2], str)):
            raise pickle.UnpicklingError("a storage record is malformed")
        _, storage_type, key, _location, numel = pid
        if key not in self.storages:
            if not isinstance(storage_type, _StorageType):
                raise pickle.UnpicklingError("a storage record names no storage type")
            dtype = storage_type.dtype
            data = bytearray(self.archive.read(f"{self.prefix}data/{key}"))
            itemsize = torch.empty((), dtype=dtype).element_size()
            if not isinstance(numel, int) or len(data) != numel * itemsize:
                raise pickle.UnpicklingError(f"storage {key} holds {len(data)} bytes, not {numel} x {itemsize}")
            self.storages[key] = torch.frombuffer(data, dtype=dtype) if data else torch.empty(0, dtype=dtype)
        return self.storages[key]


def _collect(obj: Any, prefix: str, out: dict[str, torch.Tensor], seen: set[int]) -> None:
    """Tensor attributes of `obj` and of the TorchScript objects under it, as state-dict keys."""
    if id(obj) in seen:
        return
    seen.add(id(obj))
    state = obj._state if isinstance(obj, _ScriptObject) else obj
    if not isinstance(state, dict):
        return
    for name, value in state.items():
        if not isinstance(name, str):
            continue
        if isinstance(value, torch.Tensor):
            out[prefix + name] = value
        elif isinstance(value, (_ScriptObject, dict)):
            _collect(value, f"{prefix}{name}.", out, seen)


def read_script_archive(path: str) -> dict[str, torch.Tensor]:
    """The tensors (parameters and buffers, keyed as `state_dict()` keys them) of the TorchScript archive `path`.

    Raises:
        ScriptArchiveError: the archive's code defines `__setstate__`, its pickle names anything but tensors and
            TorchScript objects, or it is damaged (one line naming the file).
    """
    where = os.fspath(path)
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            data_pkl = [n for n in names if n == "data.pkl" or re.fullmatch(r"[^/]+/data\.pkl", n)]
            if len(data_pkl) != 1:
                raise ScriptArchiveError(f"{where} is not a TorchScript archive (no single data.pkl); save the "
                                         f"weights as a state_dict (torch.save) or safetensors")
            prefix = data_pkl[0][:-len("data.pkl")]
            for n in names:
                if n.startswith(prefix + "code/") and n.endswith(".py") and \
                        re.search(rb"\bdef __setstate__\b", z.read(n)):
                    raise ScriptArchiveError(
                        f"{where} is a TorchScript archive whose objects need its own code (__setstate__ in "
                        f"{n[len(prefix):]}) to load; it was not run. Save the model's state_dict (torch.save) or "
                        f"safetensors from a trusted copy instead")
            unpickler = _Unpickler(z.read(data_pkl[0]), z, prefix)
            root = unpickler.load()
    except ScriptArchiveError:
        raise
    except pickle.UnpicklingError as e:
        raise ScriptArchiveError(f"{where} is a TorchScript archive that holds more than weights ({e}); it was not "
                                 f"run. Save the model's state_dict (torch.save) or safetensors instead") from None
    except Exception as e:  # noqa: BLE001 - a torn zip, a missing record, a malformed pickle: all damage
        raise ScriptArchiveError(f"{where} is a damaged TorchScript archive ({type(e).__name__}: {e})") from None
    out: dict[str, torch.Tensor] = {}
    _collect(root, "", out, set())
    if not out:
        raise ScriptArchiveError(f"{where} is a TorchScript archive without tensors")
    return out


__all__ = ["ScriptArchiveError", "is_script_archive", "read_script_archive"]
