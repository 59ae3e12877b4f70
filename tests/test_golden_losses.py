"""Golden losses: the four stages' tiny recipes, trained on 2 CPU ranks (gloo, fp32, one thread per rank), give the
losses recorded in tests/golden_losses.json, step for step. A refactor that changes no behaviour keeps them to the
bit; a change that is meant to alter training (a new init, another augmentation order) records them again:

    PYTHONPATH=. DS_ACCELERATOR=cpu .venv/bin/python -m tests.test_golden_losses   # rewrites the JSON

Bitwise equality holds on the CPU kind and torch version that recorded them (both kept in the file); on another
(a CPU with AVX-512 kernels, another torch) float sums round differently, so the losses are compared to 1e-4.
The MIM stage reads the tokenizer stage's tokenizer.pt, the fine-tuning stage the MIM stage's mim.pt: one chain,
as in the demo."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from tests.dist_util import losses, run_stage

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("fashion_mnist_available")]
GOLDEN = Path(__file__).with_name("golden_losses.json")
STEPS = 6   # past the warm-up, into the cosine (poly for segmentation) decay


def stage_runs(root: Path) -> dict[str, dict[int, float]]:
    """Each stage's tiny recipe for STEPS steps, chained: {stage: {step: loss}}."""
    common = [f"--schedule.total_steps={STEPS}", "--run.save_interval=1000"]
    out = {name: root / name for name in ("tokenizer", "mim", "classify", "segment")}
    run_stage("pretrain.tokenizer", ["train", "vqkd_tiny_test", *common, f"--run.output_dir={out['tokenizer']}"])
    run_stage("pretrain.mim", ["train", "beitv2_tiny_test", *common, f"--run.output_dir={out['mim']}",
                               f"--tokenizer={out['tokenizer'] / 'tokenizer.pt'}"])
    run_stage("finetune.classify", ["train", "beitv2_tiny_test_ft", *common, f"--run.output_dir={out['classify']}",
                                    f"--init={out['mim'] / 'mim.pt'}"])
    run_stage("finetune.segment", ["train", "upernet_beitv2_tiny_test", *common,
                                   f"--run.output_dir={out['segment']}"])
    return {name: losses(folder) for name, folder in out.items()}


def machine() -> dict[str, str]:
    import torch
    return {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__}


def test_the_tiny_recipes_give_the_recorded_losses(tmp_path):
    golden = json.loads(GOLDEN.read_text())
    measured = stage_runs(tmp_path)
    bitwise = golden["machine"] == machine()
    for stage, recorded in golden["losses"].items():
        got = {str(step): loss for step, loss in measured[stage].items()}
        assert got.keys() == recorded.keys(), (stage, sorted(got), sorted(recorded))
        for step, loss in recorded.items():
            if bitwise:
                assert got[step] == loss, f"{stage} step {step}: {got[step]!r} != recorded {loss!r}"
            else:
                assert math.isclose(got[step], loss, rel_tol=1e-4), f"{stage} step {step}: {got[step]} vs {loss}"
    # Every stage trains: the recorded losses are no constant.
    for stage, recorded in golden["losses"].items():
        assert len(set(recorded.values())) > 1, stage


if __name__ == "__main__":   # record the golden losses on this machine
    import tempfile
    with tempfile.TemporaryDirectory() as folder:
        recorded = {stage: {str(s): v for s, v in sorted(curve.items())}
                    for stage, curve in stage_runs(Path(folder)).items()}
    GOLDEN.write_text(json.dumps({"machine": machine(), "steps": STEPS, "losses": recorded}, indent=2) + "\n")
    print(f"wrote {GOLDEN}", file=sys.stderr)
