"""The package as `pip install .` (not editable) lays it out: everything a run needs travels inside it."""
import os
import re
import shutil
import subprocess
import sys
import tempfile

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
                           "--run.ds_config=ds_configs/zero0.json", "--run.output_dir=run"],
                          cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (work / "run" / "tokenizer.pt").exists()
    import engine
    probe = subprocess.run([sys.executable, "-c", "import engine, ds_configs; print(engine.__file__, "
                            "ds_configs.resolve_path('ds_configs/zero2.json'))"], cwd=work, env=env,
                           capture_output=True, text=True, timeout=120)
    used_engine, used_config = probe.stdout.split()
    assert used_engine.startswith(str(installed)) and used_engine != engine.__file__
    assert used_config == str(installed / "ds_configs" / "zero2.json")


RELATIVE = re.compile(r"(?:\.\./)+[\w.-]+")   # a relative path that climbs at least one folder


def references_outside(root: str, files: list[str]) -> list[str]:
    """`file: path` for each path in `files` (relative to `root`) that leaves the checkout: a relative path that
    climbs out of it from the file's folder, or an absolute path into a folder beside it. The folders beside the
    checkout are read from the disk, so this file names none of them. Beside a checkout in the system's temporary
    folder or at the top of the file system live ordinary system folders, which the scripts may name (their scratch
    files in /tmp, Debian's data sets); only the relative check applies there."""
    root = os.path.abspath(root)
    parent = os.path.dirname(root)
    beside = [] if parent in ("/", tempfile.gettempdir()) else [
        os.path.join(parent, n) for n in os.listdir(parent) if os.path.join(parent, n) != root]
    hits = []
    for name in files:
        path = os.path.join(root, name)
        if not os.path.isfile(path):
            continue
        with open(path, "rb") as f:
            text = f.read().decode(errors="ignore")
        for m in RELATIVE.finditer(text):
            target = os.path.normpath(os.path.join(os.path.dirname(path), m.group()))
            if not target.startswith(root + os.sep):
                hits.append(f"{name}: {m.group()}")
        hits += [f"{name}: {b}" for b in beside if re.search(re.escape(b) + r"(?![\w.-])", text)]
    return hits


def test_nothing_in_the_repository_points_outside_it():
    """A clone stands alone: no test, script, config or page reads or links the workspace it was built in."""
    listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if listed.returncode == 0:
        files = listed.stdout.split()
    else:   # not a git checkout (an unpacked archive): every file but the environment and the runs
        files = [os.path.relpath(os.path.join(d, f), ROOT) for d, dirs, fs in os.walk(ROOT) for f in fs
                 if os.path.relpath(d, ROOT).split(os.sep)[0] not in (".venv", ".git", "runs", "data")]
    hits = references_outside(ROOT, files)
    assert not hits, hits


def test_the_outside_check_finds_relative_and_absolute_paths_out_of_a_checkout(tmp_path):
    work = tmp_path / "work"
    (work / "repo" / "docs").mkdir(parents=True)
    (work / "notes").mkdir()
    up_two = os.path.join("..", "..", "notes")   # joined here, or this file would hold a path out of its checkout
    files = {"docs/inside.md": "see [the readme](../README.md) and ../docs/inside.md",
             "docs/up.md": f"see {up_two}/x.md",
             "run.py": f"open('{work / 'notes' / 'a.txt'}')",
             "ok.py": f"open('{work / 'notesbook'}')  # a name that only starts like a folder beside it"}
    for name, text in files.items():
        (work / "repo" / name).write_text(text)
    assert references_outside(str(work / "repo"), list(files)) == [
        f"docs/up.md: {up_two}", f"run.py: {work / 'notes'}"]
