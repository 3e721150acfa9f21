"""MoCo v3 for ResNets as published (METHOD §10): the two-view baseline W2SSL is compared with.

The checkpoint layout is W2SSL's (``base_encoder.<torchvision key>``, ``projector.*``, ``predictor.*``,
``momentum_encoder.*``, ``momentum_projector.*``), so the probe, kNN and the exports read it unchanged.
MoCo v3's own builder keeps the projector inside the encoder as ``fc``; the parameters are the same.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from w2ssl.dist import distributed as D
from w2ssl.methods.heads import predictor, projector
from w2ssl.methods.momentum import MomentumPairs
from w2ssl.methods.viewnorm import normalise_per_view, per_view
from w2ssl.trunks.resnet import GridTrunk


class PooledTrunk(GridTrunk):
    """The same torchvision ResNet trunk, globally average-pooled: ``[B, 3, H, W] -> [B, C]``."""

    def forward(self, x: Tensor) -> Tensor:
        return self.features(x).mean(dim=(2, 3))


def zero_init_residual(trunk: nn.Module) -> nn.Module:
    """torchvision's ``zero_init_residual=True``, which MoCo v3 passes: the scale of the last norm of
    every residual branch starts at 0, so each block starts as the identity. In place; returns ``trunk``."""
    for block in trunk.modules():
        last = block.bn3 if isinstance(block, Bottleneck) else block.bn2 if isinstance(block, BasicBlock) else None
        if last is not None and last.weight is not None:
            nn.init.zeros_(last.weight)
    return trunk


def infonce(q: Tensor, k: Tensor, temperature: float, offset: int = 0) -> tuple[Tensor, Tensor]:
    """MoCo v3's contrastive loss of queries ``q [n, d]`` against keys ``k [m, d]`` (all processes' keys).

    The positive of query ``i`` is key ``offset + i`` (``offset = rank * n``), every other key a negative:
    ``2T · mean_i CE(q̂_i·k̂ᵀ / T, offset + i)`` with rows L2-normalised, in float32 at least. Returns the
    loss and (detached) the fraction of queries whose most similar key is their positive.
    """
    dtype = torch.promote_types(q.dtype, torch.float32)
    q, k = F.normalize(q.to(dtype), dim=1), F.normalize(k.to(dtype), dim=1)
    logits = q @ k.T / temperature
    labels = torch.arange(offset, offset + q.shape[0], device=q.device)
    loss = F.cross_entropy(logits, labels) * (2 * temperature)
    top1 = (logits.detach().argmax(dim=1) == labels).float().mean()
    return loss, top1


class MoCoV3(nn.Module):
    """MoCo v3 (ResNet): base encoder + projector + predictor, momentum encoder + projector (EMA).

    ``forward(x1, x2, m)`` takes this process's two views ``[b, 3, H, W]`` and returns ``loss`` (this
    process's symmetric loss ``ctr(q1, k2) + ctr(q2, k1)``; DDP's gradient average then gives the
    gradient of the global batch's loss) and, detached, ``loss_ctr`` (the same value) and ``ctr_acc``
    (top-1 of the positive key, both directions). Unlike W2SSL's, these values are this process's own.

    With ``fused_views`` each encoder and head runs once on both views, every BatchNorm still taking
    each view's statistics on their own (:mod:`w2ssl.methods.viewnorm`).
    """

    def __init__(self, arch: str = "resnet50", dim: int = 256, mlp_dim: int = 4096, temperature: float = 1.0,
                 norm_layer: Callable[[int], nn.Module] | None = None, fused_views: bool = False):
        super().__init__()
        self.temperature, self.fused_views = temperature, fused_views
        self.base_encoder = zero_init_residual(PooledTrunk(arch, norm_layer))
        width = self.base_encoder.num_features
        self.projector = projector(width, mlp_dim, dim)
        self.predictor = predictor(dim, mlp_dim)
        self.momentum_encoder = PooledTrunk(arch, norm_layer)
        self.momentum_projector = projector(width, mlp_dim, dim)
        self.momentum_pairs = MomentumPairs([self.base_encoder, self.projector],
                                            [self.momentum_encoder, self.momentum_projector])
        self._normalise_views()

    def _normalise_views(self) -> None:
        if self.fused_views:
            normalise_per_view(self, 2)

    def convert_sync_batchnorm(self) -> None:
        """SyncBatchNorm in trunks and heads, as MoCo v3 converts the whole model: all see per-process batches."""
        nn.SyncBatchNorm.convert_sync_batchnorm(self)
        self._normalise_views()

    def update_momentum(self, m: float) -> None:
        """EMA ``θ_m ← m·θ_m + (1−m)·θ_b`` over trunk and projector parameters."""
        self.momentum_pairs.update(m)

    def forward(self, x1: Tensor, x2: Tensor, m: float) -> dict[str, Tensor]:
        if x1.shape != x2.shape:
            raise ValueError(f"the two views must have the same shape; got {tuple(x1.shape)} and {tuple(x2.shape)}")
        q1, q2 = per_view(lambda x: self.predictor(self.projector(self.base_encoder(x))), [x1, x2],
                          self.fused_views)
        with torch.no_grad():
            self.update_momentum(m)  # before the keys, as in MoCo v3
            k1, k2 = per_view(lambda x: self.momentum_projector(self.momentum_encoder(x)), [x1, x2],
                              self.fused_views)
            k1, k2 = D.gather(k1), D.gather(k2)
        offset = D.rank() * x1.shape[0]
        loss12, acc12 = infonce(q1, k2, self.temperature, offset)
        loss21, acc21 = infonce(q2, k1, self.temperature, offset)
        loss = loss12 + loss21
        return {"loss": loss, "loss_ctr": loss.detach(), "ctr_acc": (acc12 + acc21) / 2}
