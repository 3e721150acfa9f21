"""Each process receives only the tiles of its own montages: an all-to-all instead of an all-gather.

Tile ``t`` of ``T`` (METHOD §2) is the left crop of source image ``t`` (``t < N``) or the right crop of
image ``t - N``; images are split over the ``W`` processes in blocks of ``b = N / W``, and each process
holds its tiles as one stack ``[left tiles; right tiles]`` of ``2b`` rows. Process ``r`` builds its
montages from tiles ``local_indices(perm, r, W)``, ``2b`` of them. The authors all-gather every tile to
every process (``2N`` per view); sending each process just its ``2b`` moves ``W`` times less data and
holds ``W`` times less memory. The plan depends only on the permutation, which every process knows.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from w2ssl.dist import distributed as D
from w2ssl.methods.montage import local_indices


def owner_and_row(tiles: Tensor, n: int, world: int) -> tuple[Tensor, Tensor]:
    """Global tile ids ``[k]`` -> (the process holding each, its row in that process's tile stack)."""
    b = n // world
    right = (tiles >= n).long()
    image = tiles - n * right
    return image // b, image % b + b * right


@dataclass
class Plan:
    """What one process sends and receives; all on the host.

    ``send_rows``: rows of the local tile stack to send, grouped by destination process (ascending);
    ``send_counts``/``recv_counts``: rows per destination/source process; ``restore``: index that puts
    the received rows (grouped by source process) back in this process's montage order.
    """

    send_rows: Tensor
    send_counts: list[int]
    recv_counts: list[int]
    restore: Tensor


def plan(perm: Tensor, rank: int, world: int) -> Plan:
    """The all-to-all plan of process ``rank`` for permutation ``perm [2N]`` (a CPU tensor)."""
    n = perm.numel() // 2
    send_rows, send_counts = [], []
    recv_counts, restore = [], None
    for dest in range(world):
        owner, row = owner_and_row(local_indices(perm, dest, world), n, world)
        mine = owner == rank
        send_rows.append(row[mine])
        send_counts.append(int(mine.sum()))
        if dest == rank:
            # Rows arrive grouped by source process, each group in montage order (a stable sort).
            by_source = torch.sort(owner, stable=True).indices
            recv_counts = torch.bincount(owner, minlength=world).tolist()
            restore = torch.argsort(by_source)
    return Plan(torch.cat(send_rows), send_counts, recv_counts, restore)


def montage_tiles(tiles: Tensor, perm: Tensor) -> Tensor:
    """This process's montage tiles in order: local stack ``[2b, ...]`` -> ``[2b, ...]``.

    Row ``k`` of the result is global tile ``local_indices(perm, rank, W)[k]``. ``perm`` must be the
    same on every process; pass it on the CPU (reading a GPU tensor would make the host wait).
    """
    world = D.world_size()
    if world == 1:
        return tiles[perm.to(tiles.device, non_blocking=True)]
    p = plan(perm.cpu(), D.rank(), world)
    sent = tiles[p.send_rows.to(tiles.device, non_blocking=True)]
    received = D.all_to_all(sent, p.send_counts, p.recv_counts)
    return received[p.restore.to(tiles.device, non_blocking=True)]
