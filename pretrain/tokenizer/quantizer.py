"""l2-normalised vector quantizer with an EMA-updated codebook (VQ-KD, BEiT v2).

Buffers keep the official names (`embedding.weight`, `embedding.initted`, `cluster_size`) so released
tokenizers load as they are. Differences from the official quantizer, none of which change the default update:
- no N x K one-hot: counts come from `bincount`, sums from `index_add_`, both all-reduced in one call;
- k-means initialisation is distributed: rank 0 draws the seeds, every rank assigns its own vectors, and the
  statistics are all-reduced, so every rank ends with the same codebook;
- optional dead-code restart re-seeds rarely used codes from current encoder outputs, identically on every rank;
- a batch with a non-finite vector on any rank leaves every buffer as it was (k-means init included): the engine
  skips the optimizer step of such a batch, but these updates run in the forward pass, and one NaN in the EMA
  never washes out. It is decided on the device, with no collective of its own: a NaN or inf in any rank's
  vectors survives the all-reduced sum, so every rank reads the same flag there;
- inference touches no statistics and makes no collective calls.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.parallel import distributed as dist_utils


def codebook_stats(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(fraction of codes used, perplexity of the code distribution) from per-code counts, on the device."""
    p = counts.float() / counts.sum().clamp(min=1)
    return (counts > 0).float().mean(), torch.exp(-(p * torch.log(p.clamp(min=1e-12))).sum())


def l2norm(t: torch.Tensor) -> torch.Tensor:
    return F.normalize(t, p=2, dim=-1)


class Codebook(nn.Module):
    """Holds the unit-norm code vectors as a buffer: they change by EMA, never by gradient, and a buffer is
    neither handed to the optimizer nor partitioned by ZeRO-3."""

    def __init__(self, num_codes: int, code_dim: int, initted: bool):
        super().__init__()
        weight = torch.zeros(num_codes, code_dim) if not initted else l2norm(torch.randn(num_codes, code_dim))
        self.register_buffer("weight", weight)
        self.register_buffer("initted", torch.tensor([float(initted)]))


class NormEMAQuantizer(nn.Module):
    """Nearest-code quantizer on the unit sphere.

    Args:
        num_codes: codebook size (8192 in BEiT v2).
        code_dim: code vector size (32).
        beta: weight of the commitment loss `mse(z_q.detach(), z)`.
        decay: EMA decay of codebook vectors and usage counts (0.99).
        kmeans_init: initialise the codebook by 10 iterations of spherical k-means on the first training batch.
        kmeans_iters: k-means iterations.
        dead_code_threshold: restart codes whose EMA usage (vectors per step, summed over ranks) falls below
            this; 0 disables restarts (the official behaviour).
        restart_interval: EMA updates between dead-code checks.
        seed: seeds the draws made identically on every rank (k-means seeds come from rank 0 anyway).
    """

    def __init__(self, num_codes: int = 8192, code_dim: int = 32, beta: float = 1.0, decay: float = 0.99,
                 kmeans_init: bool = True, kmeans_iters: int = 10, dead_code_threshold: float = 0.0,
                 restart_interval: int = 100, seed: int = 0):
        super().__init__()
        self.num_codes, self.code_dim = num_codes, code_dim
        self.beta, self.decay = beta, decay
        self.kmeans_iters = kmeans_iters
        self.dead_code_threshold = dead_code_threshold
        self.restart_interval = restart_interval
        self.seed = seed
        self.embedding = Codebook(num_codes, code_dim, initted=not kmeans_init)
        self.register_buffer("cluster_size", torch.zeros(num_codes))       # EMA of per-step usage counts
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        self.register_buffer("num_restarted", torch.zeros((), dtype=torch.long))
        self._host_initted: bool | None = None   # mirrors the buffers, read once, to avoid a sync per step
        # Update attempts, read from `num_updates` once, then counted on the host; they time the dead-code checks
        # and seed their draw. Skipped (non-finite) batches count too, as the host cannot see the flag without a
        # sync: after k of them the checks fall k updates earlier in `num_updates`, on every rank alike, still
        # `restart_interval` steps apart (only a resumed run, which re-reads `num_updates`, then checks at other
        # steps than an uninterrupted one would).
        self._host_updates: int | None = None

    # ---- public -------------------------------------------------------------------------------------------
    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
        """Quantize `z` [B, N, code_dim].

        Returns `(z_q, commitment_loss, indices [B, N], stats)`; `z_q` carries straight-through gradients to
        `z`. In training mode the codebook is updated by EMA after the codes are chosen (the loss and `z_q`
        use the codebook as it was before the update, as in the official code).
        """
        with torch.autocast(device_type=z.device.type, enabled=False):   # distances and EMA stay fp32
            return self._quantize(l2norm(z.float()))

    def _quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
        flat = z.reshape(-1, self.code_dim)
        update = self.training and torch.is_grad_enabled()
        if update and not self._initted():
            self.kmeans_init_(flat)
        indices = self.nearest(flat)
        z_q = F.embedding(indices, self.embedding.weight).view_as(z)
        stats: dict = {}
        if update:
            stats = self.ema_update_(flat, indices)
        loss = self.beta * F.mse_loss(z_q.detach(), z)
        z_q = z + (z_q - z).detach()
        return z_q, loss, indices.view(z.shape[:-1]), stats

    def nearest(self, flat: torch.Tensor) -> torch.Tensor:
        """argmin of squared L2 distance; ||z||^2 is constant per row and omitted."""
        w = self.embedding.weight
        return torch.addmm(w.pow(2).sum(dim=1), flat, w.t(), alpha=-2).argmin(dim=1)   # one [N, K] tensor

    # ---- training-time updates --------------------------------------------------------------------------
    def _initted(self) -> bool:
        if not self._host_initted:
            self._host_initted = bool(self.embedding.initted.item())
        return self._host_initted

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._host_initted = self._host_updates = None   # buffers changed: re-read them once

    def _counts_and_sums(self, flat: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-code counts and vector sums over every rank, in a single all-reduce."""
        stats = torch.zeros(self.num_codes, self.code_dim + 1, device=flat.device, dtype=torch.float32)
        # Counts ride along as a column of ones: on CUDA `bincount` reads min/max back to the host every call.
        stats.index_add_(0, indices, torch.cat([flat, flat.new_ones(flat.shape[0], 1)], dim=1))
        dist_utils.all_reduce_sum_(stats)
        return stats[:, -1], stats[:, :-1]

    @torch.no_grad()
    def kmeans_init_(self, flat: torch.Tensor) -> None:
        flat = flat.detach()
        means = torch.empty(self.num_codes, self.code_dim, device=flat.device)
        if dist_utils.rank() == 0:
            g = torch.Generator(device=flat.device).manual_seed(self.seed)
            n = flat.shape[0]
            pick = (torch.randperm(n, generator=g, device=flat.device)[:self.num_codes] if n >= self.num_codes
                    else torch.randint(0, n, (self.num_codes,), generator=g, device=flat.device))
            means.copy_(flat[pick])
        dist_utils.broadcast_(means, src=0)
        finite = means.isfinite().all()
        counts = torch.zeros(self.num_codes, device=flat.device)
        for _ in range(self.kmeans_iters):
            assign = (flat @ means.t()).argmax(dim=1)
            counts, sums = self._counts_and_sums(flat, assign)
            finite &= sums.isfinite().all()
            new = l2norm(sums / counts.clamp(min=1).unsqueeze(1))
            means = torch.where((counts > 0).unsqueeze(1), new, means)
        w, initted = self.embedding.weight, self.embedding.initted
        w.copy_(torch.where(finite, means, w))
        initted.copy_(torch.where(finite, torch.ones_like(initted), initted))
        # k-means runs on the first batch only (again after a skipped one): one sync per run, not per step.
        self._host_initted = bool(finite)

    @torch.no_grad()
    def ema_update_(self, flat: torch.Tensor, indices: torch.Tensor) -> dict:
        counts, sums = self._counts_and_sums(flat.detach(), indices)
        finite = sums.isfinite().all()   # the same on every rank: see the module docstring
        d = self.decay
        self.cluster_size.copy_(torch.where(finite, self.cluster_size.mul(d).add_(counts, alpha=1 - d),
                                            self.cluster_size))
        used = (counts > 0).unsqueeze(1) & finite
        means = l2norm(sums / counts.clamp(min=1).unsqueeze(1))
        w = self.embedding.weight
        w.copy_(torch.where(used, l2norm(w * d + means * (1 - d)), w))
        if self._host_updates is None:   # once per run (and after a load); see __init__
            self._host_updates = int(self.num_updates.item())
        self._host_updates += 1
        self.num_updates.add_(finite.long())
        if self.dead_code_threshold > 0 and self._host_updates % self.restart_interval == 0:
            self.restart_dead_codes_(flat.detach(), finite)
        usage, perplexity = codebook_stats(counts)
        return {"codebook_usage": usage, "perplexity": perplexity, "codes_restarted": self.num_restarted.float()}

    @torch.no_grad()
    def restart_dead_codes_(self, flat: torch.Tensor, finite: torch.Tensor) -> None:
        """Re-seed codes whose usage EMA fell under the threshold with encoder outputs of this step.

        Every rank contributes the same number of candidate vectors; the draw uses a generator seeded from
        (seed, update count), so every rank writes the same new codebook without an extra broadcast.
        `finite` (0-d bool, agreed by every rank) False makes it a no-op, still with the same collective calls.
        """
        dead = (self.cluster_size < self.dead_code_threshold) & finite
        g = torch.Generator(device=flat.device).manual_seed(self.seed * 1_000_003 + self._host_updates)
        per_rank = min(flat.shape[0], self.num_codes)
        local = flat[torch.randperm(flat.shape[0], device=flat.device)[:per_rank]]  # local choice: any vectors do
        candidates = dist_utils.all_gather_cat(local.contiguous())
        pick = torch.randint(0, candidates.shape[0], (self.num_codes,), generator=g, device=flat.device)
        w = self.embedding.weight
        w.copy_(torch.where(dead.unsqueeze(1), candidates[pick], w))
        # A fresh code starts at the threshold so it is not restarted again before it had a chance to be used.
        self.cluster_size.copy_(torch.where(dead, torch.full_like(self.cluster_size, self.dead_code_threshold),
                                            self.cluster_size))
        self.num_restarted.add_(dead.sum())
