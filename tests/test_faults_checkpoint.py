"""Faults around checkpoints (project issue 12, items 1, 2 and 11): a save killed midway, weights that are not
finite, and damaged checkpoints on resume.

One uninterrupted run (2 gloo ranks, ZeRO-1, a linear model, checkpoints every 2 steps) is the reference; each test
copies it as a run killed after its step-6 checkpoint, plants a fault, resumes it to step 8 on 2 ranks, and
compares the losses with the reference's. (Run by hand with `run_fit(zero=2 or 3)`, a plain resume, a torn shard
and NaN weights behave the same at ZeRO-2 and ZeRO-3; `wrong_content` falls back at ZeRO-2, while at ZeRO-3, where
DeepSpeed's load has collectives inside, it stops the run with the one-line error instead.)
"""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from engine.storage.checkpoint import CheckpointManager
from tests.conftest import ROOT, free_port

SCRIPT = textwrap.dedent('''
    import json, math, sys
    import torch
    from engine.config.schema import OptimConfig, RunConfig, ScheduleConfig
    from engine.loop.guards import TrainingDiverged
    from engine.loop.trainer import fit
    from engine.parallel import distributed as dist_utils
    from engine.parallel.ds_setup import param_groups

    opts = json.loads(sys.argv[1])
    dist_utils.init()
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)

    from tests.dist_util import StepNumbers as Numbers   # every rank the same numbers, a fixed function of the step

    engines = []

    class Poison:   # makes the weights NaN after a given step (as a diverged update would)
        name = "poison"
        def after_step(self, step):
            if step == opts["poison"]:
                with torch.no_grad():   # under ZeRO-3 the fp32 partitions are the weights (written back each step)
                    for t in getattr(engines[0].optimizer, "fp32_partitioned_groups_flat", [model.weight]):
                        t.fill_(math.nan)
        def state_dict(self):
            return {}
        def load_state_dict(self, state):
            pass

    def step_fn(engine, x):
        engines[:] = [engine]
        return engine(x).pow(2).mean(), {}

    run = RunConfig(output_dir=opts["out"], ds_config=f"ds_configs/zero{opts['zero']}.json", micro_batch_size=8,
                    log_interval=1, save_interval=2, keep_last=opts["keep_last"], progress_bar=False)
    optim = OptimConfig(lr=0.05, min_lr=0.05, weight_decay=0.0, grad_clip=1.0)
    try:
        fit(run, run, optim, ScheduleConfig(total_steps=opts["steps"]), model, param_groups(model), Numbers(),
            step_fn, hooks=(Poison(),))
        report = "DONE"
    except (TrainingDiverged, ValueError) as e:
        report = f"{type(e).__name__} {e}"
    if dist_utils.is_main():
        print(f"REPORT {report}", flush=True)
''')


def run_fit(tmp_path, out, steps=8, keep_last=2, poison=None, zero=1) -> str:
    """The script on 2 ranks; rank 0's report line (DONE, or the error that stopped it), then all of stderr."""
    script = tmp_path / "faults_fit.py"
    script.write_text(SCRIPT)
    opts = dict(out=str(out), steps=steps, keep_last=keep_last, poison=poison, zero=zero)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), str(script), json.dumps(opts)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.split("REPORT ")[1] + proc.stderr


def losses(out) -> dict:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """8 uninterrupted steps; all four checkpoints kept."""
    tmp = tmp_path_factory.mktemp("reference")
    out = run_fit(tmp, tmp / "run", keep_last=4)
    assert out.startswith("DONE"), out[-3000:]
    assert CheckpointManager(str(tmp / "run")).saved_world_size("step_00000008") == 2
    return tmp / "run"


def killed_after_step_6(reference, tmp_path):
    """A copy of the reference as a run killed after its step-6 checkpoint (checkpoints 2, 4 and 6 on disk)."""
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    shutil.rmtree(run / "checkpoints" / "step_00000008")
    (run / "checkpoints" / "latest").write_text("step_00000006")
    return run, run / "checkpoints"


@pytest.mark.slow
def test_leftovers_of_a_killed_save_do_not_end_up_in_the_next_checkpoint(reference, tmp_path):
    # A save of step 8 by a 3-rank run, killed after rank 2 wrote its shard: in the partial folder, and (as an
    # unfixed save left it) in the step folder itself. The run resumed on 2 ranks saves step 8 again.
    run, ckpt = killed_after_step_6(reference, tmp_path)
    for folder in (ckpt / ".step_00000008.partial", ckpt / "step_00000008"):
        folder.mkdir()
        (folder / "zero_pp_rank_2_mp_rank_00_optim_states.pt").write_bytes(b"torn shard of a killed run")
        (folder / "rng_rank2.pt").write_bytes(b"torn")
    out = run_fit(tmp_path, run)
    assert out.startswith("DONE"), out[-3000:]
    assert sorted(os.listdir(ckpt / "step_00000008")) == sorted(os.listdir(reference / "checkpoints" /
                                                                             "step_00000008"))
    assert sorted(p.name for p in ckpt.iterdir() if p.is_dir()) == ["step_00000006", "step_00000008"]
    assert losses(run) == losses(reference)
    # The new checkpoint resumes as it is (2 ranks wrote it, nothing to re-split) and consolidates.
    manager = CheckpointManager(str(run))
    assert manager.latest_tag() == "step_00000008" and manager.saved_world_size("step_00000008") == 2
    assert not manager.needs_resplit(2)
    from engine.storage.weights import consolidated_state_dict
    ours, theirs = consolidated_state_dict(str(run)), consolidated_state_dict(str(reference))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.slow
def test_weights_that_are_not_finite_are_never_saved(reference, tmp_path):
    run, ckpt = killed_after_step_6(reference, tmp_path)
    out = run_fit(tmp_path, run, poison=7)   # the save at step 8 finds NaN weights
    message = out.splitlines()[0]
    assert message == (f"TrainingDiverged the weights are not finite at step 8, so they were not saved; resume from "
                       f"{ckpt}/step_00000006 (the last good checkpoint) with a lower optim.lr or optim.grad_clip set")
    assert (ckpt / "latest").read_text() == "step_00000006"
    assert sorted(p.name for p in ckpt.iterdir() if p.is_dir()) == ["step_00000002", "step_00000004",
                                                                     "step_00000006"]


def tear(path):
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def wrong_content(path):
    # Looks like a ZeRO shard, so only DeepSpeed's load finds it out, after rank 1 has loaded the model of that
    # step and rank 0 all of it: the fallback must overwrite everything. (ZeRO-1: no collectives in that load.)
    torch.save({"optimizer_state_dict": {"not": "a ZeRO state"}}, path)


def garble(path):
    path.write_bytes(os.urandom(path.stat().st_size))


SHARD = "zero_pp_rank_1_mp_rank_00_optim_states.pt"


@pytest.mark.parametrize("damaged,resumed", [({6: (SHARD, tear), 4: (SHARD, wrong_content)}, 2),
                                             ({6: ("rng_rank1.pt", garble)}, 4)], ids=["shards", "rng"])
@pytest.mark.slow
def test_a_damaged_checkpoint_falls_back_to_the_previous_one(reference, tmp_path, damaged, resumed):
    # Only rank 1's files are damaged: both ranks must still agree on the checkpoint they load.
    run, ckpt = killed_after_step_6(reference, tmp_path)
    for step, (name, damage) in damaged.items():
        damage(ckpt / f"step_{step:08d}" / name)
    out = run_fit(tmp_path, run)
    assert out.startswith("DONE"), out[-3000:]
    for step in damaged:   # each one passed over is named, with the one resumed from
        line = next(s for s in out.splitlines() if s.startswith(f"checkpoint {ckpt}/step_{step:08d} does not load ("))
        assert line.endswith(f"); resuming from the previous one, {ckpt}/step_{resumed:08d}")
    assert f"at step {resumed}/8" in out
    assert losses(run) == losses(reference)   # the steps after it redone exactly
    assert (ckpt / "latest").read_text() == "step_00000008"


@pytest.mark.slow
def test_an_empty_latest_file_falls_back_to_the_newest_checkpoint_folder(reference, tmp_path):
    run, ckpt = killed_after_step_6(reference, tmp_path)
    (ckpt / "latest").write_text("")
    out = run_fit(tmp_path, run)
    assert out.startswith("DONE"), out[-3000:]
    assert f"{ckpt}/latest is empty or garbled (''); using the newest checkpoint folder, step_00000006\n" in out
    assert "at step 6/8" in out
    assert losses(run) == losses(reference)


def fake_checkpoint(ckpt, step, *files):
    folder = ckpt / f"step_{step:08d}"
    folder.mkdir(parents=True)
    for name in files:
        (folder / name).write_bytes(b"garbage")


def test_when_no_checkpoint_loads_the_error_is_one_line_about_the_newest(tmp_path):
    # Every file is opened before DeepSpeed is asked to load (no engine is needed to find these out).
    ckpt = tmp_path / "checkpoints"
    for step in (4, 6):
        fake_checkpoint(ckpt, step, "mp_rank_00_model_states.pt", "rng_rank0.pt")
    (ckpt / "latest").write_text("step_00000006")
    with pytest.raises(ValueError) as err:
        CheckpointManager(str(tmp_path)).load(engine=None)
    message = str(err.value)
    assert "\n" not in message and message.startswith(
        f"checkpoint {ckpt}/step_00000006 is damaged (step_00000006/mp_rank_00_model_states.pt: ")
    assert message.endswith("restore it, or start over with --run.resume=false (nor do the older step_00000004)")


def test_partial_folders_are_ignored_and_pruned(tmp_path, capsys):
    ckpt = tmp_path / "checkpoints"
    for step in (2, 4):
        fake_checkpoint(ckpt, step, "rng_rank0.pt")
    (ckpt / ".step_00000006.partial").mkdir()   # a save killed midway
    (ckpt / ".step_00000004.old").mkdir()       # a publish killed between its two renames
    (ckpt / "latest").write_bytes(b"\xff\x00garbage")
    manager = CheckpointManager(str(tmp_path), keep_last=1)
    assert manager.latest_tag() == "step_00000004" and manager._candidates() == ["step_00000004", "step_00000002"]
    assert capsys.readouterr().err.count("is empty or garbled") == 1
    manager._prune(keep="step_00000004")
    assert sorted(os.listdir(ckpt)) == ["latest", "step_00000004"]
