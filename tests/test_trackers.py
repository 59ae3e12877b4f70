"""`--run.report_to=wandb,mlflow` (engine.reporting.trackers), with the real packages: W&B offline (its `.wandb` files,
read with W&B's own record format) and MLflow on a local file store (read with its MlflowClient). A tiny tokenizer run
and its evaluation, compared with the run's metrics.jsonl and eval.json; a missing package, a tracker that cannot
start, and a resumed run."""
import glob
import json
import os
import struct
import subprocess
import sys
import zlib

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.usefixtures("fashion_mnist_available")

TINY = ["--run.output_dir={out}", "--run.save_interval=2", "--schedule.total_steps=4", "--data.limit=64",
        "--run.log_interval=1", "--run.progress_bar=false", "--run.ds_config=ds_configs/zero0.json"]


def tracker_env(tmp_path, **extra) -> dict:
    """MLflow on a file store in tmp_path (allowed explicitly: MLflow 3 wants a database by default), W&B offline
    with its files in the run's folder (no WANDB_DIR)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "MLFLOW_"))}
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="offline", MLFLOW_TRACKING_URI=f"file://{tmp_path / 'mlruns'}",
               MLFLOW_ALLOW_FILE_STORE="true", **extra)
    return env


def stage(args: list, env: dict, prelude: str = "") -> subprocess.CompletedProcess:
    """`python -m pretrain.tokenizer ARGS`, after `prelude` (Python run first in the same process)."""
    code = f"{prelude}\nimport runpy, sys\nsys.argv = ['pretrain.tokenizer', *sys.argv[1:]]\n" \
           f"runpy.run_module('pretrain.tokenizer', run_name='__main__', alter_sys=True)\n"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


def wandb_records(run_dir) -> list:
    """Every record of the W&B runs under `run_dir/wandb`, oldest file first, as W&B's own protobuf `Record`s. A
    `.wandb` file is a LevelDB log (header ':W&B' + magic + version, 32 KiB blocks of crc32 | length | type
    chunks; type 1 a whole record, 2-4 its first, middle and last parts); the crc is checked."""
    from wandb.proto import wandb_internal_pb2
    records = []
    for path in sorted(glob.glob(os.path.join(run_dir, "wandb", "offline-run-*", "run-*.wandb"))):
        data = open(path, "rb").read()
        assert data[:4] == b":W&B"
        pos, parts = 7, b""
        while pos + 7 <= len(data):
            if 32768 - pos % 32768 < 7:   # a block's tail too short for a header is padding
                pos += 32768 - pos % 32768
                continue
            crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
            if kind == 0:   # zeros after the last record
                break
            chunk = data[pos + 7:pos + 7 + length]
            assert zlib.crc32(bytes([kind]) + chunk) == crc, path
            pos += 7 + length
            parts = chunk if kind in (1, 2) else parts + chunk
            if kind in (1, 4):
                record = wandb_internal_pb2.Record()
                record.ParseFromString(parts)
                records.append(record)
    return records


def wandb_history(records) -> dict:
    """{step: {key: value}} of the history records."""
    rows = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            rows.setdefault(r.history.step.num, {}).update(items)
    return rows


@pytest.mark.slow
def test_a_run_and_its_evaluation_reach_mlflow_and_wandb_as_they_reach_metrics_jsonl(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")   # to read the store back here
    out = tmp_path / "run"
    env = tracker_env(tmp_path)
    train = stage(["train", "vqkd_tiny_test", *(a.format(out=out) for a in TINY), "--run.report_to=mlflow,wandb"],
                  env)
    assert train.returncode == 0, train.stderr[-3000:]
    evaluate = stage(["evaluate", out / "tokenizer.pt", f"--out={out / 'eval.json'}", '--data_cfg={"eval_images": 64}'],
                     env)
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["split"] == "train"]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    result = json.loads((out / "eval.json").read_text())
    state = json.loads((out / "trackers.json").read_text())
    assert sorted(state) == ["mlflow", "wandb"]

    # MLflow: one run named after the output folder, the config as parameters, every logged value at its step.
    client = MlflowClient(state["mlflow"]["tracking_uri"])
    run = client.get_run(state["mlflow"]["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == str(out)
    config = json.loads((out / "config.json").read_text())
    assert run.data.params["run.output_dir"] == str(out) and run.data.params["run.report_to"] == "mlflow,wandb"
    assert run.data.params["optim.lr"] == str(config["optim"]["lr"]) and run.data.params["arch"] == config["arch"]
    for key in ("loss", "rec_loss", "lr", "codebook_usage", "images_per_s"):
        history = client.get_metric_history(run.info.run_id, f"train/{key}")
        assert [(m.step, m.value) for m in history] == [(r["step"], r[key]) for r in rows]
    for key in ("codebook_usage", "perplexity", "teacher_cosine"):   # at the run's last step, as in tensorboard
        assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, f"eval/{key}")] == [
            (4, result[key])]

    # W&B: the training run and the evaluation's reopened one share the id of trackers.json.
    records = wandb_records(out)
    runs = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert len(runs) == 2 and {r.run_id for r in runs} == {state["wandb"]["id"]}
    assert runs[0].display_name == str(out) and runs[0].project == "beitv2-ds"
    wandb_config = {i.key: json.loads(i.value_json) for i in runs[0].config.update}
    assert wandb_config["run"]["output_dir"] == str(out) and wandb_config["run"]["report_to"] == "mlflow,wandb"
    history = wandb_history(records)
    for r in rows:
        assert {k: history[r["step"]][f"train/{k}"] for k in ("loss", "lr", "codebook_usage")} == {
            k: r[k] for k in ("loss", "lr", "codebook_usage")}
    assert {k: history[4][f"eval/{k}"] for k in ("codebook_usage", "perplexity")} == {
        k: result[k] for k in ("codebook_usage", "perplexity")}
    exits = [r.exit.exit_code for r in records if r.WhichOneof("record_type") == "exit"]
    assert exits == [0, 0]


# `import NAME` fails as it does where the package is not installed (the finders before any other say so).
ABSENT = """
import sys
class Absent:
    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] == {name!r}:
            raise ModuleNotFoundError(f"No module named {{fullname!r}}", name=fullname)
sys.meta_path.insert(0, Absent())
"""


@pytest.mark.parametrize("name, install", [("wandb", "pip install wandb"), ("mlflow", "pip install mlflow-skinny")])
@pytest.mark.slow
def test_a_missing_tracker_is_one_line_before_training(tmp_path, name, install):
    out = tmp_path / "run"
    proc = stage(["train", "vqkd_tiny_test", *(a.format(out=out) for a in TINY), f"--run.report_to={name}"],
                 tracker_env(tmp_path), prelude=ABSENT.format(name=name))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == f"error: --run.report_to={name} names {name}, which is not " \
                                                   f"installed: {install}"
    assert "Traceback" not in proc.stderr
    assert not (out / "metrics.jsonl").exists() and not (out / "checkpoints").exists()   # no step was trained


def test_a_tracker_that_cannot_start_is_one_line_before_training(tmp_path):
    """MLflow 3 refuses a file store unless told: the run does not start, and the line says what to set."""
    out = tmp_path / "run"
    env = tracker_env(tmp_path)
    del env["MLFLOW_ALLOW_FILE_STORE"]
    proc = stage(["train", "vqkd_tiny_test", *(a.format(out=out) for a in TINY), "--run.report_to=mlflow"], env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: --run.report_to=mlflow: cannot start the MLflow run (MlflowException: ")
    assert line.endswith("set MLFLOW_TRACKING_URI to your tracking server (http://HOST:5000) or a database "
                         "(sqlite:///mlflow.db, with the full mlflow package)")
    assert not (out / "metrics.jsonl").exists() and not (out / "trackers.json").exists()


def test_a_resumed_run_continues_its_tracker_run_and_a_restart_begins_another(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from engine.loop.guards import Preempted
    from engine.reporting import trackers
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file://{tmp_path / 'mlruns'}")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    out = str(tmp_path / "run")
    config = {"run": {"output_dir": out, "seed": 3}, "optim": {"betas": [0.9, 0.99]}}
    first = trackers.start(config, "mlflow", out, step=0)
    first.log(1, {"train/loss": 2.0, "train/skipped_steps": 0, "train/note": "not a number"})
    first.close(Preempted("stopped by SIGTERM"))
    run_id = json.loads((tmp_path / "run" / "trackers.json").read_text())["mlflow"]["run_id"]
    client = MlflowClient(f"file://{tmp_path / 'mlruns'}")
    assert client.get_run(run_id).info.status == "KILLED"
    assert client.get_run(run_id).data.params == {"run.output_dir": out, "run.seed": "3", "optim.betas": "[0.9, 0.99]"}
    resumed = trackers.start(config, "mlflow", out, step=1)   # from the step-1 checkpoint
    resumed.log(2, {"train/loss": 1.5})
    resumed.close()
    assert json.loads((tmp_path / "run" / "trackers.json").read_text())["mlflow"]["run_id"] == run_id
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and set(run.data.metrics) == {"train/loss", "train/skipped_steps"}
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "train/loss")] == [(1, 2.0), (2, 1.5)]
    again = trackers.start(config, "mlflow", out, step=0)   # the run started over (resume off): a new tracker run
    again.close(RuntimeError("diverged"))
    new_id = json.loads((tmp_path / "run" / "trackers.json").read_text())["mlflow"]["run_id"]
    assert new_id != run_id and client.get_run(new_id).info.status == "FAILED"
    assert trackers.start(config, "", out, step=0) is None   # report_to empty: nothing started
