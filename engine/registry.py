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
