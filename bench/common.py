"""Timing helpers shared by the benchmarks: synchronised wall-clock timing and peak memory."""
from __future__ import annotations

import json
import resource
import time

import torch

from engine.files import write_text_atomically


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_it(fn, device: torch.device, warmup: int = 2, iters: int = 5) -> float:
    """Median seconds per call of `fn` after `warmup` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def device_info(device: torch.device) -> dict:
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "threads": torch.get_num_threads(), "torch": torch.__version__}


def write_json(result: dict, out: str) -> dict:
    if out:   # atomically: a benchmark cut short by a timeout leaves the last whole JSON, not half of one
        write_text_atomically(out, json.dumps(result, indent=2))
    return result


class DispatchCounter:
    """Counts the aten ops a block of code dispatches, and the host syncs among them.

    Seen from Python's dispatch mode, which sits below autograd: each op counted is at least one kernel launch
    on a GPU (a foreach op counts once), and each `_local_scalar_dense` (what `.item()`, `bool(t)` and
    `if t:` run) makes the host wait for the device. Counting needs no GPU.
    """

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode
        counter = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                counter.ops += 1
                counter.by_name[func.__name__] = counter.by_name.get(func.__name__, 0) + 1
                if func is torch.ops.aten._local_scalar_dense.default:
                    counter.syncs += 1
                return func(*args, **(kwargs or {}))

        self.ops = self.syncs = 0
        self.by_name: dict[str, int] = {}
        self._mode = _Mode()

    def __enter__(self):
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)


def add_speedups(results: dict) -> tuple[str, dict]:
    """Give each variant that ran `speedup_vs_baseline`: its images/s over `baseline`'s, or over the first variant
    that ran when the baseline did not. Returns (the reference's name, the variants that ran)."""
    measured = {k: r for k, r in results.items() if "error" not in r}
    if not measured:
        raise ValueError(f"every variant failed: {json.dumps(results)[:1000]}")
    base = "baseline" if "baseline" in measured else next(iter(measured))
    for r in measured.values():
        r["speedup_vs_baseline"] = r["images_per_s"] / measured[base]["images_per_s"]
    return base, measured
