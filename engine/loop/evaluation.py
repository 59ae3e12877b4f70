"""What every evaluation command shares: where it runs (each rank its shard under a launcher, else one device), and
writing its result once, atomically (and, beside a run, into its tensorboard logs)."""
from __future__ import annotations

import json
import os

import torch

from engine.parallel import distributed as dist_utils
from engine.storage.files import finite_json, write_text_atomically


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
        log_to_run(result, out)
    return result


def log_to_run(result: dict, out: str) -> None:
    """When `out` sits in a run's folder (beside its `tb/`), its numbers also go to tensorboard as `eval/<key>` at
    the run's last logged step, next to the training curves: codebook usage, masked-token accuracy, top-1, mIoU;
    and to the run's W&B / MLflow runs when it reports to them (engine.reporting.trackers)."""
    from engine.reporting.metrics import last_logged_step, open_tensorboard
    from engine.reporting.trackers import log_eval
    run_dir = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(os.path.join(run_dir, "tb")):
        return
    scalars = {k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if not scalars:
        return
    step = last_logged_step(run_dir)
    writer = open_tensorboard(os.path.join(run_dir, "tb"), filename_suffix=".eval")
    if writer is not None:
        for key, value in scalars.items():
            writer.add_scalar(f"eval/{key}", value, step)
        writer.close()
    log_eval(run_dir, scalars, step)
