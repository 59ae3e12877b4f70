"""The benchmarks still run and report what they promise (tiny sizes on CPU; the numbers are not asserted)."""
import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT


def test_tokenizer_bench_reports_speed_memory_and_quantizer_share(tmp_path):
    from bench.tokenizer import main
    out = tmp_path / "tok.json"
    result = main(arch="vqkd_tiny_test", batch=4, iters=1, out=str(out))
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    for key in ("train_images_per_s", "inference_images_per_s", "train_peak_mem_gib", "quantizer_share_of_train_step",
                "quantizer_speedup_vs_one_hot", "official_train_images_per_s", "train_step_speedup_vs_official"):
        assert result[key] > 0, key
    assert result["quantizer_share_of_train_step"] < 1
    assert result["official_loss_difference"] < 1e-5   # the baseline computes the same loss on the same weights


def test_the_tokenizer_benchs_official_formulation_trains_like_ours():
    # The baseline must be the same computation done the costly way: same codes, same codebook update.
    import torch

    from bench.tokenizer import official_formulation
    from pretrain.tokenizer import build_tokenizer
    torch.manual_seed(0)
    ours = build_tokenizer("vqkd_tiny_test", kmeans_init=False).train()
    official = official_formulation(ours)
    assert any(getattr(m, "fused_attn", None) is False for m in official.modules())
    images, target = torch.rand(4, 3, ours.img_size, ours.img_size), torch.randn(4, ours.num_patches, ours.teacher_dim)
    (loss_a, _), (loss_b, _) = ours(images, target), official(images, target)
    torch.testing.assert_close(loss_a, loss_b)
    torch.testing.assert_close(ours.quantize.embedding.weight, official.quantize.embedding.weight)
    torch.testing.assert_close(ours.quantize.cluster_size, official.quantize.cluster_size)
    assert not torch.equal(ours.quantize.cluster_size, torch.zeros_like(ours.quantize.cluster_size))   # it updated


@pytest.mark.slow
def test_pretrain_bench_runs_the_real_loop_per_variant(tmp_path):
    out = tmp_path / "pre.json"
    # flex cannot train on this CPU: that variant is recorded with its error and the others still run.
    proc = subprocess.run([sys.executable, "-m", "bench.pretrain", "--variants=baseline,flex_compile,fused",
                           "--warmup=4", "--profile=True", f"--out={out}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result["variants"]) == {"baseline", "flex_compile", "fused"}
    assert "trains on CUDA only" in result["variants"]["flex_compile"]["error"]
    fused, base = result["variants"]["fused"], result["variants"]["baseline"]
    assert result["baseline_variant"] == "baseline" and base["speedup_vs_baseline"] == 1.0
    assert fused["speedup_vs_baseline"] == pytest.approx(fused["images_per_s"] / base["images_per_s"])
    assert fused["loss"] > 0 and fused["peak_mem_gib"] > 0
    assert fused["profile_top_ops"] and fused["profile_top_ops"][0]["ms_per_step"] > 0   # the last variant only
    assert "profile_top_ops" not in result["variants"]["baseline"]
    assert result["tokenizer_ms_per_batch"] > 0


@pytest.mark.slow
def test_loader_bench_compares_against_the_official_style_loader(tmp_path):
    out = tmp_path / "loader.json"
    proc = subprocess.run([sys.executable, "-m", "bench.loader", "--images=64", "--epochs=1", "--repeats=1",
                           "--batch=16", f"--out={out}"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["synthetic"] is True
    assert result["ours_host"]["images_per_s"] > 0 and result["ours_host"]["speedup_per_cpu_s"] > 0


@pytest.mark.slow
def test_engine_step_bench_counts_ops_and_syncs_per_step(tmp_path):
    from bench.engine_step import main
    result = main(arch="beitv2_tiny_test", img_size=32, steps=(1, 2), modes="ds_bf16_zero1,lean",
                  out=str(tmp_path / "step.json"))
    lean, base = result["modes"]["lean"], result["modes"]["ds_bf16_zero1"]
    assert lean["syncs_per_step"] == 0 and base["syncs_per_step"] > 0   # DeepSpeed's bf16 checks read the device
    assert 0 < lean["ops_vs_baseline"] < 1 and lean["top_ops_per_step"]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_gpu_kernel_check_compares_outputs_and_every_gradient(dtype):
    # On CUDA it compares flex with SDPA; here the same check runs on the two CPU-trainable kernels.
    import torch

    from bench.gpu_checks import flex_matches_sdpa
    result = flex_matches_sdpa("beitv2_tiny_test", batch=2, dtype=getattr(torch, dtype),
                               kernels=("sdpa", "explicit"), device="cpu")
    assert result["ok"] and result["check"] == "explicit_matches_sdpa", result
    if dtype == "float32":
        assert result["errors"]["bias_grad"] < 1e-4 and result["errors"]["max_grad"] < 1e-3
    else:   # 16-bit: a real rounding error, measured against the fp32 reference
        assert 0 < result["reference_kernel_errors"]["output"] < 0.1


@pytest.mark.parametrize("bench,args,error", [
    ("tokenizer", ["--arch=nope"], "error: unknown tokenizer arch 'nope'; choose one of vqkd_"),
    ("tokenizer", ["--iters=0"], "error: --iters must be a whole number >= 1 (got 0)"),
    ("tokenizer", ["--arch=vqkd_tiny_test", "--batch=2", "--iters=1", "--out=/proc/nope/x.json"],
     "error: cannot write /proc/nope/x.json"),
    ("attention", ["--dtype=fp8"], "error: --dtype must be one of bf16, fp16, fp32 (got 'fp8')"),
    ("pretrain", ["--warmup=1.5"], "error: --warmup must be an integer, got 1.5"),
    ("loader", ["--batch=0"], "error: --batch must be a whole number >= 1 (got 0)"),
])
def test_bad_bench_flags_are_one_line_errors(capsys, bench, args, error):
    import importlib

    from engine.cli import run_cli
    assert run_cli(importlib.import_module(f"bench.{bench}").main, args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(error), err


def test_finetune_bench_reports_speed_memory_and_ratio(tmp_path, capsys):
    from bench.finetune import main
    from engine.cli import run_cli
    out = tmp_path / "ft.json"
    result = main(arch="beitv2_tiny_test", batch=4, warmup=2, precision="fp32", variants="baseline,fused",
                  out=str(out))
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["baseline_variant"] == "baseline" and result["flops_per_image"] > 0
    assert set(result["variants"]) == {"baseline", "fused"}
    for name, r in result["variants"].items():
        assert "error" not in r, (name, r)
        assert r["images_per_s"] > 0 and r["peak_mem_gib"] > 0 and r["speedup_vs_baseline"] > 0, (name, r)
        assert r["mfu"] is None   # no known peak FLOP/s on a CPU
    assert result["variants"]["baseline"]["attention"] == "explicit"
    assert result["variants"]["baseline"]["speedup_vs_baseline"] == 1.0
    # Same weights, same batches: the explicit softmax computes what the fused kernel does.
    assert result["variants"]["fused"]["loss"] == pytest.approx(result["variants"]["baseline"]["loss"], rel=1e-4)
    capsys.readouterr()
    # Bad flags are one-line errors before anything trains.
    for args, error in ((["--arch=nope"], "error: unknown classifier arch 'nope'; choose from beit_"),
                        (["--zero=4"], "error: --zero must be one of 0, 1, 2, 3 (got 4)"),
                        (["--batch=-1"], "error: --batch must be a whole number >= 1 (got -1)")):
        assert run_cli(main, args) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(error), err


def test_segment_bench_reports_speed_mfu_memory_and_ratio(tmp_path, capsys):
    from bench.segment import main
    from engine.cli import run_cli
    from engine.metrics import device_peak_flops
    out = tmp_path / "seg.json"
    result = main(arch="upernet_beitv2_tiny_test", batch=4, warmup=1, precision="fp32", variants="baseline,fused",
                  out=str(out))
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["synthetic"] is True and result["crop"] == 32 and result["recipe"] == "upernet_beitv2_tiny_test"
    assert result["baseline_variant"] == "baseline" and result["flops_per_image"] > 0
    assert set(result["variants"]) == {"baseline", "fused"}
    for name, r in result["variants"].items():
        assert "error" not in r, (name, r)
        assert r["images_per_s"] > 0 and r["peak_mem_gib"] > 0 and r["speedup_vs_baseline"] > 0, (name, r)
        if device_peak_flops() is None:   # no known peak FLOP/s (a CPU): no MFU rather than a guess
            assert r["mfu"] is None, (name, r)
        else:
            assert 0 < r["mfu"] < 1, (name, r)
    base, fused = result["variants"]["baseline"], result["variants"]["fused"]
    assert base["attention"] == "explicit" and fused["attention"] == "sdpa" and base["speedup_vs_baseline"] == 1.0
    assert fused["speedup_vs_baseline"] == pytest.approx(fused["images_per_s"] / base["images_per_s"])
    # Same weights, same batches, same augmentation: the explicit softmax computes what the fused kernel does.
    assert fused["loss"] == pytest.approx(base["loss"], rel=1e-4)
    capsys.readouterr()
    # Bad flags are one-line errors before anything trains.
    for args, error in ((["--arch=nope"], "error: unknown segmenter arch 'nope'; choose from upernet_"),
                        (["--variants=fused,nope"], "error: unknown variant 'nope'; choose from baseline"),
                        (["--batch=1"], "error: config key 'run.micro_batch_size' must be >= 2")):
        assert run_cli(main, args) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(error), err
