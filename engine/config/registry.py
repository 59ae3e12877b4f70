"""Named architectures: every stage keeps a dict of them beside its model class (as timm keeps its registry beside
the model) and builds through `build_from_registry`, so unknown names and settings fail the same way everywhere."""
from __future__ import annotations

import inspect
from typing import Any, Mapping


def build_from_registry(cls: type, archs: Mapping[str, Mapping[str, Any]], arch: str | Mapping[str, Any],
                        overrides: Mapping[str, Any], what: str) -> Any:
    """`cls(**archs[arch], **overrides)`, or `cls(**arch, **overrides)` for the saved kwargs of a model.

    Raises:
        ValueError: an unknown arch name or setting, in one line naming the valid ones.
    """
    if isinstance(arch, str):
        if arch not in archs:
            raise ValueError(f"unknown {what} arch '{arch}'; choose one of {', '.join(archs)}")
        arch = archs[arch]
    kwargs = {**arch, **overrides}
    valid = tuple(inspect.signature(cls.__init__).parameters)[1:]
    unknown = [k for k in kwargs if k not in valid]
    if unknown:
        raise ValueError(f"unknown {what} setting '{unknown[0]}'; valid: {', '.join(valid)}")
    return cls(**kwargs)


def load_registered(cls: type, archs: Mapping[str, Mapping[str, Any]], path: str, what: str, file_format: str,
                    overrides: Mapping[str, Any], hint: str) -> Any:
    """The model saved in one of our weights files (`engine.storage.weights.save_weights_file`), built from its own
    recorded arch and loaded strictly, in eval mode; `hint` tells the user what to do when the file records no arch."""
    from engine.storage.weights import load_strict, read_weights_file
    sd, arch = read_weights_file(path, what, file_format)
    if not isinstance(arch, dict) or "num_classes" not in arch:
        raise ValueError(f"{path} does not record its {what} arch; {hint}")
    model = build_from_registry(cls, archs, arch, overrides, what)
    return load_strict(model, sd, path, f"its saved {what} arch").eval()
