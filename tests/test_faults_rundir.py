"""One run per output directory, and resumes that cannot silently change what was trained (engine.storage.run_dir).

The engine's loop runs in this process on one rank (a linear model, ZeRO-0, 2 steps with a checkpoint at step 2);
one test runs the lock's collective on 2 gloo ranks, with a stand-in for `fit`.
"""
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from engine.config.schema import ConfigError, StageConfig
from engine.loop.trainer import fit
from engine.parallel import distributed as dist_utils
from engine.parallel.ds_setup import param_groups
from engine.storage.run_dir import HISTORY, LOCK, RunLock, claimed_output_dir, claims_output_dir
from tests.conftest import ROOT
from tests.dist_util import StepNumbers as Numbers, run_ranks




def train(out, **changes) -> StageConfig:
    """2 steps (resumed: none left to take) of the tiny model in `out`; `changes` are dotted config keys."""
    cfg = StageConfig()
    cfg.run.output_dir, cfg.run.ds_config, cfg.run.micro_batch_size = str(out), "ds_configs/zero0.json", 8
    cfg.run.log_interval, cfg.run.save_interval, cfg.run.progress_bar = 1, 2, False
    cfg.schedule.total_steps = 2
    for key, value in changes.items():
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, value)
    dist_utils.init()
    torch.manual_seed(cfg.run.seed)
    model = torch.nn.Linear(4, 1)
    fit(cfg, cfg.run, cfg.optim, cfg.schedule, model, param_groups(model), Numbers(),
        lambda engine, x: (engine(x).pow(2).mean(), {}))
    return cfg


def saved(out) -> dict:
    return json.loads((out / "config.json").read_text())


def history(out) -> list[dict]:
    return [json.loads(line) for line in (out / HISTORY).read_text().splitlines()]


@pytest.fixture
def trained(tmp_path):
    out = tmp_path / "run"
    train(out)
    assert (out / "checkpoints" / "latest").read_text() == "step_00000002"
    return out


def test_a_second_run_on_a_held_directory_is_a_one_line_error_naming_the_holder(tmp_path):
    out = tmp_path / "run"
    holder = RunLock(str(out))   # another open of the file: flock conflicts as with another process
    holder.acquire()
    try:
        with pytest.raises(ConfigError) as err:
            train(out)
    finally:
        holder.release()
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"output directory {out} is in use by another run (pid "
                                                      f"{os.getpid()} on ")
    assert message.endswith("; wait for it to end, or use another --run.output_dir")
    assert not (out / "metrics.jsonl").exists() and not (out / "config.json").exists()
    train(out)   # released: the directory is free again, and the run's own lock went with its end
    assert (out / LOCK).read_text() == ""


HOLD = textwrap.dedent('''
    import sys, time
    from engine.storage.run_dir import RunLock
    RunLock(sys.argv[1]).acquire()
    print("HELD", flush=True)
    time.sleep(120)
''')


def test_the_lock_of_a_killed_run_does_not_block_the_next(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=ROOT))
    try:
        assert proc.stdout.readline().strip() == "HELD"
        assert json.loads((out / LOCK).read_text())["pid"] == proc.pid
        with pytest.raises(ConfigError) as err:
            train(out)
        assert "\n" not in str(err.value) and f"in use by another run (pid {proc.pid} on " in str(err.value)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    assert json.loads((out / LOCK).read_text())["pid"] == proc.pid   # the file stays; its flock went with the pid
    train(out)
    assert (out / "checkpoints" / "latest").read_text() == "step_00000002"


def test_a_resume_with_another_seed_is_an_error_naming_old_and_new(trained):
    before = (trained / "config.json").read_text()
    with pytest.raises(ConfigError) as err:
        train(trained, **{"run.seed": 1, "optim.lr": 1e-3, "data.limit": 5, "optim.min_lr": 1e-6})
    message = str(err.value)
    assert "\n" not in message and message.startswith(
        f"resuming {trained} with settings that change what is trained: data.limit 0 -> 5, optim.lr 0.0002 -> "
        f"0.001, optim.min_lr 1e-05 -> 1e-06 (and 1 more) (saved in {trained}/config.json); ")
    assert message.endswith("pass --run.allow_config_change=true if the change is meant, or use another "
                            "--run.output_dir")
    with pytest.raises(ConfigError, match=r"run\.seed 0 -> 1 \(saved in"):
        train(trained, **{"run.seed": 1})
    assert (trained / "config.json").read_text() == before and not (trained / HISTORY).exists()


def test_an_allowed_change_resumes_and_keeps_the_old_config_in_the_history(trained, capsys):
    train(trained, **{"run.seed": 1, "run.allow_config_change": True})
    assert "with changed settings (allowed): run.seed 0 -> 1;" in capsys.readouterr().err
    assert saved(trained)["run"]["seed"] == 1
    [entry] = history(trained)
    assert entry["resumed_at_step"] == 2 and entry["config"]["run"]["seed"] == 0
    assert entry["replaced_utc"].endswith("Z")
    train(trained, **{"run.seed": 2, "run.allow_config_change": True})   # history is appended, oldest first
    assert [e["config"]["run"]["seed"] for e in history(trained)] == [0, 1]


def test_a_resume_changing_only_harmless_keys_needs_no_flag(trained):
    train(trained, **{"run.log_interval": 2, "run.keep_last": 5, "run.output_dir": f"{trained}/",
                      "data.eval_images": 10})
    assert saved(trained)["run"]["log_interval"] == 2
    assert history(trained)[0]["config"]["run"]["log_interval"] == 1
    train(trained, **{"run.log_interval": 2, "run.keep_last": 5, "run.output_dir": f"{trained}/",
                      "data.eval_images": 10})   # the same again: nothing new to keep
    assert len(history(trained)) == 1


def test_a_run_that_starts_over_keeps_the_old_config_and_a_new_one_is_not_checked(trained, tmp_path):
    train(trained, **{"run.seed": 3, "run.resume": False})
    assert saved(trained)["run"]["seed"] == 3
    assert [(e["resumed_at_step"], e["config"]["run"]["seed"]) for e in history(trained)] == [(0, 0)]
    train(tmp_path / "fresh", **{"run.seed": 4})   # no checkpoint: nothing to compare with
    assert not (tmp_path / "fresh" / HISTORY).exists()


def test_a_stage_holds_its_folder_around_fit_and_the_files_it_writes_after(tmp_path):
    """Classification and segmentation write eval.json (and EMA weights) after `fit`: inside their claim, where the
    nested claim of `fit` is free and a second run still cannot start."""
    @claims_output_dir
    def fit(cfg, run):
        return "trained"
    cfg = StageConfig()
    cfg.run.output_dir = str(tmp_path / "run")
    with claimed_output_dir(cfg, cfg.run):
        assert fit(cfg, cfg.run) == "trained"
        with pytest.raises(ConfigError, match="is in use by another run"):   # after fit, before the claim ends
            RunLock(cfg.run.output_dir).acquire()
    after = RunLock(cfg.run.output_dir)
    after.acquire()
    after.release()


def _fit_on_two_ranks(rank, world, out):
    @claims_output_dir
    def stand_in(cfg, run):
        raise AssertionError("must not start")
    cfg = StageConfig()
    cfg.run.output_dir = out
    try:
        stand_in(cfg, cfg.run)
    except ConfigError as e:
        assert "is in use by another run" in str(e), e
    else:
        raise AssertionError(f"rank {rank} started")


def test_every_rank_learns_that_the_directory_is_held(tmp_path):
    out = str(tmp_path / "run")
    holder = RunLock(out)
    holder.acquire()
    try:
        run_ranks(_fit_on_two_ranks, 2, out)   # rank 1 would hang (or start) without the broadcast
    finally:
        holder.release()


def test_each_stage_names_its_own_keys_a_resume_may_change(tmp_path):
    """The engine lists only run.* / data.* keys; a stage's kernel or evaluation view is the stage's to declare."""
    import json

    from engine.config.schema import to_dict
    from engine.storage.run_dir import LATEST, check_resume
    from finetune.classify.config import ClassifyConfig
    from pretrain.mim.config import MIMConfig
    for cls, harmless, other in ((MIMConfig, {"model": {"attention": "explicit"}}, {"model": {"drop_path": 0.2}}),
                                 (ClassifyConfig, {"augment": {"eval_crop": 0.5}}, {"augment": {"mixup": 0.5}})):
        out = tmp_path / cls.__name__
        (out / "checkpoints").mkdir(parents=True)
        (out / "checkpoints" / LATEST).write_text("step_00000002")
        cfg = cls()
        cfg.run.output_dir = str(out)
        (out / "config.json").write_text(json.dumps(to_dict(cfg)))
        (section, values), = harmless.items()
        for key, value in values.items():
            setattr(getattr(cfg, section), key, value)
        check_resume(cfg, cfg.run)   # no error: the stage declared it
        (section, values), = other.items()
        for key, value in values.items():
            setattr(getattr(cfg, section), key, value)
        with pytest.raises(ConfigError, match=f"{section}.{key}"):
            check_resume(cfg, cfg.run)


def test_a_resume_on_a_beton_rewritten_in_place_is_an_error_naming_the_file(tmp_path, capsys):
    """Same path, other content: the settings match, so only the record of what the file held can tell."""
    from engine.storage.input_files import RECORD
    beton = tmp_path / "train.beton"
    beton.write_bytes(b"first conversion" * 100)
    out = tmp_path / "run"
    data = {"data.source": "beton", "data.train_path": str(beton)}
    train(out, **data)
    record = json.loads((out / RECORD).read_text())
    assert record["data.train_path"]["path"] == str(beton) and record["data.train_path"]["size"] == 1600
    train(out, **data)   # unchanged: resumes
    beton.write_bytes(b"other conversion" * 100)   # the same size, another sha256
    with pytest.raises(ConfigError) as err:
        train(out, **data)
    message = str(err.value)
    assert "\n" not in message and message.startswith(
        f"resuming {out} on input files whose content changed since the run began: data.train_path ({beton}): "
        f"sha256 ")
    assert message.endswith(f"(recorded in {out}/{RECORD}); put back the files it began with, pass "
                            f"--run.allow_config_change=true if the change is meant, or use another --run.output_dir")
    beton.write_bytes(b"shorter")
    with pytest.raises(ConfigError, match=r"size 1600 -> 7 bytes"):
        train(out, **data)
    beton.unlink()
    with pytest.raises(ConfigError, match=r"\(.*train.beton\): it is gone"):
        train(out, **data)
    beton.write_bytes(b"meant")
    train(out, **data, **{"run.allow_config_change": True})
    assert "on changed input files (allowed): data.train_path" in capsys.readouterr().err
    assert json.loads((out / RECORD).read_text())["data.train_path"]["size"] == 5   # the new content is the record
    train(out, **data)


def test_input_files_are_only_those_read_at_every_step(tmp_path):
    """MIM's tokenizer and the tokenizer stage's teacher are; an init checkpoint (replaced by the resumed weights),
    held-out data and the built-in data are not; a run made before the record existed resumes unchecked."""
    from engine.config.schema import to_dict
    from engine.storage.input_files import RECORD, read_while_training, record_input_files
    from engine.storage.run_dir import LATEST, check_resume
    from finetune.classify.config import ClassifyConfig
    from pretrain.mim.config import MIMConfig
    from pretrain.tokenizer.config import TokenizerConfig
    mim, tok, ft = MIMConfig(), TokenizerConfig(), ClassifyConfig()
    mim.tokenizer, tok.teacher.weights, ft.init = "t.pt", "teacher.pth", "mim.pt"
    for cfg in (mim, tok, ft):
        cfg.data.train_path, cfg.data.eval_path = "train.beton", "val.beton"   # source stays fashion_mnist
    assert read_while_training(mim) == {"tokenizer": "t.pt"}
    assert read_while_training(tok) == {"teacher.weights": "teacher.pth"}
    assert read_while_training(ft) == {}
    ft.data.source = "beton"
    assert read_while_training(ft) == {"data.train_path": "train.beton"}

    out = tmp_path / "mim"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / LATEST).write_text("step_00000002")
    tokenizer = tmp_path / "tokenizer.pt"
    tokenizer.write_bytes(b"codebook 1")
    mim.tokenizer, mim.run.output_dir = str(tokenizer), str(out)
    (out / "config.json").write_text(json.dumps(to_dict(mim)))
    tokenizer.write_bytes(b"codebook 2")
    check_resume(mim, mim.run)   # no record yet (a run from before it existed): resumes unchecked
    record_input_files(mim, str(out))
    check_resume(mim, mim.run)
    tokenizer.write_bytes(b"codebook 3")   # a tokenizer retrained into the same file
    with pytest.raises(ConfigError, match=rf"tokenizer \({tokenizer}\): sha256 [0-9a-f]{{12}}\.\.\. -> "):
        check_resume(mim, mim.run)
    (out / RECORD).write_text("{not json")
    with pytest.raises(ConfigError, match=f"{RECORD} is unreadable"):
        check_resume(mim, mim.run)


def test_a_large_input_file_is_known_by_its_ends_and_its_conversion_record(tmp_path, monkeypatch):
    """Hashing a 150 GB .beton at every start would cost minutes: above FULL_HASH_MAX the ends (header, index) and
    the sha256 data_tools.convert recorded stand for the whole."""
    from engine.storage import input_files
    monkeypatch.setattr(input_files, "FULL_HASH_MAX", 64)
    monkeypatch.setattr(input_files, "SAMPLE", 16)
    beton = tmp_path / "big.beton"
    beton.write_bytes(bytes(range(200)))
    (tmp_path / "big.beton.json").write_text(json.dumps({"sha256": "a" * 64}))
    first = input_files.fingerprint(str(beton))
    assert set(first) == {"size", "ends_sha256", "recorded_sha256"} and first["recorded_sha256"] == "a" * 64
    body = bytearray(range(200))
    body[-1] = 0   # the index at the end
    beton.write_bytes(bytes(body))
    assert input_files._why(first, input_files.fingerprint(str(beton))).startswith("ends_sha256 ")
    beton.write_bytes(bytes(range(200)))
    (tmp_path / "big.beton.json").write_text(json.dumps({"sha256": "b" * 64}))   # re-converted: a new record
    now = input_files.fingerprint(str(beton))
    assert now["ends_sha256"] == first["ends_sha256"]
    assert input_files._why(first, now) == f"recorded_sha256 {'a' * 12}... -> {'b' * 12}..."
    gone = input_files.fingerprint(str(tmp_path / "gone.beton"))
    assert input_files._why(now, gone) == "it is gone"
    assert input_files._why(gone, gone) == ""   # missing then and now: the stage names it when it opens it

    def denied(*_):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(input_files, "_hash_ends", denied)   # (chmod 0 would not stop root, who runs CI)
    # unreadable: not a change and not an OSError (which the lock's handler would misname); the stage names the file
    assert input_files.fingerprint(str(beton)) == {"unreadable": True}
    assert input_files._why(now, {"unreadable": True}) == ""
