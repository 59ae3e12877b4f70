"""Block-wise masking: exact counts, block structure like the official algorithm, determinism, small grids."""
import numpy as np
import pytest
import torch

from pretrain.mim.masking import BlockMaskGenerator, reference_block_mask


def _grid(masks, shape) -> torch.Tensor:
    return torch.as_tensor(np.asarray(masks)).reshape(-1, *shape).float()


def masked_neighbours(masks, shape) -> float:
    """Mean number of 4-connected masked neighbours of a masked patch (about 1.4 for uniform 75/196 masks)."""
    m = _grid(masks, shape)
    n = torch.zeros_like(m)
    n[:, 1:] += m[:, :-1]
    n[:, :-1] += m[:, 1:]
    n[:, :, 1:] += m[:, :, :-1]
    n[:, :, :-1] += m[:, :, 1:]
    return ((n * m).sum((1, 2)) / m.sum((1, 2))).mean().item()


def rows_touched(masks, shape) -> float:
    """Mean number of grid rows holding at least one masked patch."""
    return _grid(masks, shape).amax(2).sum(1).mean().item()


def uniform_masks(n: int, shape, num_masked: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, shape[0] * shape[1], generator=g).argsort(1) < num_masked


def test_exact_count_default_14x14():
    gen = BlockMaskGenerator()   # official BEiT v2 setting: 75 of 196, blocks >= 16
    g = torch.Generator().manual_seed(0)
    masks = torch.cat([gen(500, generator=g) for _ in range(4)])
    assert masks.shape == (2000, 196) and masks.dtype == torch.bool
    assert (masks.sum(1) == 75).all()


def test_block_structure_matches_reference():
    shape = (14, 14)
    ours = BlockMaskGenerator()(2000, generator=torch.Generator().manual_seed(1))
    rng = np.random.default_rng(1)
    ref = np.stack([reference_block_mask(rng=rng) for _ in range(2000)])
    assert (ref.reshape(2000, -1).sum(1) == 75).all()
    rand = uniform_masks(2000, shape, 75)
    nb_ours, nb_ref, nb_rand = (masked_neighbours(m, shape) for m in (ours, ref, rand))
    # Blocks: about 3.3 masked neighbours per masked patch, against 1.4 for scattered patches.
    assert nb_rand < 1.6 and nb_ours > 3.0
    assert abs(nb_ours - nb_ref) < 0.1, (nb_ours, nb_ref)
    # Blocks also leave rows empty (about 10.9 of 14 rows touched; uniform masks touch all 14).
    assert abs(rows_touched(ours, shape) - rows_touched(ref, shape)) < 0.3
    assert rows_touched(rand, shape) - rows_touched(ours, shape) > 2.0
    # Same spatial prior: corners are rarely covered by blocks, the centre often.
    p_ours = _grid(ours, shape).mean(0)
    p_ref = torch.as_tensor(ref, dtype=torch.float32).mean(0)
    centre = (slice(4, 10), slice(4, 10))
    assert abs(p_ours[centre].mean() - p_ref[centre].mean()) < 0.03
    assert p_ours[centre].mean() > 2 * p_ours[[0, 0, 13, 13], [0, 13, 0, 13]].mean()


def test_same_seed_same_masks_and_different_seeds_differ():
    gen = BlockMaskGenerator()
    a = gen(64, generator=torch.Generator().manual_seed(7))
    b = gen(64, generator=torch.Generator().manual_seed(7))
    c = gen(64, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # Consecutive draws from one generator differ too (state advances).
    g = torch.Generator().manual_seed(7)
    assert not torch.equal(gen(64, generator=g), gen(64, generator=g))


@pytest.mark.parametrize("grid,num_masked,min_patches", [
    (8, 20, 4),        # small demo grid
    (4, 6, 2),         # tiny test grid
    ((6, 10), 22, 4),  # rectangular grid
    (4, 6, 16),        # blocks can never fit: everything comes from the random fill-up
    (14, 196, 16),     # everything masked
    (14, 0, 16),       # nothing masked
])
def test_exact_count_small_and_odd_grids(grid, num_masked, min_patches):
    gen = BlockMaskGenerator(grid_size=grid, num_masked=num_masked, min_num_patches=min_patches)
    masks = gen(300, generator=torch.Generator().manual_seed(0), device="cpu")
    assert masks.shape == (300, gen.num_patches)
    assert (masks.sum(1) == num_masked).all()
    ref = reference_block_mask(grid, num_masked, min_patches, rng=np.random.default_rng(0))
    assert ref.shape == gen.shape and ref.sum() == num_masked


def test_small_grid_is_blocky_like_reference():
    shape, n = (8, 8), 20
    ours = BlockMaskGenerator(grid_size=8, num_masked=n, min_num_patches=4)(1000,
                                                                          generator=torch.Generator().manual_seed(2))
    rng = np.random.default_rng(2)
    ref = np.stack([reference_block_mask(8, n, 4, rng=rng) for _ in range(1000)])
    nb_ours, nb_ref = masked_neighbours(ours, shape), masked_neighbours(ref, shape)
    assert nb_ours - masked_neighbours(uniform_masks(1000, shape, n), shape) > 1.0
    assert abs(nb_ours - nb_ref) < 0.12, (nb_ours, nb_ref)


def test_zero_rounds_gives_uniform_fill():
    # With no block rounds only the fix-up runs: uniformly random patches, still the exact count.
    shape = (14, 14)
    masks = BlockMaskGenerator(max_rounds=0)(1000, generator=torch.Generator().manual_seed(3))
    assert (masks.sum(1) == 75).all()
    assert abs(masked_neighbours(masks, shape) - masked_neighbours(uniform_masks(1000, shape, 75), shape)) < 0.08


@pytest.mark.parametrize("grid,num_masked,min_patches", [(14, 75, 16), (8, 20, 4), (4, 6, 16), (14, 0, 16)])
def test_the_sync_free_path_of_accelerators_gives_the_same_masks_law(grid, num_masked, min_patches):
    # What a GPU runs (all rounds, full-row sort in the fill-up), checked here on the CPU.
    gen = BlockMaskGenerator(grid_size=grid, num_masked=num_masked, min_num_patches=min_patches)
    shape = gen.shape
    free = gen(1000, generator=torch.Generator().manual_seed(4), sync_free=True)
    early = gen(1000, generator=torch.Generator().manual_seed(4), sync_free=False)
    assert (free.sum(1) == num_masked).all()
    if num_masked:
        assert abs(masked_neighbours(free, shape) - masked_neighbours(early, shape)) < 0.1
        assert abs(rows_touched(free, shape) - rows_touched(early, shape)) < 0.3


def test_the_sync_free_fill_up_flips_the_same_patches():
    # Given the same random keys, sorting whole rows picks the same patches as taking only the k needed.
    gen = BlockMaskGenerator(grid_size=8, num_masked=20)
    mask = torch.rand(64, 64, generator=torch.Generator().manual_seed(5)) < 0.3
    count = mask.sum(1)
    assert (count != 20).any()
    picks = [gen._fix_count(mask, count, torch.Generator().manual_seed(6), sync_free) for sync_free in (False, True)]
    assert torch.equal(picks[0], picks[1]) and (picks[0].sum(1) == 20).all()


def test_generator_device_is_default_device():
    g = torch.Generator(device="cpu").manual_seed(0)
    assert BlockMaskGenerator()(2, generator=g).device.type == "cpu"


@pytest.mark.parametrize("kwargs", [
    dict(num_masked=197), dict(num_masked=-1), dict(min_num_patches=0), dict(grid_size=0),
    dict(min_aspect=0.0), dict(min_aspect=2.0, max_aspect=1.0), dict(max_tries=0), dict(max_rounds=-1),
])
def test_invalid_settings_raise(kwargs):
    with pytest.raises(ValueError):
        BlockMaskGenerator(**kwargs)
