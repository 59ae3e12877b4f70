"""A resume on another number of ranks keeps the global batch (project hardening issue, item 5;
engine.parallel.global_batch).

One uninterrupted run is the reference: 2 gloo ranks, micro-batch 2, no accumulation (global batch 4), a linear model
on 32 tiny images from an ArraySource (so the real ShardPlan decides which samples each step reads), a one-epoch
cosine schedule (8 steps) and a checkpoint every 4 steps; every rank logs the dataset indices and per-sample losses of
each micro-batch. A copy of it, as a run killed after its step-4 checkpoint, is resumed on 1 rank: it runs with
accumulation 2, the same 8-step schedule, the same samples in every step and the same losses and weights. The rest
(a micro-batch that does not divide, the config comparison, the record) runs in this process on the copy.
"""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from engine.config.schema import ConfigError, RunConfig, StageConfig, to_dict
from engine.parallel.global_batch import RECORD, keep_global_batch, saved_batch
from engine.storage.run_dir import check_resume
from tests.conftest import ROOT, free_port

SCRIPT = textwrap.dedent('''
    import json, sys
    import numpy as np
    import torch
    from data_tools.ffcv_loader import ArraySource, RawAug
    from engine.config.schema import StageConfig
    from engine.loop.trainer import fit
    from engine.parallel import distributed as dist_utils
    from engine.parallel.ds_setup import param_groups
    from engine.parallel.global_batch import keep_global_batch

    opts = json.loads(sys.argv[1])
    cfg = StageConfig()
    cfg.run.output_dir, cfg.run.ds_config, cfg.run.progress_bar = opts["out"], "ds_configs/zero0.json", False
    cfg.run.micro_batch_size, cfg.run.log_interval, cfg.run.save_interval = 2, 1, 4
    cfg.optim.lr, cfg.optim.min_lr, cfg.optim.weight_decay, cfg.optim.grad_clip = 0.05, 0.005, 0.0, 1.0
    cfg.schedule.epochs, cfg.schedule.warmup_steps = 1.0, 2   # 32 images / global batch 4: 8 steps
    device = dist_utils.init()
    keep_global_batch(cfg.run)   # as every stage does, before its data source
    rank = dist_utils.rank()
    images = np.random.default_rng(0).integers(0, 256, (32, 4, 4), dtype=np.uint8)
    source = ArraySource(images, np.arange(32) % 2, aug=RawAug(), micro_batch_size=cfg.run.micro_batch_size,
                         grad_accum_steps=cfg.run.grad_accum_steps, world_size=dist_utils.world_size(), rank=rank,
                         seed=0, device=device)
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 1)
    log = open(f"{opts['log']}/rank{rank}.jsonl", "a")

    def step_fn(engine, batch):
        x = batch["image"].float().flatten(1) / 255
        per_sample = (engine(x).squeeze(1) - batch["label"].float()).pow(2)
        log.write(json.dumps({"step": batch["step"], "index": batch["index"].tolist(),
                              "loss": per_sample.tolist()}) + "\\n")
        return per_sample.mean(), {}

    fit(cfg, cfg.run, cfg.optim, cfg.schedule, model, param_groups(model), source, step_fn)
    log.close()
    if dist_utils.is_main():
        print("WEIGHT " + json.dumps(model.weight.detach().flatten().tolist()), flush=True)
''')


def run_script(tmp_path, out, log, nproc: int) -> str:
    """The script on `nproc` ranks (torchrun for 2, a plain process for 1); its stdout + stderr."""
    script = tmp_path / "resume_batch.py"
    script.write_text(SCRIPT)
    log.mkdir(parents=True, exist_ok=True)
    launch = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                                                  str(nproc), "--master_port", str(free_port())]
    proc = subprocess.run([*launch, str(script), json.dumps({"out": str(out), "log": str(log)})], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def per_step(log) -> dict:
    """{step: (indices, per-sample losses)} over every rank's log, in rank order (= the global batch's order)."""
    steps: dict = {}
    for path in sorted(log.glob("rank*.jsonl")):
        for row in map(json.loads, path.read_text().splitlines()):
            indices, losses = steps.setdefault(row["step"], ([], []))
            indices += row["index"]
            losses += row["loss"]
    return steps


def weight(out: str) -> list:
    return json.loads(out.split("WEIGHT ")[1].splitlines()[0])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reference")
    out = run_script(tmp, tmp / "run", tmp / "log", nproc=2)
    assert "at step" not in out   # a fresh run
    return tmp / "run", per_step(tmp / "log"), weight(out)


def killed_after_step_4(reference, tmp_path):
    """A copy of the reference as a run killed after its step-4 checkpoint."""
    run = tmp_path / "run"
    shutil.copytree(reference[0], run)
    shutil.rmtree(run / "checkpoints" / "step_00000008")
    (run / "checkpoints" / "latest").write_text("step_00000004")
    return run


@pytest.mark.slow
def test_a_resume_on_one_rank_keeps_the_global_batch_by_accumulating(reference, tmp_path):
    ref_dir, ref_steps, ref_weight = reference
    assert [len(ref_steps[s][0]) for s in range(8)] == [4] * 8   # 2 ranks x micro-batch 2
    run = killed_after_step_4(reference, tmp_path)
    out = run_script(tmp_path, run, tmp_path / "log", nproc=1)
    assert f"resuming {run} on 1 rank: run.grad_accum_steps 1 -> 2 keeps the global batch of 4 (saved: 2 x 1 x " \
           f"2 ranks)" in out
    assert "resumed from" in out and "at step 4/8" in out   # the same 8-step schedule
    steps = per_step(tmp_path / "log")
    assert sorted(steps) == [4, 5, 6, 7]
    for s in steps:   # the samples of every step, in the same order, and their losses
        assert steps[s][0] == ref_steps[s][0]
        assert steps[s][1] == pytest.approx(ref_steps[s][1], rel=1e-6, abs=1e-9)
    assert weight(out) == pytest.approx(ref_weight, rel=1e-6, abs=1e-9)
    # What ran is what is recorded: config.json says accumulation 2, the one it replaced went to the history.
    config = json.loads((run / "config.json").read_text())
    assert config["run"]["grad_accum_steps"] == 2
    [old] = [json.loads(line) for line in (run / "config_history.jsonl").read_text().splitlines()]
    assert old["resumed_at_step"] == 4 and old["config"]["run"]["grad_accum_steps"] == 1
    assert json.loads((run / RECORD).read_text()) == {
        "global_batch": 4, "micro_batch_size": 2, "grad_accum_steps": 2, "world_size": 1,
        "requested_grad_accum_steps": 1}


def saved_cfg(run) -> StageConfig:
    """The reference's config as the script builds it (what a resume with the same command resolves to)."""
    cfg = StageConfig()
    saved = json.loads((run / "config.json").read_text())
    for section in ("data", "optim", "schedule", "run"):
        for key, value in saved[section].items():
            setattr(getattr(cfg, section), key, tuple(value) if isinstance(value, list) else value)
    assert to_dict(cfg) == saved
    cfg.run.output_dir = str(run)   # the copy (a harmless key)
    return cfg


def test_a_micro_batch_that_does_not_divide_is_a_one_line_error_naming_the_flags(reference, tmp_path):
    run = killed_after_step_4(reference, tmp_path)
    cfg = saved_cfg(run)
    cfg.run.micro_batch_size = 3   # this process is one rank: 3 x accum never makes 4
    with pytest.raises(ConfigError) as err:
        keep_global_batch(cfg.run)
    message = str(err.value)
    assert "\n" not in message and message == (
        f"resuming {run} with a global batch of 3 (3 x 1 x 1 rank) instead of the saved 4 (2 x 1 x 2 ranks) would "
        f"change the schedule and the data order; keep it with --run.micro_batch_size=2 --run.grad_accum_steps=2, "
        f"or pass --run.allow_config_change=true to train on with a global batch of 3")
    # Knowingly: the settings stay as given, and the config comparison lets the new global batch through, saying so.
    cfg.run.allow_config_change = True
    keep_global_batch(cfg.run)
    assert (cfg.run.micro_batch_size, cfg.run.grad_accum_steps) == (3, 1)
    check_resume(cfg, cfg.run)


def test_the_config_comparison_looks_at_the_global_batch(reference, tmp_path, capsys):
    run = killed_after_step_4(reference, tmp_path)
    cfg = saved_cfg(run)
    cfg.run.grad_accum_steps = 2   # one rank here: 2 x 2 x 1 = the saved 4, however split
    check_resume(cfg, cfg.run)
    cfg.run.micro_batch_size, cfg.run.grad_accum_steps = 4, 1
    check_resume(cfg, cfg.run)
    # A `fit` caller that does not keep it (no keep_global_batch): 2 x 1 x 1 rank is an error, like any change.
    cfg.run.micro_batch_size = 2
    with pytest.raises(ConfigError, match=r"global batch \(run.micro_batch_size x run.grad_accum_steps x ranks\) "
                                          r"4 -> 2 \(saved in "):
        check_resume(cfg, cfg.run)
    cfg.run.allow_config_change = True
    check_resume(cfg, cfg.run)
    assert "(allowed): global batch (run.micro_batch_size x run.grad_accum_steps x ranks) 4 -> 2" in \
        capsys.readouterr().err


def test_the_same_command_after_an_adjusted_resume_is_adjusted_again(reference, tmp_path):
    run = killed_after_step_4(reference, tmp_path)
    # As the 1-rank resume above records itself: accumulation 2 run, 1 asked for.
    (run / RECORD).write_text(json.dumps({"micro_batch_size": 2, "grad_accum_steps": 2, "world_size": 1,
                                          "requested_grad_accum_steps": 1}))
    cfg = saved_cfg(run)
    cfg.run.allow_config_change = True   # for some other change: the unchanged batch flags are still adjusted
    keep_global_batch(cfg.run)
    assert cfg.run.grad_accum_steps == 2


def test_a_run_from_before_the_record_reads_config_and_checkpoint(reference, tmp_path):
    run = killed_after_step_4(reference, tmp_path)
    (run / RECORD).unlink()
    batch = saved_batch(str(run))   # config.json's micro 2 x accum 1 x the 2 RNG files of step 4
    assert (batch.micro_batch_size, batch.grad_accum_steps, batch.world_size) == (2, 1, 2)
    cfg = saved_cfg(run)
    keep_global_batch(cfg.run)
    assert cfg.run.grad_accum_steps == 2
    # Not resuming, or nothing to resume from: nothing to keep.
    fresh = RunConfig(output_dir=str(tmp_path / "fresh"), micro_batch_size=3)
    keep_global_batch(fresh)
    cfg = saved_cfg(run)
    cfg.run.resume = False
    keep_global_batch(cfg.run)
    assert (fresh.grad_accum_steps, cfg.run.grad_accum_steps) == (1, 1)
