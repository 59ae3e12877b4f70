"""Host cost of a training step through the shared loop: ops dispatched and host syncs per optimizer step.

On a GPU every dispatched op is at least one kernel launch and every sync drains the launch queue, so these
counts are what leaves a fast GPU idle between kernels; counting them needs no GPU. Each mode runs the real
`engine.loop.trainer.fit` on the MIM model (full parameter set, small images so the CPU finishes quickly) for two
run lengths with one log point each; the difference divided by the extra steps is the per-step cost, free of
setup and logging. Modes:

- `ds_bf16_zero1` (baseline, the MIM recipes' setting): DeepSpeed's bf16 optimizer with fp32 master weights.
- `ds_bf16_zero0`: DeepSpeed's bf16 optimizer without ZeRO.
- `lean`: `bf16_autocast` at ZeRO-0: fp32 weights, the loop clips with one foreach norm, fused AdamW skips
  non-finite updates on the device.

    python -m bench.engine_step --out=bench/results/cpu_engine_step.json
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import fire

from bench.common import write_json
from engine.config.cli import check_counts, run_cli

MODES = {"ds_bf16_zero1": ("bf16", 1), "ds_bf16_zero0": ("bf16", 0), "lean": ("bf16_autocast", 0)}


def measure(mode: str, steps: int, arch: str, img_size: int, batch: int) -> dict:
    """One run of `steps` optimizer steps in this process; prints and returns the counts."""
    import torch
    import torch.nn.functional as F

    from bench.common import DispatchCounter
    from engine.config.schema import OptimConfig, RunConfig, ScheduleConfig
    from engine.loop.trainer import fit
    from engine.parallel import distributed as dist_utils
    from engine.parallel.ds_setup import PARAM_DTYPES, param_groups
    from pretrain.mim import MIM_ARCHS, build_mim_model

    precision, zero = MODES[mode]
    device = dist_utils.init()
    torch.manual_seed(0)
    grid = img_size // MIM_ARCHS[arch].get("patch_size", 16)
    k = max(1, grid * grid * 75 // 196)   # the recipes' masking ratio on the smaller grid
    model = build_mim_model(arch, img_size=img_size, num_masked_patches=k)
    n = model.num_patches
    images = torch.rand(batch, 3, img_size, img_size, dtype=PARAM_DTYPES[precision], device=device)
    mask = torch.zeros(batch, n, dtype=torch.bool, device=device)
    mask[:, :k] = True
    labels = torch.randint(0, model.lm_head.out_features, (batch * k,), device=device)

    class Batches:
        steps_per_epoch = 10 ** 6

        def micro_batches(self, start):
            while True:
                yield images, mask

    def step_fn(engine, batch):
        logits, agg_logits = engine(*batch)
        return F.cross_entropy(logits.float(), labels) + F.cross_entropy(agg_logits.float(), labels), {}

    out = tempfile.mkdtemp(prefix="bench_engine_step_")
    run = RunConfig(output_dir=out, ds_config=f"ds_configs/zero{zero}.json", precision=precision,
                    micro_batch_size=batch, log_interval=steps, save_interval=10 ** 9, save_final=False,
                    progress_bar=False)
    optim = OptimConfig(lr=1e-4, min_lr=1e-4, grad_clip=3.0)
    with DispatchCounter() as counter:
        fit(run, run, optim, ScheduleConfig(total_steps=steps), model, param_groups(model), Batches(), step_fn)
    result = {"ops": counter.ops, "syncs": counter.syncs, "by_name": counter.by_name,
              "param_tensors": len(list(model.parameters()))}
    print("RESULT", json.dumps(result))
    return result


def _run(mode: str, steps: int, arch: str, img_size: int, batch: int) -> dict:
    """`measure` in a fresh process: DeepSpeed's autocast mode sets process-wide state."""
    cmd = [sys.executable, "-m", "bench.engine_step", "measure", mode, str(steps), arch, str(img_size), str(batch)]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if proc.returncode:
        raise RuntimeError(f"bench.engine_step {mode} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.split("RESULT ")[-1].splitlines()[0])


def main(arch: str = "beit_base_patch16_224_8k_vocab_cls_pt", img_size: int = 32, batch: int = 2,
         steps: tuple[int, int] = (2, 6), modes: str = "ds_bf16_zero1,ds_bf16_zero0,lean",
         out: str = "bench_engine_step.json") -> dict:
    """Per-step dispatched ops and host syncs of each mode, and ratios to the first mode."""
    check_counts(img_size=img_size, batch=batch)
    short, long = steps
    if not 0 < short < long:
        raise SystemExit(f"error: --steps needs two run lengths, shorter first, e.g. 2,6 (got {steps})")
    unknown = [m for m in (modes.split(",") if isinstance(modes, str) else modes) if m not in MODES]
    if unknown:
        raise SystemExit(f"error: unknown mode '{unknown[0]}'; choose from {', '.join(MODES)}")
    names = modes.split(",") if isinstance(modes, str) else list(modes)
    results = {}
    for mode in names:
        a, b = (_run(mode, s, arch, img_size, batch) for s in (short, long))
        results[mode] = {"ops_per_step": (b["ops"] - a["ops"]) / (long - short),
                         "syncs_per_step": (b["syncs"] - a["syncs"]) / (long - short),
                         "param_tensors": b["param_tensors"]}
        per_op = {name: (b["by_name"][name] - a["by_name"].get(name, 0)) / (long - short) for name in b["by_name"]}
        results[mode]["top_ops_per_step"] = dict(sorted(per_op.items(), key=lambda kv: -kv[1])[:10])
    base = results[names[0]]
    for r in results.values():
        r["ops_vs_baseline"] = r["ops_per_step"] / base["ops_per_step"]
    return write_json({"arch": arch, "img_size": img_size, "batch": batch, "baseline": names[0],
                       "device": "cpu (counts are device-independent)", "modes": results}, out)


if __name__ == "__main__":
    if sys.argv[1:2] == ["measure"]:   # the child process `_run` starts
        fire.Fire({"measure": measure})
    else:
        sys.exit(run_cli(main))
