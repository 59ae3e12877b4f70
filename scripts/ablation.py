"""The paper's ablations as one command (`make ablation`): each row changes one thing of the BEiT v2 baseline (VQ-KD
codes as targets, patch-aggregation head, tokenizer distilled from the ImageNet-trained teacher) and is judged by a
linear probe of the pretrained backbone on the held-out Fashion-MNIST test split, over several MIM seeds.

  baseline          VQ-KD codes, aggregation head, ImageNet teacher
  pixel_targets     normalised pixels as targets (`--model.target=pixels`, no tokenizer)
  no_aggregation    no patch-aggregation head (`--model.aggregation=false`)
  random_teacher    the tokenizer distilled from a randomly initialised teacher (`--teacher.random_init=true`)

Stages run as subprocesses of one rank (no launcher): a tokenizer per teacher kind (trained once with seed 0 and
shared by every MIM seed), then per row and seed a MIM run (`--run.seed`) of the same budget, then linear probes of
its final [CLS] token and of its mean patch token. A rerun skips every piece whose output exists (and a stage killed
midway resumes from its checkpoint). Writes OUT/results.json (per row: the per-seed top-1, mean and std) and
OUT/report.md with a bar plot (OUT/ablation.png).

    python scripts/ablation.py --out=runs/ablation --seeds=3
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from engine.storage.files import write_text_atomically  # noqa: E402 - after the repo root is importable
# name -> (what it changes, MIM flags, teacher kind of its tokenizer or None for no tokenizer)
ROWS = {
    "baseline": ("VQ-KD codes, aggregation head, ImageNet teacher", [], "imagenet"),
    "pixel_targets": ("normalised pixels as targets (no tokenizer)", ["--model.target=pixels"], None),
    "no_aggregation": ("no patch-aggregation head", ["--model.aggregation=false"], "imagenet"),
    "random_teacher": ("tokenizer from a randomly initialised teacher", [], "random"),
}
POOLINGS = {"cls": "final [CLS]", "mean": "mean patch token"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default="runs/ablation", help="output folder")
    p.add_argument("--seeds", type=int, default=3, help="MIM seeds per row (0, 1, ...)")
    p.add_argument("--rows", default=",".join(ROWS), help="comma-separated rows to run")
    p.add_argument("--tokenizer_recipe", default="vqkd_small_demo")
    p.add_argument("--mim_recipe", default="beitv2_small_demo")
    p.add_argument("--tokenizer_steps", type=int, default=150, help="tokenizer training steps (each teacher kind)")
    p.add_argument("--mim_steps", type=int, default=300, help="MIM steps, the same for every row and seed")
    p.add_argument("--limit", type=int, default=12000, help="training images of every stage and of the probe")
    p.add_argument("--eval_images", type=int, default=10000, help="held-out test images of the probe")
    p.add_argument("--probe_epochs", type=int, default=30, help="linear-probe epochs")
    p.add_argument("--probe_batch", type=int, default=256, help="linear-probe global batch")
    p.add_argument("--poolings", default="cls,mean", help="probe poolings: cls (final [CLS]) and/or mean")
    p.add_argument("--extra", action="append", default=[], help="flag added to every training stage, repeatable")
    args = p.parse_args(argv)
    args.rows = [r for r in args.rows.split(",") if r]
    args.poolings = [x for x in args.poolings.split(",") if x]
    unknown = [r for r in args.rows if r not in ROWS] + [x for x in args.poolings if x not in POOLINGS]
    if unknown or args.seeds < 1:
        p.error(f"unknown rows/poolings {unknown} (rows: {', '.join(ROWS)}; poolings: {', '.join(POOLINGS)}), "
                f"or --seeds < 1")
    return args


def run(cmd: list[str], log: str) -> None:
    """One stage in one process on both cores; its output goes to `log`; a failure stops the driver."""
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"), PYTHONPATH=ROOT,
               DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)   # one rank, no launcher
    print("$", " ".join(cmd), flush=True)
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        with open(log) as f:
            tail = f.read()[-3000:]
        sys.exit(f"{tail}\nablation: stage failed (exit {proc.returncode}); its log: {log}")


def stage_flags(args, out_dir: str, steps: int, seed: int) -> list[str]:
    """The budget every training stage shares: steps, images, one rank without ZeRO."""
    return [f"--run.output_dir={out_dir}", f"--run.seed={seed}", f"--schedule.total_steps={steps}",
            f"--schedule.warmup_steps={max(1, steps // 10)}", "--run.ds_config=ds_configs/zero0.json",
            "--run.progress_bar=false", f"--data.limit={args.limit}", *args.extra]


def tokenizer(args, kind: str, seconds: dict) -> str:
    out = os.path.join(args.out, f"tokenizer_{kind}")
    path = os.path.join(out, "tokenizer.pt")
    if not os.path.exists(path):
        start = time.time()
        os.makedirs(out, exist_ok=True)
        random_init = "true" if kind == "random" else "false"
        run([sys.executable, "-m", "pretrain.tokenizer", "train", args.tokenizer_recipe,
             *stage_flags(args, out, args.tokenizer_steps, 0), f"--teacher.random_init={random_init}"],
            os.path.join(args.out, f"tokenizer_{kind}.log"))
        seconds[f"tokenizer_{kind}"] = time.time() - start
    return path


def mim(args, row: str, seed: int, tokenizers: dict, seconds: dict) -> str:
    _, flags, kind = ROWS[row]
    out = os.path.join(args.out, f"{row}_seed{seed}")
    path = os.path.join(out, "mim.pt")
    if not os.path.exists(path):
        start = time.time()
        os.makedirs(out, exist_ok=True)
        tok = [f"--tokenizer={tokenizers[kind]}"] if kind else []
        run([sys.executable, "-m", "pretrain.mim", "train", args.mim_recipe, *stage_flags(args, out, args.mim_steps,
             seed), *tok, *flags], os.path.join(args.out, f"{row}_seed{seed}.log"))
        seconds[f"{row}_seed{seed}"] = time.time() - start
    return path


def probe(args, checkpoint: str, pooling: str, seconds: dict) -> float:
    run_dir = os.path.dirname(checkpoint)
    out = os.path.join(run_dir, f"linear_probe_{pooling}.json")
    if not os.path.exists(out):
        start = time.time()
        data = json.dumps({"source": "fashion_mnist", "limit": args.limit, "eval_images": args.eval_images})
        run([sys.executable, "-m", "finetune.classify", "linear_probe", checkpoint, f"--pooling={pooling}",
             f"--data_cfg={data}", "--eval_crop=1.0", f"--epochs={args.probe_epochs}",
             f"--warmup_epochs={max(1, args.probe_epochs // 10)}", f"--batch_size={args.probe_batch}",
             f"--cache_dir={os.path.join(run_dir, 'features')}", f"--out={out}"],
            os.path.join(run_dir, f"linear_probe_{pooling}.log"))
        seconds[f"{os.path.basename(run_dir)}_probe_{pooling}"] = time.time() - start
    with open(out) as f:
        return float(json.load(f)["top1"])


def summary(values: list[float]) -> dict:
    """Mean and sample standard deviation (0 for one seed)."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def plot(results: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows, poolings = list(results["rows"]), results["budget"]["poolings"]
    width = 0.8 / len(poolings)
    fig, ax = plt.subplots(figsize=(2 + 1.6 * len(rows), 4), dpi=120)
    for i, pooling in enumerate(poolings):
        stats = [results["rows"][r][pooling] for r in rows]
        xs = [j + (i - (len(poolings) - 1) / 2) * width for j in range(len(rows))]
        ax.bar(xs, [100 * s["mean"] for s in stats], width, yerr=[100 * s["std"] for s in stats], capsize=4,
               label=f"linear probe, {POOLINGS[pooling]}")
    ax.set_xticks(range(len(rows)), rows)
    ax.set_ylabel("top-1 on the Fashion-MNIST test split (%)")
    ax.set_title(f"BEiT v2 ablations: mean +/- std over {results['budget']['seeds']} seed(s)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def report(results: dict, png: str) -> str:
    poolings = results["budget"]["poolings"]
    b = results["budget"]
    lines = ["# Ablation", "",
             f"Each row changes one thing of the baseline; MIM {b['mim_steps']} steps ({b['mim_recipe']}), tokenizer "
             f"{b['tokenizer_steps']} steps ({b['tokenizer_recipe']}, one per teacher kind, seed 0, shared by the "
             f"MIM seeds), linear probe {b['probe_epochs']} epochs on {b['limit']} training images, top-1 on "
             f"{b['eval_images']} held-out Fashion-MNIST test images; mean +/- sample std over seeds "
             f"{', '.join(map(str, b['seed_list']))}.", "",
             "| row | changes | " + " | ".join(f"probe, {POOLINGS[p]}" for p in poolings) + " |",
             "| --- | --- |" + " --- |" * len(poolings)]
    for name, row in results["rows"].items():
        cells = [f"{100 * row[p]['mean']:.1f} +/- {100 * row[p]['std']:.1f}%" for p in poolings]
        lines.append(f"| {name} | {row['changes']} | " + " | ".join(cells) + " |")
    lines += ["", f"![ablation]({os.path.basename(png)})", "",
              "Per-seed numbers are in results.json. A row's gap to the baseline means little when it is within "
              "the seeds' spread (the error bars).", ""]
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    started, seconds = time.time(), {}
    previous = os.path.join(args.out, "results.json")
    if os.path.exists(previous):   # a rerun keeps the seconds of the pieces it skips
        with open(previous) as f:
            seconds = {k: v for k, v in json.load(f).get("seconds", {}).items() if k != "this_run_total"}
    seeds = list(range(args.seeds))
    kinds = sorted({ROWS[r][2] for r in args.rows if ROWS[r][2]})
    tokenizers = {kind: tokenizer(args, kind, seconds) for kind in kinds}
    rows = {}
    for row in args.rows:
        per_seed = {p: {} for p in args.poolings}
        for seed in seeds:
            checkpoint = mim(args, row, seed, tokenizers, seconds)
            for pooling in args.poolings:
                per_seed[pooling][str(seed)] = probe(args, checkpoint, pooling, seconds)
        rows[row] = {"changes": ROWS[row][0],
                     **{p: {"per_seed": v, **summary(list(v.values()))} for p, v in per_seed.items()}}
    budget = {k: getattr(args, k) for k in ("tokenizer_recipe", "mim_recipe", "tokenizer_steps", "mim_steps",
                                             "limit", "eval_images", "probe_epochs", "probe_batch", "poolings",
                                             "seeds", "extra")}
    results = {"rows": rows, "budget": {**budget, "seed_list": seeds}, "tokenizers": tokenizers,
               "seconds": {**seconds, "this_run_total": time.time() - started}}
    png = os.path.join(args.out, "ablation.png")
    plot(results, png)
    # Whole files or none: a killed driver leaves the previous results, and its rerun skips the finished pieces.
    write_text_atomically(os.path.join(args.out, "report.md"), report(results, png))
    write_text_atomically(os.path.join(args.out, "results.json"), json.dumps(results, indent=1) + "\n")
    print(f"ablation: {args.out}/results.json, report.md, ablation.png")
    return results


if __name__ == "__main__":
    main()
