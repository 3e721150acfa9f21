"""Projector and predictor for ViT trunks, as MoCo v3 builds them for ViTs (METHOD §11).

MoCo v3's ``MoCo_ViT`` uses a 3-layer projector and a 2-layer predictor, both ending in a BatchNorm without
scale or shift (its ResNet predictor has none, :mod:`w2ssl.methods.heads`). The where head is unchanged.
"""
from __future__ import annotations

from torch import nn


def mlp(num_layers: int, in_dim: int, hidden_dim: int, out_dim: int, last_bn: bool = True) -> nn.Sequential:
    """MoCo v3's ``_build_mlp``: ``num_layers`` bias-free Linear layers, ``BN1d → ReLU`` between them,
    ``BN1d(affine=False)`` after the last one if ``last_bn``: ``[n, in] -> [n, out]``."""
    layers: list[nn.Module] = []
    for i in range(num_layers):
        last = i == num_layers - 1
        layers.append(nn.Linear(in_dim if i == 0 else hidden_dim, out_dim if last else hidden_dim, bias=False))
        if not last:
            layers += [nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(nn.BatchNorm1d(out_dim, affine=False))
    return nn.Sequential(*layers)


def projector(in_dim: int = 384, hidden_dim: int = 4096, out_dim: int = 256) -> nn.Sequential:
    return mlp(3, in_dim, hidden_dim, out_dim)


def predictor(dim: int = 256, hidden_dim: int = 4096) -> nn.Sequential:
    return mlp(2, dim, hidden_dim, dim)
