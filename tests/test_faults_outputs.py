"""What a run writes stays valid and whole (project issue 23): non-finite weights refused at load, strict JSON
results, SIGTERM outside the training loop, a kill inside the first save, a resume across ZeRO stages, a global
batch that does not split over `deepspeed --num_gpus 2`, and a tensorboard folder that cannot be written.

The engine cases train a linear model on one process (a child process: DeepSpeed's process group must not
outlive a test in pytest's own); the stage cases run the tiny fine-tune recipe."""
import json
import math
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from tests.conftest import ROOT, cli_error, free_port

ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, PYTHONUNBUFFERED="1")
EVAL_DATA = '--data_cfg={"source": "fashion_mnist", "eval_images": 40}'


def strict_json(text: str):
    """`json.loads` that refuses NaN and Infinity, as strict readers (jq, JavaScript, Go) do."""
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")
    return json.loads(text, parse_constant=refuse)


def run_python(code: str, *args, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *map(str, args)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


# ---- non-finite weights, strict JSON ---------------------------------------------------------------------------

@pytest.fixture
def nan_classifier(tmp_path):
    """A tiny_test classifier file (10 classes) whose weights hold a NaN, as a diverged run's export would."""
    from finetune.model import build_classifier, save_classifier
    model = build_classifier("beitv2_tiny_test", 10)
    with torch.no_grad():
        model.blocks[1].mlp.fc1.weight[0, 0] = math.nan
    path = tmp_path / "diverged" / "classifier.pt"
    save_classifier(model, path)
    return path


def test_evaluating_non_finite_weights_is_refused_at_load_naming_the_file(nan_classifier, tmp_path, capsys):
    # Before: it evaluated, printed `"loss": NaN` (not JSON) and exited 0.
    from finetune.classify.__main__ import COMMANDS
    out = tmp_path / "eval.json"
    err = cli_error(capsys, COMMANDS, "evaluate", str(nan_classifier), EVAL_DATA, f"--out={out}")
    assert err == (f"error: {nan_classifier} holds weights that are not finite (NaN or inf) in 1 tensor, first "
                   f"blocks.1.mlp.fc1.weight; it cannot be evaluated or trained from: use a checkpoint written "
                   f"before its run diverged")
    assert not out.exists()


def test_fine_tuning_from_non_finite_weights_names_the_starting_file(nan_classifier, tmp_path, capsys,
                                                                     fashion_mnist_available):
    # Before: it trained on, skipped every step and stopped advising a lower optim.lr.
    from finetune.classify.__main__ import COMMANDS
    run = tmp_path / "ft"
    err = cli_error(capsys, COMMANDS, "train", "beitv2_tiny_test_ft", f"--init={nan_classifier}",
                    f"--run.output_dir={run}")
    assert err.startswith(f"error: {nan_classifier} holds weights that are not finite") and "optim.lr" not in err
    assert not run.exists()   # stopped before the run claimed its folder


def test_results_are_strict_json_with_non_finite_values_as_null(tmp_path, capsys):
    from engine.config.cli import run_cli
    from engine.loop.evaluation import write_result
    from engine.reporting.metrics import RunLogger
    out = tmp_path / "eval.json"
    returned = write_result({"images": 3, "loss": math.nan, "ema": {"top1": 0.5, "loss": math.inf}}, str(out))
    written = strict_json(out.read_text())
    assert written == returned == {"images": 3, "loss": None, "ema": {"top1": 0.5, "loss": None},
                                   "not_finite": ["loss", "ema.loss"]}
    assert "loss, ema.loss not finite (NaN or inf): written as null" in capsys.readouterr().err
    # metrics.jsonl: the mean loss of an interval with a skipped (non-finite) step is NaN.
    logger = RunLogger(str(tmp_path / "run"), 2, 0, show_progress=False)
    logger.log(1, {"loss": math.nan, "lr": 0.1})
    logger.close()
    assert strict_json((tmp_path / "run" / "metrics.jsonl").read_text()) == {"step": 1, "split": "train",
                                                                            "loss": None, "lr": 0.1}
    # What a command prints on stdout.
    assert run_cli({"ev": lambda: {"loss": -math.inf, "n": [1.0, math.nan]}}, ["ev"]) == 0
    assert strict_json(capsys.readouterr().out) == {"loss": None, "n": [1.0, None]}


# ---- a scheduler's signal outside the training loop ---------------------------------------------------------

# Sends this process SIG$SIGNAL_IN_EVAL when the evaluation has read its first batch: a scheduler's notice
# mid-evaluation.
SIGNAL_IN_EVALUATION = '''
    import os, signal, sys
    import finetune.classify.evaluate as ev
    from engine.main import main
    measure = ev.classification_metrics
    def signalled(model, batches, *args):
        def batches_then_sigterm():
            for i, batch in enumerate(batches):
                if i == 0:
                    os.kill(os.getpid(), getattr(signal, "SIG" + os.environ["SIGNAL_IN_EVAL"]))
                yield batch
        return measure(model, batches_then_sigterm(), *args)
    if os.environ.get("SIGNAL_IN_EVAL"):
        ev.classification_metrics = signalled
    sys.exit(main(sys.argv[1:]))
'''


def _leftovers(folder) -> list:
    return sorted(str(p) for p in folder.rglob("*") if ".tmp" in p.name or ".partial" in p.name)


def test_sigterm_during_classify_evaluate_exits_143_and_writes_nothing(tmp_path):
    from finetune.model import build_classifier, save_classifier
    ckpt = tmp_path / "classifier.pt"
    save_classifier(build_classifier("beitv2_tiny_test", 10), ckpt)
    out = tmp_path / "eval.json"
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(SIGNAL_IN_EVALUATION), "classify", "evaluate",
                           str(ckpt), EVAL_DATA, "--batch_size=8", f"--out={out}"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=dict(ENV, SIGNAL_IN_EVAL="TERM"))
    assert proc.returncode == 143, proc.stderr[-2000:]   # before: killed by the signal (-15), no word
    assert proc.stderr.strip().splitlines()[-1].startswith("stopped: SIGTERM outside a training loop; nothing was "
                                                           "left half-written")
    assert not out.exists() and not _leftovers(tmp_path) and proc.stdout == ""


@pytest.mark.parametrize("signal_name", ["TERM", "USR1"])
@pytest.mark.slow
def test_a_signal_during_a_stage_evaluation_after_training_exits_143_and_the_rerun_evaluates(
        tmp_path, fashion_mnist_available, signal_name):
    """USR1 as the job's preemption signal (`#SBATCH --signal=B:USR1@300`) with run.requeue: outside the loop it
    stops as cleanly as SIGTERM (it used to kill the process: no requeue, no word) and rank 0 asks for the requeue
    (here no SLURM job, so it says why not)."""
    run = tmp_path / "ft"
    args = ["classify", "train", "beitv2_tiny_test_ft", f"--run.output_dir={run}", "--schedule.total_steps=2",
            "--run.save_interval=2", "--data.eval_images=40"]
    if signal_name == "USR1":
        args += ["--run.preempt_signal=USR1", "--run.requeue=true"]
    cmd = [sys.executable, "-c", textwrap.dedent(SIGNAL_IN_EVALUATION), *args]
    env = {k: v for k, v in ENV.items() if k != "SLURM_JOB_ID"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(env, SIGNAL_IN_EVAL=signal_name))
    assert proc.returncode == 143, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"stopped: SIG{signal_name} outside a training loop"), last
    assert ("not requeued: no SLURM_JOB_ID" in last) == (signal_name == "USR1"), last
    assert (run / "classifier.pt").exists() and not (run / "eval.json").exists() and not _leftovers(run)
    # The same command again: the run is complete, so it only evaluates (and its lock was released).
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "at step 2/2" in proc.stderr
    assert strict_json((run / "eval.json").read_text())["images"] == 40


# ---- engine faults: a kill in the first save, ZeRO stage switches, tensorboard --------------------------------

FIT = '''
    import json, os, signal, sys
    import torch
    from engine.config.schema import OptimConfig, RunConfig, ScheduleConfig
    from engine.loop.trainer import fit
    from engine.parallel import distributed as dist_utils
    from engine.parallel.ds_setup import param_groups
    from tests.dist_util import StepNumbers

    opts = json.loads(sys.argv[1])
    dist_utils.init()
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    if opts.get("kill_in_save"):   # SIGKILL inside the first save, once DeepSpeed has written its files
        from deepspeed.runtime.engine import DeepSpeedEngine
        save = DeepSpeedEngine.save_checkpoint
        def killed(self, *args, **kwargs):
            save(self, *args, **kwargs)
            os.kill(os.getpid(), signal.SIGKILL)
        DeepSpeedEngine.save_checkpoint = killed
    run = RunConfig(output_dir=opts["out"], ds_config=f"ds_configs/zero{opts.get('zero', 0)}.json",
                    micro_batch_size=8, log_interval=1, save_interval=2, progress_bar=False,
                    allow_config_change=opts.get("allow", False))
    optim = OptimConfig(lr=0.05, min_lr=0.05, weight_decay=0.0, grad_clip=1.0)
    try:
        fit(run, run, optim, ScheduleConfig(total_steps=opts["steps"]), model, param_groups(model), StepNumbers(),
            lambda engine, x: (engine(x).pow(2).mean(), {}))
        print("REPORT DONE", flush=True)
    except Exception as e:
        print(f"REPORT {type(e).__name__} {e}", flush=True)
'''


def fit(out, steps=4, **opts) -> tuple[str, str]:
    """(rank 0's report: DONE or the error, stderr) of the linear model trained on one process."""
    proc = run_python(FIT, json.dumps({"out": str(out), "steps": steps, **opts}))
    assert "REPORT " in proc.stdout, (proc.returncode, proc.stderr[-3000:])
    return proc.stdout.split("REPORT ")[1].strip(), proc.stderr


def losses(out) -> dict:
    rows = [strict_json(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


@pytest.mark.slow
def test_a_kill_inside_the_first_save_then_the_same_command_starts_over_cleanly(tmp_path):
    run = tmp_path / "run"
    proc = run_python(FIT, json.dumps({"out": str(run), "steps": 4, "kill_in_save": True}))
    assert proc.returncode == -signal.SIGKILL
    ckpt = run / "checkpoints"
    assert os.listdir(ckpt) == [".step_00000002.partial"]   # no `latest`, no published folder
    report, err = fit(run)
    assert report == "DONE" and "resumed from" not in err   # from scratch: nothing whole to resume from
    assert sorted(os.listdir(ckpt)) == ["latest", "step_00000002", "step_00000004"]   # the partial one pruned
    report, _ = fit(tmp_path / "straight")
    assert report == "DONE" and losses(run) == losses(tmp_path / "straight")   # each step logged once, the same


@pytest.mark.slow
def test_a_resume_after_a_zero_3_to_0_switch_is_one_line_naming_the_saved_config(tmp_path):
    run = tmp_path / "run"
    assert fit(run, zero=3)[0] == "DONE"
    # Without --run.allow_config_change the changed ds_config is named, as any change of a run's settings
    # (test_faults_rundir.py). With it, DeepSpeed cannot load ZeRO-3 shards at ZeRO-0 (before: "does not fit this
    # run (AssertionError)").
    report, _ = fit(run, steps=8, zero=0, allow=True)
    assert report == (f"ValueError checkpoint {run}/checkpoints/step_00000004 was written at ZeRO-3 and this run "
                      f"uses ZeRO-0 (run.ds_config); DeepSpeed cannot load a checkpoint across these stages: resume "
                      f"with --run.ds_config=ds_configs/zero3.json (the saved run's), or start over with "
                      f"--run.resume=false (nor do the older step_00000002)")
    assert (run / "checkpoints" / "latest").read_text() == "step_00000004"   # nothing lost
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.is_dir()) == ["step_00000002",
                                                                                    "step_00000004"]


def test_an_unwritable_tensorboard_folder_warns_once_and_training_goes_on(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "tb").write_text("not a folder")   # before: FileExistsError, a traceback, no training
    report, err = fit(run)
    assert report == "DONE"
    assert err.count(f"warning: cannot write tensorboard logs to {run}/tb (a file is in its place); training goes "
                     f"on without them (metrics.jsonl has every logged value)") == 1
    assert sorted(losses(run)) == [1, 2, 3, 4] and (run / "tb").read_text() == "not a folder"


def test_a_read_only_tensorboard_folder_warns_and_pictures_are_skipped(tmp_path, monkeypatch, capsys):
    # Read-only is simulated (the tests may run as root, whom permissions do not stop).
    import errno

    import tensorboardX

    from engine.reporting import metrics

    def read_only(folder, **kwargs):
        raise PermissionError(errno.EROFS, os.strerror(errno.EROFS), os.path.join(folder, "events.out"))
    monkeypatch.setattr(tensorboardX, "SummaryWriter", read_only)
    logger = metrics.RunLogger(str(tmp_path), 4, 0, show_progress=False)
    logger.log(1, {"loss": 1.0})
    logger.close()
    assert "(Read-only file system); training goes on without them" in capsys.readouterr().err
    assert (tmp_path / "metrics.jsonl").exists()

    class Engine:   # what TensorboardPictures reads of DeepSpeed's engine
        global_steps = 2
        module = torch.nn.Identity()

        def zero_optimization_stage(self):
            return 0
    pictures = metrics.TensorboardPictures(str(tmp_path / "other"), 2, lambda m, x: {"p": x[0]})
    pictures(Engine(), torch.zeros(1, 2, 2, 3))   # the first batch: kept
    Engine.global_steps = 4
    pictures(Engine(), torch.zeros(1, 2, 2, 3))   # a picture step: the writer cannot open, warned, no crash
    assert not pictures.active and "cannot write tensorboard logs" in capsys.readouterr().err


# ---- a global batch that does not split over `deepspeed --num_gpus 2` -----------------------------------------

@pytest.mark.slow
def test_a_global_batch_that_does_not_split_over_two_deepspeed_ranks_stops_both_in_one_line(tmp_path):
    """A run made on one rank with micro-batch 3 (global batch 3), resumed by `deepspeed --num_gpus 2`: no micro-batch
    splits 3 over 2 ranks. Both ranks stop before building anything, with the line that says what keeps it."""
    from engine.config.schema import resolve, save_json
    from engine.parallel.global_batch import RECORD
    from finetune.classify.config import RECIPES, ClassifyConfig
    run = tmp_path / "run"
    flags = ["--run.micro_batch_size=3", "--schedule.total_steps=4"]
    cfg = resolve(ClassifyConfig, RECIPES, "beitv2_tiny_test_ft", {"run.output_dir": str(run),
                                                                   "run.micro_batch_size": 3,
                                                                   "schedule.total_steps": 4})
    save_json(cfg, str(run / "config.json"))   # what the one-rank run left after its step-2 checkpoint
    (run / RECORD).write_text(json.dumps({"global_batch": 3, "micro_batch_size": 3, "grad_accum_steps": 1,
                                          "world_size": 1, "requested_grad_accum_steps": 1}))
    (run / "checkpoints" / "step_00000002").mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("step_00000002")
    before = sorted(p.name for p in run.rglob("*"))
    cmd = [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", "2", "--master_port",
           str(free_port()), "--module", "engine.main", "classify", "train", "beitv2_tiny_test_ft",
           f"--run.output_dir={run}", *flags]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    expected = (f"error: resuming {run} with a global batch of 6 (3 x 1 x 2 ranks) instead of the saved 3 (3 x 1 x 1 "
                f"rank) would change the schedule and the data order; no micro-batch splits it over 2 ranks: resume "
                f"on 1 rank to keep it, or pass --run.allow_config_change=true to train on with a global batch of 6")
    out = proc.stdout + proc.stderr
    # each rank, one line (counted in the text: the two ranks' writes can land on one line of the launcher's output)
    assert out.count(expected) == 2, [line for line in out.splitlines() if "error" in line]
    assert sorted(p.name for p in run.rglob("*")) == before   # nothing written


def test_without_a_terminal_every_logged_step_prints_one_plain_line(tmp_path, capsys):
    from engine.reporting.metrics import RunLogger
    logger = RunLogger(str(tmp_path / "run"), total_steps=10, start_step=2, show_progress=True)   # stderr: no tty
    assert logger.bar is None
    logger.log(4, {"loss": 1.23456, "lr": 1.5e-3, "images_per_s": 512.0, "mim_acc": 0.5})
    logger.log(4, {"top1": 0.5}, prefix="eval")   # evaluation rows go to the files only
    logger.close()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("step 4/10 | loss 1.235 | lr 0.0015 | images/s 512 | eta 0:0")


def test_tensorboard_reads_the_training_curves_and_an_evaluation_written_beside_the_run(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from engine.loop.evaluation import write_result
    from engine.reporting.metrics import RunLogger
    logger = RunLogger(str(tmp_path), total_steps=4, start_step=0, show_progress=False)
    for step in (2, 4):
        logger.log(step, {"loss": 1.0 / step, "lr": 1e-3})
    logger.close()
    write_result({"top1": 0.75, "top5": 0.9, "arch": "tiny", "per_class": []}, str(tmp_path / "eval.json"))
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(2, 0.5), (4, 0.25)]
    assert [(e.step, round(e.value, 6)) for e in events.Scalars("eval/top1")] == [(4, 0.75)]   # the last step
    assert "eval/arch" not in events.Tags()["scalars"]
    write_result({"top1": 0.5}, str(tmp_path / "elsewhere" / "eval.json"))   # not beside a run: no tb/ is made
    assert not (tmp_path / "elsewhere" / "tb").exists()
