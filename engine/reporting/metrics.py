"""Metrics that stay on the device until the log interval, and the rank-0 writers (tensorboardX, JSONL, tqdm)."""
from __future__ import annotations

import json
import os
import resource
import sys
import time

import torch

from engine.parallel import distributed as dist_utils
from engine.storage.files import json_text, write_text_atomically

# Dense bf16/fp16 tensor-core peak per device, for MFU. Unknown devices report no MFU rather than a guess.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "V100": 125e12}


def device_peak_flops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, flops in PEAK_FLOPS.items():
        if key in name:
            return flops
    return None


def peak_memory_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # Linux reports KiB


class DeviceMeter:
    """Sums scalar tensors on the device; `read()` is the only host synchronisation, done once per interval."""

    def __init__(self):
        self._sums: dict[str, torch.Tensor] = {}
        self._count = 0

    def add(self, metrics: dict[str, torch.Tensor]) -> None:
        for k, v in metrics.items():
            v = v.detach().float()
            self._sums[k] = self._sums[k] + v if k in self._sums else v.clone()
        self._count += 1

    def read(self) -> dict[str, float]:
        if not self._sums:
            return {}
        keys = sorted(self._sums)
        values = torch.stack([self._sums[k] for k in keys]).div_(self._count).tolist()
        self._sums, self._count = {}, 0
        return dict(zip(keys, values))


_TB_WARNED: set[str] = set()


def open_tensorboard(folder: str, **kwargs):
    """A tensorboardX `SummaryWriter` on `folder`, or None when the folder cannot be written (a file in its place,
    read-only, a full disk): losing the curves must not stop a long run, and metrics.jsonl keeps every logged value.
    Warns once per folder, on stderr."""
    try:
        from tensorboardX import SummaryWriter
        return SummaryWriter(folder, **kwargs)
    except OSError as e:
        if folder not in _TB_WARNED:
            _TB_WARNED.add(folder)
            why = "a file is in its place" if os.path.exists(folder) and not os.path.isdir(folder) else \
                (e.strerror or str(e))
            dist_utils.log_main(f"warning: cannot write tensorboard logs to {folder} ({why}); training goes on "
                                f"without them (metrics.jsonl has every logged value): remove or fix the folder "
                                f"to get them back on the next start")
        return None


def last_logged_step(output_dir: str) -> int:
    """The last step in a run's metrics.jsonl (0 when it has none)."""
    try:
        with open(os.path.join(output_dir, "metrics.jsonl")) as f:
            steps = [s for s in map(_step_of, f) if s != float("inf")]
    except OSError:
        return 0
    return int(max(steps, default=0))


def _step_of(line: str) -> float:
    """The step of a metrics.jsonl row; a row torn by a kill mid-write (or a blank line) sorts after every step."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


class RunLogger:
    """Rank 0 writes tensorboard scalars and `metrics.jsonl` (and sends them to the trackers of `run.report_to`,
    engine.reporting.trackers); other ranks stay silent. On a terminal a progress bar
    shows the run; without one (launchers, log files, `run.progress_bar=false`) every logged step prints one plain
    line: step, loss, lr, images/s and the time left."""

    def __init__(self, output_dir: str, total_steps: int, start_step: int, show_progress: bool = True,
                 trackers=None):
        self.active = dist_utils.is_main()
        self.trackers = trackers   # engine.reporting.trackers.Trackers (run.report_to), or None
        self.jsonl = os.path.join(output_dir, "metrics.jsonl")
        self.tb = None
        self.bar = None
        self.total, self.start, self.t0 = total_steps, start_step, time.perf_counter()
        if not self.active:
            return
        os.makedirs(output_dir, exist_ok=True)
        self._truncate_after(start_step)
        self.tb = open_tensorboard(os.path.join(output_dir, "tb"), purge_step=start_step + 1)
        if show_progress and sys.stderr.isatty():   # a bar in a log file is a wall of carriage returns
            from tqdm import tqdm
            self.bar = tqdm(total=total_steps, initial=start_step, dynamic_ncols=True, mininterval=2.0)

    def _truncate_after(self, step: int) -> None:
        """A resumed run redoes the steps after its checkpoint: drop their old rows so each step appears once."""
        if not os.path.exists(self.jsonl):
            return
        with open(self.jsonl) as f:
            rows = [line for line in f if _step_of(line) <= step]
        write_text_atomically(self.jsonl, "".join(rows))

    def log(self, step: int, scalars: dict[str, float], prefix: str = "train") -> None:
        if not self.active:
            return
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(f"{prefix}/{k}", v, step)
        if self.trackers is not None:   # the same scalars to W&B / MLflow
            self.trackers.log(step, {f"{prefix}/{k}": v for k, v in scalars.items()})
        with open(self.jsonl, "a") as f:   # strict JSON: a NaN loss (a skipped step) is null
            f.write(json_text({"step": step, "split": prefix, **scalars}) + "\n")
        if self.bar is not None:
            shown = {k: f"{v:.4g}" for k, v in scalars.items() if k in ("loss", "lr", "images_per_s")}
            self.bar.set_postfix(shown, refresh=False)
        elif prefix == "train":
            print(self._line(step, scalars), file=sys.stderr, flush=True)

    def _line(self, step: int, scalars: dict[str, float]) -> str:
        done, elapsed = step - self.start, time.perf_counter() - self.t0
        left = elapsed / done * (self.total - step) if done > 0 else float("nan")
        eta = "?" if left != left else f"{int(left) // 3600}:{int(left) % 3600 // 60:02d}:{int(left) % 60:02d}"
        parts = [f"step {step}/{self.total}"]
        parts += [f"{k} {scalars[k]:.4g}" for k in ("loss", "lr", "images_per_s") if scalars.get(k) is not None]
        return " | ".join(parts + [f"eta {eta}"]).replace("images_per_s", "images/s")

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self, error: BaseException | None = None) -> None:
        """Close the bar, tensorboard and the tracker runs (`error`: what stopped the run, None when it ended)."""
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.trackers is not None:
            self.trackers.close(error)
            self.trackers = None


class TensorboardPictures:
    """Pictures in tensorboard every `every` optimizer steps, drawn by a stage from its step function.

    The stage calls this at the top of its step function with the engine and the batch's images; it keeps the first
    `count` images of the first batch it sees as the fixed set to draw. When DeepSpeed's step count
    (`engine.global_steps`, restored on resume) reaches a multiple of `every` (not the step the process started
    at), rank 0 calls `render(module, images)` -> `{tag: uint8 [H, W, 3]}` with the module in eval mode and no
    grad, and writes the images to `<output_dir>/tb` at that step, where the run's scalars are (a second event
    file, `*.pictures`). Between picture steps a call is one integer test: no device work, no host sync.

    Not a `StepHook`: hooks' state is checkpointed and required on resume, so a checkpoint written before pictures
    existed could no longer resume. Under ZeRO-3 each rank holds a shard of the weights and a rank-0 forward
    cannot run; such runs get no pictures.

    Args:
        output_dir: the run's output directory.
        every: steps between pictures (0 turns them off).
        render: draws the pictures of the fixed images with the current weights.
        count: fixed images kept from the first batch.
    """

    def __init__(self, output_dir: str, every: int, render, count: int = 4):
        self.dir, self.every, self.render, self.count = os.path.join(output_dir, "tb"), every, render, count
        self.active = every > 0 and dist_utils.is_main()
        self.images = None
        self._first = self._last = None
        self._tb = None

    def __call__(self, engine, images: torch.Tensor) -> None:
        if not self.active:
            return
        step = engine.global_steps
        if self.images is None:
            self.images, self._first = images[:self.count].detach().clone(), step
            self.active = engine.zero_optimization_stage() < 3
        if step % self.every or step in (self._first, self._last) or not self.active:
            return
        self._last = step   # the other micro-batches of this step draw nothing
        self._draw(engine.module, step)

    def final(self, module: torch.nn.Module, step: int) -> None:
        """The pictures of the trained weights at the run's last step (`step`), unless that step drew them already;
        a stage calls it after `fit` with its model."""
        if self.active and self.images is not None and step != self._last:
            self._last = step
            self._draw(module, step)

    def _draw(self, module: torch.nn.Module, step: int) -> None:
        was_training = module.training
        module.eval()
        try:
            with torch.no_grad():
                pictures = self.render(module, self.images)
        finally:
            module.train(was_training)
        if self._tb is None:
            # No purge_step: tensorboard reads event files in name order, and a purge mark in this later file would
            # drop the scalars this run already logged. RunLogger's file, opened first, purges for both on resume.
            self._tb = open_tensorboard(self.dir, filename_suffix=".pictures")
            if self._tb is None:   # an unwritable folder (warned): no pictures, the run goes on
                self.active = False
                return
        for tag, image in pictures.items():
            self._tb.add_image(tag, image, step, dataformats="HWC")
        self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


@torch.no_grad()
def forward_flops_per_image(fn, image: torch.Tensor) -> float:
    """FLOPs of `fn(image[None])` counted by torch's FlopCounterMode (matmuls, convolutions, attention), for the
    MFU of frozen helpers (teacher, tokenizer) that run forward only. One image, once, at startup."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        fn(image.unsqueeze(0))
    return float(counter.get_total_flops())


class Throughput:
    """Images/s and MFU over the last log interval (wall clock, so it includes data loading)."""

    def __init__(self, flops_per_image: float | None, world_size: int):
        self.flops_per_image = flops_per_image
        self.world_size = world_size
        self.peak = device_peak_flops()
        self._t = time.perf_counter()
        self._images = 0

    def add(self, images: int) -> None:
        self._images += images

    def read(self) -> dict[str, float]:
        now = time.perf_counter()
        dt = max(now - self._t, 1e-9)
        out = {"images_per_s": self._images / dt}
        if self.flops_per_image and self.peak:
            out["mfu"] = out["images_per_s"] * self.flops_per_image / (self.peak * self.world_size)
        self._t, self._images = now, 0
        return out


class StepProfiler:
    """torch.profiler over `steps` training steps; rank 0 writes the costliest operators to profile.json."""

    def __init__(self, output_dir: str, steps: int, top: int = 30):
        from torch.profiler import ProfilerActivity, profile
        self.path = os.path.join(output_dir, "profile.json")
        self.steps, self.top, self.seen = steps, top, 0
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        self.prof = profile(activities=activities)
        self.prof.__enter__()

    def step(self) -> None:
        self.seen += 1
        if self.seen >= self.steps:
            self.close()

    def close(self) -> None:
        """Stop profiling and write the table (also when the run ended before `steps` steps)."""
        if self.prof is None or self.seen == 0:
            if self.prof is not None:
                self.prof.__exit__(None, None, None)
                self.prof = None
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.prof.__exit__(None, None, None)
        key = "self_device_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        events = sorted(self.prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)[:self.top]
        rows = [{"op": e.key, "ms_per_step": getattr(e, key) / 1e3 / self.seen, "calls_per_step": e.count / self.seen}
                for e in events]
        if dist_utils.is_main():
            with open(self.path, "w") as f:
                json.dump(rows, f, indent=1)
        self.prof = None
