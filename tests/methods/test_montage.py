import pytest
import torch

from w2ssl.methods.montage import assemble, local_indices, split_grid, tile_labels


def quadrant_means(montages: torch.Tensor) -> torch.Tensor:
    """An identity "encoder": the mean of each quadrant, ``[M, C, 2t, 2t] -> [M, C, 2, 2]``."""
    m, c, h, w = montages.shape
    return montages.view(m, c, 2, h // 2, 2, w // 2).mean(dim=(3, 5))


@pytest.mark.parametrize("seed", range(5))
def test_round_trip_returns_tile_means_in_permuted_order(seed):
    g = torch.Generator().manual_seed(seed)
    n = 2 * int(torch.randint(1, 9, (1,), generator=g))
    t = int(torch.randint(1, 6, (1,), generator=g))
    tiles = torch.randn(2 * n, 3, t, t, generator=g)
    perm = torch.randperm(2 * n, generator=g)
    features = split_grid(quadrant_means(assemble(tiles, perm)))
    assert features.shape == (2 * n, 3)
    torch.testing.assert_close(features, tiles.mean(dim=(2, 3))[perm])


def test_layout_matches_spec_by_hand():
    # N = 2 images -> 4 tiles, M = 1 montage: [[S0, S1], [S2, S3]].
    tiles = torch.arange(4.0).view(4, 1, 1, 1)
    perm = torch.tensor([2, 0, 3, 1])
    montage = assemble(tiles, perm)
    assert montage.tolist() == [[[[2.0, 0.0], [3.0, 1.0]]]]
    m = 2
    tiles = torch.arange(8.0).view(8, 1, 1, 1)
    montages = assemble(tiles, torch.arange(8))
    # montage j = [[S[j], S[M+j]], [S[2M+j], S[3M+j]]]
    assert montages[1, 0].tolist() == [[1.0, 1.0 + m], [1.0 + 2 * m, 1.0 + 3 * m]]


def test_split_grid_order():
    grid = torch.arange(2 * 2 * 2 * 2.0).view(2, 2, 2, 2)  # [M=2, D=2, 2, 2]
    out = split_grid(grid)
    expected = [grid[0, :, 0, 0], grid[1, :, 0, 0], grid[0, :, 0, 1], grid[1, :, 0, 1],
                grid[0, :, 1, 0], grid[1, :, 1, 0], grid[0, :, 1, 1], grid[1, :, 1, 1]]
    torch.testing.assert_close(out, torch.stack(expected))


@pytest.mark.parametrize("seed", range(5))
def test_labels_follow_spec(seed):
    g = torch.Generator().manual_seed(seed)
    n = 2 * int(torch.randint(1, 20, (1,), generator=g))
    perm = torch.randperm(2 * n, generator=g)
    source, where = tile_labels(perm, n)
    for k in range(2 * n):
        assert source[k] == perm[k] % n
        assert where[k] == (1 if perm[k] >= n else 0)
    # Each source image appears exactly twice: once left, once right.
    assert torch.bincount(source, minlength=n).tolist() == [2] * n
    assert int(where.sum()) == n


@pytest.mark.parametrize("world", [1, 2, 4])
def test_local_slices_rebuild_the_global_montages(world):
    n, t = 16, 3
    tiles = torch.randn(2 * n, 3, t, t)
    perm = torch.randperm(2 * n)
    full = assemble(tiles, perm)
    parts = [assemble(tiles, local_indices(perm, r, world)) for r in range(world)]
    torch.testing.assert_close(torch.cat(parts), full)


def test_bad_sizes_raise():
    with pytest.raises(ValueError, match="multiple of 4"):
        assemble(torch.zeros(6, 3, 2, 2), torch.arange(6))
    with pytest.raises(ValueError, match="do not split"):
        local_indices(torch.arange(12), 0, 2)
