"""Integrity checks of a .beton: its sha256 against the one `data_tools.convert` recorded, and decoded batches that
come out all black.

- `verify_sha256(path)` hashes the file and compares the digest with `sha256` in `<path>.json`, which convert writes
  beside every .beton. It reads the whole file (minutes for a 150 GB ImageNet-21k .beton at disk speed), so it runs
  only when asked (`FFCVSource(verify=True)`, the `data.verify` config flag), once per file per process.
- `BlackImages` counts the decoded images that came out entirely black (every pixel 0 inside the image's own size).
  A damaged JPEG payload does not raise anywhere: FFCV's decoder reports the failure only in a return code that its
  callers drop, and the image slot keeps whatever the buffer held. Our decoder (data_tools.ffcv_ops) zeroes the slot
  on a failed decode, so that it is always black, and flags every black image in its canvas's status row while the
  pixels are still in the CPU cache (it stops at the first non-zero byte). What reaches this class is one flag byte
  per image: a batch costs one b-element sum on the device, whatever its pixels. The counter is read without
  stalling the device (copied to the host every `CHECK_EVERY` batches and looked at the next time) and read directly
  at the end of every pass over the data. More than `MAX_BLACK_FRACTION` black images after at least `MIN_IMAGES` is
  a one-line error.
  Real photos that are entirely black (every channel exactly 0, e.g. a lens cap shot) are rare, far below 1%; dark
  or black-background images (MNIST-style digits, night scenes) are not entirely 0 and do not count. Fashion-MNIST
  has none (tests/test_beton_integrity.py). A data set that does hold more than 1% of all-black images would need
  the threshold raised.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys

import torch
from torch import Tensor

MAX_BLACK_FRACTION = 0.01   # of the images seen so far
MIN_IMAGES = 500            # before judging: a few black images early on are not yet a fraction
CHECK_EVERY = 64            # batches between two looks at the counter
_VERIFIED: set[tuple] = set()   # (path, size, mtime) of files this process has verified


class BetonIntegrityError(ValueError):
    """A .beton whose content is not what data_tools.convert wrote; the message is one line saying what to do."""


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def recorded_sha256(path: str) -> str:
    """The sha256 data_tools.convert recorded for `path` in `<path>.json`.

    Raises:
        BetonIntegrityError: there is no record, or it holds no digest.
    """
    record = path + ".json"
    try:
        with open(record) as f:
            digest = json.load(f).get("sha256")
    except FileNotFoundError:
        digest, why = None, f"{record} is missing"
    except (OSError, ValueError, AttributeError) as e:
        digest, why = None, f"{record} is unreadable ({type(e).__name__})"
    else:
        why = f"{record} records no sha256"
    if not isinstance(digest, str) or not digest:
        raise BetonIntegrityError(f"{path} cannot be verified: {why}; re-convert it with python -m "
                                  f"data_tools.convert, or pass --data.verify=false to train on it unverified")
    return digest


def verify_sha256(path: str) -> None:
    """Hash `path` and compare with convert's record (once per file and process; a changed file is hashed again).

    Raises:
        BetonIntegrityError: no record, or the digests differ (one line naming the file and what to do).
    """
    stat = os.stat(path)
    key = (os.path.abspath(path), stat.st_size, stat.st_mtime_ns)
    if key in _VERIFIED:
        return
    expected = recorded_sha256(path)
    print(f"verifying the sha256 of {path} ({stat.st_size / 2 ** 30:.1f} GiB)", file=sys.stderr, flush=True)
    digest = file_sha256(path)
    if digest != expected:
        raise BetonIntegrityError(f"{path} is damaged or was changed: its sha256 is {digest[:16]}..., "
                                  f"data_tools.convert recorded {expected[:16]}... in {path}.json; re-convert it "
                                  f"with python -m data_tools.convert, or pass --data.verify=false to train on it "
                                  f"as it is")
    _VERIFIED.add(key)


class BlackImages:
    """Counts decoded images that are entirely black (see the module docstring); `add` per batch, `check` at a
    cheap moment (the end of a pass). Raises BetonIntegrityError from either when there are too many."""

    def __init__(self, path: str, device: torch.device):
        self.path = path
        self.device = device
        self.black: Tensor | None = None   # on the device
        self.seen = 0                      # images added (known on the host without reading the device)
        self._batches = 0
        self._snapshot: tuple[Tensor, torch.cuda.Event | None, int] | None = None

    def add(self, black: Tensor) -> None:
        """`black`: one uint8 flag per decoded image, 1 where it is entirely black (the canvases' status row)."""
        count = black.sum(dtype=torch.int64)
        self.black = count if self.black is None else self.black.add_(count)
        self.seen += len(black)
        self._batches += 1
        if self._batches % CHECK_EVERY == 0:
            self._poll()

    def _poll(self) -> None:
        """Judge the copy taken at the previous poll (long arrived by now), then start a new non-blocking copy."""
        if self._snapshot is not None:
            host, event, seen = self._snapshot
            if event is not None:
                event.synchronize()
            self._judge(int(host), seen)
        cuda = self.black.device.type == "cuda"
        host = torch.empty((), dtype=self.black.dtype, pin_memory=cuda)
        host.copy_(self.black, non_blocking=cuda)
        event = None
        if cuda:
            event = torch.cuda.Event()
            event.record()
        self._snapshot = (host, event, self.seen)

    def check(self) -> None:
        """Read the counter now (a host sync: at the end of a pass over the data) and judge it."""
        if self.black is not None:
            self._judge(int(self.black), self.seen)

    def _judge(self, black: int, seen: int) -> None:
        if seen >= MIN_IMAGES and black > MAX_BLACK_FRACTION * seen:
            raise BetonIntegrityError(
                f"{self.path}: {black} of the {seen} images decoded so far ({black / seen:.1%}) are entirely "
                f"black, more than {MAX_BLACK_FRACTION:.0%}: its stored images look damaged; re-convert it with "
                f"python -m data_tools.convert (--data.verify=true checks a .beton against the sha256 convert "
                f"recorded)")


__all__ = ["BetonIntegrityError", "BlackImages", "file_sha256", "recorded_sha256", "verify_sha256"]
