"""The demo's training steps on the CPU: images/s of the real `train` command per process layout and precision.

Each variant runs the demo recipe (`vqkd_small_demo` or `beitv2_small_demo`, real Fashion-MNIST, the real teacher or
a tokenizer of the demo's shapes) as its own process tree for `steps` steps at the demo's global batch, and reports
the median images/s of the log rows after the first `skip` (start-up, first allocations). Layouts on a machine of C
cores: `ranks` (C ranks of one thread each through the `deepspeed` launcher, ZeRO-2: how `make demo` ran the
pretraining stages before), `threads` (one process with C threads, no launcher, ZeRO-0: the demo's training stages)
and `lanes` (two independent processes of C/2 threads side by side, as the demo runs its jobs after MIM; images/s is
the two processes' sum, each at the full global batch). Precisions: `fp32` and
`auto` (bf16 autocast where the CPU computes bf16 natively, fp32 elsewhere: engine/config/precision.py). With
`--compiles=off,on` each layout x precision also runs with `--run.compile=true` (torch.compile's inductor on the
CPU; its compile time is in `wall_s`, not in images/s). Speed-ups are against the first variant; with
`--baseline_tree=DIR` (another checkout, e.g. a `git worktree` of the commit before a change) each variant also runs
on that code first, and `speedup_vs_baseline` is the change's before/after on the same machine. Writes JSON.

    python -m bench.demo_step --stage=mim --steps=60
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from bench.common import write_json
from engine.config.cli import check_counts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = {"tokenizer": "vqkd_small_demo", "mim": "beitv2_small_demo"}
TOKENIZER_FOR = {"beitv2_small_demo": "vqkd_small_demo", "beitv2_tiny_test": "vqkd_tiny_test"}
LAYOUTS = ("ranks", "threads", "lanes")
COMPILES = ("off", "on")


def _command(stage: str, recipe: str, layout: str, cores: int, out: str, steps: int, global_batch: int,
             precision: str, tokenizer: str, compiled: bool = False, tree: str = ROOT) -> tuple[list[str], dict]:
    """The train command of one variant and its environment; `tree` is the checkout whose code it runs."""
    env = dict(os.environ, PYTHONPATH=tree, DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    ranks = cores if layout == "ranks" else 1
    flags = [f"--run.output_dir={out}", f"--schedule.total_steps={steps}", "--schedule.warmup_steps=1",
             f"--run.micro_batch_size={global_batch // ranks}", f"--run.precision={precision}",
             "--run.progress_bar=false", "--run.log_interval=5", f"--run.save_interval={steps + 1}",
             "--run.ds_config=ds_configs/" + ("zero2.json" if layout == "ranks" else "zero0.json"),
             "--data.eval_images=64"]   # the evaluation after training is not timed: keep it short
    if stage == "mim":
        flags.append(f"--tokenizer={tokenizer}")
    if compiled:
        flags.append("--run.compile=true")
    command = [f"pretrain.{stage}", "train", recipe, *flags]
    if layout == "ranks":
        env.update(OMP_NUM_THREADS="1", LOCAL_SIZE=str(ranks))
        launcher = os.path.join(os.path.dirname(sys.executable), "deepspeed")
        return [launcher, "--num_gpus", str(ranks), "--master_port", str(29700 + os.getpid() % 200), "--module",
                *command], env
    env["OMP_NUM_THREADS"] = str(cores)
    return [sys.executable, "-m", *command], env


def _tokenizer_for(recipe: str, folder: str) -> str:
    """A tokenizer of the MIM recipe's shapes (random weights: the codes it gives do not change the step's cost)."""
    from pretrain.mim.config import RECIPES as MIM_RECIPES
    from pretrain.tokenizer import build_tokenizer, save_tokenizer
    path = os.path.join(folder, "tokenizer.pt")
    save_tokenizer(build_tokenizer(TOKENIZER_FOR[MIM_RECIPES[recipe]["arch"]]), path)
    return path


def measure(stage: str, recipe: str, layout: str, precision: str, *, cores: int, steps: int, skip: int,
            global_batch: int, tokenizer: str, work: str, compiled: bool = False, tree: str = ROOT) -> dict:
    lanes = 2 if layout == "lanes" and cores >= 2 else 1
    outs = [tempfile.mkdtemp(dir=work) for _ in range(lanes)]
    start, procs = time.time(), []
    for i, out in enumerate(outs):   # lanes: cores // 2 threads for the first process, the rest for the second
        threads = cores // lanes if i == 0 else cores - cores // lanes
        cmd, env = _command(stage, recipe, "threads" if layout == "lanes" else layout, threads, out, steps,
                            global_batch, precision, tokenizer, compiled, tree)
        with open(os.path.join(out, "output.log"), "w") as log:
            procs.append(subprocess.Popen(cmd, cwd=tree, env=env, stdout=log, stderr=subprocess.STDOUT))
    codes = [p.wait() for p in procs]
    medians = []
    for out, code in zip(outs, codes):
        if code:   # recorded, the other variants still run
            with open(os.path.join(out, "output.log")) as f:
                lines = f.read().strip().splitlines() or [f"exit status {code}"]
            return {"error": lines[-1][:300]}
        with open(os.path.join(out, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        rates = [r["images_per_s"] for r in rows[skip:] if "images_per_s" in r]
        medians.append(statistics.median(rates))
        with open(os.path.join(out, "config.json")) as f:
            resolved = json.load(f)["run"]["precision"]
    row = {"images_per_s": sum(medians), "log_rows": len(rates), "precision_resolved": resolved,
           "wall_s": round(time.time() - start, 1)}
    if lanes > 1:
        row["per_process"] = medians
    return row


def main(stage: str = "mim", recipe: str = "", steps: int = 60, skip: int = 2, layouts: str = "ranks,threads",
         precisions: str = "auto,fp32", compiles: str = "off", cores: int = 0, global_batch: int = 64,
         baseline_tree: str = "", out: str = "") -> dict:
    """Images/s of the demo's `stage` step per layout x precision, and each as a ratio to the first variant.

    Args:
        stage: `tokenizer` or `mim`; recipe: its recipe (default the demo's).
        steps: training steps per variant (log every 5); skip: log rows dropped at the start.
        layouts: comma-separated `ranks` / `threads` / `lanes`;
        precisions: comma-separated `auto` / `fp32` / `bf16_autocast`;
        compiles: comma-separated `off` / `on` (torch.compile the model).
        cores: cores to use (0: all of this machine's); global_batch: the demo's (64).
        baseline_tree: another checkout of this project (e.g. `git worktree add /tmp/before <commit>`): each variant
            runs there first as `<variant>@baseline`, and the variant gains `speedup_vs_baseline`, the before/after
            of a change in one run on one machine.
    """
    check_counts(steps=steps, global_batch=global_batch)
    if stage not in RECIPES:
        raise ValueError(f"stage must be one of {sorted(RECIPES)}, got {stage!r}")
    recipe = recipe or RECIPES[stage]
    unknown = [x for x in layouts.split(",") if x and x not in LAYOUTS]
    if unknown:
        raise ValueError(f"layouts must be among {LAYOUTS}, got {unknown}")
    unknown = [x for x in compiles.split(",") if x and x not in COMPILES]
    if unknown:
        raise ValueError(f"compiles must be among {COMPILES}, got {unknown}")
    if baseline_tree and not os.path.isfile(os.path.join(baseline_tree, "pretrain", stage, "__main__.py")):
        raise ValueError(f"baseline_tree {baseline_tree!r} is not a checkout of this project (no "
                         f"pretrain/{stage}/__main__.py there)")
    cores = cores or os.cpu_count()
    work = tempfile.mkdtemp(prefix="bench_demo_step_")
    tokenizer = _tokenizer_for(recipe, work) if stage == "mim" else ""
    result = {"bench": "demo_step", "stage": stage, "recipe": recipe, "cores": cores, "steps": steps,
              "global_batch": global_batch, "baseline_tree": baseline_tree or None, "variants": {}}
    baseline = None
    for layout in [x for x in layouts.split(",") if x]:
        for precision, compiled in [(p, c) for p in precisions.split(",") if p for c in compiles.split(",") if c]:
            name = f"{layout}_{precision}" + ("_compile" if compiled == "on" else "")
            before = None
            for tree, label in ([(baseline_tree, name + "@baseline")] if baseline_tree else []) + [(ROOT, name)]:
                row = measure(stage, recipe, layout, precision, cores=cores, steps=steps, skip=skip,
                              global_batch=global_batch, tokenizer=tokenizer, work=work, compiled=compiled == "on",
                              tree=tree)
                if "images_per_s" in row:
                    baseline = baseline or row["images_per_s"]
                    row["speedup_vs_first"] = round(row["images_per_s"] / baseline, 3)
                    if tree != ROOT:
                        before = row["images_per_s"]
                    elif before:
                        row["speedup_vs_baseline"] = round(row["images_per_s"] / before, 3)
                result["variants"][label] = row
                print(label, row, flush=True)
                write_json(result, out)
    return result


if __name__ == "__main__":
    from engine.config.cli import run_cli
    sys.exit(run_cli(main))
