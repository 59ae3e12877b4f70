"""Optional experiment trackers: `--run.report_to=wandb,mlflow` also sends a run's metrics to Weights & Biases and/or
MLflow, where the user has them installed. Neither is a dependency: tensorboard's `tb/` and `metrics.jsonl` are
always written, and with `run.report_to` empty (the default) nothing here is imported.

- Start: the training loop (`engine.loop.trainer`) first checks on every rank that each named package imports, before it
  builds the engine; a missing one is a one-line error naming `pip install wandb` / `pip install mlflow-skinny`.
  Then rank 0 starts one run per tracker, named after `run.output_dir`, with the resolved config as its parameters
  (W&B: the nested config; MLflow: one `section.key` parameter per value). A tracker that cannot start (no W&B
  login, an unreachable MLflow server) is a one-line error on every rank, before the first step.
- During: the scalars `RunLogger` writes to tensorboard (`train/<key>` every `run.log_interval` steps) go to each
  tracker at the same step. A tracker that fails then warns once and is dropped; training goes on.
- End: each run is closed when `fit` ends, also when it raises (MLflow status FAILED, or KILLED for a preemption or
  Ctrl-C; W&B exit code 1).
- Resume and evaluation: `<output_dir>/trackers.json` keeps each tracker's run id. A run that resumes from a
  checkpoint continues the same tracker runs; an evaluation written beside the run (`eval.json`,
  `engine.loop.evaluation.log_to_run`) sends its numbers as `eval/<key>` at the run's last logged step to the same
  tracker runs, as it does to tensorboard.

Where the trackers write is their own configuration: W&B's `wandb login` or `WANDB_MODE=offline`, `WANDB_PROJECT`
(default `beitv2-ds`) and `WANDB_DIR` (default: the run's output directory); MLflow's `MLFLOW_TRACKING_URI` (a
tracking server, or a database with the full `mlflow` package) and `MLFLOW_EXPERIMENT_NAME` (default `beitv2-ds`).
"""
from __future__ import annotations

import importlib
import json
import os
import time
from typing import Any

from engine.config.schema import ConfigError, flat_keys
from engine.parallel import distributed as dist_utils
from engine.storage.files import write_text_atomically

__all__ = ["INSTALL", "STATE", "Trackers", "log_eval", "names", "require", "start"]

STATE = "trackers.json"   # in the run's output directory: {tracker: what reopens its run}
PROJECT = "beitv2-ds"     # W&B project and MLflow experiment unless the environment names one
INSTALL = {"wandb": "pip install wandb", "mlflow": "pip install mlflow-skinny"}
MAX_PARAM = 6000          # MLflow's longest parameter value


def names(report_to: str) -> list[str]:
    """The trackers `run.report_to` names, each once, in its order ('' names none)."""
    return [n for n in dict.fromkeys(t.strip() for t in report_to.split(",")) if n]


def require(report_to: str) -> None:
    """Import each tracker `report_to` names; a missing package is a one-line ConfigError naming its pip install,
    a broken one (a dependency of its own missing) says so."""
    for name in names(report_to):
        try:
            importlib.import_module(name)
        except ImportError as e:
            if (e.name or "").split(".")[0] == name:
                raise ConfigError(f"--run.report_to={report_to} names {name}, which is not installed: "
                                  f"{INSTALL[name]}") from None
            raise ConfigError(f"--run.report_to={report_to}: {name} is installed but does not import "
                              f"({_one_line(e)}); reinstall it: {INSTALL[name]}") from None


def _one_line(e: BaseException, most: int = 300) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:most]}{'...' if len(text) > most else ''}"


class _Wandb:
    """One W&B run: `saved` (its id and project from trackers.json) resumes it, else a new one starts."""

    label = "Weights & Biases"
    hint = "log in with `wandb login`, or set WANDB_MODE=offline to keep the run on disk (`wandb sync` later)"

    def __init__(self, output_dir: str, run_name: str, config: dict | None, saved: dict | None):
        import wandb
        kwargs = {"project": os.environ.get("WANDB_PROJECT") or PROJECT, "name": run_name}
        if not os.environ.get("WANDB_DIR"):
            kwargs["dir"] = output_dir
        if saved:
            kwargs.update(id=saved["id"], project=saved["project"], resume="allow")
        else:
            kwargs["config"] = config
        self.run = wandb.init(**kwargs)
        if saved and config is not None:   # a resume may change reporting keys (engine.storage.run_dir.HARMLESS)
            self.run.config.update(config, allow_val_change=True)
        self.state = {"id": self.run.id, "project": self.run.project}
        # W&B keeps one increasing step per run: a resumed online run goes on after the last step it received, and
        # a row for an earlier step (redone after the checkpoint) takes W&B's next step instead of being dropped.
        self.floor = self.run.step if saved else 0

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log(scalars, step=step if step >= self.floor else None)
        self.floor = max(self.floor, step)

    def close(self, error: BaseException | None) -> None:
        self.run.finish(exit_code=0 if error is None else 1)


class _Mlflow:
    """One MLflow run through `MlflowClient` (no global active run): `saved` (run id and tracking URI) reopens it."""

    label = "MLflow"
    hint = ("set MLFLOW_TRACKING_URI to your tracking server (http://HOST:5000) or a database (sqlite:///mlflow.db, "
            "with the full mlflow package)")

    def __init__(self, output_dir: str, run_name: str, config: dict | None, saved: dict | None):
        import mlflow
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient
        self.uri = saved["tracking_uri"] if saved else mlflow.get_tracking_uri()
        self.client = MlflowClient(tracking_uri=self.uri)
        if saved:
            self.run_id = saved["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            experiment = os.environ.get("MLFLOW_EXPERIMENT_ID") or self._experiment(
                os.environ.get("MLFLOW_EXPERIMENT_NAME") or PROJECT)
            tags = {"output_dir": os.path.abspath(output_dir)}
            self.run_id = self.client.create_run(experiment, run_name=run_name, tags=tags).info.run_id
            params = [Param(k, str(v)[:MAX_PARAM]) for k, v in flat_keys(config or {}).items()]
            for i in range(0, len(params), 100):   # MLflow takes at most 100 parameters a call
                self.client.log_batch(self.run_id, params=params[i:i + 100])
        self.state = {"run_id": self.run_id, "tracking_uri": self.uri}

    def _experiment(self, name: str) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(name)
        except Exception:   # noqa: BLE001 - another run created it meanwhile
            return self.client.get_experiment_by_name(name).experiment_id

    def log(self, step: int, scalars: dict[str, float]) -> None:
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in scalars.items()])

    def close(self, error: BaseException | None) -> None:
        from engine.loop.guards import Preempted
        stopped = isinstance(error, (Preempted, KeyboardInterrupt))
        self.client.set_terminated(self.run_id, "FINISHED" if error is None else "KILLED" if stopped else "FAILED")


TRACKER_CLASSES = {"wandb": _Wandb, "mlflow": _Mlflow}


class Trackers:
    """The open tracker runs of one training process (rank 0)."""

    def __init__(self, opened: dict[str, Any]):
        self.opened = opened

    def log(self, step: int, scalars: dict[str, Any]) -> None:
        """`scalars` (tensorboard's tags, e.g. `train/loss`) at `step` to every tracker; numbers only."""
        values = {k: float(v) for k, v in scalars.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if not values:
            return
        for name, tracker in list(self.opened.items()):
            try:
                tracker.log(step, values)
            except Exception as e:   # noqa: BLE001 - losing a tracker must not stop a long run
                del self.opened[name]
                dist_utils.log_main(f"warning: {tracker.label} stopped taking metrics at step {step} "
                                    f"({_one_line(e)}); training goes on without it (tensorboard and "
                                    f"metrics.jsonl have every logged value)")
                _close_quietly(tracker, e)

    def close(self, error: BaseException | None = None) -> None:
        for tracker in self.opened.values():
            _close_quietly(tracker, error)
        self.opened = {}


def _close_quietly(tracker, error: BaseException | None) -> None:
    try:
        tracker.close(error)
    except Exception as e:   # noqa: BLE001 - closing is best effort: the metrics are sent already
        dist_utils.log_main(f"warning: could not close the {tracker.label} run ({_one_line(e)})")


def _read_state(output_dir: str) -> dict:
    try:
        with open(os.path.join(output_dir, STATE)) as f:
            state = json.load(f)
        return state if isinstance(state, dict) else {}
    except (OSError, ValueError):
        return {}


def _open(wanted: list[str], output_dir: str, config: dict, resume: bool) -> Trackers:
    """Rank 0: start (or, on a resume, reopen) each tracker's run and record them in trackers.json."""
    saved = _read_state(output_dir) if resume else {}
    run_name = os.path.normpath(output_dir)
    opened: dict[str, Any] = {}
    for name in wanted:
        cls = TRACKER_CLASSES[name]
        try:
            opened[name] = cls(output_dir, run_name, config, saved.get(name))
        except Exception as e:   # noqa: BLE001 - any failure is the user's setup: one line, before training
            Trackers(opened).close(e)
            raise ConfigError(f"--run.report_to={name}: cannot start the {cls.label} run ({_one_line(e)}); "
                              f"{cls.hint}") from None
    os.makedirs(output_dir, exist_ok=True)
    state = {name: {"name": run_name, **tracker.state} for name, tracker in opened.items()}
    write_text_atomically(os.path.join(output_dir, STATE), json.dumps(state, indent=2) + "\n")
    return Trackers(opened)


def start(config: dict, report_to: str, output_dir: str, step: int) -> Trackers | None:
    """The tracker runs of a training process: None when `report_to` names none, or on ranks other than 0.

    Collective (every rank calls it with the same settings): rank 0 starts the runs (reopening those of
    trackers.json when the run resumes, `step` > 0) and every rank raises the same one-line ConfigError when one
    cannot start."""
    wanted = names(report_to)
    if not wanted:
        return None
    trackers, error = None, ""
    if dist_utils.is_main():
        try:
            trackers = _open(wanted, output_dir, config, resume=step > 0)
        except ConfigError as e:
            error = str(e)
        except OSError as e:   # trackers.json cannot be written
            error = f"--run.report_to={report_to}: cannot record the tracker runs in {output_dir} ({_one_line(e)})"
    error = dist_utils.broadcast_object(error)
    if error:
        if trackers is not None:
            trackers.close(ConfigError(error))
        raise ConfigError(error)
    return trackers


def log_eval(run_dir: str, scalars: dict[str, float], step: int) -> None:
    """An evaluation written beside a run: `eval/<key>` at `step` to the tracker runs of its trackers.json (none
    without one). Best effort: the evaluation's file is written already, so a tracker that cannot take the numbers
    is a warning, never an error."""
    saved = _read_state(run_dir)
    for name, state in saved.items():
        cls = TRACKER_CLASSES.get(name)
        if cls is None or not isinstance(state, dict):
            continue
        try:
            importlib.import_module(name)
        except ImportError:
            dist_utils.log_main(f"warning: the run reports to {name}, which is not installed here: the evaluation "
                                f"is not sent to it ({INSTALL[name]})")
            continue
        try:
            tracker = cls(run_dir, state.get("name", os.path.normpath(run_dir)), None, state)
        except Exception as e:   # noqa: BLE001
            dist_utils.log_main(f"warning: cannot reopen the {cls.label} run of {run_dir} ({_one_line(e)}): the "
                                f"evaluation is not sent to it")
            continue
        group = Trackers({name: tracker})
        group.log(step, {f"eval/{k}": v for k, v in scalars.items()})
        group.close()
