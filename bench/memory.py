"""Per-rank memory of MIM training steps, split by part and set next to the arithmetic; a model of step time.

`run` trains a few steps of `pretrain.mim.train.train` (the real stage: DeepSpeed engine, frozen tokenizer, masks)
on synthetic images for each setup (ranks x DeepSpeed config), each setup in fresh processes under torchrun, and
writes JSON plus a Markdown table. Per rank it records:

- a timeline: memory after process start (fixed runtime), after the model, after the tokenizer, after the engine,
  and around every forward / backward / optimizer step, each with the peak since the previous mark. On CUDA the
  numbers are the caching allocator's (`memory_allocated`, `max_memory_allocated`); on CPU they are resident memory
  (RSS and VmHWM, whose high-water mark is reset per phase through /proc/self/clear_refs), so they include the
  libraries, allocator slack and pages the allocator keeps after a free;
- an inventory of the tensors the engine holds after the last backward (deduplicated by storage): parameters,
  master weights, gradients, optimizer state, communication buckets, the frozen tokenizer;
- the arithmetic for the same parts (`expected_bytes`, a pure function of parameter counts, precision, ZeRO stage,
  ranks and bucket sizes, following DeepSpeed 0.19's buffers).

The activation memory of a step is the forward's peak over the memory held before it (on CPU fp32 with
PyTorch's SDPA kernel; bf16 on a GPU with flash attention holds less).

`estimate` turns the arithmetic and a per-image activation memory into the largest micro-batch per device and
ZeRO stage. `step_time` is a back-of-the-envelope model (compute from FLOPs and an MFU, ring all-reduce of the
gradients, with and without overlap) that explains the `overlap_comm` choice in `engine.parallel.ds_setup`.

    python -m bench.memory run --arch=beit_base_patch16_224_8k_vocab_cls_pt --micro=2 \\
        --setups=1:zero0,2:zero1,2:zero2,2:zero3 --out=bench/results/cpu_memory_vitb.json
    python -m bench.memory step_time --arch=beit_base_patch16_224_8k_vocab_cls_pt --ranks=8 --bandwidth_gbs=25
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass

from bench.common import write_json
from engine.config.cli import check_counts, run_cli
from engine.parallel.host_memory import MODES as MMAP_MODES

GIB = 2 ** 30
PARAM_BYTES = {"fp32": 4, "bf16_autocast": 4, "bf16": 2, "fp16": 2}
TOKENIZER_FOR = {"beit_base_patch16_224_8k_vocab_cls_pt": "vqkd_encoder_base_decoder_3x768x12_clip",
                 "beit_large_patch16_224_8k_vocab_cls_pt": "vqkd_encoder_base_decoder_3x768x12_clip",
                 "beitv2_small_demo": "vqkd_small_demo", "beitv2_tiny_test": "vqkd_tiny_test"}
PARTS = ("parameters", "master_weights", "gradients", "optimizer_state", "buckets", "gathered_parameters",
         "frozen_tokenizer")


# ------------------------------------------------------------------------------------------------- arithmetic
@dataclass(frozen=True)
class ParamCounts:
    """What the arithmetic needs to know about a model.

    Args:
        sizes: element count of every trainable parameter tensor.
        frozen: elements of the frozen helper (the tokenizer as the MIM step keeps it), parameters and buffers.
        frozen_sizes: element count of each of its parameter tensors (ZeRO-3 partitions them, engine.loop.frozen).
        largest_module: elements of the largest module ZeRO-3 gathers at once (a transformer block).
    """
    sizes: tuple[int, ...]
    frozen: int = 0
    largest_module: int = 0
    frozen_sizes: tuple[int, ...] = ()

    @property
    def trainable(self) -> int:
        return sum(self.sizes)


def count_params(model, frozen=None) -> ParamCounts:
    """ParamCounts of `model` (trainable tensors; ZeRO-3-partitioned or not) and an optional frozen module."""
    import torch
    from engine.parallel.ds_setup import largest_layer
    numel = lambda p: getattr(p, "ds_numel", p.numel())   # noqa: E731 - ZeRO-3 leaves an empty placeholder
    sizes = tuple(numel(p) for p in model.parameters() if p.requires_grad)
    frozen_sizes = tuple(numel(p) for p in frozen.parameters()) if frozen is not None else ()
    frozen_numel = sum(frozen_sizes) + (sum(b.numel() for b in frozen.buffers()) if frozen is not None else 0)
    if any(hasattr(p, "ds_numel") for p in model.parameters()):
        layers = [sum(numel(p) for p in m.parameters()) for lst in model.modules()
                  if isinstance(lst, torch.nn.ModuleList) for m in lst]
        largest = max(layers or [max(sizes)])
    else:
        largest = largest_layer(model)
    return ParamCounts(sizes, frozen_numel, largest, frozen_sizes)


@dataclass(frozen=True)
class ZeroSettings:
    """The ZeRO settings that size buffers, DeepSpeed's defaults where a config leaves a key out."""
    stage: int = 0
    reduce_bucket_size: int = int(5e8)
    allgather_bucket_size: int = int(5e8)
    contiguous_gradients: bool = True
    overlap_comm: bool = False
    prefetch_bucket_size: int = int(5e7)
    max_live_parameters: int = int(1e9)
    max_reuse_distance: int = int(1e9)
    param_persistence_threshold: int = int(1e5)
    sub_group_size: int = int(1e9)
    offload_optimizer: bool = False
    offload_param: bool = False
    shard_frozen: bool = True   # run.shard_frozen: at ZeRO-3 the frozen tokenizer is partitioned too

    @classmethod
    def from_ds_config(cls, ds: dict, shard_frozen: bool = True) -> "ZeroSettings":
        z = ds.get("zero_optimization", {})
        stage = int(z.get("stage", 0))
        keys = {"reduce_bucket_size": "reduce_bucket_size", "allgather_bucket_size": "allgather_bucket_size",
                "contiguous_gradients": "contiguous_gradients", "prefetch_bucket_size": "stage3_prefetch_bucket_size",
                "max_live_parameters": "stage3_max_live_parameters", "max_reuse_distance": "stage3_max_reuse_distance",
                "param_persistence_threshold": "stage3_param_persistence_threshold",
                "sub_group_size": "sub_group_size"}
        values = {ours: type(getattr(cls, ours))(z[theirs]) for ours, theirs in keys.items() if theirs in z}
        overlap = z.get("overlap_comm")
        values["overlap_comm"] = bool(stage == 3 if overlap is None else overlap)   # DeepSpeed's default
        offload = {k: z.get(k, {}).get("device", "none") not in ("none", None)
                   for k in ("offload_optimizer", "offload_param")}
        return cls(stage=stage, **values, **offload, shard_frozen=shard_frozen)


def expected_bytes(counts: ParamCounts, precision: str, zero: ZeroSettings, ranks: int,
                   touched_only: bool = False) -> dict[str, int]:
    """Bytes one rank holds per part during a step, as DeepSpeed 0.19 lays them out (Adam, no offload to NVMe).

    Args:
        counts: the model's parameter counts.
        precision: run.precision (`fp32`, `bf16_autocast`, `bf16`, `fp16`).
        zero: ZeRO settings (stage, buckets, stage-3 limits).
        ranks: data-parallel ranks.
        touched_only: count only the bucket elements a step writes (CPU resident memory: an `empty` buffer's
            untouched pages cost nothing); False gives what an allocator reserves (CUDA).

    Parts: `parameters` (the model's weights, flat partition at ZeRO-3), `master_weights` (fp32 copies the ZeRO
    optimizer steps on), `gradients` (on the parameters and/or in flat partition buffers), `optimizer_state` (Adam's
    two moments, fp32), `buckets` (gradient reduction buffers), `gathered_parameters` (ZeRO-3's whole layers live
    during forward/backward), `frozen_tokenizer` (fp32 or the compute dtype; its encoder runs in the training
    dtype; at ZeRO-3 on several ranks a partition of each parameter, as engine.loop.frozen keeps it, plus the ones under
    the persistence threshold whole, and its buffers). Offloaded parts are on the host and count 0 here.
    """
    n, bp, stage = ranks, PARAM_BYTES[precision], zero.stage
    total = counts.trainable
    part = math.ceil(total / n)
    sixteen = bp == 2
    out = dict.fromkeys(PARTS, 0)
    out["frozen_tokenizer"] = counts.frozen * bp   # the encoder dominates and runs in the training dtype
    if stage == 3 and n > 1 and zero.shard_frozen:   # DeepSpeed partitions each parameter on its own
        sizes = counts.frozen_sizes
        kept = (sum(math.ceil(s / n) for s in sizes) + sum(s for s in sizes if s <= zero.param_persistence_threshold)
                + counts.frozen - sum(sizes))
        out["frozen_tokenizer"] = kept * bp
    bucket = min(zero.reduce_bucket_size, total) if touched_only else zero.reduce_bucket_size
    if stage == 0:
        out["parameters"] = total * bp
        out["gradients"] = total * bp
        out["optimizer_state"] = 2 * total * 4
        if sixteen:   # DeepSpeed's bf16/fp16 optimizer: fp32 master weights and fp32 gradient accumulators
            out["master_weights"] = total * 4
            out["gradients"] += total * 4
        if n > 1:     # the all-reduce flattens the gradients in buckets of up to 5e8 elements
            out["buckets"] = min(total, int(5e8)) * bp
        return out
    opt = 0 if zero.offload_optimizer else 1
    out["optimizer_state"] = 2 * part * 4 * opt
    if stage in (1, 2):
        out["parameters"] = total * bp
        out["master_weights"] = part * 4 * opt   # cloned even in fp32 (stage_1_and_2.py)
        # fp32 gradient partition the optimizer steps on, plus: stage 1 keeps every full gradient until the
        # step, stage 2 copies its own partition out of the reduction buckets.
        out["gradients"] = part * 4 + (total * bp if stage == 1 else part * bp)
        out["buckets"] = bucket * bp * (2 if zero.overlap_comm else 1) if zero.contiguous_gradients else 0
        return out
    # Stage 3: a flat partition of the weights; parameters under the persistence threshold are partitioned too and
    # also stay whole on every rank.
    persistent = sum(s for s in counts.sizes if s <= zero.param_persistence_threshold)
    out["parameters"] = (part + persistent) * bp * (0 if zero.offload_param else 1)
    # fp32 weights are stepped in place (engine.parallel.ds_setup.share_fp32_master_weights); 16-bit ones, or offloaded
    # ones, get an fp32 master partition.
    out["master_weights"] = part * 4 * opt if (sixteen or zero.offload_optimizer or zero.offload_param) else 0
    out["gradients"] = part * 4   # grad_partitions_flat_buffer (fp32 accumulation)
    out["buckets"] = bucket * bp if zero.contiguous_gradients else 0
    # Gathered layers: a released layer's memory comes back, one kept for reuse does not. With a reuse distance
    # of the whole model, nothing is released between forward and backward: the whole model is live.
    if zero.max_reuse_distance >= total:
        live = total
    else:
        live = min(total, counts.largest_module + zero.prefetch_bucket_size + zero.max_reuse_distance,
                   max(zero.max_live_parameters, counts.largest_module))
    out["gathered_parameters"] = live * bp * (1 if n > 1 else 0)
    return out


def largest_micro_batch(states_bytes: float, activation_bytes_per_image: float, device_bytes: float = 80e9,
                        headroom: float = 0.9) -> int:
    """Images per rank that fit: (headroom x device memory - model states) / activation memory per image.

    Args:
        states_bytes: the arithmetic's parts summed (parameters ... frozen tokenizer) for one rank.
        activation_bytes_per_image: measured (`run`: activations / micro) and scaled to the device's precision.
        device_bytes: device memory (80 GB: A100/H100).
        headroom: share of the device the allocator can use (fragmentation, CUDA context, kernels' workspaces).
    """
    return max(0, int((headroom * device_bytes - states_bytes) // activation_bytes_per_image))


# ------------------------------------------------------------------------------------------------ step time
@dataclass(frozen=True)
class StepTime:
    compute_s: float
    comm_s: float
    step_no_overlap_s: float
    step_overlap_s: float

    @property
    def overlap_gain(self) -> float:
        return self.step_no_overlap_s / self.step_overlap_s - 1


def step_time(flops_per_image: float, micro: int, ranks: int, grad_bytes: float, bandwidth_bytes_s: float,
              peak_flops: float, mfu: float, bucket_bytes: float, zero_stage: int = 1,
              latency_s: float = 20e-6, shared_cores: bool = False) -> StepTime:
    """Seconds per step from compute and a ring all-reduce of the gradients.

    Args:
        flops_per_image: training FLOPs per image (forward + backward).
        micro: images per rank per step.
        ranks: data-parallel ranks.
        grad_bytes: gradient bytes to reduce per step.
        bandwidth_bytes_s: per-rank link bandwidth (bytes/s).
        peak_flops, mfu: the device's peak and the fraction reached.
        bucket_bytes: bytes per reduction bucket; the last bucket cannot overlap anything.
        zero_stage: 3 moves 1.5x the all-reduce volume (two all-gathers of the weights and a reduce-scatter).
        latency_s: per-message latency of one ring hop.
        shared_cores: communication runs on the cores that compute (gloo on CPU): nothing overlaps.

    Ring all-reduce: 2 (n - 1) / n x bytes / bandwidth, plus 2 (n - 1) latencies per bucket. Without overlap the
    step is compute + comm; with overlap the reduction hides behind the backward (2/3 of compute) except for the
    last bucket.
    """
    compute = flops_per_image * micro / (peak_flops * mfu)
    if ranks == 1:
        return StepTime(compute, 0.0, compute, compute)
    volume = grad_bytes * (1.5 if zero_stage == 3 else 1.0)
    buckets = max(1, math.ceil(volume / max(bucket_bytes, 1)))
    comm = 2 * (ranks - 1) / ranks * volume / bandwidth_bytes_s + buckets * 2 * (ranks - 1) * latency_s
    serial = compute + comm
    if shared_cores:
        return StepTime(compute, comm, serial, serial)
    tail = 2 * (ranks - 1) / ranks * min(bucket_bytes, volume) / bandwidth_bytes_s
    backward = compute * 2 / 3
    return StepTime(compute, comm, serial, compute - backward + max(backward, comm) + tail)


# ------------------------------------------------------------------------------------------------ measurement
class MemoryProbe:
    """Marks of (current, peak since the previous mark) bytes: CUDA allocator or CPU resident memory."""

    def __init__(self, device):
        import torch
        self.cuda = device.type == "cuda"
        self.torch = torch
        self.marks: list[dict] = []
        self.resettable = self.cuda or self._reset_hwm()
        self.source = ("cuda allocator (memory_allocated / max_memory_allocated)" if self.cuda else
                       "cpu resident memory (RSS / VmHWM per phase" + (")" if self.resettable else
                                                                     ", peak not resettable: process peak)"))

    @staticmethod
    def _reset_hwm() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")   # resets VmHWM to the current RSS
            return True
        except OSError:
            return False

    @staticmethod
    def _status(key: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        raise KeyError(key)

    def current(self) -> int:
        return self.torch.cuda.memory_allocated() if self.cuda else self._status("VmRSS")

    def peak(self) -> int:
        return self.torch.cuda.max_memory_allocated() if self.cuda else self._status("VmHWM")

    def mark(self, name: str) -> None:
        self.marks.append({"name": name, "current": self.current(), "peak": self.peak()})
        if self.cuda:
            self.torch.cuda.reset_peak_memory_stats()
        elif self.resettable:
            self._reset_hwm()

    def at(self, name: str) -> dict:
        return next(m for m in self.marks if m["name"] == name)


def _storages(tensors) -> dict[int, int]:
    """{storage address: bytes} of the tensors that hold memory (views of one buffer count once)."""
    out = {}
    for t in tensors:
        if t is None or not hasattr(t, "untyped_storage"):
            continue
        s = t.untyped_storage()
        if s.nbytes():
            out[s.data_ptr()] = s.nbytes()
    return out


def inventory(engine, tokenizer) -> dict[str, int]:
    """Bytes of the tensors the engine holds, by part; a storage counts once, in the first part that claims it."""
    import torch
    opt = engine.optimizer
    params = list(engine.module.parameters())
    zero_attr = lambda name: [t for t in getattr(opt, name, None) or [] if torch.is_tensor(t)]   # noqa: E731
    buckets = []
    for bucket in getattr(opt, "ipg_buckets", {}).values():
        buf = getattr(bucket, "buffer", None)
        buckets += buf if isinstance(buf, list) else [buf]
    basic = getattr(opt, "optimizer", opt)
    state = [v for s in basic.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
    masters = zero_attr("single_partition_of_fp32_groups") + zero_attr("fp32_partitioned_groups_flat")
    groups = [
        ("parameters", [p.data for p in params] + [getattr(p, "ds_tensor", None) for p in params]
         + zero_attr("bit16_groups_flat") + [getattr(opt, "lp_param_buffer", None)]),
        ("master_weights", masters),
        ("gradients", [p.grad for p in params] + [m.grad for m in masters] + zero_attr("averaged_gradients")
         + [getattr(opt, "grads_in_partition", None), getattr(opt, "grad_partitions_flat_buffer", None)]),
        ("optimizer_state", state),
        ("buckets", buckets),
        ("frozen_tokenizer", [*tokenizer.parameters(), *tokenizer.buffers(),   # ds_tensor: its ZeRO-3 partition
                              *[getattr(p, "ds_tensor", None) for p in tokenizer.parameters()]]
         if tokenizer is not None else []),
    ]
    seen, out = set(), {}
    for name, tensors in groups:
        mine = {k: v for k, v in _storages(tensors).items() if k not in seen}
        seen |= set(mine)
        out[name] = sum(mine.values())
    return out


def _measure_rank(arch: str, tokenizer: str, precision: str, micro: int, ds_config: str, steps: int,
                  grad_ckpt: bool, out_dir: str, result: str, extra: str) -> None:
    """One rank of one setup (run under torchrun): train `steps` steps with probes; rank 0 writes `result`."""
    import torch
    import torch.distributed as dist

    import engine.loop.trainer as trainer
    import pretrain.mim.train as mim
    from engine.parallel import distributed as dist_utils
    from engine.parallel.ds_setup import zero_stage

    device = dist_utils.init()
    probe = MemoryProbe(device)
    probe.mark("runtime")
    held: dict = {}

    def after(fn, name, keep=None):
        def wrapped(*a, **k):
            r = fn(*a, **k)
            probe.mark(name)
            if keep:
                held[keep] = r
            return r
        return wrapped

    mim.build_model = after(mim.build_model, "model", "model")
    mim.frozen_tokenizer = after(mim.frozen_tokenizer, "tokenizer", "tokenizer")
    original_initialize = trainer.initialize

    def initialize(*a, **k):
        engine, ds = original_initialize(*a, **k)
        probe.mark("engine")
        held.update(engine=engine, ds=ds)
        step = {"n": 0}
        fwd, bwd, opt_step = engine.forward, engine.backward, engine.step

        def forward(*fa, **fk):
            step["n"] += 1
            probe.mark(f"before_forward_{step['n']}")
            return after(fwd, f"forward_{step['n']}")(*fa, **fk)

        def backward(*ba, **bk):
            r = bwd(*ba, **bk)
            probe.mark(f"backward_{step['n']}")
            if step["n"] == steps:
                held["inventory"] = inventory(engine, held["tokenizer"][0])
            return r
        def optimizer_step(*sa, **sk):
            r = opt_step(*sa, **sk)
            probe.mark(f"step_{step['n']}")
            return r
        engine.forward, engine.backward, engine.step = forward, backward, optimizer_step
        return engine, ds

    trainer.initialize = initialize
    overrides = {"arch": arch, "tokenizer": tokenizer, "data.source": "synthetic",
                 "data.limit": micro * dist_utils.world_size() * (steps + 2), "run.output_dir": out_dir,
                 "run.micro_batch_size": micro, "run.grad_accum_steps": 1, "run.precision": precision,
                 "run.ds_config": ds_config, "run.grad_checkpointing": grad_ckpt, "run.log_interval": steps,
                 "run.save_interval": 10 ** 9, "run.save_final": False, "run.progress_bar": False,
                 "run.profile_steps": 0, "schedule.total_steps": steps, "schedule.warmup_steps": 1,
                 **json.loads(extra or "{}")}
    recipe = "beitv2_tiny_test" if arch == "beitv2_tiny_test" else "beitv2_base_300e"
    mim.train(recipe, **overrides)
    import resource
    process_peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
                    else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    counts = count_params(held["model"], held["tokenizer"][0])
    mine = {"rank": dist_utils.rank(), "marks": probe.marks, "inventory": held["inventory"],
            "process_peak": max(process_peak, max(m["peak"] for m in probe.marks))}
    ranks = [None] * dist_utils.world_size()
    dist.all_gather_object(ranks, mine)
    if dist_utils.is_main():
        write_json({"source": probe.source, "counts": asdict(counts), "ds_config": held["ds"],
                    "zero_stage": zero_stage(held["ds"]), "ranks": ranks}, result)


def split(marks: list[dict], steps: int) -> dict[str, int]:
    """Measured parts from a rank's timeline (bytes); on CPU differences of resident memory, so approximate.

    `activations` is the first forward's peak over what was held before it; `held_between_steps` what the last
    step starts from; `*_over_held` each phase's peak over that; `peak` the highest mark."""
    at = {m["name"]: m for m in marks}
    last = steps
    before = at[f"before_forward_{last}"]["current"]
    # Activations from the first step: later steps reuse pages freed by the one before, which RSS cannot see.
    first = at["before_forward_1"]["current"]
    out = {"runtime": at["runtime"]["current"],
           "model_built": at["model"]["current"] - at["runtime"]["current"],
           "tokenizer_built": at["tokenizer"]["current"] - at["model"]["current"],
           "engine_init": at["engine"]["current"] - at["tokenizer"]["current"],
           "engine_init_peak": at["engine"]["peak"],
           "held_between_steps": before,
           "activations": at["forward_1"]["peak"] - first,
           "backward_over_held": at[f"backward_{last}"]["peak"] - before,
           "optimizer_step_over_held": at[f"step_{last}"]["peak"] - before,
           "step_peak": max(at[f"{k}_{last}"]["peak"] for k in ("forward", "backward", "step")),
           "peak": max(m["peak"] for m in marks)}
    return out


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(arch: str, precision: str, micro: int, ds_config: str, ranks: int, steps: int = 2,
            grad_ckpt: bool = False, tokenizer: str = "", extra: str = "", timeout: int = 1800,
            mmap_threshold: str = "fixed") -> dict:
    """One setup in fresh processes (`ranks` under torchrun): the per-rank timeline, inventory, split and
    arithmetic. `mmap_threshold` (engine.parallel.host_memory): `fixed` maps big host blocks on their own throughout, so
    resident memory follows the tensors; `dynamic` is what ZeRO-0/1/2 training runs do by default (`auto`)."""
    check_counts(micro=micro, ranks=ranks, steps=steps)
    work = tempfile.mkdtemp(prefix="bench_memory_")
    if not tokenizer:
        tokenizer = os.path.join(work, "tokenizer.pt")
        _save_random_tokenizer(TOKENIZER_FOR[arch], tokenizer)
    result = os.path.join(work, "result.json")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port",
           str(_free_port()), "-m", "bench.memory", "rank", f"--arch={arch}", f"--tokenizer={tokenizer}",
           f"--precision={precision}", f"--micro={micro}", f"--ds_config={ds_config}", f"--steps={steps}",
           f"--grad_ckpt={grad_ckpt}", f"--out_dir={os.path.join(work, 'run')}", f"--result={result}",
           f"--extra={extra or '{}'}"]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               BEITV2_MMAP_THRESHOLD=mmap_threshold)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or not os.path.exists(result):
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"{ranks} rank(s) with {ds_config} failed (exit {proc.returncode}): {tail[0][:300]}")
    with open(result) as f:
        raw = json.load(f)
    counts = ParamCounts(tuple(raw["counts"]["sizes"]), raw["counts"]["frozen"], raw["counts"]["largest_module"],
                         tuple(raw["counts"]["frozen_sizes"]))
    zero = ZeroSettings.from_ds_config(raw["ds_config"], json.loads(extra or "{}").get("run.shard_frozen", True))
    cpu = raw["source"].startswith("cpu")
    per_rank = [{"rank": r["rank"], "measured": split(r["marks"], steps), "tensors_held": r["inventory"],
                 "process_peak": r["process_peak"], "timeline": r["marks"]} for r in raw["ranks"]]
    return {"arch": arch, "precision": precision, "micro": micro, "ds_config": ds_config, "ranks": ranks,
            "steps": steps, "grad_ckpt": grad_ckpt, "extra": json.loads(extra or "{}"), "source": raw["source"],
            "mmap_threshold": mmap_threshold,
            "trainable_params": counts.trainable, "frozen_params": counts.frozen,
            "largest_module_params": counts.largest_module, "zero": asdict(zero),
            "arithmetic": expected_bytes(counts, precision, zero, ranks, touched_only=cpu), "per_rank": per_rank}


def _save_random_tokenizer(arch: str, path: str) -> None:
    """A randomly initialised tokenizer of `arch` (MIM needs fixed codes per image, not good ones)."""
    import torch

    from pretrain.tokenizer import build_tokenizer, save_tokenizer
    torch.manual_seed(0)
    save_tokenizer(build_tokenizer(arch, kmeans_init=False), path)


def _gib(b) -> str:
    return "" if b is None else f"{b / GIB:.2f}"


def markdown(results: list[dict]) -> str:
    """One table row per setup: rank-0 peak and its parts, measured next to the arithmetic (GiB)."""
    head = ("| setup | peak (process) | step peak | runtime | activations | params a/t | master a/t | grads a/t "
            "| optim a/t | buckets a/t | gathered a | tokenizer a/t |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['setup']} | {r['error']} |" + " |" * (head.count("|") - 3))
            continue
        m, t, a = r["per_rank"][0]["measured"], r["per_rank"][0]["tensors_held"], r["arithmetic"]
        pair = lambda k: f"{_gib(a[k])} / {_gib(t.get(k, 0))}"   # noqa: E731
        lines.append(f"| {r['setup']} | {_gib(r['per_rank'][0]['process_peak'])} | {_gib(m['step_peak'])} "
                     f"| {_gib(m['runtime'])} | {_gib(m['activations'])} | {pair('parameters')} "
                     f"| {pair('master_weights')} | {pair('gradients')} | {pair('optimizer_state')} "
                     f"| {pair('buckets')} | {_gib(a['gathered_parameters'])} | {pair('frozen_tokenizer')} |")
    return "\n".join(lines) + "\n"


def run(arch: str = "beitv2_tiny_test", precision: str = "fp32", micro: int = 2,
        setups: str = "1:zero0,2:zero1,2:zero2,2:zero3", steps: int = 2, grad_ckpt: bool = False,
        extra: str = "", mmap_threshold: str = "fixed", out: str = "bench/results/cpu_memory.json") -> dict:
    """Measure each setup `RANKS:CONFIG` (CONFIG: a name in ds_configs/ or a JSON path); JSON to `out`, the table
    to `out` with .md.

    Args:
        arch: MIM arch (its tokenizer is a random-init file of the matching tokenizer arch).
        precision: run.precision.
        micro: images per rank per step.
        setups: comma-separated `ranks:config`, e.g. `1:zero0,2:zero3`.
        steps: training steps per setup (the last one is reported; the first allocates the optimizer state).
        grad_ckpt: gradient checkpointing.
        extra: JSON object of more stage overrides, e.g. '{"masking.num_masked": 30}'.
        mmap_threshold: host allocation on CPU (engine.parallel.host_memory): `fixed` (resident memory follows the
            tensors) or `dynamic` (glibc's own rule, the default of ZeRO-0/1/2 runs) or `auto`.
        out: JSON path; the Markdown table goes next to it.
    """
    if mmap_threshold not in MMAP_MODES:
        raise ValueError(f"--mmap_threshold must be one of {', '.join(MMAP_MODES)} (got {mmap_threshold!r})")
    if arch not in TOKENIZER_FOR:
        raise ValueError(f"--arch must be one of {', '.join(TOKENIZER_FOR)} (got {arch!r})")
    results = []
    for setup in setups.split(",") if isinstance(setups, str) else setups:
        ranks_text, _, config = str(setup).partition(":")
        path = config if config.endswith(".json") else f"ds_configs/{config}.json"
        if not ranks_text.isdigit() or not config:
            raise ValueError(f"--setups entries are RANKS:CONFIG, e.g. 2:zero3 (got {setup!r})")
        try:
            r = measure(arch, precision, micro, path, int(ranks_text), steps, grad_ckpt, extra=extra,
                        mmap_threshold=mmap_threshold)
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            r = {"error": str(e).splitlines()[0]}
        r["setup"] = f"{ranks_text} x {os.path.basename(path)}"
        results.append(r)
        write_json({"partial": True, "results": results}, out)
    table = markdown(results)
    write_json({"arch": arch, "precision": precision, "micro": micro, "grad_ckpt": grad_ckpt,
                "mmap_threshold": mmap_threshold, "results": results, "table": table}, out)
    if out:
        with open(os.path.splitext(out)[0] + ".md", "w") as f:
            f.write(table)
    print(table, file=sys.stderr)
    return {"out": out, "setups": [r["setup"] for r in results]}


def step_time_cli(arch: str = "beit_base_patch16_224_8k_vocab_cls_pt", micro: int = 128, ranks: int = 8,
                  bandwidth_gbs: float = 25.0, peak_tflops: float = 989.0, mfu: float = 0.4, grad_bytes: int = 2,
                  zero: int = 1, bucket_mb: float = 0.0, shared_cores: bool = False) -> dict:
    """Step time with and without overlap_comm (`step_time`), for the arch's FLOPs and gradient bytes.

    Args:
        arch: MIM arch.
        micro: images per rank per step.
        ranks: data-parallel ranks.
        bandwidth_gbs: per-rank link bandwidth, GB/s (NVLink ~150+, InfiniBand HDR 25, CPU loopback ~5).
        peak_tflops, mfu: device peak (dense bf16) and the fraction reached.
        grad_bytes: bytes per gradient element (2: bf16, 4: fp32).
        zero: ZeRO stage.
        bucket_mb: reduction bucket in MB (0: what engine.parallel.ds_setup derives).
        shared_cores: communication competes with compute for the same cores (gloo on CPU).
    """
    import torch

    from engine.parallel.ds_setup import zero_settings_for
    from pretrain.mim import build_mim_model
    with torch.device("meta"):
        model = build_mim_model(arch)
    counts = count_params(model)
    bucket = bucket_mb * 1e6 or zero_settings_for(max(zero, 1), list(counts.sizes), counts.largest_module, ranks,
                                                  "nccl")["reduce_bucket_size"] * grad_bytes
    flops = model.flops_per_image()   # forward + backward
    t = step_time(flops, micro, ranks, counts.trainable * grad_bytes, bandwidth_gbs * 1e9, peak_tflops * 1e12, mfu,
                  bucket, zero, shared_cores=shared_cores)
    return {**asdict(t), "overlap_gain": t.overlap_gain, "bucket_bytes": bucket, "flops_per_image": flops}


def estimate(arch: str = "beit_base_patch16_224_8k_vocab_cls_pt", precision: str = "bf16", ranks: int = 8,
             activation_gib_per_image: float = 0.1, device_gb: float = 80.0) -> dict:
    """Largest micro-batch per device for each ZeRO stage, from the arithmetic (settings as engine.parallel.ds_setup
    derives them under NCCL) and a per-image activation memory (measure it with `run`).

    Args:
        arch: MIM arch (its tokenizer: the base VQ-KD encoder).
        precision: run.precision on the device.
        ranks: data-parallel ranks.
        activation_gib_per_image: activation memory per image in the device's precision (GiB).
        device_gb: device memory in GB.
    """
    import torch

    from engine.parallel.ds_setup import zero_settings_for
    from pretrain.mim import build_mim_model
    from pretrain.tokenizer import build_tokenizer
    check_counts(ranks=ranks)
    with torch.device("meta"):   # shapes only
        model = build_mim_model(arch)
        tokenizer = build_tokenizer(TOKENIZER_FOR[arch], kmeans_init=False)
    tokenizer.decoder = tokenizer.decode_task_layer = None
    counts = count_params(model, tokenizer)
    out = {}
    for stage in (0, 1, 2, 3):
        derived = zero_settings_for(stage, list(counts.sizes), counts.largest_module, ranks, "nccl")
        zero = ZeroSettings.from_ds_config({"zero_optimization": {"stage": stage, **derived}})
        states = sum(expected_bytes(counts, precision, zero, ranks).values())
        out[f"zero{stage}"] = {"states_gib": states / GIB, "largest_micro_batch": largest_micro_batch(
            states, activation_gib_per_image * GIB, device_gb * 1e9)}
    return out


def rank(arch: str, tokenizer: str, precision: str, micro: int, ds_config: str, steps: int, grad_ckpt: bool,
         out_dir: str, result: str, extra: str = "{}") -> None:
    """Internal: one rank of `measure` (started by torchrun)."""
    _measure_rank(arch, tokenizer, precision, micro, ds_config, steps, grad_ckpt, out_dir, result, extra)


if __name__ == "__main__":
    sys.exit(run_cli({"run": run, "estimate": estimate, "step_time": step_time_cli, "rank": rank}))
