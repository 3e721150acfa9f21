"""The all-to-all tile plan: every process ends up with exactly its montages' tiles, in order."""
import pytest
import torch

from w2ssl.methods.exchange import montage_tiles, owner_and_row, plan
from w2ssl.methods.montage import local_indices


def test_owner_and_row_by_hand():
    # N = 6 images over 3 processes (b = 2): left tiles 0..5, right tiles 6..11.
    owner, row = owner_and_row(torch.tensor([0, 1, 2, 5, 6, 7, 11]), n=6, world=3)
    assert owner.tolist() == [0, 0, 1, 2, 0, 0, 2]
    assert row.tolist() == [0, 1, 0, 1, 2, 3, 3]  # rows 0..1 left tiles, 2..3 right tiles


@pytest.mark.parametrize("world, b, seed", [(2, 4, 0), (3, 2, 1), (4, 6, 2), (8, 2, 3)])
def test_simulated_all_to_all_delivers_each_process_its_tiles(world, b, seed):
    n = world * b
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(2 * n, generator=g)
    left, right = torch.arange(n) * 10.0, torch.arange(n) * 10.0 + 1  # tile values name the tile
    global_tiles = torch.cat([left, right])
    stacks = [torch.cat([left[r * b:(r + 1) * b], right[r * b:(r + 1) * b]]) for r in range(world)]
    plans = [plan(perm, r, world) for r in range(world)]
    for dest in range(world):
        received = []
        for src in range(world):
            start = sum(plans[src].send_counts[:dest])
            rows = plans[src].send_rows[start:start + plans[src].send_counts[dest]]
            assert len(rows) == plans[dest].recv_counts[src]
            received.append(stacks[src][rows])
        mine = torch.cat(received)[plans[dest].restore]
        assert torch.equal(mine, global_tiles[local_indices(perm, dest, world)])
    # Each process sends and receives 2b tiles, not the 2N of an all-gather.
    assert all(sum(p.send_counts) == sum(p.recv_counts) == 2 * b for p in plans)


def test_one_process_is_plain_indexing():
    tiles = torch.randn(8, 2, 3, 4, 4)
    perm = torch.randperm(8)
    assert torch.equal(montage_tiles(tiles, perm), tiles[perm])
