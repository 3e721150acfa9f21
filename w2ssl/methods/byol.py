"""BYOL (Grill et al. 2020, *Bootstrap Your Own Latent*): the third method of the comparison, in one module.

Online network: trunk, projector (``Linear → BN → ReLU → Linear``, 4096 hidden, 256 out) and predictor
(the same MLP on 256); target network: an EMA of trunk and projector. For the two views ``x1, x2`` the
loss is symmetric, ``byol_loss(p1, z2) + byol_loss(p2, z1)`` (``w2ssl/losses/byol.py``), with no
negatives, so each process needs only its own samples and DDP's gradient average gives the global
batch's gradient. Views: MoCo v3's asymmetric pair (METHOD §10, which takes it from BYOL: blur 1.0 / 0.1,
solarize 0 / 0.2) at ``2 x --tile-size``. The EMA is the trainer's momentum. Its defaults are BYOL's
published recipe: ``--moco-m 0.996 --moco-m-cos``, LARS, base lr 0.2, weight decay 1.5e-6.
The checkpoint layout is W2SSL's (``base_encoder.*``, ``projector.*``, ``predictor.*``,
``momentum_encoder.*``, ``momentum_projector.*``), so the probe, kNN and the exports read it unchanged.
"""
from __future__ import annotations

from argparse import Namespace
from collections.abc import Callable

import torch
from torch import Tensor, nn

from w2ssl.losses.byol import byol_loss
from w2ssl.methods import heads
from w2ssl.methods.base import EMA_ARGUMENTS, MomentumModel, momentum_schedules
from w2ssl.methods.registry import TrunkBuilder, register_method
from w2ssl.methods.two_views import two_view_method
from w2ssl.trunks import Family
from w2ssl.trunks.resnet import RESNET


class BYOL(MomentumModel):
    """Online trunk + projector + predictor, target trunk + projector (EMA); ``forward(x1, x2, m)``.

    ``base_encoder()`` builds a trunk with ``num_features`` C, read by its family's ``"avg"`` read-out (a
    feature map averaged; a ViT's patch-token average). Returns ``loss`` and, detached, ``loss_byol`` (the
    same value) and ``cos_sim`` (mean cosine of prediction and target).
    """

    def __init__(self, base_encoder: Callable[[], nn.Module], dim: int = 256, mlp_dim: int = 4096,
                 family: Family = RESNET, fused_views: bool = False):
        super().__init__(base_encoder, lambda width: heads.mlp(2, width, mlp_dim, dim, last_bn=False),
                         lambda width: {"predictor": heads.mlp(2, dim, mlp_dim, dim, last_bn=False)}, fused_views)
        self.feature = family.readout("avg")

    def forward(self, x1: Tensor, x2: Tensor, m: float) -> dict[str, Tensor]:
        if x1.shape != x2.shape:
            raise ValueError(f"the two views must have the same shape; got {tuple(x1.shape)} and {tuple(x2.shape)}")
        p1, p2 = self.per_view(lambda x: self.predictor(self.projector(self.feature(self.base_encoder, x))), [x1, x2])
        with torch.no_grad():
            self.update_momentum(m)
            z1, z2 = self.per_view(lambda x: self.momentum_projector(self.feature(self.momentum_encoder, x)), [x1, x2])
        loss = byol_loss(p1, z2) + byol_loss(p2, z1)
        cos = 1 - loss.detach() / 4  # each term is 2 − 2·mean cos
        return {"loss": loss, "loss_byol": loss.detach(), "cos_sim": cos}


def build(args: Namespace, trunk: TrunkBuilder, family: Family) -> BYOL:
    return BYOL(trunk, args.moco_dim, args.moco_mlp_dim, family=family, fused_views=args.fused_views)


# BYOL's published recipe (Grill et al. 2020, appendix J.1): LARS, base lr 0.2, weight decay 1.5e-6, the
# target's EMA from 0.996 to 1 on a half-cosine; the family's recipe (ViTs) and the command line go over it.
register_method(two_view_method("byol", build, schedules=momentum_schedules, arguments=(EMA_ARGUMENTS,),
                                defaults={"moco_m": 0.996, "moco_m_cos": True, "lr": 0.2, "weight_decay": 1.5e-6}))
