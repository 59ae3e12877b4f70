"""The pretraining stages' evaluate commands on several ranks: each rank a share of the batches, sums all-reduced,
every held-out image counted once, and the numbers of one process (2 gloo ranks, an uneven split: 37 images in
batches of 8 are 5 batches, 3 on rank 0 and 2 on rank 1, the last one short). Fashion-MNIST test images, untrained
tiny models (the counting is what is tested, not what they learned)."""
import json

import pytest
import torch

from tests.dist_util import run_ranks

pytestmark = [pytest.mark.usefixtures("fashion_mnist_available"), pytest.mark.slow]

DATA = {"eval_images": 37}


def _evaluate(stage: str, args: dict, out):
    """The stage's evaluate, counting the images this process was given."""
    import data_tools.sources as sources
    from pretrain.mim.evaluate import evaluate as mim_evaluate
    from pretrain.tokenizer.train import evaluate as tokenizer_evaluate
    seen, batches = [0], sources.eval_batches

    def counted(*a, **kw):
        for batch in batches(*a, **kw):
            seen[0] += batch["image"].shape[0]
            yield batch
    sources.eval_batches = counted
    try:
        torch.set_num_threads(1)   # every process the same kernels: the same per-batch sums
        result = {"tokenizer": tokenizer_evaluate, "mim": mim_evaluate}[stage](**args, data_cfg=DATA, batch_size=8)
    finally:
        sources.eval_batches = batches
    return result, seen[0]


def _rank(rank, world, stage, args, out):
    result, seen = _evaluate(stage, args, out)
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump({"result": result, "seen": seen}, f)


def on_two_ranks(stage: str, args: dict, out) -> tuple[list, list]:
    run_ranks(_rank, 2, stage, args, str(out))
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    return [r["result"] for r in ranks], [r["seen"] for r in ranks]


def assert_same(one: dict, two: dict, exact: tuple) -> None:
    assert set(one) == set(two)
    for key in exact:
        assert one[key] == two[key], key
    for key, value in one.items():
        assert two[key] == (pytest.approx(value, rel=1e-9) if isinstance(value, float) else value), key


def test_tokenizer_evaluate_on_two_ranks_equals_one_process(tmp_path, tiny_tokenizer_file):
    args = {"checkpoint": str(tiny_tokenizer_file)}
    threads = torch.get_num_threads()
    try:
        one, seen = _evaluate("tokenizer", args, tmp_path)
    finally:
        torch.set_num_threads(threads)
    assert one["images"] == seen == 37
    results, shares = on_two_ranks("tokenizer", args, tmp_path)
    assert shares == [21, 16]   # batches 0, 2, 4 (8 + 8 + 5 images) and 1, 3: nothing twice
    for two in results:
        assert_same(one, two, exact=("images", "codebook_usage"))


def test_mim_evaluate_on_two_ranks_equals_one_process(tmp_path, tiny_tokenizer_file):
    from pretrain.mim.model import build_mim_model, save_mim_model
    torch.manual_seed(0)
    save_mim_model(build_mim_model("beitv2_tiny_test"), tmp_path / "mim.pt")
    args = {"checkpoint": str(tmp_path / "mim.pt"), "tokenizer": str(tiny_tokenizer_file),
            "masking": {"min_patches": 2}}
    threads = torch.get_num_threads()
    try:
        one, seen = _evaluate("mim", args, tmp_path)
    finally:
        torch.set_num_threads(threads)
    assert one["images"] == seen == 37 and one["masked_tokens"] == 37 * 6
    results, shares = on_two_ranks("mim", args, tmp_path)
    assert shares == [21, 16]
    for two in results:   # the views and masks of a batch come from its number, not from the rank that takes it
        assert_same(one, two, exact=("images", "masked_tokens", "majority_code_acc", "mim_acc", "agg_acc"))
