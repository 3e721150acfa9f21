"""Projector, predictor and where head (METHOD §4), as in MoCo v3's ResNet MLPs."""
from __future__ import annotations

from torch import nn


def mlp(in_dim: int, hidden_dim: int, out_dim: int, last_bn: bool) -> nn.Sequential:
    """``Linear(no bias) → BN → ReLU → Linear(no bias) [→ BN(affine=False)]``: ``[n, in] -> [n, out]``."""
    layers: list[nn.Module] = [
        nn.Linear(in_dim, hidden_dim, bias=False),
        nn.BatchNorm1d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, out_dim, bias=False),
    ]
    if last_bn:
        # SimCLR/MoCo v3: the output BN has no learnable scale or shift.
        layers.append(nn.BatchNorm1d(out_dim, affine=False))
    return nn.Sequential(*layers)


def projector(in_dim: int = 2048, hidden_dim: int = 4096, out_dim: int = 256) -> nn.Sequential:
    return mlp(in_dim, hidden_dim, out_dim, last_bn=True)


def predictor(dim: int = 256, hidden_dim: int = 4096) -> nn.Sequential:
    return mlp(dim, hidden_dim, dim, last_bn=False)


def where_head(in_dim: int = 2048) -> nn.Linear:
    """Left/right classifier on one tile's feature: ``[n, in] -> [n, 2]``."""
    return nn.Linear(in_dim, 2)
