"""MoCo v3 as published (METHOD §10): the two-view baseline W2SSL is compared with.

The checkpoint layout is W2SSL's (``base_encoder.<torchvision or timm key>``, ``projector.*``,
``predictor.*``, ``momentum_encoder.*``, ``momentum_projector.*``), so the probe, kNN and the exports read
it unchanged. MoCo v3's own builder keeps the projector inside the encoder as ``fc``; the parameters are
the same.
"""
from __future__ import annotations

from argparse import Namespace, _ArgumentGroup
from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor, nn

from w2ssl.argtypes import positive_float
from w2ssl.dist import distributed as D
from w2ssl.losses.infonce import infonce
from w2ssl.methods import heads
from w2ssl.methods.base import EMA_ARGUMENTS, MomentumModel, momentum_schedules
from w2ssl.methods.registry import NEW, Arguments, TrunkBuilder, register_method
from w2ssl.methods.two_views import two_view_method
from w2ssl.trunks import Family
from w2ssl.trunks.resnet import RESNET


class MoCoV3(MomentumModel):
    """MoCo v3: base encoder + projector + predictor, momentum encoder + projector (EMA).

    ``base_encoder()`` builds a trunk (``num_features`` C), called twice as in MoCo v3 (base and momentum
    encoder). ``family`` (the trunk's :class:`~w2ssl.trunks.registry.Family`) gives the feature and the
    heads as MoCo v3 picks them (METHOD §10, §11): the class token where the trunk has one (a ViT,
    timm's ``global_pool='token'``), else the averaged feature map; its MLP depths (:mod:`~w2ssl.methods.heads`).

    ``forward(x1, x2, m)`` takes this process's two views ``[b, 3, H, W]`` and returns ``loss`` (this
    process's symmetric loss ``ctr(q1, k2) + ctr(q2, k1)`` against the keys of all processes; DDP's
    gradient average then gives the gradient of the global batch's loss) and, detached, ``loss_ctr`` (the
    same value) and ``ctr_acc`` (top-1 of the positive key, both directions), this process's own values.

    With ``fused_views`` each encoder and head runs once on both views, every BatchNorm still taking
    each view's statistics on their own (:mod:`w2ssl.dist.viewnorm`).
    """

    def __init__(self, base_encoder: Callable[[], nn.Module], dim: int = 256, mlp_dim: int = 4096,
                 temperature: float = 1.0, family: Family = RESNET, fused_views: bool = False):
        super().__init__(base_encoder, partial(heads.projector, hidden_dim=mlp_dim, out_dim=dim, depths=family.heads),
                         lambda width: {"predictor": heads.predictor(dim, mlp_dim, family.heads)}, fused_views)
        self.temperature = temperature
        self.feature = family.readouts.get("cls", family.readouts["avg"])

    def forward(self, x1: Tensor, x2: Tensor, m: float) -> dict[str, Tensor]:
        if x1.shape != x2.shape:
            raise ValueError(f"the two views must have the same shape; got {tuple(x1.shape)} and {tuple(x2.shape)}")
        q1, q2 = self.per_view(lambda x: self.predictor(self.projector(self.feature(self.base_encoder, x))), [x1, x2])
        with torch.no_grad():
            self.update_momentum(m)  # before the keys, as in MoCo v3
            k1, k2 = self.per_view(lambda x: self.momentum_projector(self.feature(self.momentum_encoder, x)), [x1, x2])
            k1, k2 = D.gather(k1), D.gather(k2)
        offset = D.rank() * x1.shape[0]
        loss12, acc12 = infonce(q1, k2, self.temperature, offset)
        loss21, acc21 = infonce(q2, k1, self.temperature, offset)
        loss = loss12 + loss21
        return {"loss": loss, "loss_ctr": loss.detach(), "ctr_acc": (acc12 + acc21) / 2}


# ----------------------------------------------------------------- the method, for the trainer
def build(args: Namespace, trunk: TrunkBuilder, family: Family) -> MoCoV3:
    """MoCo v3 starts each residual branch at zero (torchvision's ``zero_init_residual=True`` for ResNets)."""
    return MoCoV3(partial(trunk, **family.zero_init), args.moco_dim, args.moco_mlp_dim, args.moco_t, family=family,
                  fused_views=args.fused_views)


def add_arguments(group: _ArgumentGroup) -> None:
    group.add_argument("--moco-t", default=1.0, type=positive_float,
                       help="InfoNCE temperature (MoCo v3's default; unused by W2SSL, as in the authors' code)")


register_method(two_view_method("mocov3", build, schedules=momentum_schedules,
                                arguments=(EMA_ARGUMENTS, Arguments("--method mocov3", add_arguments,
                                                                    on_resume={"moco_t": NEW}))))
