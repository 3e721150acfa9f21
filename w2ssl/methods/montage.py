"""Montages of four tiles and their read-out (METHOD §2–§3).

Tile ``t`` of ``T = cat(left tiles of N images, right tiles of N images)`` comes from source image
``t mod N`` and is a right crop iff ``t >= N``. ``S = T[perm]``; montage ``j`` of ``M = N/2`` is
``[[S[j], S[M+j]], [S[2M+j], S[3M+j]]]``.
"""
from __future__ import annotations

from torch import Tensor


def assemble(tiles: Tensor, perm: Tensor) -> Tensor:
    """``tiles [2N, C, t, t]``, ``perm [4M]`` (indices into tiles) -> montages ``[M, C, 2t, 2t]``.

    Quadrant ``q`` (0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right) of montage ``j`` is
    ``tiles[perm[q*M + j]]``. With ``perm`` a full permutation of ``2N`` this is METHOD §2.
    """
    return arrange(tiles[perm])


def arrange(s: Tensor) -> Tensor:
    """Tiles already in order ``[4M, C, t, t]`` -> montages ``[M, C, 2t, 2t]``: ``assemble(s, arange(4M))``."""
    if s.shape[0] % 4:
        raise ValueError(f"a montage needs 4 tiles: got {s.shape[0]} tiles, not a multiple of 4")
    m, (c, th, tw) = s.shape[0] // 4, s.shape[1:]
    return s.reshape(2, 2, m, c, th, tw).permute(2, 3, 0, 4, 1, 5).reshape(m, c, 2 * th, 2 * tw)


def local_indices(perm: Tensor, rank: int, world_size: int) -> Tensor:
    """The slice of ``perm [4M]`` that builds montages ``[rank*M/W, (rank+1)*M/W)``: ``[4M/W]``."""
    m = perm.numel() // 4
    if m % world_size:
        raise ValueError(f"{m} montages do not split over {world_size} processes")
    per = m // world_size
    return perm.view(4, m)[:, rank * per:(rank + 1) * per].reshape(-1)


def split_grid(grid: Tensor) -> Tensor:
    """``[M, D, 2, 2] -> [4M, D]`` in the order [all top-left; all top-right; all bottom-left;
    all bottom-right], i.e. row ``k`` is the feature of ``S[k]``."""
    m, d = grid.shape[:2]
    return grid.permute(2, 3, 0, 1).reshape(4 * m, d)


def tile_labels(perm: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """``perm [2N]`` -> (source id ``perm mod N``, where-label ``1`` for right crops), each ``[2N]``."""
    return perm % n, (perm >= n).long()

