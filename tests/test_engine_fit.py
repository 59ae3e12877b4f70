"""The shared loop on its own: a linear model fed by a DataSource written here (synthetic numbers), one process.

Non-finite losses: a step whose gradients are not finite is skipped and counted, and `max_nonfinite_steps` in a row
stop the run with a one-line error that leaves the last good checkpoint in place.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import ROOT, free_port

SCRIPT = textwrap.dedent('''
    import contextlib, json, math, sys
    import torch
    from engine.config.schema import OptimConfig, RunConfig, ScheduleConfig
    from engine.loop.guards import TrainingDiverged
    from engine.loop.trainer import fit
    from engine.parallel import distributed as dist_utils
    from engine.parallel.ds_setup import param_groups

    from bench.common import DispatchCounter

    opts = json.loads(sys.argv[1])
    zero, bad_steps, out, accum = opts["zero"], set(opts["bad_steps"]), opts["out"], opts["accum"]
    dist_utils.init()
    from deepspeed.accelerator import get_accelerator
    accelerator, device_syncs, synchronize = get_accelerator(), [0], get_accelerator().synchronize
    def counted_synchronize(*args, **kwargs):   # a no-op on CPU, a full device sync on a GPU
        device_syncs[0] += 1
        return synchronize(*args, **kwargs)
    accelerator.synchronize = counted_synchronize
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)

    class Numbers:
        steps_per_epoch = 100
        def micro_batches(self, start):
            step = start
            while True:
                g = torch.Generator().manual_seed(step)
                for part in torch.randn(8, 4, generator=g).chunk(accum):   # the same 8 numbers, in accum parts
                    yield step, part
                step += 1

    def step_fn(engine, batch):
        step, x = batch
        loss = engine(x.to(model.weight.dtype)).float().pow(2).mean()
        if step in bad_steps:
            loss = loss * math.inf
        return loss, {}

    run = RunConfig(output_dir=out, ds_config=f"ds_configs/zero{zero}.json", micro_batch_size=8 // accum,
                    grad_accum_steps=accum, log_interval=opts["log_interval"], precision=opts["precision"],
                    save_interval=2 * opts["steps"], max_nonfinite_steps=3, progress_bar=False,
                    compile=opts["compile_mode"] is not None, compile_mode=opts["compile_mode"] or "default",
                    allow_config_change=opts.get("allow_config_change", False))
    if opts["save_interval"]:
        run.save_interval = opts["save_interval"]
    optim = OptimConfig(lr=0.05, min_lr=0.05, weight_decay=opts.get("weight_decay", 0.0), grad_clip=opts["clip"])
    # Dynamo leaves a frame eager while a dispatch mode is active: count only the eager runs.
    counter = DispatchCounter() if opts["compile_mode"] is None else None
    try:
        with counter or contextlib.nullcontext():
            fit(run, run, optim, ScheduleConfig(total_steps=opts["steps"]), model, param_groups(model), Numbers(),
                step_fn)
    except TrainingDiverged as e:
        report = [f"DIVERGED {e}"]
    else:
        report = []
    report += [f"SYNCS {counter.syncs if counter else -1}", f"DEVICE_SYNCS {device_syncs[0]}",
               f"GRAPHS {torch._dynamo.utils.counters['stats']['unique_graphs']}"]
    gathered = contextlib.nullcontext()
    if zero == 3:   # ZeRO-3 leaves each rank a shard of the weight: gather it (collective)
        import deepspeed
        gathered = deepspeed.zero.GatheredParameters(model.weight)
    with gathered:
        report.append(f"WEIGHT {json.dumps(model.weight.detach().float().flatten().tolist())}")
    if dist_utils.is_main():   # one rank reports: lines from two ranks on one pipe can interleave mid-line
        print("\\n".join(report), flush=True)
''')


def run_fit(tmp_path, zero, bad_steps, accum=1, clip=None, precision="fp32", steps=8, log_interval=1,
            save_interval=2, compile_mode=None, nproc=1, weight_decay=0.0, allow_config_change=False):
    out = tmp_path / f"z{zero}"
    opts = dict(zero=zero, bad_steps=bad_steps, out=str(out), accum=accum, precision=precision, steps=steps,
                clip=(1.0 if zero else 0.0) if clip is None else clip, log_interval=log_interval,
                save_interval=save_interval, compile_mode=compile_mode, weight_decay=weight_decay,
                allow_config_change=allow_config_change)
    if nproc == 1:
        cmd = [sys.executable, "-c", SCRIPT]
    else:   # every rank sees the same numbers, so any number of ranks takes the same steps
        script = tmp_path.parent / f"{tmp_path.name}_fit.py"
        script.write_text(SCRIPT)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
               str(free_port()), str(script)]
    proc = subprocess.run([*cmd, json.dumps(opts)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    weight = json.loads(proc.stdout.split("WEIGHT ")[1].splitlines()[0])
    return proc.stdout + proc.stderr, rows, weight, out


def host_syncs(stdout, kind="SYNCS"):
    return int(stdout.split(f"\n{kind} ")[1].split()[0])


@pytest.mark.parametrize("zero", [0, 1])
@pytest.mark.slow
def test_a_non_finite_step_is_skipped_and_counted(tmp_path, zero):
    _, clean, clean_weight, _ = run_fit(tmp_path / "clean", zero, [], steps=7)
    out, rows, weight, _ = run_fit(tmp_path / "bad", zero, [7])
    assert [r["skipped_steps"] for r in rows] == [0, 0, 0, 0, 0, 0, 0, 1]
    # The skipped last step changed nothing: the weights are those of 7 clean steps (the lr is constant).
    assert weight == clean_weight


@pytest.mark.parametrize("zero", [0, 1])
@pytest.mark.slow
def test_non_finite_steps_in_a_row_stop_the_run_keeping_the_last_checkpoint(tmp_path, zero):
    out, rows, _, run_dir = run_fit(tmp_path, zero, [5, 6, 7])
    message = out.split("DIVERGED ")[1].splitlines()[0]
    assert message.startswith("3 steps in a row had non-finite gradients (by step 8)")
    # The checkpoint at step 6 came after two skipped steps: skipped steps leave the weights as they were.
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000006"
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6, 7]


@pytest.mark.parametrize("zero", [0, 1])
@pytest.mark.slow
def test_gradient_accumulation_equals_the_full_batch(tmp_path, zero):
    _, full, full_weight, _ = run_fit(tmp_path / "full", zero, [], accum=1)
    _, accumulated, acc_weight, _ = run_fit(tmp_path / "acc", zero, [], accum=2)
    assert [r["step"] for r in accumulated] == list(range(1, 9))
    for a, b in zip(full, accumulated):
        assert abs(a["loss"] - b["loss"]) < 1e-6 and abs(a["grad_norm"] - b["grad_norm"]) < 1e-5
    assert max(abs(a - b) for a, b in zip(full_weight, acc_weight)) < 1e-6


@pytest.mark.slow
def test_the_loops_clipping_at_zero0_equals_deepspeeds(tmp_path):
    # ZeRO-0 (fp32 gradients): the loop clips with one foreach norm; ZeRO-1: DeepSpeed's optimizer clips.
    _, ours, our_weight, _ = run_fit(tmp_path / "ours", 0, [], clip=0.5, precision="bf16_autocast")
    _, theirs, their_weight, _ = run_fit(tmp_path / "ds", 1, [], clip=0.5, precision="bf16_autocast")
    assert sum(r["grad_norm"] > 0.5 for r in ours) >= 4   # clipping was active on most steps
    for a, b in zip(ours, theirs):
        assert abs(a["grad_norm"] - b["grad_norm"]) < 1e-5 * max(1.0, b["grad_norm"])
    assert max(abs(a - b) for a, b in zip(our_weight, their_weight)) < 1e-6


@pytest.mark.parametrize("zero,precision,per_step", [(0, "bf16_autocast", False), (1, "bf16", True)])
@pytest.mark.slow
def test_host_syncs_come_only_at_the_log_interval(tmp_path, zero, precision, per_step):
    """Counting every `.item()`-like read: 2 or 6 steps between two log points cost the same on the lean path;
    DeepSpeed's own bf16 optimizer (the contrast) reads the device on every step."""
    syncs = {}
    for steps in (2, 6):
        out, *_ = run_fit(tmp_path / str(steps), zero, [], clip=1.0, precision=precision, steps=steps,
                          log_interval=steps, save_interval=0)
        syncs[steps] = host_syncs(out)
    assert (syncs[6] > syncs[2]) == per_step, syncs


@pytest.mark.parametrize("zero,precision", [(0, "bf16_autocast"), (1, "bf16"), (3, "fp32")])
@pytest.mark.slow
def test_deepspeed_does_not_synchronize_the_device_every_step(tmp_path, zero, precision):
    """Counting `synchronize()` on DeepSpeed's accelerator: its throughput timer, on by default, would call it at
    every forward and optimizer step (engine.parallel.ds_setup.quiet_defaults turns it off); 2 or 6 steps cost the
    same."""
    syncs = {}
    for steps in (2, 6):
        out, *_ = run_fit(tmp_path / str(steps), zero, [], clip=1.0, precision=precision, steps=steps,
                          log_interval=steps, save_interval=0)
        syncs[steps] = host_syncs(out, "DEVICE_SYNCS")
    assert syncs[6] == syncs[2], syncs


@pytest.mark.slow
def test_the_lean_step_resumes_exactly(tmp_path):
    # bf16_autocast at ZeRO-0: the fused optimizer's on-device state (moments, step counts) round-trips.
    _, ref, ref_weight, _ = run_fit(tmp_path / "ref", 0, [], clip=0.5, precision="bf16_autocast")
    run_fit(tmp_path / "split", 0, [], clip=0.5, precision="bf16_autocast", steps=4)
    out, rows, weight, _ = run_fit(tmp_path / "split", 0, [], clip=0.5, precision="bf16_autocast")
    assert "resumed from" in out and "at step 4/8" in out
    assert [r["loss"] for r in rows[-4:]] == [r["loss"] for r in ref[-4:]]
    assert weight == ref_weight


@pytest.mark.slow
def test_a_compiled_run_equals_the_eager_one(tmp_path):
    # torch.compile through DeepSpeed's engine.compile with a mode (on the CPU, reduce-overhead's CUDA graphs are
    # skipped and the inductor code runs alone): same losses and weights as eager.
    _, eager, eager_weight, _ = run_fit(tmp_path / "eager", 0, [], clip=0.5, steps=4)
    out, compiled, compiled_weight, _ = run_fit(tmp_path / "compiled", 0, [], clip=0.5, steps=4,
                                                compile_mode="reduce-overhead")
    assert int(out.split("GRAPHS ")[1].split()[0]) >= 1
    for a, b in zip(eager, compiled):
        assert abs(a["loss"] - b["loss"]) < 1e-6 * max(1.0, a["loss"])
    assert max(abs(a - b) for a, b in zip(eager_weight, compiled_weight)) < 1e-6


@pytest.mark.slow
@pytest.mark.parametrize("zero,precision", [(2, "fp32"), (3, "fp32"), (1, "bf16")])
def test_a_sharded_checkpoint_resumes_on_another_number_of_ranks(tmp_path, zero, precision):
    # 4 steps on 2 ranks, then 4 on 1 rank (optimizer shards re-split through DeepSpeed's universal checkpoint)
    # equal 8 steps on 1 rank: weights, Adam moments, step counts and per-group weight decay all came across.
    # Every rank sees the same numbers, so the global batch (16 on 2 ranks, 8 on 1) changes in name only: allowed.
    # (Keeping it on another number of ranks: test_faults_resume_batch.)
    kw = dict(precision=precision, weight_decay=0.5)   # the bias group has none: a mix-up of groups would show
    _, ref, ref_weight, _ = run_fit(tmp_path / "ref", zero, [], steps=8, **kw)
    run_fit(tmp_path / "split", zero, [], steps=4, nproc=2, **kw)
    out, rows, weight, run_dir = run_fit(tmp_path / "split", zero, [], steps=8, allow_config_change=True, **kw)
    assert "at step 4/8 (re-split from 2 ranks)" in out
    assert [r["loss"] for r in rows[-4:]] == pytest.approx([r["loss"] for r in ref[-4:]], rel=1e-6, abs=1e-9)
    assert max(abs(a - b) for a, b in zip(weight, ref_weight)) < 1e-6
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.is_dir()) == [
        "step_00000006", "step_00000008"]   # the re-split copy went with the next save
