"""BYOL (Grill et al. 2020, *Bootstrap Your Own Latent*): the third method of the comparison, in one module.

Online network: trunk, projector (``Linear → BN → ReLU → Linear``, 4096 hidden, 256 out) and predictor
(the same MLP on 256); target network: an EMA of trunk and projector. For the two views ``x1, x2`` the
loss is symmetric, ``byol_loss(p1, z2) + byol_loss(p2, z1)`` (``w2ssl/losses/byol.py``), with no
negatives, so each process needs only its own samples and DDP's gradient average gives the global
batch's gradient. Views: MoCo v3's asymmetric pair (METHOD §10, which takes it from BYOL: blur 1.0 / 0.1,
solarize 0 / 0.2) at ``2 x --tile-size``. The EMA is the trainer's momentum: BYOL's published schedule is
``--moco-m 0.996 --moco-m-cos`` (and LARS, base lr 0.2, weight decay 1.5e-6 at batch 4096).
The checkpoint layout is W2SSL's (``base_encoder.*``, ``projector.*``, ``predictor.*``,
``momentum_encoder.*``, ``momentum_projector.*``), so the probe, kNN and the exports read it unchanged.
"""
from __future__ import annotations

from argparse import Namespace
from collections.abc import Callable

import torch
from torch import Tensor, nn

from w2ssl.data.fast_augment import fast_two_crop
from w2ssl.data.twocrop import two_crop
from w2ssl.dist import syncbn
from w2ssl.dist.viewnorm import normalise_per_view, per_view
from w2ssl.losses.byol import byol_loss
from w2ssl.methods import heads
from w2ssl.methods.mocov3 import check_batch, preview
from w2ssl.methods.momentum import MomentumPairs
from w2ssl.methods.registry import Method, TrunkBuilder, register_method


class BYOL(nn.Module):
    """Online trunk + projector + predictor, target trunk + projector (EMA); ``forward(x1, x2, m)``.

    ``base_encoder()`` builds a trunk with ``num_features`` C whose output is a feature map ``[B, C, h, w]``
    (averaged) or, for a ViT (``family="vit"``), read by ``vit_feature(x, "avg")``. Returns ``loss`` and,
    detached, ``loss_byol`` (the same value) and ``cos_sim`` (mean cosine of prediction and target).
    """

    def __init__(self, base_encoder: Callable[[], nn.Module], dim: int = 256, mlp_dim: int = 4096,
                 family: str = "resnet", fused_views: bool = False):
        super().__init__()
        self.fused_views = fused_views
        self.feature = _token_average if family == "vit" else _averaged_map
        self.base_encoder = base_encoder()
        width = self.base_encoder.num_features
        self.projector = heads.mlp(width, mlp_dim, dim, last_bn=False)
        self.predictor = heads.mlp(dim, mlp_dim, dim, last_bn=False)
        self.momentum_encoder = base_encoder()
        self.momentum_projector = heads.mlp(width, mlp_dim, dim, last_bn=False)
        self.momentum_pairs = MomentumPairs([self.base_encoder, self.projector],
                                            [self.momentum_encoder, self.momentum_projector])
        if fused_views:
            normalise_per_view(self, 2)

    def convert_sync_batchnorm(self) -> None:
        """Synchronise every BatchNorm, trunks and heads (BYOL trains with synchronised BN)."""
        syncbn.convert(self)

    def update_momentum(self, m: float) -> None:
        """EMA ``ξ ← m·ξ + (1−m)·θ`` over trunk and projector parameters."""
        self.momentum_pairs.update(m)

    def forward(self, x1: Tensor, x2: Tensor, m: float) -> dict[str, Tensor]:
        if x1.shape != x2.shape:
            raise ValueError(f"the two views must have the same shape; got {tuple(x1.shape)} and {tuple(x2.shape)}")
        p1, p2 = per_view(lambda x: self.predictor(self.projector(self.feature(self.base_encoder, x))), [x1, x2],
                          self.fused_views)
        with torch.no_grad():
            self.update_momentum(m)
            z1, z2 = per_view(lambda x: self.momentum_projector(self.feature(self.momentum_encoder, x)), [x1, x2],
                              self.fused_views)
        loss = byol_loss(p1, z2) + byol_loss(p2, z1)
        cos = 1 - loss.detach() / 4  # each term is 2 − 2·mean cos
        return {"loss": loss, "loss_byol": loss.detach(), "cos_sim": cos}


def _averaged_map(trunk: nn.Module, x: Tensor) -> Tensor:
    return trunk(x).mean(dim=(2, 3))


def _token_average(trunk: nn.Module, x: Tensor) -> Tensor:
    return trunk.vit_feature(x, "avg")


def build(args: Namespace, trunk: TrunkBuilder, family: str) -> BYOL:
    return BYOL(trunk, args.moco_dim, args.moco_mlp_dim, family=family, fused_views=args.fused_views)


register_method(Method("byol", build, lambda args: two_crop(args.tile_size, args.crop_min),
                       inputs=lambda views, key: {"x1": views[0], "x2": views[1]}, check_batch=check_batch,
                       input_size=lambda tile: 2 * tile, preview=preview,
                       fast_transform=lambda args: fast_two_crop(2 * args.tile_size, args.crop_min)))
