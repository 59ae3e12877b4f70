"""What skips a training step or stops a run: non-finite gradients (counted and skipped on the device), the
loop's own clipping at ZeRO-0, and a scheduler's SIGTERM (agreed between ranks at the log interval)."""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from typing import TYPE_CHECKING, Callable, Iterator

import torch

from engine.parallel import distributed as dist_utils

if TYPE_CHECKING:
    import psutil


class TrainingDiverged(RuntimeError):
    pass


class Preempted(RuntimeError):
    pass


def _forked_child(owner: int, signum: int) -> bool:
    """True in a process forked after the handler was installed (a multiprocessing Pool worker inherits it): there the
    signal is given its default action and sent again, so the child ends as it would without the handler. Raising or
    only noting the signal there would leave a Pool waiting on a worker forever (`Pool.terminate` sends SIGTERM and
    joins)."""
    if os.getpid() == owner:
        return False
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
    return True


class PreemptionFlag:
    """SIGTERM (what schedulers send before they kill a job) asks the loop to checkpoint and stop.

    Ranks may see the signal at different steps, so they agree at the log interval, where the loop reads the
    device anyway: one all-reduce of a flag, then every rank saves the same step. A rank whose launcher is gone
    (`LauncherWatch`) asks for the same stop. `signals` (TERM and run.preempt_signal: USR1...) are those taken
    this way; `end_time` (unix seconds, the job's end: engine.parallel.launch_env.job_end_time) asks for the stop once
    the next log interval (as long as the last one) and `margin_s` more would run past it. After `agreed()`,
    `scheduled` says whether a signal or the time limit asked on some rank (a job to requeue), not only a launcher
    that is gone.
    """

    def __init__(self, signals: tuple[str, ...] = ("TERM",), end_time: float | None = None, margin_s: float = 0.0):
        self.requested = False
        self.scheduled = False
        self._mine = False
        self.reason = "SIGTERM"
        self.end_time, self.margin_s = end_time, margin_s
        self._last_check = time.time()
        names = dict.fromkeys(n.strip().upper().removeprefix("SIG") for n in signals)
        self._owner = os.getpid()
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.Signals[f"SIG{n}"] for n in names)}
        self._watch = LauncherWatch.watching(self._launcher_gone)

    def _handle(self, signum, frame) -> None:
        if _forked_child(self._owner, signum):
            return
        self.reason = signal.Signals(signum).name
        self.requested = self._mine = True

    def _launcher_gone(self, what: str) -> None:
        self.reason = f"{what} exiting"
        self.requested = True

    def _check_time(self) -> None:
        now = time.time()
        interval, self._last_check = now - self._last_check, now
        if self.end_time is not None and not self.requested and now + interval + self.margin_s >= self.end_time:
            self.reason = (f"the job's time limit ({self.end_time - now:.0f} s left, the last log interval took "
                           f"{interval:.0f} s, run.stop_before_end_s={self.margin_s:g})")
            self.requested = self._mine = True

    def agreed(self) -> bool:
        self._check_time()
        flag = torch.tensor([float(self.requested), float(self._mine)], device=dist_utils.current_device())
        total = dist_utils.all_reduce_sum_(flag).tolist()
        self.scheduled = total[1] > 0
        return total[0] > 0

    def restore(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        if self._watch is not None:
            self._watch.stop()


_requeue_on_signal = False


def requeue_on_signal(on: bool) -> None:
    """A train command's run.requeue, once its config is resolved: a scheduler's signal outside the training loop
    (while the model loads, during the evaluation after it) requeues the job too, as one inside it does."""
    global _requeue_on_signal
    _requeue_on_signal = on


@contextlib.contextmanager
def stop_on_signals(signals: tuple[str, ...]) -> Iterator[None]:
    """Around a whole command: SIGTERM and the other signals a scheduler may send before the end (`signals`,
    run.preempt_signal's choices) raise `Preempted` (exit 143 with one `stopped:` line, engine.config.cli) instead of
    killing the process where it stands, so `finally` blocks run (temporary files removed, the run lock released)
    and nothing is left half-written; with run.requeue, rank 0 requeues the job first. The training loop's
    `PreemptionFlag` takes its signals over while it trains (a checkpoint first); this covers what runs outside it:
    starting up, a stage's evaluation after training (its eval.json is not written) and the evaluation commands.
    Only in the main thread (where Python delivers signals)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    owner = os.getpid()

    def stop(signum, frame) -> None:
        if _forked_child(owner, signum):
            return
        requeued = ""
        if _requeue_on_signal and os.environ.get("RANK", "0") == "0":
            from engine.parallel.launch_env import requeue_job
            requeued = f" ({requeue_job()})"
        raise Preempted(f"{signal.Signals(signum).name} outside a training loop{requeued}; nothing was left "
                        f"half-written and the checkpoints are whole: run the same command again (a training run "
                        f"resumes from its last checkpoint, and a finished one only evaluates)")

    previous = {s: signal.signal(s, stop) for s in (signal.Signals[f"SIG{n}"] for n in signals)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


class LauncherWatch(threading.Thread):
    """Notices when the processes that launched this rank are gone, and calls `on_gone(name)` once.

    The `deepspeed` command runs `deepspeed.launcher.launch`, which starts the ranks. SIGTERM to the `deepspeed`
    process ends it at once (it forwards nothing on a single node), so without this the ranks would train on as
    orphans to the end. Each rank watches its parent (torchrun's agent or DeepSpeed's per-node launcher) and, under
    DeepSpeed's launcher, the `deepspeed` command above it; a process counts as gone when its pid is free, reused
    (another start time) or a zombie. Polling once a second costs nothing next to a training step.
    """

    POLL_S = 1.0

    def __init__(self, watched: list[tuple[str, "psutil.Process"]], on_gone: Callable[[str], None]):
        super().__init__(name="launcher-watch", daemon=True)
        self.watched, self.on_gone = watched, on_gone
        self._stopped = threading.Event()

    @classmethod
    def watching(cls, on_gone: Callable[[str], None]) -> "LauncherWatch | None":
        """Watch this rank's launchers when it was started by one (LOCAL_RANK set), else return None."""
        if "LOCAL_RANK" not in os.environ:
            return None
        try:
            import psutil
            parent = psutil.Process(os.getppid())
            watched = [("the launcher", parent)]
            if any("deepspeed.launcher.launch" in part for part in parent.cmdline()):
                grand = parent.parent()
                if grand is not None and grand.pid > 1:
                    watched.append(("the deepspeed command", grand))
            for _, process in watched:   # read the start time now: `is_running` compares it with the pid's later
                process.create_time()
        except Exception:   # no psutil, no /proc: run without the watch rather than not at all
            return None
        watch = cls(watched, on_gone)
        watch.start()
        return watch

    @staticmethod
    def _gone(process) -> bool:
        import psutil
        try:
            return not process.is_running() or process.status() == psutil.STATUS_ZOMBIE
        except psutil.Error:
            return True

    def run(self) -> None:
        while not self._stopped.wait(self.POLL_S):
            for name, process in self.watched:
                if self._gone(process):
                    print(f"rank {os.environ.get('RANK', '0')}: {name} (pid {process.pid}) is gone; checkpointing "
                          f"at the next log interval and stopping", file=sys.stderr, flush=True)
                    self.on_gone(name)
                    return

    def stop(self) -> None:
        """Ends the thread before the run goes on (it must not outlive the training loop into interpreter exit)."""
        self._stopped.set()
        self.join(timeout=5)


class NonFiniteSteps:
    """Counts skipped updates and the longest run of them, on the device: read at the log interval, no sync.

    `add(flag)` takes a 0-d float tensor, 1.0 for a skipped update. `read()` returns `(skipped so far, longest run
    since the last read)`; a run that is still going carries into the next interval.
    """

    def __init__(self, device: torch.device):
        self.total = 0
        self._skipped, self._run, self._longest = (torch.zeros((), device=device) for _ in range(3))
        self.flags = (torch.zeros((), device=device), torch.ones((), device=device))   # for host-known outcomes

    def add(self, flag: torch.Tensor) -> None:
        self._skipped += flag
        self._run = (self._run + 1) * flag
        self._longest = torch.maximum(self._longest, self._run)

    def read(self) -> tuple[int, int]:
        self.total += int(self._skipped.item())
        longest = int(self._longest.item())
        self._skipped.zero_()
        self._longest = self._run.clone()
        return self.total, longest


def clip_and_flag(engine, params: list[torch.Tensor], max_norm: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip the (all-reduced) gradients of `params` to `max_norm` (0: only measure) and arm the fused optimizer's
    skip.

    Returns `(grad_norm, found_inf)` as device tensors. torch's fused AdamW reads `found_inf` and leaves weights,
    moments and step count untouched when it is 1, so a non-finite step is skipped without a host sync.
    """
    if max_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None], foreach=True)
    found_inf = (~norm.isfinite()).float()
    engine.optimizer.found_inf = found_inf
    return norm, found_inf
