"""Memory at scale: the benchmark's arithmetic, ZeRO-3 below one unsharded rank, CPU offload, and ViT-L/16 MIM steps.

The arithmetic is checked against counts taken from the model here and against the tensors a real engine holds;
the memory comparisons run the real MIM loop through `bench.memory` on 2 gloo ranks.
"""
import dataclasses
import json
import math

import pytest
import torch

from bench.memory import ZeroSettings, count_params, expected_bytes, markdown, measure, step_time
from engine.parallel.ds_setup import zero_settings_for
from pretrain.mim import build_mim_model
from pretrain.tokenizer import build_tokenizer
from tests.dist_util import losses, run_ranks, run_stage


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = build_mim_model("beitv2_tiny_test")
    tokenizer = build_tokenizer("vqkd_tiny_test", kmeans_init=False)
    tokenizer.decoder = tokenizer.decode_task_layer = None   # as the MIM stage keeps it
    return model, tokenizer


def test_arithmetic_matches_counts_taken_from_the_model(tiny):
    model, tokenizer = tiny
    counts = count_params(model, tokenizer)
    numels = [p.numel() for p in model.parameters()]
    n_params = sum(numels)
    assert counts.trainable == n_params and sorted(counts.sizes) == sorted(numels)
    assert counts.frozen == sum(t.numel() for t in [*tokenizer.parameters(), *tokenizer.buffers()])
    assert sorted(counts.frozen_sizes) == sorted(p.numel() for p in tokenizer.parameters())
    buffers = sum(b.numel() for b in tokenizer.buffers())
    assert counts.largest_module == max(sum(p.numel() for p in b.parameters()) for b in model.blocks)
    threshold = 1000
    small = sum(n for n in numels if n <= threshold)
    for ranks in (1, 2, 3, 8):
        share = math.ceil(n_params / ranks)
        for stage in (0, 1, 2, 3):
            zero = ZeroSettings(stage=stage, reduce_bucket_size=4096, param_persistence_threshold=threshold,
                                max_reuse_distance=10, max_live_parameters=10, prefetch_bucket_size=10)
            for precision, width in (("fp32", 4), ("bf16", 2)):
                got = expected_bytes(counts, precision, zero, ranks)
                sharded = 1 if stage == 0 else ranks
                assert got["optimizer_state"] == 2 * 4 * math.ceil(n_params / sharded)   # Adam's two fp32 moments
                if stage == 3 and ranks > 1:   # engine.loop.frozen: a partition of each tensor, small ones also whole
                    kept = sum(math.ceil(p.numel() / ranks) + (p.numel() if p.numel() <= threshold else 0)
                               for p in tokenizer.parameters())
                    assert got["frozen_tokenizer"] == (kept + buffers) * width
                    whole = expected_bytes(counts, precision, dataclasses.replace(zero, shard_frozen=False),
                                           ranks)
                    assert whole["frozen_tokenizer"] == counts.frozen * width > got["frozen_tokenizer"]
                else:
                    assert got["frozen_tokenizer"] == counts.frozen * width
                if stage < 3:
                    assert got["parameters"] == n_params * width
                else:   # a partition each, plus the small tensors every rank also keeps whole
                    assert got["parameters"] == (share + small) * width
                if stage == 2:
                    assert got["gradients"] == share * (4 + width)   # own partition + its fp32 copy
                if stage == 3:
                    assert got["gradients"] == share * 4
                    assert got["master_weights"] == (share * 4 if width == 2 else 0)
                    # max_live below one layer: DeepSpeed still gathers a whole layer, one at a time
                    assert got["gathered_parameters"] == (0 if ranks == 1 else counts.largest_module * width)
    # Sharding pays: per-rank model states fall with ranks at ZeRO-3, and not at all at ZeRO-0.
    def states(stage, ranks):
        got = expected_bytes(counts, "fp32", ZeroSettings(stage=stage), ranks)
        return sum(got[k] for k in ("parameters", "master_weights", "gradients", "optimizer_state"))
    assert states(3, 8) < states(3, 2) < states(0, 1) == states(0, 8)


def test_derived_zero_settings_follow_the_model_and_the_backend():
    vit_b = [768 * 768 * 3] * 12 + [768 * 3072 * 2] * 12 + [768] * 200
    layer = 7_000_000
    s3, nccl = zero_settings_for(3, vit_b, layer, 2, "gloo"), zero_settings_for(3, vit_b, layer, 2, "nccl")
    assert s3["overlap_comm"] is False and nccl["overlap_comm"] is True
    for s in (s3, nccl):
        assert s["stage3_max_reuse_distance"] == layer < sum(vit_b)   # layers are released between forward and backward
        assert max(vit_b) <= s["reduce_bucket_size"] <= sum(vit_b) // 4
        assert s["sub_group_size"] * 2 * 4 >= sum(vit_b) > s["sub_group_size"] * 2
    # A GPU prefetches the next layer while it computes; under gloo nothing overlaps, so nothing is prefetched.
    assert (nccl["stage3_prefetch_bucket_size"], nccl["stage3_max_live_parameters"]) == (layer, 2 * layer)
    assert (s3["stage3_prefetch_bucket_size"], s3["stage3_max_live_parameters"]) == (0, layer)
    assert s3["reduce_bucket_size"] <= layer < nccl["reduce_bucket_size"]
    assert zero_settings_for(0, vit_b, layer, 2, "nccl") == {}
    assert "stage3_max_reuse_distance" not in zero_settings_for(2, vit_b, layer, 2, "gloo")


def test_step_time_model():
    flops, grads = 160e9, 86e6 * 2
    one = step_time(flops, 128, 1, grads, 25e9, 989e12, 0.4, 25e6)
    eight = step_time(flops, 128, 8, grads, 25e9, 989e12, 0.4, 25e6)
    assert one.comm_s == 0 and one.step_overlap_s == one.compute_s
    buckets = math.ceil(grads / 25e6)   # each pays 2 (n - 1) hop latencies
    assert eight.comm_s == pytest.approx(2 * 7 / 8 * grads / 25e9 + buckets * 2 * 7 * 20e-6)
    assert eight.compute_s < eight.step_overlap_s < eight.step_no_overlap_s
    assert eight.step_no_overlap_s == pytest.approx(eight.compute_s + eight.comm_s)
    cpu = step_time(flops, 2, 2, 4 * 106e6, 5e9, 50e9, 1.0, 4 * 13e6, shared_cores=True)
    assert cpu.overlap_gain == 0
    assert step_time(flops, 128, 8, grads, 25e9, 989e12, 0.4, 25e6, zero_stage=3).comm_s > eight.comm_s


@pytest.mark.slow
def test_zero3_rank_holds_less_than_one_unsharded_rank():
    """The real MIM loop of ViT-B on 1 rank at ZeRO-0 and on 2 ranks at ZeRO-3: the tensors each rank holds match
    the arithmetic, and a ZeRO-3 rank's peak is below the unsharded rank's (0.84x measured in docs/scale.md; the
    bound is a regression guard with a generous margin). A smaller model would not show it: below ~10M parameters
    the runtime and the engines' fixed costs outweigh what ZeRO-3 saves."""
    kw = dict(arch="beit_base_patch16_224_8k_vocab_cls_pt", precision="fp32", micro=2, steps=2)
    one = measure(ds_config="ds_configs/zero0.json", ranks=1, **kw)
    two = measure(ds_config="ds_configs/zero3.json", ranks=2, **kw)
    for r in (one, two):
        held, want = r["per_rank"][0]["tensors_held"], r["arithmetic"]
        for part in ("parameters", "gradients", "optimizer_state", "master_weights", "frozen_tokenizer"):
            assert held[part] == pytest.approx(want[part], rel=0.02, abs=64 * 1024), (r["setup"] if "setup" in r
                                                                                      else r["ds_config"], part)
        assert held["buckets"] <= want["buckets"] + 64 * 1024
    # The model states a rank holds halve (DeepSpeed's defaults would add a 2 GB bucket), and so does the tokenizer.
    states = lambda r: sum(r["per_rank"][0]["tensors_held"][k] for k in   # noqa: E731
                           ("parameters", "master_weights", "gradients", "optimizer_state", "buckets"))
    assert states(two) < 0.6 * states(one), (states(one), states(two))
    tokenizer = lambda r: r["per_rank"][0]["tensors_held"]["frozen_tokenizer"]   # noqa: E731
    assert tokenizer(two) < 0.6 * tokenizer(one), (tokenizer(one), tokenizer(two))
    peak = lambda r: r["per_rank"][0]["process_peak"]   # noqa: E731
    assert peak(two) < 0.95 * peak(one), (peak(one), peak(two))
    table = markdown([{**one, "setup": "1 x zero0"}, {**two, "setup": "2 x zero3"}])
    assert table.count("\n") == 4 and "2 x zero3" in table


def _mim_args(tokenizer, out, ds_config, *extra):
    return ["train", "beitv2_tiny_test", f"--tokenizer={tokenizer}", f"--run.output_dir={out}",
            f"--run.ds_config={ds_config}", "--data.source=synthetic", "--data.limit=64", "--schedule.total_steps=4",
            "--run.save_interval=100", "--run.save_final=false", *extra]


@pytest.mark.slow
def test_cpu_offload_gives_the_losses_of_no_offload(tmp_path, tiny_tokenizer_file):
    """ZeRO-3 with optimizer state and parameters offloaded to the host: the same optimizer on the same numbers."""
    runs = {}
    for name in ("zero3", "zero3_offload"):
        out = tmp_path / name
        run_stage("pretrain.mim", _mim_args(tiny_tokenizer_file, out, f"ds_configs/{name}.json"))
        runs[name] = losses(out)
    assert sorted(runs["zero3"]) == [1, 2, 3, 4]
    assert runs["zero3_offload"] == pytest.approx(runs["zero3"], rel=1e-4, abs=1e-5)
    assert runs["zero3"][4] != runs["zero3"][1]   # the steps trained something: equal losses are not trivial
    saved = json.loads((tmp_path / "zero3_offload" / "config.json").read_text())
    assert saved["run"]["ds_config"] == "ds_configs/zero3_offload.json"


@pytest.mark.slow
def test_vit_large_mim_steps_and_resume_at_zero3(tmp_path):
    """beitv2_large_1600e on 2 CPU ranks: ZeRO-3, gradient checkpointing, one image per rank, a random-init
    base tokenizer; one step and a checkpoint, then a resume that trains one more."""
    from pretrain.tokenizer import save_tokenizer
    torch.manual_seed(0)
    tokenizer = tmp_path / "tokenizer_base.pt"
    save_tokenizer(build_tokenizer("vqkd_encoder_base_decoder_3x768x12_clip", kmeans_init=False), str(tokenizer))
    out = tmp_path / "large"
    common = ["train", "beitv2_large_1600e", f"--tokenizer={tokenizer}", f"--run.output_dir={out}",
              "--data.source=synthetic", "--data.limit=8", "--run.precision=fp32", "--run.micro_batch_size=1",
              "--run.ds_config=ds_configs/zero3.json", "--run.grad_checkpointing=true", "--run.save_final=false",
              "--run.log_interval=1", "--run.progress_bar=false", "--schedule.warmup_steps=1"]
    first = run_stage("pretrain.mim", [*common, "--schedule.total_steps=1", "--run.save_interval=1"])
    # The step-1 checkpoint is complete (`latest` names it only then); config.json alone would not be one.
    latest = out / "checkpoints" / "latest"
    assert latest.is_file() and latest.read_text() == "step_00000001", first[-2000:]
    assert (out / "checkpoints" / "step_00000001").is_dir()
    second = run_stage("pretrain.mim", [*common, "--schedule.total_steps=2", "--run.save_interval=1000",
                                        "--run.allow_config_change=true"])
    assert "resumed from" in second and "at step 1/2" in second, second[-2000:]
    curve = losses(out)
    assert sorted(curve) == [1, 2] and all(math.isfinite(v) for v in curve.values())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["peak_mem_gib"] < 8, rows[-1]   # per rank, inside this machine's memory


def _heap_free_after_zero3_start(rank, world, mode):
    """One rank: a stage's start under glibc (threshold raised by a large free, as loading the tokenizer does), a
    ZeRO-3 engine of 4 MB layers; asserts how much free space the engine start left in glibc's heaps."""
    import ctypes
    import os

    from engine.config.schema import OptimConfig, RunConfig
    from engine.parallel import host_memory
    from engine.parallel.ds_setup import initialize, param_groups

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    os.environ.update(BEITV2_MMAP_THRESHOLD=mode, LOCAL_RANK=str(rank))   # DeepSpeed wants LOCAL_RANK
    host_memory.at_process_start(zero_stage=3)   # what dist_utils.init does first, for a ZeRO-3 run
    torch.ones(4 << 20).sum()   # a 16 MB block, freed at once: glibc's dynamic threshold rises above 2 MB
    torch.manual_seed(0)
    model = torch.nn.ModuleList([torch.nn.Linear(1024, 1024, bias=False) for _ in range(8)])
    run = RunConfig(output_dir="unused", ds_config="ds_configs/zero3.json", micro_batch_size=1)
    initialize(model, param_groups(model), run, OptimConfig(), world)
    free, model_bytes = libc.mallinfo2().fordblks, 8 * 1024 * 1024 * 4
    # ZeRO-3 copies each 2 MB partition into a flat buffer and frees it: heap space every later step would refill.
    assert (free > model_bytes / 4) if mode == "dynamic" else (free < model_bytes / 8), (mode, free)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["fixed", "dynamic", "auto"])   # auto: fixed, for this ZeRO-3 run
def test_zero3_engine_start_leaves_no_free_heap_when_the_threshold_is_fixed(mode):
    """With BEITV2_MMAP_THRESHOLD=fixed the process fixes glibc's threshold before ZeRO-3 partitions the model, so
    the partitions it frees leave no free space in the heap, which every later step would fill and keep resident
    (about 0.4 GiB per ViT-B rank, docs/scale.md); under glibc's own rule the same start leaves half the model's
    bytes."""
    run_ranks(_heap_free_after_zero3_start, 2, mode)


@pytest.mark.slow
def test_gloo_zero3_settings_and_the_mmap_threshold_keep_the_losses(tmp_path, tiny_tokenizer_file, monkeypatch):
    """What the engine now derives under gloo (no prefetch, one live layer, a bucket of at most one layer) and where
    glibc maps tensors move memory, not numbers: to the bit the losses of a prefetching, whole-model-bucket run under
    glibc's own threshold."""
    zero = {"stage": 3, "contiguous_gradients": True, "stage3_param_persistence_threshold": 1000,   # layers gather
            "stage3_gather_16bit_weights_on_model_save": False}
    layer = 50048   # a beitv2_tiny_test block
    before = {**zero, "overlap_comm": False, "reduce_bucket_size": 268288, "stage3_prefetch_bucket_size": layer,
              "stage3_max_live_parameters": 2 * layer, "stage3_max_reuse_distance": layer}
    runs = {}
    for name, block, threshold in (("before", before, "dynamic"), ("now", zero, "fixed")):
        config = tmp_path / f"{name}.json"
        config.write_text(json.dumps({"zero_optimization": block}))
        monkeypatch.setenv("BEITV2_MMAP_THRESHOLD", threshold)
        run_stage("pretrain.mim", _mim_args(tiny_tokenizer_file, tmp_path / name, config))
        runs[name] = losses(tmp_path / name)
    assert sorted(runs["now"]) == [1, 2, 3, 4] and runs["now"] == runs["before"], runs


def test_a_bad_mmap_threshold_mode_names_the_variable(monkeypatch):
    from engine.parallel import host_memory
    monkeypatch.setenv("BEITV2_MMAP_THRESHOLD", "sometimes")
    with pytest.raises(ValueError, match="BEITV2_MMAP_THRESHOLD='sometimes' must be one of auto, dynamic, fixed"):
        host_memory.at_process_start()


def test_the_default_threshold_is_fixed_for_zero3_runs_only(monkeypatch):
    from engine.parallel import host_memory
    monkeypatch.delenv("BEITV2_MMAP_THRESHOLD", raising=False)
    assert [host_memory.mode(stage) for stage in (None, 0, 1, 2, 3)] == ["dynamic"] * 4 + ["fixed"]
    monkeypatch.setenv("BEITV2_MMAP_THRESHOLD", "dynamic")
    assert host_memory.mode(3) == "dynamic"
    monkeypatch.setenv("BEITV2_MMAP_THRESHOLD", "fixed")
    assert host_memory.mode(0) == "fixed"


def test_a_stage_tells_host_memory_its_zero_stage_before_anything_is_built(monkeypatch):
    from engine.config.schema import RunConfig
    from engine.parallel import distributed as dist_utils
    from engine.parallel import host_memory

    class Stop(Exception):   # stop init right there: no process group in the test process
        pass
    seen = []

    def record(zero_stage=None):
        seen.append(zero_stage)
        raise Stop
    monkeypatch.setattr(host_memory, "at_process_start", record)
    for run in (RunConfig(ds_config="ds_configs/zero3.json"), RunConfig(ds_config="ds_configs/zero1.json"), None):
        with pytest.raises(Stop):
            dist_utils.init(run)
    assert seen == [3, 1, None]
