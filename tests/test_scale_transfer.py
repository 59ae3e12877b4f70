"""The transfer stage's large recipes at scale: ViT-L/16 classification and UperNet-on-ViT-L segmentation take steps
on 2 CPU ranks at ZeRO-3 with gradient checkpointing, checkpoint, resume and evaluate inside this machine's memory.

Backbones start from random weights (`--init=random`) on synthetic images: what is under test is that the models of
the official large recipes train, checkpoint and resume sharded, not what they learn. Segmentation trains on 128 px
crops instead of 512 to keep the test minutes short; its parameters, gradients and optimizer state are the recipe's.
"""
import json
import math
import shutil

import pytest

from tests.dist_util import losses, run_stage

LARGE = [
    pytest.param("finetune.classify", "beitv2_large_ft_from_1600e", ["--run.micro_batch_size=1"], id="classify"),
    pytest.param("finetune.segment", "upernet_beitv2_large_ade20k",
                 ["--run.micro_batch_size=2", "--model.img_size=128", "--augment.scale=[160,128]",
                  "--eval.stride=128"], id="segment"),
]


@pytest.mark.slow
@pytest.mark.parametrize("module, recipe, extra", LARGE)
def test_large_transfer_recipe_steps_resumes_and_evaluates_at_zero3(tmp_path, module, recipe, extra):
    out = tmp_path / "large"
    common = ["train", recipe, "--init=random", f"--run.output_dir={out}", "--data.source=synthetic",
              "--data.limit=8", "--data.eval_images=2", "--run.precision=fp32",
              "--run.ds_config=ds_configs/zero3.json", "--run.grad_checkpointing=true", "--run.save_final=false",
              "--run.log_interval=1", "--run.progress_bar=false", "--schedule.warmup_steps=1", *extra]
    try:
        first = run_stage(module, [*common, "--schedule.total_steps=1", "--run.save_interval=1"], timeout=900)
        assert (out / "checkpoints" / "latest").is_file(), first[-2000:]
        second = run_stage(module, [*common, "--schedule.total_steps=2", "--run.save_interval=1000",
                                    "--run.allow_config_change=true"], timeout=900)
        assert "resumed from" in second and "at step 1/2" in second, second[-2000:]
        curve = losses(out)
        assert sorted(curve) == [1, 2] and all(math.isfinite(v) for v in curve.values()), curve
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert rows[-1]["peak_mem_gib"] < 8, rows[-1]   # per rank, inside this machine's memory
        held_out = json.loads((out / "eval.json").read_text())
        assert held_out["images"] == 2, held_out   # every held-out image once, over both ranks
        assert all(math.isfinite(v) for v in held_out.values() if isinstance(v, float)), held_out
    finally:
        shutil.rmtree(out, ignore_errors=True)   # ~5 GB of ZeRO-3 shards per run
