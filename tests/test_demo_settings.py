"""scripts/demo.sh checks its settings (DEMO_SEED, DEMO_NPROC, DEMO_CORES) before any work: a bad one is one line and
exit 2 with nothing written, instead of a bash error or a failure minutes in, after the tokenizer's training."""
from __future__ import annotations

import os
import signal
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _demo(tmp_path, **settings) -> subprocess.Popen:
    env = {**os.environ, "DEMO_OUT": str(tmp_path / "demo"), **settings}
    return subprocess.Popen(["bash", "scripts/demo.sh"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


@pytest.mark.parametrize("name,value,low", [("DEMO_SEED", "abc", 0), ("DEMO_SEED", "-1", 0), ("DEMO_NPROC", "two", 1),
                                            ("DEMO_NPROC", "0", 1), ("DEMO_CORES", "1.5", 1)])
def test_a_bad_setting_is_one_line_before_any_work(tmp_path, name, value, low):
    proc = _demo(tmp_path, **{name: value})
    try:
        out, err = proc.communicate(timeout=30)
    finally:   # without the check the demo would go on training: stop it whatever the outcome
        _stop(proc)
    assert proc.returncode == 2 and out == ""
    assert err == f"demo: {name} must be a whole number >= {low}, got '{value}'\n"
    assert not (tmp_path / "demo").exists()


def test_good_settings_pass_the_check(tmp_path):
    """Leading zeros are a whole number too; the demo starts its first stage (stopped there: no training here)."""
    proc = _demo(tmp_path, DEMO_SEED="01", DEMO_NPROC="1", DEMO_CORES="1")
    try:
        assert proc.stdout.readline() == "== 1/5 VQ-KD tokenizer: training (1 process(es), 1 cores) ==\n"
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:   # it has ended, with its whole group
        pass
    proc.wait(timeout=30)
