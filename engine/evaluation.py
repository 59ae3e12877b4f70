"""What every evaluation command shares: where it runs (each rank its shard under a launcher, else one device), and
writing its result once, atomically."""
from __future__ import annotations

import json
import os

import torch

from engine import distributed as dist_utils
from engine.files import finite_json, write_text_atomically


def eval_device() -> torch.device:
    """Under a launcher (WORLD_SIZE > 1) every rank joins the process group and evaluates its own shard; alone, the
    GPU when there is one, else the CPU."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return dist_utils.init()
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def write_result(result: dict, out: str) -> dict:
    """Write `result` as strict JSON to `out` (when given) from rank 0, atomically; return what was written.

    A value that is not finite (a NaN loss) is written as null, its key listed under `not_finite`, with a note."""
    result, nulls = finite_json(result)
    if nulls:
        result["not_finite"] = nulls
        dist_utils.log_main(f"{', '.join(nulls)} not finite (NaN or inf): written as null"
                            f"{f' in {out}' if out else ''}")
    if out and dist_utils.is_main():
        write_text_atomically(out, json.dumps(result, indent=2, allow_nan=False))
    return result
