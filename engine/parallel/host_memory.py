"""Host memory of CPU runs: where glibc puts big tensors, and giving freed pages back (a no-op without glibc or on
CUDA).

glibc serves blocks under its mmap threshold from heaps and keeps the pages of freed blocks; by default it raises the
threshold to the largest block freed so far (up to 32 MB), so a CPU rank's resident memory grows by whatever its
largest transient set was. `BEITV2_MMAP_THRESHOLD=fixed` fixes the threshold at 1 MB from the process's start, before
the stage builds anything: big blocks are then mapped on their own and unmapped on free, and resident memory follows
the tensors (ViT-B at ZeRO-3 on 2 ranks: 0.84x of one unsharded rank, against 1.09x under glibc's rule, where each
rank's heap keeps the pages of the layers ZeRO-3 gathers and frees; docs/scale.md). `auto`, the default, fixes it
for ZeRO-3 runs, which chose memory over speed, and leaves glibc's rule to the others: faulting in every large
tensor's fresh mapping costs speed (ViT-B at ZeRO-3 on 2 CPU ranks: 0.36 against 0.52 images/s, for 2.44 against
3.90 GiB per rank). It must be fixed before ZeRO-3 partitions the model: fixed later, the
buffers ZeRO frees at its start leave heap space that every later step fills and keeps resident. (Fixing it at the
start and raising it to 32 MB once the engine is built, to keep steps fast, measured worse than either.)
"""
from __future__ import annotations

import ctypes
import os

import torch

_M_MMAP_THRESHOLD = -3   # mallopt's parameter; setting it also turns off the dynamic raise
MODES = ("auto", "dynamic", "fixed")


def _libc():
    """glibc, or None (another C library, or not Linux)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def mode(zero_stage: int | None = None) -> str:
    """`fixed` or `dynamic`: BEITV2_MMAP_THRESHOLD, where `auto` (the default) is `fixed` for a ZeRO-3 run."""
    value = os.environ.get("BEITV2_MMAP_THRESHOLD", "auto")
    if value not in MODES:
        raise ValueError(f"BEITV2_MMAP_THRESHOLD={value!r} must be one of {', '.join(MODES)}")
    if value == "auto":
        return "fixed" if zero_stage == 3 else "dynamic"
    return value


def at_process_start(zero_stage: int | None = None) -> bool:
    """Before a stage builds anything: with `fixed`, big blocks mapped on their own. Returns whether it set it.

    Args:
        zero_stage: the run's ZeRO stage, for `auto` (None: not known yet, glibc's rule).
    """
    if torch.cuda.is_available() or mode(zero_stage) != "fixed":
        return False
    libc = _libc()
    return libc is not None and libc.mallopt(_M_MMAP_THRESHOLD, 1 << 20) == 1


def after_engine_start() -> None:
    """Once ZeRO has copied the model into its partitions and freed the originals: give the freed pages back."""
    libc = None if torch.cuda.is_available() else _libc()
    if libc is not None:
        libc.malloc_trim(0)
