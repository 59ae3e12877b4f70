"""Timing helpers shared by the benchmarks: synchronised wall-clock timing and peak memory."""
from __future__ import annotations

import gc
import json
import os
import resource
import time

import torch

from engine.config.cli import check_counts
from engine.storage.files import write_text_atomically


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

    A benchmark's instrument (bench/engine_step.py) that tests also measure with (test_engine_fit.py,
    test_faults_nonfinite.py, test_mim_train.py): it stays here, so that bench/ never imports tests/.
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


# ------------------------------------------------------------------ transfer stages through their real train()
# Variants of a transfer stage's training loop (bench/finetune.py, bench/segment.py); the baseline is the official
# attention formulation, the others change one thing each against `fused` (SDPA).
STAGE_VARIANTS = {
    "baseline": {"model.attention": "explicit"},
    "fused": {},
    "ckpt": {"run.grad_checkpointing": True},
    "compile": {"run.compile": True},
    # The lean step: fp32 weights under bf16 autocast at ZeRO-0, no host sync between log points.
    "lean": {"run.precision": "bf16_autocast", "run.ds_config": "ds_configs/zero0.json"},
    "lean_compile": {"run.precision": "bf16_autocast", "run.ds_config": "ds_configs/zero0.json", "run.compile": True},
}
ZERO_STAGES = (0, 1, 2, 3)


def stage_variant_names(variants, zero: int, warmup: int, batch: int, arch: str, archs, what: str) -> list[str]:
    """The benchmark's flags checked (one-line ValueErrors); returns the variant names in order."""
    check_counts(warmup=warmup, **({"batch": batch} if batch else {}))   # batch 0: the default for the device
    if isinstance(zero, bool) or zero not in ZERO_STAGES:
        raise ValueError(f"--zero must be one of {', '.join(map(str, ZERO_STAGES))} (got {zero!r})")
    names = variants.split(",") if isinstance(variants, str) else list(variants)
    unknown = [n for n in names if n not in STAGE_VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant '{unknown[0]}'; choose from {', '.join(STAGE_VARIANTS)}")
    if arch and arch not in archs:
        raise ValueError(f"unknown {what} arch '{arch}'; choose from {', '.join(archs)}")
    return names


def stage_overrides(*, arch: str, batch: int, precision: str, zero: int, warmup: int, eval_images: int,
                    output_dir: str, variant: str) -> dict:
    """Flags of one variant's run: random init on synthetic data, 2 x warmup steps, no checkpoints."""
    return {"arch": arch, "init": "random", "data.source": "synthetic", "data.limit": batch * 4,
            "data.eval_images": eval_images, "run.output_dir": output_dir,
            "run.micro_batch_size": batch, "run.grad_accum_steps": 1, "run.precision": precision,
            "run.ds_config": f"ds_configs/zero{zero}.json", "run.log_interval": warmup,
            "run.save_interval": 10 ** 9, "run.save_final": False, "run.progress_bar": False,
            "run.profile_steps": 0, "schedule.total_steps": 2 * warmup, "schedule.warmup_steps": 1,
            **STAGE_VARIANTS[variant]}


def run_stage_variants(train, recipe: str, overrides: dict, configs: dict, warmup: int, device: torch.device,
                       out: str, is_main: bool) -> tuple[dict, str]:
    """Run `train(recipe, **overrides[name])` per variant and read its second log interval; a failing variant is
    recorded with its error and the others still run; the JSON is rewritten after every variant, so a run cut
    short (a lease ending) keeps what it measured. Returns (results, baseline name)."""
    results = {}
    for name, flags in overrides.items():
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            train(recipe, **flags)
            with open(os.path.join(flags["run.output_dir"], "metrics.jsonl")) as f:
                last = next(row for row in map(json.loads, f) if row["step"] == 2 * warmup)
        except Exception as e:  # noqa: BLE001 - one failing variant must not cost the others' numbers
            results[name] = {"error": f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"}
        else:
            results[name] = {k: last.get(k) for k in ("images_per_s", "mfu", "peak_mem_gib", "loss")}
            results[name].update(precision=flags["run.precision"], ds_config=flags["run.ds_config"],
                                 attention=configs[name].model.attention)
        write_json({"partial": True, "variants": results}, out if is_main else "")
        gc.collect()
    base_name, _ = add_speedups(results)
    return results, base_name
