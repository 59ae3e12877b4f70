"""The package as `pip install .` (not editable) lays it out: everything a run needs travels inside it."""
import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A wheel install of a copy of the source tree into a folder of its own (the venv keeps the dependencies)."""
    src, target = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("site")
    shutil.copytree(ROOT, src, dirs_exist_ok=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "runs", "data", "build", "*.egg-info", "__pycache__", ".pytest_cache"))
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                           "--target", str(target), str(src)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return target


def test_the_packaged_ds_configs_are_found_from_any_folder(installed, tmp_path):
    packaged = set(os.listdir(installed / "ds_configs"))
    assert {"__init__.py", "zero0.json", "zero1.json", "zero2.json", "zero3.json"} <= packaged
    assert not (installed / "tests").exists()
    work = tmp_path / "elsewhere"   # nothing of the repository or its workspace beside it
    work.mkdir()
    env = dict(os.environ, PYTHONPATH=str(installed), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "pretrain.tokenizer", "train", "vqkd_tiny_test",
                           "--data.source=synthetic", "--schedule.total_steps=2",
                           "--run.ds_config=ds_configs/zero0.json", "--run.output_dir=run"], cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (work / "run" / "tokenizer.pt").exists()
    import engine
    probe = subprocess.run([sys.executable, "-c", "import engine, ds_configs; print(engine.__file__, "
                            "ds_configs.resolve_path('ds_configs/zero2.json'))"], cwd=work, env=env,
                           capture_output=True, text=True, timeout=120)
    used_engine, used_config = probe.stdout.split()
    assert used_engine.startswith(str(installed)) and used_engine != engine.__file__
    assert used_config == str(installed / "ds_configs" / "zero2.json")


def test_nothing_in_the_repository_points_outside_it():
    """A clone stands alone: no test, script, config or page reads or links the workspace it was built in."""
    listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if listed.returncode == 0:
        files = listed.stdout.split()
    else:   # not a git checkout (an unpacked archive): every file but the environment and the runs
        files = [os.path.relpath(os.path.join(d, f), ROOT) for d, dirs, fs in os.walk(ROOT) for f in fs
                 if not os.path.relpath(d, ROOT).split(os.sep)[0] in (".venv", ".git", "runs", "data")]
    # Spelled in pieces, so that this file is checked too and does not name the paths it looks for.
    outside = (os.path.join("..", "shared"), os.path.join("/work", "shared"), os.path.join("/work", ".library"))
    hits = []
    for name in files:
        path = os.path.join(ROOT, name)
        if not os.path.isfile(path):
            continue
        with open(path, "rb") as f:
            text = f.read().decode(errors="ignore")
        hits += [f"{name}: {o}" for o in outside if o in text]
    assert not hits, hits
