"""The EMA quantizer against a plain re-statement of the official update rule, and its collective paths."""
import os
import tempfile

import pytest
import torch
import torch.nn.functional as F

from pretrain.tokenizer.quantizer import NormEMAQuantizer
from tests.dist_util import run_ranks


def official_step(weight, cluster_size, z, decay, beta):
    """The official NormEMAVectorQuantizer training step, written out with a one-hot matrix."""
    z = F.normalize(z, dim=-1)
    flat = z.reshape(-1, weight.shape[1])
    d = flat.pow(2).sum(1, keepdim=True) + weight.pow(2).sum(1) - 2 * flat @ weight.t()
    idx = d.argmin(1)
    z_q = weight[idx].view_as(z)
    onehot = F.one_hot(idx, weight.shape[0]).float()
    bins = onehot.sum(0)
    cluster_size = cluster_size * decay + bins * (1 - decay)
    zero = bins == 0
    embed_sum = flat.t() @ onehot
    embed_norm = F.normalize((embed_sum / bins.masked_fill(zero, 1).unsqueeze(0)).t(), dim=-1)
    embed_norm = torch.where(zero[:, None], weight, embed_norm)
    new_weight = F.normalize(weight * decay + embed_norm * (1 - decay), dim=-1)
    loss = beta * F.mse_loss(z_q, z)
    return new_weight, cluster_size, idx, loss


def test_update_matches_official_rule():
    torch.manual_seed(0)
    q = NormEMAQuantizer(num_codes=32, code_dim=8, decay=0.9, beta=1.0, kmeans_init=False).train()
    weight, cluster = q.embedding.weight.clone(), q.cluster_size.clone()
    for _ in range(5):
        z = torch.randn(4, 10, 8, requires_grad=True)
        z_q, loss, idx, stats = q(z)
        weight, cluster, ref_idx, ref_loss = official_step(weight, cluster, z.detach(), 0.9, 1.0)
        assert torch.equal(idx.flatten(), ref_idx)
        torch.testing.assert_close(loss, ref_loss)
        torch.testing.assert_close(q.embedding.weight, weight, atol=1e-6, rtol=0)
        torch.testing.assert_close(q.cluster_size, cluster)
    # Straight-through: the gradient of z_q w.r.t. z is the gradient of the l2-normalisation, not zero.
    z_q.sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    assert 0 < stats["codebook_usage"] <= 1 and stats["perplexity"] >= 1


def test_eval_mode_leaves_statistics_alone():
    q = NormEMAQuantizer(num_codes=16, code_dim=4, kmeans_init=False).eval()
    before = {k: v.clone() for k, v in q.state_dict().items()}
    with torch.no_grad():
        q(torch.randn(2, 5, 4))
    for k, v in q.state_dict().items():
        assert torch.equal(v, before[k]), k


def _kmeans_worker(rank, world, out_dir):
    torch.manual_seed(100 + rank)   # every rank sees different vectors
    q = NormEMAQuantizer(num_codes=16, code_dim=4, kmeans_init=True, seed=3).train()
    z = torch.randn(2, 30, 4) + rank
    q(z)
    torch.save({"weight": q.embedding.weight, "z": z}, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.slow
def test_kmeans_init_is_identical_on_every_rank_and_uses_all_data():
    with tempfile.TemporaryDirectory() as d:
        run_ranks(_kmeans_worker, 2, d)
        r0, r1 = (torch.load(os.path.join(d, f"rank{r}.pt")) for r in (0, 1))
    assert torch.equal(r0["weight"], r1["weight"])
    w = r0["weight"]
    torch.testing.assert_close(w.norm(dim=1), torch.ones(16))
    # The codebook after init + one EMA step must be close to vectors of both ranks' data, not just rank 0's.
    for r in (r0, r1):
        flat = F.normalize(r["z"].reshape(-1, 4), dim=-1)
        assert (flat @ w.t()).max(dim=1).values.mean() > 0.8


def _restart_worker(rank, world, out_dir):
    torch.manual_seed(0)    # same initial codebook everywhere, as the engine guarantees
    q = NormEMAQuantizer(num_codes=32, code_dim=4, kmeans_init=False, dead_code_threshold=0.5,
                         restart_interval=2, seed=5).train()
    torch.manual_seed(rank)  # different data on each rank
    # Concentrate the data in one direction so most codes go unused and die.
    base = F.normalize(torch.tensor([1.0, 0.0, 0.0, 0.0]) + 0.05 * torch.randn(64, 4), dim=-1)
    before = q.embedding.weight.clone()
    for _ in range(4):
        q(base.view(1, 64, 4).clone().requires_grad_())
    torch.save({"weight": q.embedding.weight, "before": before, "restarted": q.num_restarted.clone(),
                "usage": q.cluster_size.clone()}, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.slow
def test_dead_code_restart_is_identical_on_every_rank():
    with tempfile.TemporaryDirectory() as d:
        run_ranks(_restart_worker, 2, d)
        r0, r1 = (torch.load(os.path.join(d, f"rank{r}.pt")) for r in (0, 1))
    assert torch.equal(r0["weight"], r1["weight"])
    assert int(r0["restarted"]) > 0 and torch.equal(r0["restarted"], r1["restarted"])
    # Restarted codes now sit on the data: most codes are close to the (1, 0, 0, 0) direction.
    assert (r0["weight"][:, 0] > 0.8).float().mean() > 0.5
    assert (r0["before"][:, 0] > 0.8).float().mean() < 0.2


def test_no_one_hot_matrix(monkeypatch):
    """Counts and sums come from bincount/index_add, never an N x K one-hot (tokens x codes floats: 8192 codes
    make it 32 KiB per token)."""
    def forbidden(*a, **k):
        raise AssertionError("one_hot called")
    monkeypatch.setattr(F, "one_hot", forbidden)
    monkeypatch.setattr(torch.nn.functional, "one_hot", forbidden)
    q = NormEMAQuantizer(num_codes=64, code_dim=8, kmeans_init=True).train()
    q(torch.randn(2, 40, 8))
    q(torch.randn(2, 40, 8))
