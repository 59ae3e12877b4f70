"""`make bench`: the loader, tokenizer and pretraining benchmarks in one go, one JSON and one Markdown table.

Each benchmark runs as its own subprocess (`python -m bench.<name>`): they set process-wide state (DeepSpeed's
process group, autocast), so two of them never share a process. Each picks its own default sizes for the device
(CPU sizes here, GPU sizes on a CUDA host); `--quick` passes tiny sizes instead, for a smoke run. A benchmark that
fails is recorded with its one-line error and the others still run. Then the suite writes
`<out_dir>/suite_<device>.json` (the device, each benchmark's full result, the rows) and `<out_dir>/suite_<device>.md`
(one row per comparison: ours against the baseline, both in images/s, and their ratio). `--from_json` rebuilds both
files from JSON already written (a GPU run's results copied back) without running anything.

    python -m bench.suite                                   # loader, tokenizer, pretrain at the device's sizes
    python -m bench.suite --quick=true --benches=tokenizer,pretrain --out_dir=/tmp/bench
    python -m bench.suite --from_json=bench/results         # tables from existing results, one per device type

The row builders (`rows_for`, `markdown_table`) are pure functions of the benchmarks' JSON dicts.
"""
from __future__ import annotations

import glob
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

from engine.config.cli import run_cli
from engine.storage.files import write_text_atomically

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_BENCHES = "loader,tokenizer,pretrain"
# Tiny sizes for a smoke run: each finishes in seconds on a CPU (the numbers mean nothing at these sizes).
QUICK_FLAGS = {
    "loader": ["--images=64", "--epochs=1", "--repeats=1"],
    "tokenizer": ["--arch=vqkd_tiny_test", "--batch=4", "--iters=1"],
    "pretrain": ["--variants=baseline,fused", "--warmup=2", "--batch=8"],
    "finetune": ["--variants=baseline,fused", "--batch=4", "--warmup=2"],
    "segment": ["--variants=baseline,fused", "--batch=4", "--warmup=1"],
}
BENCHES = tuple(QUICK_FLAGS)

OFFICIAL_LOADER = "official PIL DataLoader"   # per-sample PIL decode, jitter, two crops, Python block masks
# The variants of bench/pretrain.py and bench/common.STAGE_VARIANTS in words; an unknown name stands for itself.
VARIANT_WORDS = {
    "baseline": "official formulation (explicit-softmax attention, eager)",
    "fused": "fused SDPA attention",
    "fused_ckpt": "fused attention + activation checkpointing",
    "ckpt": "fused attention + activation checkpointing",
    "fused_compile": "fused attention + torch.compile",
    "compile": "fused attention + torch.compile",
    "explicit_compile": "explicit attention + torch.compile",
    "flex_compile": "FlexAttention + torch.compile",
    "lean": "lean step (bf16 autocast, ZeRO-0, no host syncs)",
    "lean_compile": "lean step + torch.compile",
    "lean_flex_compile": "lean step + FlexAttention + torch.compile",
    "lean_flex_cudagraphs": "lean step + FlexAttention + CUDA graphs",
}
COLUMNS = (("benchmark", "benchmark"), ("comparison", "ours vs baseline"), ("setup", "setup"),
           ("metric", "metric"), ("ours", "ours"), ("baseline", "baseline"), ("ratio", "ratio"),
           ("peak_mem_gib", "peak memory GiB (ours / baseline)"), ("hardware", "hardware"))


# ---------------------------------------------------------------------------------------------- rows (pure)
def hardware(result: dict) -> str:
    """The hardware line of one benchmark's result (its `device_info` keys, plus what else it records)."""
    if "device" not in result:   # a partial result (variants only)
        return ""
    parts = [str(result["device"])]
    if result.get("cores"):
        parts.append(f"{result['cores']} cores")
    if result.get("threads"):
        parts.append(f"{result['threads']} torch thread{'s' if result['threads'] != 1 else ''}")
    if (result.get("world_size") or 1) > 1:
        parts.append(f"{result['world_size']} ranks")
    if result.get("torch"):
        parts.append(f"torch {result['torch']}")
    return ", ".join(parts)


def _row(bench: str, result: dict, comparison: str, setup: str, metric: str, ours: float, baseline: float,
         peaks: tuple = (None, None)) -> dict:
    return {"benchmark": bench, "comparison": comparison, "setup": setup, "metric": metric,
            "ours_images_per_s": ours, "baseline_images_per_s": baseline, "ratio": ours / baseline,
            "ours_peak_mem_gib": peaks[0], "baseline_peak_mem_gib": peaks[1], "hardware": hardware(result),
            "error": None}


def error_row(bench: str, error: str, result: dict | None = None) -> dict:
    return {"benchmark": bench, "comparison": "", "setup": "", "metric": "", "ours_images_per_s": None,
            "baseline_images_per_s": None, "ratio": None, "ours_peak_mem_gib": None, "baseline_peak_mem_gib": None,
            "hardware": hardware(result or {}) if result else "", "error": error}


def loader_rows(result: dict) -> list[dict]:
    """FFCV (host part, and host + device augmentation) against the official DataLoader, per CPU-second and wall."""
    base = result["official_dataloader"]
    setup = f"{result['jpegs']} JPEGs, batch {result['batch']}, {result['workers']} workers"
    ours = {"ours_host": "FFCV decode + batching (host part)",
            "ours_host_plus_device": "FFCV + device augmentation on the GPU",
            "ours_host_plus_device_on_cpu": "FFCV + device augmentation run on the CPU"}
    rows = []
    for key, words in ours.items():
        if key not in result:
            continue
        for metric, field in (("images per CPU-second", "images_per_cpu_s"), ("images/s (wall)", "images_per_s")):
            rows.append(_row("loader", result, f"{words} vs {OFFICIAL_LOADER}", setup, metric,
                             result[key][field], base[field]))
    if "plain_ffcv" in result:   # results written before the no-check baseline lack it
        rows.append(_row("loader", result, "FFCV decode + batching with our checks and plan (host part) vs FFCV's "
                         "own Loader on the same file, no checks", setup, "images/s (wall)",
                         result["ours_host"]["images_per_s"], result["plain_ffcv"]["images_per_s"]))
    return rows


def tokenizer_rows(result: dict) -> list[dict]:
    """The VQ-KD training step against the official formulation, and the quantizer against the one-hot one."""
    setup = f"{result['arch']}, batch {result['batch']}, {result['precision']}"
    rows = []
    if "official_train_images_per_s" in result:   # results written before the baseline was measured lack it
        rows.append(_row("tokenizer", result, "training step: fused attention + no one-hot vs official formulation "
                         "(explicit softmax, one-hot codebook update)", setup, "images/s",
                         result["train_images_per_s"], result["official_train_images_per_s"],
                         (result.get("train_peak_mem_gib"), result.get("official_train_peak_mem_gib"))))
    # The quantizer is timed per batch: as images/s it is batch / time, so the ratio is the inverse time ratio.
    rows.append(_row("tokenizer", result, "quantizer: nearest code + index counts vs one-hot [N, K] baseline",
                     setup, "images/s", result["batch"] * 1e3 / result["quantizer_ms"],
                     result["batch"] * 1e3 / result["one_hot_baseline_quantizer_ms"]))
    return rows


def variant_rows(bench: str, result: dict) -> list[dict]:
    """Each measured variant against the reference variant (the baseline; the first measured one when the run left
    the baseline out), the fastest marked; a failed variant is an error row."""
    variants = result["variants"]
    measured = {k: v for k, v in variants.items() if "error" not in v}
    setup = ", ".join(x for x in (result.get("arch"),
                                  result.get("batch_per_rank") and f"batch {result['batch_per_rank']}/rank",
                                  result.get("precision"),
                                  result.get("zero") is not None and f"ZeRO-{result['zero']}") if x)
    ref = result.get("baseline_variant") or ("baseline" if "baseline" in measured else next(iter(measured), None))
    rows = []
    if ref not in measured:
        return [error_row(bench, f"{name}: {v['error']}", result) for name, v in variants.items()]
    best = max(measured, key=lambda k: measured[k]["images_per_s"])
    for name, v in variants.items():
        if name == ref:
            continue
        if "error" in v:
            rows.append(error_row(bench, f"{name}: {v['error']}", result))
            continue
        words = f"{VARIANT_WORDS.get(name, name)}{' (best)' if name == best else ''}"
        rows.append(_row(bench, result, f"{words} vs {VARIANT_WORDS.get(ref, ref)}", setup, "images/s",
                         v["images_per_s"], measured[ref]["images_per_s"],
                         (v.get("peak_mem_gib"), measured[ref].get("peak_mem_gib"))))
    return rows


ROW_BUILDERS = {"loader": loader_rows, "tokenizer": tokenizer_rows, "pretrain": lambda r: variant_rows("pretrain", r),
                "finetune": lambda r: variant_rows("finetune", r), "segment": lambda r: variant_rows("segment", r)}


def kind_of(result: dict) -> str | None:
    """Which benchmark wrote `result`, told by the keys only it writes (file names vary: h200_pretrain_...)."""
    if "official_dataloader" in result:
        return "loader"
    if "quantizer_ms" in result:
        return "tokenizer"
    if "variants" in result and "tokenizer_ms_per_batch" in result:
        return "pretrain"
    if "variants" in result and "crop" in result:
        return "segment"
    if "variants" in result and "recipe" in result:
        return "finetune"
    return None


def rows_for(bench: str, entry: dict) -> list[dict]:
    """The rows of one suite entry: `{"result": ...}` when the benchmark ran, `{"error": ...}` when it failed (with
    the `result` it wrote before failing, if any)."""
    rows, result = [], entry.get("result")
    if result:   # with an error too: a partial result still shows what was measured (or why each variant failed)
        try:
            rows = ROW_BUILDERS[bench](result)
        except (KeyError, TypeError, ZeroDivisionError) as e:   # a result of another shape: say so, keep the rest
            rows = [error_row(bench, f"unreadable result: {type(e).__name__}: {e}", result)]
    if entry.get("error") and not (rows and all(r["error"] for r in rows)):
        # ...unless each of the result's rows already says why it failed (every variant did: that is the error)
        rows.insert(0, error_row(bench, entry["error"], result))
    return rows


def _num(x: float | None) -> str:
    if x is None:
        return "–"
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def _cell(row: dict, key: str) -> str:
    if key == "comparison" and row["error"]:
        return f"**failed**: {row['error']}"
    if key in ("ours", "baseline"):
        return _num(row[f"{key}_images_per_s"])
    if key == "ratio":
        return "–" if row["ratio"] is None else f"**{row['ratio']:.2f}x**"
    if key == "peak_mem_gib":
        ours, base = row["ours_peak_mem_gib"], row["baseline_peak_mem_gib"]
        if ours is None and base is None:
            return "–"
        return " / ".join("–" if x is None else f"{x:.2f}" for x in (ours, base))
    return str(row[key] or "")


def markdown_table(rows: list[dict]) -> str:
    """A header line, a separator line and one line per row (pipes in error text escaped)."""
    lines = ["| " + " | ".join(title for _, title in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row, key).replace("|", "\\|").replace("\n", " ")
                                       for key, _ in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- running
def device_type() -> str:
    """'cuda' where the benchmarks will pick GPU sizes, else 'cpu' (the same test they make)."""
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def machine_info(device: str) -> dict:
    import torch

    from bench.common import device_info
    return {"device_type": device, **device_info(torch.device(device)), "cores": os.cpu_count(),
            "python": platform.python_version(), "platform": platform.platform()}


def one_line_error(stderr: str, returncode: int) -> str:
    """A failed benchmark's message: run_cli's `error: ...` line, else a traceback's last line, else the status."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    if errors:
        return errors[-1].removeprefix("error: ")[:300]
    return lines[-1][:300] if lines else f"exit status {returncode}"


def run_bench(name: str, quick: bool, timeout_s: int) -> dict:
    """Run `python -m bench.<name>` in its own process; its result, or its one-line error (and any partial result)."""
    with tempfile.TemporaryDirectory(prefix=f"bench_{name}_") as tmp:
        out = os.path.join(tmp, f"{name}.json")
        cmd = [sys.executable, "-m", f"bench.{name}", f"--out={out}", *(QUICK_FLAGS[name] if quick else [])]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
        entry: dict = {"command": " ".join(cmd[1:]).replace(out, f"{name}.json")}
        t = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                                  timeout=timeout_s or None)
        except subprocess.TimeoutExpired:
            entry["error"] = f"timed out after {timeout_s} s"
        else:
            if proc.returncode != 0:
                entry["error"] = one_line_error(proc.stderr, proc.returncode)
                entry["stderr_tail"] = proc.stderr.splitlines()[-20:]
        entry["seconds"] = round(time.perf_counter() - t, 1)
        if os.path.exists(out):   # a failed run may still have written what it measured (a partial result)
            with open(out) as f:
                entry["result"] = json.load(f)
        elif "error" not in entry:
            entry["error"] = "wrote no result"
    return entry


def build_suite(benches: dict, machine: dict) -> dict:
    rows = [row for name, entry in benches.items() for row in rows_for(entry.get("bench", name), entry)]
    return {"machine": machine, "benches": benches, "rows": rows}


def write_suite(suite: dict, out_dir: str, device: str) -> tuple[str, str]:
    """Write suite_<device>.json and suite_<device>.md into `out_dir`; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"suite_{device}")
    write_text_atomically(path + ".json", json.dumps(suite, indent=2))
    machine = suite["machine"]
    title = f"# Benchmarks on {machine.get('device', device)}"
    note = ("Ratio = ours / baseline, both measured in the same run on the same machine. Peak memory: per model on "
            "CUDA, the process's peak RSS so far on a CPU.")
    write_text_atomically(path + ".md", f"{title}\n\n{note}\n\n{markdown_table(suite['rows'])}")
    return path + ".json", path + ".md"


# ---------------------------------------------------------------------------------------------- from JSON
def load_results(source: str) -> dict[str, dict[str, dict]]:
    """Benchmark results found in a JSON file or a folder of them, grouped by device type ('cpu' / 'cuda'):
    {device: {entry name: entry}}. A suite file contributes its entries; a file one benchmark wrote is an entry of
    its own; the same result found twice (a folder holding both) counts once; other JSON files are skipped."""
    paths = sorted(glob.glob(os.path.join(source, "*.json"))) if os.path.isdir(source) else [source]
    if not paths or not all(os.path.exists(p) for p in paths):
        raise FileNotFoundError(f"no JSON results in {source}")
    grouped: dict[str, dict[str, dict]] = {}
    seen = set()
    for path in paths:
        with open(path) as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} is not JSON: {e}") from None
        stem = os.path.splitext(os.path.basename(path))[0]
        if isinstance(data, dict) and "benches" in data:
            device = data.get("machine", {}).get("device_type", "cpu")
            entries = {f"{stem}/{name}": {**entry, "bench": entry.get("bench", name)}
                       for name, entry in data["benches"].items()}
        elif isinstance(data, dict) and kind_of(data):
            device = "cpu" if str(data.get("device", "cpu")).startswith("cpu") else "cuda"
            entries = {stem: {"bench": kind_of(data), "result": data, "file": path}}
        else:
            continue
        for name, entry in entries.items():
            key = json.dumps(entry.get("result", entry), sort_keys=True)
            if key not in seen:
                seen.add(key)
                grouped.setdefault(device, {})[name] = entry
    if not grouped:
        raise ValueError(f"no benchmark results in {source} (looked for loader, tokenizer, pretrain, finetune, "
                         "segment JSON and suite files)")
    return grouped


# ---------------------------------------------------------------------------------------------- command
def main(benches: str = DEFAULT_BENCHES, quick: bool = False, out_dir: str = "bench/results",
         from_json: str = "", timeout_s: int = 0) -> None:
    """Run `benches` (comma-separated: loader, tokenizer, pretrain, finetune, segment) one process each, then write
    suite_<device>.json and .md into `out_dir`; `--quick` uses tiny sizes; `--from_json=DIR` only rebuilds the
    tables from results already written; `--timeout_s` bounds each benchmark (0: no limit)."""
    if from_json:
        for device, entries in load_results(from_json).items():
            names = {e["result"]["device"] for e in entries.values() if e.get("result", {}).get("device")}
            machine = {"device_type": device, "device": ", ".join(sorted(names)) or device, "from_json": from_json}
            suite = build_suite(entries, machine)
            print(markdown_table(suite["rows"]))
            print("wrote " + " and ".join(write_suite(suite, out_dir, device)))
        return
    names = [n.strip() for n in benches.split(",") if n.strip()]
    unknown = [n for n in names if n not in BENCHES]
    if unknown or not names:
        raise ValueError(f"unknown benchmark '{unknown[0] if unknown else benches}'; choose from {', '.join(BENCHES)}")
    if isinstance(timeout_s, bool) or timeout_s < 0:
        raise ValueError(f"--timeout_s must be a whole number >= 0 (got {timeout_s!r})")
    device = device_type()
    entries = {}
    for name in names:
        print(f"bench {name}: running{' (quick sizes)' if quick else ''} ...", file=sys.stderr, flush=True)
        entries[name] = run_bench(name, quick, timeout_s)
        status = f"failed: {entries[name]['error']}" if entries[name].get("error") else "done"
        print(f"bench {name}: {status} ({entries[name]['seconds']} s)", file=sys.stderr, flush=True)
    suite = build_suite(entries, {**machine_info(device), "quick": quick})
    paths = write_suite(suite, out_dir, device)
    print(markdown_table(suite["rows"]))
    print("wrote " + " and ".join(paths))
    failed = [n for n, e in entries.items() if e.get("error")]
    if failed:   # the files are written; the status still tells a script (or make) that something broke
        print(f"error: {len(failed)} of {len(names)} benchmarks failed: {', '.join(failed)}", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    sys.exit(run_cli(main))
