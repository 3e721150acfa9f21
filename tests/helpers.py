"""Small builders shared by tests."""
from __future__ import annotations

import functools

import torch
from torch import nn

from w2ssl.model import W2SSL


def group_norm(channels: int) -> nn.Module:
    """A normalisation without batch statistics, so results do not depend on how a batch is split."""
    return nn.GroupNorm(4, channels)


def tiny_model(norm: bool = False, **kw) -> W2SSL:
    """resnet18 trunk with small heads; ``norm=True`` swaps BatchNorm2d for GroupNorm."""
    kw = {"arch": "resnet18", "dim": 16, "mlp_dim": 32, **kw}
    if norm:
        kw["norm_layer"] = functools.partial(group_norm)
    return W2SSL(**kw)


def random_views(b: int, tile: int, seed: int = 0, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(seed)
    tiles = [torch.randn(b, 3, tile, tile, generator=g, dtype=dtype) for _ in range(4)]
    return [tiles[0], tiles[1]], [tiles[2], tiles[3]]
