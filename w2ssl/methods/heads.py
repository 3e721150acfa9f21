"""Projector, predictor and where head (METHOD §4, §11), as MoCo v3 builds its MLPs.

MoCo v3's ResNet heads are a 2-layer projector ending in a BatchNorm without scale or shift and a 2-layer
predictor without it; its ViT heads a 3-layer projector and a 2-layer predictor, both ending in that
BatchNorm. The trunk's family says which (:class:`~w2ssl.trunks.registry.HeadDepths`).
"""
from __future__ import annotations

from torch import nn

from w2ssl.trunks import HeadDepths

RESNET_HEADS = HeadDepths()  # MoCo v3's ResNet MLPs


def mlp(num_layers: int, in_dim: int, hidden_dim: int, out_dim: int, last_bn: bool) -> nn.Sequential:
    """MoCo v3's ``_build_mlp``: ``num_layers`` bias-free Linear layers, ``BN1d → ReLU`` between them,
    ``BN1d(affine=False)`` after the last one if ``last_bn`` (SimCLR/MoCo v3): ``[n, in] -> [n, out]``."""
    layers: list[nn.Module] = []
    for i in range(num_layers):
        last = i == num_layers - 1
        layers.append(nn.Linear(in_dim if i == 0 else hidden_dim, out_dim if last else hidden_dim, bias=False))
        if not last:
            layers += [nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(nn.BatchNorm1d(out_dim, affine=False))
    return nn.Sequential(*layers)


def projector(in_dim: int = 2048, hidden_dim: int = 4096, out_dim: int = 256,
              depths: HeadDepths = RESNET_HEADS) -> nn.Sequential:
    return mlp(depths.projector_layers, in_dim, hidden_dim, out_dim, last_bn=True)


def predictor(dim: int = 256, hidden_dim: int = 4096, depths: HeadDepths = RESNET_HEADS) -> nn.Sequential:
    return mlp(2, dim, hidden_dim, dim, last_bn=depths.predictor_last_bn)


def where_head(in_dim: int = 2048) -> nn.Linear:
    """Left/right classifier on one tile's feature: ``[n, in] -> [n, 2]``."""
    return nn.Linear(in_dim, 2)
