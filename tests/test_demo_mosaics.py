"""scripts/mosaics.sh, the demo's segmentation data cache: drawn and converted once, reused by a rerun, drawn again
(and the segmenters that learnt from the old mosaics removed) when the demo's mosaic arguments change, and only the
missing part redone after a kill. Real bash, the real data_tools commands on a few Fashion-MNIST mosaics."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("fashion_mnist_available")]   # 13 data_tools runs: 40 s
SMALL = "--train=4 --val=2 --height=32 --width_range=32,40 --palette=grey"
OTHER = "--train=3 --val=2 --height=32 --width_range=32,40 --palette=grey"


def _mosaics(tmp_path, args: str) -> list[str]:
    """Run the demo's `mosaics` once with MOSAIC_ARGS=args; the names of the steps it ran."""
    calls = tmp_path / "calls"
    calls.write_text("")
    script = f"""set -euo pipefail
cd {ROOT}
PY={sys.executable}; M={tmp_path}/mosaics; T={tmp_path}/transfer; MOSAIC_ARGS='{args}'
logged() {{ echo "$1" >> {calls}; local name=$1; shift; "$@" > {tmp_path}/$name.log 2>&1; }}
source scripts/mosaics.sh
mosaics"""
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.returncode == 0, proc.stderr
    return calls.read_text().split()


def _count(folder) -> int:
    return len(os.listdir(folder))


def test_mosaics_are_drawn_once_and_redrawn_when_their_arguments_change(tmp_path):
    m, segmenter = tmp_path / "mosaics", tmp_path / "transfer" / "segment_pretrained"
    assert _mosaics(tmp_path, SMALL) == ["mosaics", "convert_training", "convert_validation"]
    assert (m / "made_with").read_text().strip() == SMALL
    assert _count(m / "ade" / "images" / "training") == 4
    stamps = {name: os.stat(m / name).st_mtime_ns for name in ("training.beton", "validation.beton")}

    segmenter.mkdir(parents=True)   # a segmentation run that learnt from these mosaics
    assert _mosaics(tmp_path, SMALL) == []   # a rerun reuses everything
    assert segmenter.is_dir()
    assert {name: os.stat(m / name).st_mtime_ns for name in stamps} == stamps

    assert _mosaics(tmp_path, OTHER) == ["mosaics", "convert_training", "convert_validation"]
    assert not segmenter.exists(), "a segmenter trained on the old mosaics survived their replacement"
    assert (m / "made_with").read_text().strip() == OTHER
    assert _count(m / "ade" / "images" / "training") == 3


def test_a_kill_before_conversion_redoes_only_the_missing_file_and_unknown_mosaics_are_redrawn(tmp_path):
    m = tmp_path / "mosaics"
    _mosaics(tmp_path, SMALL)
    (m / "validation.beton").unlink()   # as a kill before the last conversion leaves it
    assert _mosaics(tmp_path, SMALL) == ["convert_validation"]

    (m / "made_with").unlink()   # mosaics of unknown arguments (a demo older than the record)
    segmenter = tmp_path / "transfer" / "segment_random"
    segmenter.mkdir(parents=True)
    assert _mosaics(tmp_path, SMALL) == ["mosaics", "convert_training", "convert_validation"]
    assert not segmenter.exists()
