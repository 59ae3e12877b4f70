"""scripts/ablation.py (`make ablation`) on a tiny budget: every row, one seed, both probe poolings; results.json's
structure, report.md and its plot; a rerun skips every finished piece."""
import importlib.util
import json
import math
import os

import pytest

from tests.conftest import ROOT

spec = importlib.util.spec_from_file_location("ablation", os.path.join(ROOT, "scripts", "ablation.py"))
ablation = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ablation)

TINY = ["--seeds=1", "--tokenizer_recipe=vqkd_tiny_test", "--mim_recipe=beitv2_tiny_test", "--tokenizer_steps=2",
        "--mim_steps=2", "--limit=96", "--eval_images=64", "--probe_epochs=2", "--probe_batch=32"]


def test_mean_and_sample_std_over_seeds():
    assert ablation.summary([0.5]) == {"mean": 0.5, "std": 0.0}
    s = ablation.summary([0.2, 0.4, 0.6])
    assert s["mean"] == pytest.approx(0.4) and s["std"] == pytest.approx(0.2)
    with pytest.raises(SystemExit):
        ablation.parse_args(["--rows=baseline,nonsense"])


@pytest.mark.slow
@pytest.mark.usefixtures("fashion_mnist_available")
def test_the_ablation_runs_every_row_and_reports_it(tmp_path):
    out = tmp_path / "ablation"
    results = ablation.main([f"--out={out}", *TINY])
    with open(out / "results.json") as f:
        saved = json.load(f)
    assert saved["rows"] == json.loads(json.dumps(results["rows"]))
    assert list(saved["rows"]) == list(ablation.ROWS)
    for name, row in saved["rows"].items():
        for pooling in ("cls", "mean"):
            stats = row[pooling]
            assert list(stats["per_seed"]) == ["0"], name
            assert all(0 <= v <= 1 for v in stats["per_seed"].values()), (name, stats)
            assert math.isfinite(stats["mean"]) and math.isfinite(stats["std"]) and 0 <= stats["mean"] <= 1
    assert saved["budget"]["mim_steps"] == 2 and saved["budget"]["seed_list"] == [0]
    assert set(saved["tokenizers"]) == {"imagenet", "random"}
    with open(out / "tokenizer_random" / "config.json") as f:
        assert json.load(f)["teacher"]["random_init"] is True
    with open(out / "no_aggregation_seed0" / "config.json") as f:
        assert json.load(f)["model"]["aggregation"] is False
    with open(out / "pixel_targets_seed0" / "config.json") as f:
        assert json.load(f)["model"]["target"] == "pixels"
    report = (out / "report.md").read_text()
    assert all(f"| {name} |" in report for name in ablation.ROWS) and "![ablation](ablation.png)" in report
    assert (out / "ablation.png").stat().st_size > 10_000
    # A rerun trains and probes nothing again: the same numbers, the checkpoints untouched.
    stamp = (out / "baseline_seed0" / "mim.pt").stat().st_mtime_ns
    again = ablation.main([f"--out={out}", *TINY])
    assert again["rows"] == results["rows"]
    assert (out / "baseline_seed0" / "mim.pt").stat().st_mtime_ns == stamp
    assert set(again["seconds"]) >= {"tokenizer_imagenet", "baseline_seed0"}
