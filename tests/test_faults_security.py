"""Untrusted run directories and unwritable outputs (project hardening issue, items 6 and 13).

Item 6: every file a resume, the consolidation or an export reads is read weights-only (`engine.storage.safe_load`).
Each test plants, in one kind of file, a pickled object whose unpickling would run code (it would create a marker file)
and checks that the marker is never created and that the error is one line naming the file. Reference runs (one
rank, ZeRO 0-3, a linear model, checkpoints at steps 2, 4 and 6) are written once; each case copies one as a run
killed after its step-4 checkpoint, and all the resumes run in one child process (the engine's process group must
not outlive a test in pytest's process). The same batch resumes unplanted copies at ZeRO 0-3, which must redo
steps 5 and 6 exactly.

Item 13: one-line errors for a DeepSpeed config that is a folder or not a JSON object, an export to a read-only
folder or a full disk, and an empty `latest` file.
"""
import errno
import gc
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from engine.config.schema import ConfigError
from engine.storage.safe_load import REFUSED, TRUST, UntrustedCheckpoint
from tests.conftest import ROOT, cli_error

SCRIPT = textwrap.dedent('''
    import json, sys
    import torch
    from engine.config.schema import OptimConfig, RunConfig, ScheduleConfig
    from engine.loop.trainer import fit
    from engine.parallel import distributed as dist_utils
    from engine.parallel.ds_setup import param_groups
    from engine.storage.weights import save_weights_file

    dist_utils.init()

    from tests.dist_util import StepNumbers as Numbers   # a fixed function of the step

    def step_fn(engine, x):
        return engine(x).pow(2).mean(), {}

    def save_final(path, sd):
        save_weights_file(path, sd, {}, "test/1")

    for job in json.loads(sys.argv[1]):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 1)
        run = RunConfig(output_dir=job["out"], ds_config=job["ds_config"], micro_batch_size=8, log_interval=1,
                        save_interval=2, keep_last=3, progress_bar=False)
        optim = OptimConfig(lr=0.05, min_lr=0.05, weight_decay=0.0, grad_clip=1.0)
        try:
            fit(run, run, optim, ScheduleConfig(total_steps=6), model, param_groups(model), Numbers(), step_fn,
                final_weights=("final.pt", save_final))
            report = "DONE"
        except Exception as e:   # the type tells a one-line error from a crash
            report = f"{type(e).__name__}: {e}"
        print("REPORT " + json.dumps({"out": job["out"], "report": report}), flush=True)
''')


def run_jobs(tmp_path, jobs: list[dict]) -> dict[str, str]:
    """The fits of `jobs` ({"out", "ds_config"}) one after another in one child process: {out: report}."""
    proc = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(jobs)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT))
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = [json.loads(line[len("REPORT "):]) for line in proc.stdout.splitlines() if line.startswith("REPORT ")]
    assert len(reports) == len(jobs), proc.stderr[-3000:]
    return {r["out"]: r["report"] for r in reports}


def zero_config(zero: int) -> str:
    return f"ds_configs/zero{zero}.json"


class Payload:
    """Unpickling it runs code of the file's choosing; here the code creates `marker`."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def plant(path: Path, marker: Path) -> None:
    """Add a `Payload` to the dict in `path` (a file this test wrote, so it is read the trusting way)."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    state["payload"] = Payload(marker)
    torch.save(state, path)


def assert_refused(message: str, path: Path, marker: Path) -> None:
    assert not marker.exists(), "the planted code ran"
    assert "\n" not in message
    assert message == (f"{path} {REFUSED} (type builtins.exec); it was not loaded. {TRUST}"), message


def losses(out: Path) -> dict:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """{zero: run dir} of 6 uninterrupted steps at ZeRO 0-3 (checkpoints 2, 4, 6 and `final.pt`)."""
    tmp = tmp_path_factory.mktemp("references")
    runs = {zero: tmp / f"z{zero}" for zero in range(4)}
    reports = run_jobs(tmp, [{"out": str(out), "ds_config": zero_config(zero)} for zero, out in runs.items()])
    assert set(reports.values()) == {"DONE"}, reports
    return runs


def killed_after_step_4(reference: Path, run: Path) -> Path:
    """A copy of `reference` as a run killed after its step-4 checkpoint; returns that checkpoint's folder."""
    shutil.copytree(reference, run)
    shutil.rmtree(run / "checkpoints" / "step_00000006")
    (run / "checkpoints" / "latest").write_text("step_00000004")
    return run / "checkpoints" / "step_00000004"


# (ZeRO stage, file planted in the step-4 checkpoint): every kind of file a resume reads.
PLANTED = [(0, "mp_rank_00_model_states.pt"), (0, "rng_rank0.pt"), (2, "mp_rank_00_model_states.pt"),
           (2, "zero_pp_rank_0_mp_rank_00_optim_states.pt"), (3, "zero_pp_rank_0_mp_rank_00_model_states.pt"),
           (3, "zero_pp_rank_0_mp_rank_00_optim_states.pt")]
BAD_CONFIGS = {"folder": None, "array": "[1, 2]", "string": '"x"', "not_json": "{'stage': 2}",
               "zero_block": '{"zero_optimization": 3}', "stage": '{"zero_optimization": {"stage": true}}'}


@pytest.fixture(scope="module")
def resumes(references, tmp_path_factory):
    """All resumes in one child process: {case: (run dir, report)} for planted files ("z<stage>-<file>"), plain
    copies ("clean-z<stage>"), bad DeepSpeed configs ("config-<kind>") and an empty `latest` ("empty-latest")."""
    tmp = tmp_path_factory.mktemp("resumes")
    cases, jobs = {}, []

    def add(case: str, run: Path, ds_config: str) -> None:
        cases[case] = run
        jobs.append({"out": str(run), "ds_config": ds_config})

    for zero, name in PLANTED:
        run = tmp / f"z{zero}-{name}"
        plant(killed_after_step_4(references[zero], run) / name, tmp / f"marker-z{zero}-{name}")
        add(f"z{zero}-{name}", run, zero_config(zero))
    for zero, reference in references.items():
        run = tmp / f"clean-z{zero}"
        killed_after_step_4(reference, run)
        add(f"clean-z{zero}", run, zero_config(zero))
    for kind, text in BAD_CONFIGS.items():
        path = tmp / f"{kind}.json"
        if text is None:
            path.mkdir()
        else:
            path.write_text(text)
        add(f"config-{kind}", tmp / f"config-{kind}", str(path))
    run = tmp / "empty-latest"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("")
    add("empty-latest", run, zero_config(0))
    reports = run_jobs(tmp, jobs)
    return {case: (run, reports[str(run)]) for case, run in cases.items()}, tmp


@pytest.mark.parametrize("zero,name", PLANTED, ids=[f"z{z}-{n}" for z, n in PLANTED])
@pytest.mark.slow
def test_a_resume_refuses_a_file_holding_pickled_code(resumes, zero, name):
    results, tmp = resumes
    run, report = results[f"z{zero}-{name}"]
    # No fallback to the step-2 checkpoint: it came from the same untrusted directory.
    assert report.startswith("ValueError: "), report
    assert_refused(report[len("ValueError: "):], run / "checkpoints" / "step_00000004" / name,
                   tmp / f"marker-z{zero}-{name}")


@pytest.mark.parametrize("zero", range(4))
def test_a_plain_resume_still_redoes_the_steps_exactly(resumes, references, zero):
    run, report = resumes[0][f"clean-z{zero}"]
    assert report == "DONE"
    assert losses(run) == losses(references[zero])
    assert (run / "checkpoints" / "latest").read_text() == "step_00000006"


@pytest.mark.parametrize("kind", BAD_CONFIGS)
def test_a_bad_deepspeed_config_is_one_line(resumes, kind):
    report = resumes[0][f"config-{kind}"][1]
    path = resumes[1] / f"{kind}.json"
    expected = {"folder": f"DeepSpeed config {path} is a folder; give a JSON file",
                "array": f"DeepSpeed config {path} must hold a JSON object ({{...}}), not [1, 2]",
                "string": f'DeepSpeed config {path} must hold a JSON object ({{...}}), not "x"',
                "not_json": f"DeepSpeed config {path} is not valid JSON (Expecting property name",
                "zero_block": f"{path}: 'zero_optimization' must be a JSON object, not 3",
                "stage": f"{path}: 'zero_optimization.stage' must be 0, 1, 2 or 3, not true"}[kind]
    assert report.startswith(f"ConfigError: {expected}") and "\n" not in report, report


def test_an_empty_latest_without_checkpoints_is_one_line(resumes):
    run, report = resumes[0]["empty-latest"]
    latest = run / "checkpoints" / "latest"
    assert report == (f"FileNotFoundError: {latest} is empty or garbled ('') and {run / 'checkpoints'} holds no "
                      f"checkpoint; delete {latest} to start over")


def test_a_binary_deepspeed_config_is_one_line(tmp_path):
    from engine.parallel.ds_setup import load_ds_json
    path = tmp_path / "zero.json"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match=r"is not valid JSON \(not UTF-8 text\)$"):
        load_ds_json(str(path))


# ---- the consolidation, the universal converter and weights files -------------------------------------------

@pytest.mark.parametrize("zero,name", [(0, "mp_rank_00_model_states.pt"),
                                       (2, "zero_pp_rank_0_mp_rank_00_optim_states.pt"),
                                       (3, "zero_pp_rank_0_mp_rank_00_model_states.pt")])
def test_the_consolidation_refuses_a_file_holding_pickled_code(references, tmp_path, zero, name):
    from engine.storage.weights import consolidated_state_dict
    folder = killed_after_step_4(references[zero], tmp_path / "run")
    clean = consolidated_state_dict(str(tmp_path / "run"))   # ZeRO 0, 2 and 3 paths still consolidate
    assert set(clean) == {"weight", "bias"} and all(v.dtype == torch.float32 for v in clean.values())
    plant(folder / name, tmp_path / "marker")
    with pytest.raises(UntrustedCheckpoint) as err:
        consolidated_state_dict(str(tmp_path / "run"))
    assert_refused(str(err.value), folder / name, tmp_path / "marker")


def test_the_universal_converter_refuses_a_file_holding_pickled_code(references, tmp_path):
    from engine.storage.checkpoint import _to_universal
    folder = killed_after_step_4(references[2], tmp_path / "run")
    assert _to_universal(str(folder), str(folder) + "_universal") == ""   # runs through engine.storage.safe_load
    assert (folder.parent / "step_00000004_universal" / "zero").is_dir()
    name = "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    plant(folder / name, tmp_path / "marker")
    error = _to_universal(str(folder), str(tmp_path / "converted"))
    assert_refused(error, folder / name, tmp_path / "marker")
    assert not (tmp_path / "converted").exists()


def test_reading_a_weights_file_refuses_pickled_code(references, tmp_path):
    from engine.storage.weights import read_weights_file
    path = tmp_path / "final.pt"
    shutil.copy(references[0] / "final.pt", path)
    sd, _ = read_weights_file(path, "test weights", "test/1")
    assert set(sd) == {"weight", "bias"}
    plant(path, tmp_path / "marker")
    with pytest.raises(UntrustedCheckpoint) as err:
        read_weights_file(path, "test weights", "test/1")
    assert_refused(str(err.value), path, tmp_path / "marker")


@pytest.fixture
def mim_file(tmp_path):
    from pretrain.mim import build_mim_model, save_mim_model
    path = tmp_path / "mim.pt"
    save_mim_model(build_mim_model("beitv2_tiny_test"), path)
    return path


def export_error(capsys, *argv) -> str:
    from pretrain.mim.export import export
    return cli_error(capsys, {"export": export}, "export", *map(str, argv))


def test_exporting_a_mim_file_holding_pickled_code_is_refused(capsys, mim_file, tmp_path):
    plant(mim_file, tmp_path / "marker")
    err = export_error(capsys, mim_file, tmp_path / "out.safetensors")
    assert_refused(err[len("error: "):], mim_file, tmp_path / "marker")
    assert not (tmp_path / "out.safetensors").exists()


# ---- an export that cannot be written -----------------------------------------------------------------------

def test_an_export_under_a_file_is_one_line(capsys, mim_file, tmp_path):
    out = tmp_path / "a_file" / "out.safetensors"
    (tmp_path / "a_file").write_text("")
    err = export_error(capsys, mim_file, out)
    assert err == f"error: cannot write {out} (File exists); pick a writable location"


@pytest.mark.parametrize("failure", ["safetensors", "oserror"])
def test_an_export_to_a_full_disk_is_one_line(capsys, monkeypatch, mim_file, tmp_path, failure):
    # What safetensors raises when the disk fills (its writer is Rust), and a plain OSError.
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        if failure == "safetensors":
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("pretrain.mim.export.save_file", full)
    out = tmp_path / "out.safetensors"
    err = export_error(capsys, mim_file, out)
    assert err == f"error: cannot write {out} (No space left on device); pick a writable location"
    assert os.listdir(tmp_path) == ["mim.pt"]   # no temporary left behind


def test_an_export_to_a_real_full_or_read_only_disk_is_one_line(capsys, mim_file, small_tmpfs):
    out = small_tmpfs / "out.safetensors"   # the tiny model's export is ~0.4 MB
    err = export_error(capsys, mim_file, out)
    assert err == f"error: cannot write {out} (No space left on device); pick a writable location"
    assert os.listdir(small_tmpfs) == []
    subprocess.run(["mount", "-o", "remount,ro", str(small_tmpfs)], check=True)
    err = export_error(capsys, mim_file, out)
    assert err == f"error: cannot write {out} (Read-only file system); pick a writable location"


def test_a_torch_save_to_a_full_disk_is_one_line(small_tmpfs):
    """torch.save's C++ writer reports a full disk as 'unexpected pos 704 vs 598' (a RuntimeError): the final weights
    and checkpoint files of a run say what happened instead."""
    from engine.storage.files import OutputPathError, write_atomically
    path = small_tmpfs / "classifier.pt"
    message = ""
    try:
        write_atomically(path, lambda tmp: torch.save({"w": torch.zeros(100_000)}, tmp))
    except OutputPathError as e:
        # Not the exception itself: its frames hold torch's writer, whose open file would keep the mount busy.
        message = str(e)
    gc.collect()
    assert message == f"cannot write {path} (No space left on device); pick a writable location"
    assert os.listdir(small_tmpfs) == []
