"""A non-finite batch leaves the tokenizer's quantizer state as it was (issue 12, item 1).

The EMA codebook update, k-means init and dead-code restart run in the forward pass, so the engine skipping the
optimizer step does not protect them: the quantizer decides on the device, with every rank agreeing.

Run as a module (`python -m tests.test_faults_nonfinite train ...`) this file is the tokenizer CLI with one training
image turned NaN after augmentation (`NAN_IMAGE_AT=<step>:<rank>`), for the end-to-end test.
"""
import itertools
import math
import os
import sys
import tempfile

import pytest
import torch

from tests.dist_util import losses, run_ranks, run_stage

NAN_IMAGE_AT = "NAN_IMAGE_AT"


def _tokenizer(**overrides):
    from pretrain.tokenizer import build_tokenizer
    torch.manual_seed(0)   # the same weights on every rank, as the engine guarantees
    return build_tokenizer("vqkd_tiny_test", **overrides).train()


def _batch(seed: int, bad: float | None = None):
    """(images, teacher features) from `seed`; `bad` (nan or inf) fills image 1."""
    g = torch.Generator().manual_seed(seed)
    images, target = torch.rand(4, 3, 32, 32, generator=g), torch.randn(4, 16, 112, generator=g)
    if bad is not None:
        images[1] = bad
    return images, target


def _state(model) -> dict:
    return {k: v.clone() for k, v in model.quantize.state_dict().items()}


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("restarts", [False, True], ids=["official", "restart_every_step"])
def test_non_finite_batches_leave_the_quantizer_alone(restarts):
    from bench.common import DispatchCounter
    # A dead-code check every step, with a threshold most codes stay under: finite steps restart codes.
    kw = dict(dead_code_threshold=1.0, restart_interval=1) if restarts else {}
    model, clean = _tokenizer(**kw), _tokenizer(**kw)
    q = model.quantize

    # A NaN batch first: k-means init must wait for a finite one.
    before = _state(model)
    model(*_batch(0, bad=math.nan))
    _assert_same(_state(model), before)
    assert not q._host_initted and float(q.embedding.initted) == 0.0

    for m in (model, clean):
        m(*_batch(1))
    assert float(q.embedding.initted) == 1.0 and int(q.num_updates) == 1
    before, host_updates = _state(model), q._host_updates
    with DispatchCounter() as counter:
        model(*_batch(2, bad=math.nan))
        after_nan = _state(model)
        model(*_batch(3, bad=math.inf))
        after_inf = _state(model)
        host_after_bad = q._host_initted, q._host_updates
        for m in (model, clean):
            m(*_batch(4))
    assert counter.syncs == 0, "the non-finite check must not read the device"
    _assert_same(after_nan, before)
    _assert_same(after_inf, before)
    # The host's count of update attempts goes on (documented in NormEMAQuantizer.__init__).
    assert host_after_bad == (True, host_updates + 2)
    after = _state(model)
    assert int(after["num_updates"]) == 2
    assert not torch.equal(after["embedding.weight"], before["embedding.weight"])
    assert all(v.isfinite().all() for v in after.values())
    if restarts:
        assert int(after["num_restarted"]) > int(before["num_restarted"]) > 0
    else:   # the run goes on exactly as if the bad batches had never come
        _assert_same(after, _state(clean))


def _two_rank_worker(rank, world, out_dir):
    torch.set_num_threads(1)
    model = _tokenizer(dead_code_threshold=1.0, restart_interval=1)
    states = [_state(model)]
    # Rank 1's batch holds a NaN image at steps 0 and 2; rank 0's batches are all finite.
    for step in range(4):
        model(*_batch(10 * step + rank, bad=math.nan if rank == 1 and step % 2 == 0 else None))
        states.append(_state(model))
    torch.save(states, os.path.join(out_dir, f"rank{rank}.pt"))


def test_a_nan_on_one_rank_is_skipped_on_every_rank():
    with tempfile.TemporaryDirectory() as d:
        run_ranks(_two_rank_worker, 2, d)
        ranks = [torch.load(os.path.join(d, f"rank{r}.pt")) for r in (0, 1)]
    for states in ranks:
        _assert_same(states[1], states[0])   # no k-means init from the bad step, on either rank
        _assert_same(states[3], states[2])   # no EMA update nor restart
        assert float(states[2]["embedding.initted"]) == 1.0 and int(states[4]["num_updates"]) == 2
        assert not torch.equal(states[4]["embedding.weight"], states[3]["embedding.weight"])
        assert states[4]["embedding.weight"].isfinite().all()
    for s0, s1 in zip(*ranks):   # the codebooks stay identical across ranks
        _assert_same(s0, s1)


# ---- end to end: a 2-rank tokenizer run with one NaN training image ----------------------------------------------
def _poison_one_training_image(spec: str) -> None:
    """Turn image 0 of the training batch of `step` (1-based) on `rank` NaN, after augmentation."""
    from data_tools.gpu_augment import TokenizerTrainAug
    step, rank = map(int, spec.split(":"))
    real, calls = TokenizerTrainAug.__call__, itertools.count(1)

    def call(self, images, sizes, g):
        x = real(self, images, sizes, g)
        if next(calls) == step and int(os.environ.get("RANK", 0)) == rank:
            x[0] = math.nan
        return x
    TokenizerTrainAug.__call__ = call


def _all_floats_finite(obj) -> bool:
    if isinstance(obj, torch.Tensor):
        return not obj.is_floating_point() or bool(obj.isfinite().all())
    if isinstance(obj, dict):
        return all(_all_floats_finite(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return all(_all_floats_finite(v) for v in obj)
    return True


@pytest.mark.slow
@pytest.mark.usefixtures("fashion_mnist_available")
def test_tokenizer_run_with_one_nan_image_skips_that_step_and_trains_on(tmp_path, monkeypatch):
    from pretrain.tokenizer.train import evaluate
    common = ["train", "vqkd_tiny_test", "--schedule.total_steps=12", "--run.save_interval=6"]
    clean, poisoned = tmp_path / "clean", tmp_path / "nan"
    run_stage("pretrain.tokenizer", common + [f"--run.output_dir={clean}"])
    monkeypatch.setenv(NAN_IMAGE_AT, "3:1")
    run_stage("tests.test_faults_nonfinite", common + [f"--run.output_dir={poisoned}"])

    # Rank 1's step 3 is skipped on both ranks; rank 0's logged losses (its own batches) stay finite throughout.
    skipped = losses(poisoned, "skipped_steps")
    assert sorted(skipped) == list(range(1, 13)) and (skipped[2], skipped[3], skipped[12]) == (0, 1, 1), skipped
    assert all(math.isfinite(v) for v in losses(poisoned).values())
    assert losses(clean, "skipped_steps")[12] == 0
    # On held-out images the codebook is used as in the clean run (without the fix the codebook turns NaN at step 3
    # and the run stops at step 7: 5 non-finite steps in a row).
    result = {name: evaluate(str(out / "tokenizer.pt")) for name, out in (("clean", clean), ("nan", poisoned))}
    usage = {name: r["codebook_usage"] for name, r in result.items()}
    assert usage["nan"] >= usage["clean"] - 0.1 and usage["nan"] > 0.25, result
    assert result["nan"]["teacher_cosine"] > result["clean"]["teacher_cosine"] - 0.05, result
    saved = [p for p in poisoned.rglob("*") if p.suffix in (".pt", ".pth")]
    assert any(p.name == "tokenizer.pt" for p in saved) and len(saved) > 1
    for path in saved:
        assert _all_floats_finite(torch.load(path, map_location="cpu", weights_only=False)), path


if __name__ == "__main__":
    _poison_one_training_image(os.environ[NAN_IMAGE_AT])
    from engine.config.cli import run_cli
    from pretrain.tokenizer.train import train
    sys.exit(run_cli({"train": train}))
