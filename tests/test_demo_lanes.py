"""scripts/lanes.sh, the demo's two side-by-side lanes: the core split, failure, the sequential fallback, and that a
stop reaches the lanes' processes (and nothing else). Real bash and real child processes; no training."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _script(body: str, cores: int, nproc: int = 1) -> str:
    return (f"set -euo pipefail\ncd {ROOT}\nsource scripts/lanes.sh\nCORES={cores}\nNPROC={nproc}\n"
            f"{body}\necho done\n")


def _run(body: str, cores: int, nproc: int = 1) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", _script(body, cores, nproc)], capture_output=True, text=True, timeout=60,
                          start_new_session=True)


# Each lane writes its core count and its start/end times; a 1 s sleep in each lets the test see them overlap.
TIMED = """
a() { echo "a $CORES $(date +%s.%N)" >> "$LOG"; sleep 1; echo "a_end $(date +%s.%N)" >> "$LOG"; }
b() { echo "b $CORES $(date +%s.%N)" >> "$LOG"; sleep 1; echo "b_end $(date +%s.%N)" >> "$LOG"; }
lanes a b
"""


def _times(log) -> dict:
    rows = [line.split() for line in log.read_text().splitlines()]
    return {r[0]: (r[1:]) for r in rows}


@pytest.mark.parametrize("cores,split", [(2, ("1", "1")), (5, ("2", "3"))])
def test_two_lanes_run_side_by_side_on_half_the_cores_each(tmp_path, cores, split):
    log = tmp_path / "log"
    proc = _run(f"LOG={log}\n{TIMED}", cores)
    assert proc.returncode == 0 and proc.stdout.strip() == "done", proc.stderr
    t = _times(log)
    assert (t["a"][0], t["b"][0]) == split
    # side by side: each started before the other ended
    assert float(t["a"][1]) < float(t["b_end"][0]) and float(t["b"][1]) < float(t["a_end"][0])


@pytest.mark.parametrize("cores,nproc", [(1, 1), (4, 2)])
def test_one_core_or_several_ranks_run_the_lanes_one_after_the_other(tmp_path, cores, nproc):
    log = tmp_path / "log"
    proc = _run(f"LOG={log}\n{TIMED}", cores, nproc)
    assert proc.returncode == 0, proc.stderr
    t = _times(log)
    assert t["a"][0] == t["b"][0] == str(cores)   # each keeps every core
    assert float(t["a_end"][0]) <= float(t["b"][1])


def test_a_failed_lane_fails_the_script_after_the_other_lane_ends(tmp_path):
    log = tmp_path / "log"
    proc = _run(f"""LOG={log}
bad() {{ false; }}
slow() {{ sleep 1; echo slow_end >> "$LOG"; }}
lanes bad slow""", 2)
    assert proc.returncode == 1 and "done" not in proc.stdout and "a step failed" in proc.stdout
    assert log.read_text() == "slow_end\n"   # the other lane was waited for, not cut off


def test_term_stops_both_lanes_processes(tmp_path):
    """Each lane starts a long-lived Python child (as the demo's jobs are); TERM to the script must end them both."""
    pids = tmp_path / "pids"
    sleeper = f"{sys.executable} -c 'import os, time; open(\"{pids}\", \"a\").write(f\"{{os.getpid()}}\\n\"); " \
              f"time.sleep(120)'"
    script = _script(f"a() {{ {sleeper}; }}\nb() {{ {sleeper}; }}\nlanes a b", 2)
    proc = subprocess.Popen(["bash", "-c", script], start_new_session=True, stdout=subprocess.PIPE, text=True)
    deadline = time.time() + 30
    while (not pids.exists() or len(pids.read_text().split()) < 2) and time.time() < deadline:
        time.sleep(0.1)
    children = [int(p) for p in pids.read_text().split()]
    assert len(children) == 2
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 130 and "done" not in proc.stdout.read()
    deadline = time.time() + 10
    alive = children
    while alive and time.time() < deadline:
        alive = [p for p in children if _alive(p)]
        time.sleep(0.1)
    assert not alive, f"lane processes {alive} outlived the stop"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:   # a zombie has ended
        return f.read().split(")")[-1].split()[0] != "Z"
