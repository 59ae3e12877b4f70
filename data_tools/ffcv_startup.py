"""FFCV's import without its numba start-up cost (3.5 s on a 2-core CPU, in every process that reads or writes a .beton:
each rank, each test subprocess).

`ffcv.fields.rgb_image` keeps two constants, `{'jpg': 0, 'raw': 1}`, in a numba typed Dict that it fills when it is
imported, and the first typed Dict of a process compiles numba's whole dict implementation. FFCV reads that dict only
from Python, never inside compiled code, so a plain dict serves the same. `install()` (run by `import data_tools`)
puts a finder on `sys.meta_path` that imports the `ffcv` package, whose `__init__` imports every field, with numba's
`Dict` name bound to `dict` for the duration of that import only; numba's own `Dict` is back as soon as it ends.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from types import ModuleType


class _PlainDictWhileImporting(importlib.abc.Loader):
    """The `ffcv` package's own loader, with `numba.typed.Dict` bound to `dict` while the package executes."""

    def __init__(self, loader: importlib.abc.Loader):
        self.loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        import numba.typed   # FFCV needs numba: without it this is the ImportError FFCV would raise
        typed_dict = numba.typed.Dict
        numba.typed.Dict = dict
        try:
            self.loader.exec_module(module)
        finally:
            numba.typed.Dict = typed_dict

    def __getattr__(self, name: str):   # get_resource_reader, is_package, ...: the original loader's
        return getattr(self.loader, name)


class _FFCVFinder(importlib.abc.MetaPathFinder):
    """Finds `ffcv` as the path finder does and wraps its loader; every other module is left to the next finder."""

    def find_spec(self, name: str, path=None, target=None) -> importlib.machinery.ModuleSpec | None:
        if name != "ffcv":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _PlainDictWhileImporting(spec.loader)
        return spec


def install() -> None:
    """Add the finder once, ahead of the default ones (a no-op once FFCV is imported)."""
    if "ffcv" not in sys.modules and not any(isinstance(f, _FFCVFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _FFCVFinder())
