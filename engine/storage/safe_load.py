"""Reading checkpoint files without running code from them.

`torch.load(weights_only=False)`, which DeepSpeed uses for every file it reads, unpickles whatever a file holds: a
run directory someone else wrote can carry an object whose unpickling runs their code. Here every file is read with
`weights_only=True` (tensors, containers, numbers, strings) plus, for DeepSpeed's files, the few plain-data classes
they hold (`DEEPSPEED_TYPES`). A file that names anything else is refused with a one-line `UntrustedCheckpoint`
before any object in it is built.

- `load(path, ...)`: our own reads.
- `deepspeed_loads_weights_only()`: around calls into DeepSpeed (its checkpoint load, the ZeRO consolidation), every
  `torch.load` is `load`, whatever `weights_only` the caller passes.
- `python -m engine.storage.safe_load <module> <args>`: runs a DeepSpeed tool (the universal-checkpoint converter) as
  `python -m <module>` would, with its loads made safe the same way (its worker processes are forked, so they
  inherit that).
"""
from __future__ import annotations

import contextlib
import os
import pickle
import re
import sys
from typing import Any, Iterator

import torch

REFUSED = "contains pickled code/objects that are not weights"
TRUST = "Only resume from or export run directories you trust"


def _deepspeed_types() -> list:
    """The classes DeepSpeed 0.19's checkpoints hold besides tensors and containers: found by saving one-rank
    checkpoints at ZeRO 0-3 in fp32 and bf16, converting them to universal checkpoints, and listing each file's
    globals with `torch.serialization.get_unsafe_globals_in_checkpoint` (model states and RNG files need none).
    Each is plain data: building one sets attributes (or looks up an enum member) and runs no code of the file's
    choosing."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    return [
        LossScaler,         # ZeRO 1-3 optimizer shards and universal `optimizer_state.pt`: `loss_scaler`
        DynamicLossScaler,  # the same with run.precision=fp16 (CUDA only, so from DeepSpeed's source, not a save)
        ZeroStageEnum,      # the same files: `zero_stage`
        fragment_address,   # ZeRO-1/2 optimizer shards (fp32 and bf16): `param_slice_mappings`, (numel, start)
    ]


class UntrustedCheckpoint(ValueError):
    """A checkpoint file holds pickled objects other than weights; nothing in it was built. One line."""


_TORCH_LOAD = torch.load   # the real one, also while `deepspeed_loads_weights_only` has swapped it
# torch's own messages when the weights-only unpickler meets a global it does not allow (or a call to one).
_CODE = re.compile(r"GLOBAL (\S+) was not an allowed global|unsupported GLOBAL (\S+) whose module"
                   r"|call reduce for unrecognized function (\S+)")
# The first bytes of a file torch.save wrote: a zip archive, or the legacy format's pickled magic number.
_TORCH_HEADS = (b"PK\x03\x04", b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19")


def _is_torch_file(f: Any) -> bool:
    """Whether `f` starts as torch.save's files do: random bytes (a garbled file) can look like a pickle naming a
    global, and are damage, not code."""
    if not isinstance(f, (str, os.PathLike)):
        return True
    try:
        with open(f, "rb") as file:
            head = file.read(16)
    except OSError:
        return False
    return head.startswith(_TORCH_HEADS)


def _refusal(f: Any, error: Exception, allow: list) -> UntrustedCheckpoint | None:
    """The one-line refusal for a weights-only load that failed on a global, or None if it failed otherwise."""
    match = _CODE.search(str(error))
    if match is None or not _is_torch_file(f):
        return None
    names = [next(g for g in match.groups() if g)]
    with contextlib.suppress(Exception), torch.serialization.safe_globals(allow):   # a static scan: names them all
        names = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(f)) or names
    where = os.fspath(f) if isinstance(f, (str, os.PathLike)) else "a checkpoint file"
    return UntrustedCheckpoint(f"{where} {REFUSED} (type {', '.join(names[:3])}); it was not loaded. {TRUST}")


def load(f: Any, map_location: Any = None, mmap: bool | None = None, allow: list | tuple = ()) -> Any:
    """`torch.load(f, weights_only=True)` with the classes in `allow` also accepted.

    Raises:
        UntrustedCheckpoint: the file names another class or function (one line naming the file and it).
        Whatever torch raises for a file that is torn or not a checkpoint.
    """
    allow = list(allow)
    try:
        with torch.serialization.safe_globals(allow):
            return _TORCH_LOAD(f, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        refusal = _refusal(f, e, allow)
        if refusal is not None:
            raise refusal from None
        raise


def load_deepspeed_file(f: Any, map_location: Any = None, mmap: bool | None = None) -> Any:
    """`load` for a file DeepSpeed wrote (its classes allowed)."""
    return load(f, map_location=map_location, mmap=mmap, allow=_deepspeed_types())


def _forced_load(f: Any, map_location: Any = None, pickle_module: Any = None, *, weights_only: Any = None,
                 mmap: bool | None = None, **pickle_load_args: Any) -> Any:
    """`torch.load`'s signature; `weights_only`, `pickle_module` and pickle arguments are ignored (DeepSpeed passes
    `weights_only=False`), the file is read as `load_deepspeed_file` reads it."""
    del pickle_module, weights_only, pickle_load_args
    return load_deepspeed_file(f, map_location=map_location, mmap=mmap)


@contextlib.contextmanager
def deepspeed_loads_weights_only() -> Iterator[None]:
    """Within it, every `torch.load` call (DeepSpeed calls it as `torch.load`, looked up at each call) reads
    weights only. Not for threads that load other files meanwhile: it swaps the module attribute."""
    previous = torch.load
    torch.load = _forced_load
    try:
        yield
    finally:
        torch.load = previous


def _run_module(argv: list[str]) -> int:
    """`python -m <argv[0]> <argv[1:]>` with safe loads; a refusal is the last line of stderr and exit status 1."""
    import runpy
    sys.argv = list(argv)
    try:
        with deepspeed_loads_weights_only():
            runpy.run_module(argv[0], run_name="__main__", alter_sys=True)
    except UntrustedCheckpoint as e:
        print(e, file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    # Through the module's import name: a worker process must find the refusal's class by it to pass it back.
    from engine.storage.safe_load import _run_module as run
    sys.exit(run(sys.argv[1:]))
