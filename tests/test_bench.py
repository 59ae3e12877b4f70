"""The benchmarks still run and report what they promise (tiny sizes on CPU; the numbers are not asserted)."""
import json
import shutil
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
    # The no-check baseline read the same file, and the host path is reported against it.
    assert result["plain_ffcv"]["images"] == result["ours_host"]["images"]
    assert result["ours_host"]["vs_plain_ffcv"]["images_per_s"] == pytest.approx(
        result["ours_host"]["images_per_s"] / result["plain_ffcv"]["images_per_s"], rel=1e-2)


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
    ("demo_step", ["--stage=segment"], "error: stage must be one of ['mim', 'tokenizer'], got 'segment'"),
    ("demo_step", ["--steps=0"], "error: --steps must be a whole number >= 1 (got 0)"),
    ("demo_step", ["--layouts=gpus"], "error: layouts must be among ('ranks', 'threads', 'lanes'), got ['gpus']"),
    ("demo_step", ["--compiles=yes"], "error: compiles must be among ('off', 'on'), got ['yes']"),
    ("demo_step", ["--baseline_tree=/nonexistent"],
     "error: baseline_tree '/nonexistent' is not a checkout of this project (no pretrain/mim/__main__.py there)"),
])
def test_bad_bench_flags_are_one_line_errors(capsys, bench, args, error):
    import importlib

    from engine.config.cli import run_cli
    assert run_cli(importlib.import_module(f"bench.{bench}").main, args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(error), err


def test_finetune_bench_reports_speed_memory_and_ratio(tmp_path, capsys):
    from bench.finetune import main
    from engine.config.cli import run_cli
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
    from engine.config.cli import run_cli
    from engine.reporting.metrics import device_peak_flops
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


# ------------------------------------------------------------------ bench.suite: rows, table, one run of the suite
# Results shaped like what the benchmarks write (the keys they set), so the row builders run on nothing measured.
CPU_INFO = {"device": "cpu", "threads": 1, "torch": "2.x"}
LOADER_RESULT = {"jpegs": 384, "synthetic": True, "batch": 64, "workers": 2, "cores": 2, **CPU_INFO,
                 "ours_host": {"images_per_s": 1955.9, "images_per_cpu_s": 1028.6, "speedup_per_cpu_s": 6.67},
                 "ours_host_plus_device_on_cpu": {"images_per_s": 255.4, "images_per_cpu_s": 151.6},
                 "official_dataloader": {"images_per_s": 295.3, "images_per_cpu_s": 154.2},
                 "plain_ffcv": {"images_per_s": 2000.0, "images_per_cpu_s": 1050.0}}
TOKENIZER_RESULT = {"arch": "vqkd_small_demo", "batch": 32, "precision": "fp32", **CPU_INFO,
                    "train_images_per_s": 40.0, "train_peak_mem_gib": 1.5, "official_train_images_per_s": 32.0,
                    "official_train_peak_mem_gib": 1.75, "quantizer_ms": 2.0, "one_hot_baseline_quantizer_ms": 5.0}
PRETRAIN_RESULT = {"arch": "beitv2_tiny_test", "batch_per_rank": 16, "precision": "fp32", "zero": 1, "world_size": 1,
                   **CPU_INFO, "baseline_variant": "baseline", "tokenizer_ms_per_batch": 3.0,
                   "variants": {"baseline": {"images_per_s": 50.0, "peak_mem_gib": 2.0},
                                "fused": {"images_per_s": 60.0, "peak_mem_gib": 1.9},
                                "flex_compile": {"error": "RuntimeError: flex attention trains on CUDA only"},
                                "fused_compile": {"images_per_s": 75.0, "peak_mem_gib": 2.5}}}


def test_suite_rows_are_ours_over_the_baseline_for_each_benchmark():
    from bench.suite import rows_for
    loader = rows_for("loader", {"result": LOADER_RESULT})
    # Host part and host + device part on the CPU, each per CPU-second and per wall second.
    assert [(r["metric"], r["ours_images_per_s"], r["baseline_images_per_s"]) for r in loader] == [
        ("images per CPU-second", 1028.6, 154.2), ("images/s (wall)", 1955.9, 295.3),
        ("images per CPU-second", 151.6, 154.2), ("images/s (wall)", 255.4, 295.3),
        ("images/s (wall)", 1955.9, 2000.0)]   # and the host part against FFCV's own Loader, no checks
    assert "no checks" in loader[4]["comparison"]
    assert loader[0]["ratio"] == pytest.approx(1028.6 / 154.2) and loader[3]["ratio"] == pytest.approx(255.4 / 295.3)
    assert "official PIL DataLoader" in loader[0]["comparison"] and "on the CPU" in loader[2]["comparison"]
    assert loader[0]["hardware"].startswith("cpu, 2 cores, 1 torch thread")

    step, quant = rows_for("tokenizer", {"result": TOKENIZER_RESULT})
    assert step["ratio"] == pytest.approx(40.0 / 32.0) and "official formulation" in step["comparison"]
    assert (step["ours_peak_mem_gib"], step["baseline_peak_mem_gib"]) == (1.5, 1.75)
    # The quantizer is timed per batch: images/s = batch / seconds, so the ratio is the one-hot's time over ours.
    assert quant["ours_images_per_s"] == pytest.approx(32 / 2e-3) and quant["ratio"] == pytest.approx(5.0 / 2.0)

    pretrain = {r["comparison"].split(" vs ")[0]: r for r in rows_for("pretrain", {"result": PRETRAIN_RESULT})}
    assert len(pretrain) == 3   # every variant but the baseline, the failed one as an error row
    fused, best = pretrain["fused SDPA attention"], pretrain["fused attention + torch.compile (best)"]
    assert fused["ratio"] == pytest.approx(60.0 / 50.0) and best["ratio"] == pytest.approx(75.0 / 50.0)
    assert (best["ours_peak_mem_gib"], best["baseline_peak_mem_gib"]) == (2.5, 2.0)
    assert "official formulation" in best["comparison"].split(" vs ")[1]
    [failed] = [r for r in pretrain.values() if r["error"]]
    assert failed["error"] == "flex_compile: RuntimeError: flex attention trains on CUDA only"
    assert failed["ratio"] is None


def test_a_failed_benchmark_is_an_error_row_and_the_table_has_a_line_per_row():
    from bench.suite import build_suite, markdown_table, one_line_error
    stderr = "Traceback (most recent call last):\n  ...\nsome | log\nerror: --batch must be a whole number >= 1\n"
    assert one_line_error(stderr, 2) == "--batch must be a whole number >= 1"
    assert one_line_error("Traceback ...\nRuntimeError: boom\n", 1) == "RuntimeError: boom"
    assert one_line_error("", -9) == "exit status -9"
    suite = build_suite({"loader": {"error": "RuntimeError: no | FFCV"}, "tokenizer": {"result": TOKENIZER_RESULT},
                         "pretrain": {"result": PRETRAIN_RESULT}}, {"device_type": "cpu"})
    rows = suite["rows"]
    assert [r["benchmark"] for r in rows] == ["loader"] + ["tokenizer"] * 2 + ["pretrain"] * 3
    assert rows[0]["error"] == "RuntimeError: no | FFCV" and rows[0]["ratio"] is None
    table = markdown_table(rows).splitlines()
    assert len(table) == 2 + len(rows) and table[1].startswith("|---|")
    n_columns = table[0].count(" | ")
    assert all(line.count(" | ") == n_columns for line in table[2:]), table   # the pipe in the error is escaped
    assert "**failed**: RuntimeError: no \\| FFCV" in table[2]
    assert f"**{40.0 / 32.0:.2f}x**" in table[3]
    # A partial result whose every variant failed: the variants' errors are the rows (not the summary again too).
    partial = {"partial": True, "variants": {"baseline": {"error": "AssertionError: x"}}}
    only = build_suite({"pretrain": {"error": "every variant failed: ...", "result": partial}}, {})["rows"]
    assert [r["error"] for r in only] == ["baseline: AssertionError: x"]


def test_the_suite_rebuilds_its_tables_from_results_already_written(tmp_path, capsys):
    from bench.suite import main
    from engine.config.cli import run_cli
    gpu = {**PRETRAIN_RESULT, "device": "NVIDIA H200", "threads": 16}
    for name, result in (("cpu_loader", LOADER_RESULT), ("cpu_tokenizer", TOKENIZER_RESULT), ("h200_pretrain", gpu),
                         ("not_a_bench", {"modes": {}})):
        (tmp_path / f"{name}.json").write_text(json.dumps(result))
    assert run_cli(main, [f"--from_json={tmp_path}", f"--out_dir={tmp_path}"]) == 0
    cpu, cuda = (json.loads((tmp_path / f"suite_{d}.json").read_text()) for d in ("cpu", "cuda"))
    assert {r["benchmark"] for r in cpu["rows"]} == {"loader", "tokenizer"} and len(cpu["rows"]) == 7
    assert {r["benchmark"] for r in cuda["rows"]} == {"pretrain"} and cuda["machine"]["device"] == "NVIDIA H200"
    assert (tmp_path / "suite_cuda.md").read_text().count("| pretrain |") == 3
    # Again, with the suite files now in the folder: each result still counts once.
    assert run_cli(main, [f"--from_json={tmp_path}", f"--out_dir={tmp_path}"]) == 0
    assert len(json.loads((tmp_path / "suite_cpu.json").read_text())["rows"]) == 7
    capsys.readouterr()
    for args, error in ((["--benches=loader,nope"], "error: unknown benchmark 'nope'; choose from loader, "),
                        ([f"--from_json={tmp_path / 'missing'}"], "error: no JSON results in ")):
        assert run_cli(main, args) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(error), err


@pytest.mark.slow
def test_the_suite_runs_each_benchmark_in_its_own_process_and_writes_one_table(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bench.suite", "--quick=true", "--benches=tokenizer,pretrain",
                           f"--out_dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    suite = json.loads((tmp_path / "suite_cpu.json").read_text())
    assert set(suite["benches"]) == {"tokenizer", "pretrain"} and suite["machine"]["quick"] is True
    assert suite["benches"]["pretrain"]["result"]["variants"]["fused"]["images_per_s"] > 0
    assert suite["rows"] and all(r["error"] is None and r["ratio"] > 0 for r in suite["rows"]), suite["rows"]
    assert {r["benchmark"] for r in suite["rows"]} == {"tokenizer", "pretrain"}
    table = (tmp_path / "suite_cpu.md").read_text()
    assert "| tokenizer |" in table and "| pretrain |" in table
    assert sum(line.startswith("| ") for line in table.splitlines()) == 1 + len(suite["rows"])


def test_demo_step_bench_command_keeps_the_global_batch_per_layout():
    from bench.demo_step import _command
    ranks, env = _command("mim", "beitv2_small_demo", "ranks", 2, "/tmp/o", 10, 64, "auto", "tok.pt")
    assert "deepspeed" in ranks[0] and ranks[1:3] == ["--num_gpus", "2"] and env["OMP_NUM_THREADS"] == "1"
    assert "--run.micro_batch_size=32" in ranks and "--run.ds_config=ds_configs/zero2.json" in ranks
    one, env = _command("mim", "beitv2_small_demo", "threads", 2, "/tmp/o", 10, 64, "fp32", "tok.pt")
    assert one[:3] == [sys.executable, "-m", "pretrain.mim"] and env["OMP_NUM_THREADS"] == "2"
    assert "--run.micro_batch_size=64" in one and "--run.ds_config=ds_configs/zero0.json" in one
    assert "--tokenizer=tok.pt" in one and "--run.precision=fp32" in one
    tok, _ = _command("tokenizer", "vqkd_small_demo", "threads", 2, "/tmp/o", 10, 64, "auto", "")
    assert not [f for f in tok if f.startswith("--tokenizer=")]
    assert "--run.compile=true" not in one
    compiled, _ = _command("mim", "beitv2_small_demo", "threads", 2, "/tmp/o", 10, 64, "fp32", "tok.pt", True)
    assert "--run.compile=true" in compiled and [f for f in compiled if f != "--run.compile=true"] == one
    # A baseline checkout runs the same command on its own code.
    before, env = _command("mim", "beitv2_small_demo", "threads", 2, "/tmp/o", 10, 64, "fp32", "tok.pt", tree="/b")
    assert before == one and env["PYTHONPATH"] == "/b"


@pytest.mark.slow
def test_demo_step_bench_times_both_layouts_through_the_real_train_command(tmp_path):
    from bench.demo_step import main
    out = tmp_path / "demo_step.json"
    result = main(stage="mim", recipe="beitv2_tiny_test", steps=10, skip=1, layouts="threads,ranks,lanes",
                  precisions="fp32", global_batch=8, cores=2, out=str(out))
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    rows = result["variants"]
    assert set(rows) == {"threads_fp32", "ranks_fp32", "lanes_fp32"}
    lanes = rows["lanes_fp32"]   # two processes side by side: their images/s added up
    assert len(lanes["per_process"]) == 2 and lanes["images_per_s"] == pytest.approx(sum(lanes["per_process"]))
    for row in rows.values():
        assert row["images_per_s"] > 0 and row["log_rows"] >= 1 and row["precision_resolved"] == "fp32", row
    assert rows["threads_fp32"]["speedup_vs_first"] == 1.0
    assert rows["ranks_fp32"]["speedup_vs_first"] == pytest.approx(
        rows["ranks_fp32"]["images_per_s"] / rows["threads_fp32"]["images_per_s"], abs=1e-3)


@pytest.mark.slow
def test_demo_step_bench_measures_a_baseline_checkout_before_each_variant(tmp_path):
    """--baseline_tree runs each variant on another checkout first (here a copy of this one, so the code is the
    same) and gives the before/after ratio."""
    from bench.demo_step import ROOT, main
    tree = tmp_path / "before"
    shutil.copytree(ROOT, tree, ignore=shutil.ignore_patterns(".venv", ".git", "runs", "__pycache__", "*.egg-info"))
    result = main(stage="tokenizer", recipe="vqkd_tiny_test", steps=6, skip=1, layouts="threads", precisions="fp32",
                  global_batch=8, baseline_tree=str(tree), out=str(tmp_path / "r.json"))
    rows = result["variants"]
    assert list(rows) == ["threads_fp32@baseline", "threads_fp32"] and result["baseline_tree"] == str(tree)
    assert all(r["images_per_s"] > 0 for r in rows.values()), rows
    assert rows["threads_fp32"]["speedup_vs_baseline"] == pytest.approx(
        rows["threads_fp32"]["images_per_s"] / rows["threads_fp32@baseline"]["images_per_s"], abs=1e-3)
