"""data_tools imports FFCV with a plain dict for its image-mode table instead of a numba typed Dict (whose first use
compiles numba's dict implementation in every process); numba's own Dict is untouched afterwards."""
import subprocess
import sys

from tests.conftest import ROOT

CHECK = """
import sys, time
import data_tools   # installs the finder
import numba.typed
typed_dict = numba.typed.Dict
from ffcv.fields.rgb_image import IMAGE_MODES
from ffcv.loader import Loader
assert type(IMAGE_MODES) is dict and IMAGE_MODES == {"jpg": 0, "raw": 1}, IMAGE_MODES
assert numba.typed.Dict is typed_dict and typed_dict is not dict
d = numba.typed.Dict()   # numba's typed Dict still works for everyone else
d["a"] = 1
assert d["a"] == 1 and type(d) is typed_dict
"""


def test_ffcv_imports_with_a_plain_mode_table_and_leaves_numba_alone():
    proc = subprocess.run([sys.executable, "-c", CHECK], cwd=ROOT, capture_output=True, text=True,
                          env={"PYTHONPATH": ROOT, "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_without_data_tools_ffcv_still_builds_its_typed_dict():
    """The control: the table is a numba Dict when FFCV is imported on its own, so the test above sees the finder."""
    code = "from ffcv.fields.rgb_image import IMAGE_MODES; import numba.typed; " \
           "assert type(IMAGE_MODES) is numba.typed.Dict, type(IMAGE_MODES)"
    proc = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
