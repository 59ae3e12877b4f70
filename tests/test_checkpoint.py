"""Resume bookkeeping: the `latest` pointer, pruning, RNG state round trip, metric rows, atomic writes, and the
errors of a checkpoint from another number of ranks (one test builds a one-rank engine, in a child process)."""
import json
import os
import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from engine.storage.checkpoint import CheckpointManager, rng_state, set_rng_state
from engine.storage.files import OutputPathError, write_atomically, write_text_atomically
from tests.conftest import ROOT


def test_rng_state_round_trip_is_exact_and_loads_weights_only(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = rng_state()
    torch.save(state, tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_latest_pointing_to_a_missing_folder_is_a_clear_error(tmp_path):
    manager = CheckpointManager(str(tmp_path), keep_last=2)
    assert manager.latest_tag() is None
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest").write_text("step_00000010")
    with pytest.raises(FileNotFoundError, match="names checkpoint 'step_00000010', which is missing"):
        manager.latest_tag()


def test_prune_keeps_the_last_k_and_drops_leftovers_of_a_killed_save(tmp_path):
    manager = CheckpointManager(str(tmp_path), keep_last=2)
    for step in (2, 4, 6, 8):
        (tmp_path / "checkpoints" / f"step_{step:08d}").mkdir(parents=True)
    manager._prune(keep="step_00000006")   # step 8 was being written when the run died
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000004", "step_00000006"]


def test_a_failed_write_leaves_the_old_file_whole_and_no_temporary_behind(tmp_path):
    path = tmp_path / "sub" / "weights.pt"
    write_text_atomically(path, "old")

    def half_write(tmp):
        with open(tmp, "w") as f:
            f.write("ne")
        raise OSError("disk full")

    with pytest.raises(OutputPathError, match=f"cannot write {path} \\(disk full\\); pick a writable location"):
        write_atomically(path, half_write)
    assert path.read_text() == "old"
    assert [p.name for p in path.parent.iterdir()] == ["weights.pt"]
    # A folder that cannot be made (a file is in the way): the same one-line error the CLIs print.
    with pytest.raises(OutputPathError, match="cannot write .*weights.pt/x.pt \\(File exists\\)"):
        write_text_atomically(path / "x.pt", "new")


def test_a_resumed_run_drops_later_and_torn_metric_rows(tmp_path):
    # Rows after the checkpoint are redone by the resumed run; a row torn by a kill mid-write must not stop it.
    from engine.reporting.metrics import RunLogger
    rows = [json.dumps({"step": s, "split": "train", "loss": 1.0 / s}) + "\n" for s in range(1, 5)]
    (tmp_path / "metrics.jsonl").write_text("".join(rows) + '{"step": 5, "split": "tr')
    RunLogger(str(tmp_path), total_steps=8, start_step=2, show_progress=False)
    assert (tmp_path / "metrics.jsonl").read_text() == "".join(rows[:2])


def fake_checkpoint(root, ranks: int, sharded: bool) -> CheckpointManager:
    """The file layout a run of `ranks` ranks leaves (empty files: only names are read here)."""
    folder = root / "checkpoints" / "step_00000002"
    folder.mkdir(parents=True)
    (root / "checkpoints" / "latest").write_text("step_00000002")
    for r in range(ranks):
        (folder / f"rng_rank{r}.pt").touch()
        if sharded:
            (folder / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt").touch()
    return CheckpointManager(str(root))


def test_which_checkpoints_need_a_re_split_and_a_failed_one_is_one_line(tmp_path):
    # Same number of ranks, or nothing sharded: loaded as it is. (The re-split itself: test_engine_fit.)
    assert not fake_checkpoint(tmp_path / "same", 1, sharded=True).needs_resplit(1)
    assert not fake_checkpoint(tmp_path / "whole", 2, sharded=False).needs_resplit(1)
    # Sharded over 2 ranks, resumed on 1: DeepSpeed's converter runs, and fails on these empty files.
    manager = fake_checkpoint(tmp_path / "bad", 2, sharded=True)
    with pytest.raises(ValueError) as err:
        manager.needs_resplit(1)
    message = str(err.value)
    assert "\n" not in message and message.startswith(
        f"checkpoint {manager.dir}/step_00000002 was written by 2 ranks and this run has 1; re-splitting it failed (")
    assert sorted(os.listdir(manager.dir)) == ["latest", "step_00000002"]   # nothing half-converted left



def test_a_checkpoint_that_does_not_load_on_another_number_of_ranks_is_one_line(tmp_path):
    # Not sharded, so no re-split; DeepSpeed's own load then fails (here on empty files): one line naming both
    # counts. In a child process: the engine's process group must not outlive the test in pytest's process.
    fake_checkpoint(tmp_path, 2, sharded=False)
    script = textwrap.dedent('''
        import sys, torch
        from engine.config.schema import OptimConfig, RunConfig
        from engine.parallel import distributed as dist_utils
        from engine.parallel.ds_setup import initialize, param_groups
        from engine.storage.checkpoint import CheckpointManager
        dist_utils.init()
        model = torch.nn.Linear(2, 1)
        run = RunConfig(output_dir=sys.argv[1], ds_config="ds_configs/zero0.json", micro_batch_size=1)
        engine, _ = initialize(model, param_groups(model), run, OptimConfig(), world_size=1)
        manager = CheckpointManager(sys.argv[1])
        assert not manager.needs_resplit(1)
        try:
            manager.load(engine)
        except ValueError as e:
            print("ERROR", e)
    ''')
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 0, proc.stderr[-2000:]
    message = proc.stdout.split("ERROR ")[1].rstrip("\n")
    assert "\n" not in message and message.startswith(
        f"checkpoint {tmp_path}/checkpoints/step_00000002 was written by 2 ranks and does not load on 1 (")
    assert message.endswith("resume with 2 ranks, or start over with --run.resume=false")
