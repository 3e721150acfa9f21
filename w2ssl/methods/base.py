"""The model contract every method's model follows, and the momentum skeleton W2SSL, MoCo v3 and BYOL share.

What the trainer, checkpoints, kNN and exports rely on is written here once (:class:`SSLModel`); a method
with an EMA copy of its encoder and projector builds on :class:`MomentumModel` (moco-v3's base class, solo-learn's
``BaseMomentumMethod``), a method without one directly on :class:`SSLModel`.
"""
from __future__ import annotations

from argparse import BooleanOptionalAction, Namespace, _ArgumentGroup
from collections.abc import Callable, Sequence

from torch import Tensor, nn

from w2ssl import schedules
from w2ssl.argtypes import positive_int, unit_interval
from w2ssl.dist import syncbn
from w2ssl.dist.viewnorm import normalise_per_view, per_view
from w2ssl.methods.momentum import MomentumPairs
from w2ssl.methods.registry import NEW, REFUSE, Arguments
from w2ssl.schedules import Schedules, momentum_at


class SSLModel(nn.Module):
    """A method's model, as the trainer sees it.

    * ``base_encoder``: the trunk being learnt, the one kNN reads and the exports write (its state dict
      keys are ``base_encoder.<trunk key>`` in every checkpoint).
    * ``forward(**inputs, **scheduled) -> {"loss": ..., **named detached scalars}``: ``inputs`` from the
      method's ``inputs``, ``scheduled`` the method's forward schedules at this step (:class:`Schedules`).
    * :attr:`compiled`: the submodules ``--compile`` compiles (the trunks).
    * :meth:`convert_sync_batchnorm`: called before DDP when there are several processes.
    * :meth:`param_groups`: the optimiser's parameter groups; :meth:`after_backward`: the hook between
      the backward and the optimiser step.
    """

    compiled: tuple[str, ...] = ("base_encoder",)
    base_encoder: nn.Module

    def convert_sync_batchnorm(self) -> None:
        """Synchronise every BatchNorm (:mod:`w2ssl.dist.syncbn`: any device and backend, per-view norms
        kept): each process runs on its own samples, and the statistics must be the global batch's."""
        syncbn.convert(self)

    def param_groups(self) -> list[dict]:
        """One group of every trainable parameter (the published recipes: LARS already leaves 1-D
        parameters undecayed). A method may return several, each with its own ``weight_decay`` or
        ``wd_scale`` (0 for no decay under a weight-decay schedule) and ``lr_scale``."""
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]

    def after_backward(self, epoch: float) -> None:
        """Called after the backward of the step at fractional ``epoch``, on unscaled gradients, before
        clipping and the optimiser step (e.g. DINO's frozen last layer); nothing by default."""


def momentum_schedules(args: Namespace, lr: float) -> Schedules:
    """The standard schedules (:func:`w2ssl.schedules.standard`) plus the EMA momentum ``m``
    (``--moco-m``, raised to 1 on a half-cosine with ``--moco-m-cos``), logged as ``momentum``."""
    return Schedules(lr=schedules.standard(args, lr).lr,
                     forward={"m": lambda t: momentum_at(t, args.epochs, args.moco_m, args.moco_m_cos)},
                     names={"m": "momentum"})


def _add_ema_arguments(group: _ArgumentGroup) -> None:
    group.add_argument("--moco-m", default=0.99, type=unit_interval, help="momentum of the EMA encoder")
    group.add_argument("--moco-m-cos", action=BooleanOptionalAction, default=False,
                       help="raise the momentum to 1 on a half-cosine")
    group.add_argument("--moco-mlp-dim", default=4096, type=positive_int, help="hidden dimension of the MLP heads")
    group.add_argument("--moco-dim", default=256, type=positive_int,
                       help="MoCo v3 and BYOL: projector/predictor output dimension (unused by W2SSL, as in the "
                            "authors' code)")


# The flags of every method built on MomentumModel (added once to main_moco.py's parser).
EMA_ARGUMENTS = Arguments("EMA encoder and heads (w2ssl, mocov3, byol)", _add_ema_arguments,
                          on_resume={"moco_mlp_dim": REFUSE, "moco_dim": REFUSE, "moco_m": NEW, "moco_m_cos": NEW})


class MomentumModel(SSLModel):
    """A base encoder and projector with an EMA copy (``momentum_encoder``, ``momentum_projector``), and the
    heads only the online branch has (a predictor, W2SSL's where head).

    ``base_encoder()`` builds a trunk (``num_features`` C), called twice as in MoCo v3; ``projector(C)``
    builds a projector, called twice; ``online_heads(C)`` gives the other heads by name. They are built in
    the order base encoder, projector, online heads, momentum encoder, momentum projector (the random
    initialisation follows it). With ``fused_views`` every BatchNorm normalises each of the 2 views on its own
    (:mod:`w2ssl.dist.viewnorm`), so that :meth:`per_view` may run both in one call.
    """

    compiled = ("base_encoder", "momentum_encoder")

    def __init__(self, base_encoder: Callable[[], nn.Module], projector: Callable[[int], nn.Module],
                 online_heads: Callable[[int], dict[str, nn.Module]], fused_views: bool = False):
        super().__init__()
        self.fused_views = fused_views
        self.base_encoder = base_encoder()
        width = self.base_encoder.num_features
        self.projector = projector(width)
        for name, head in online_heads(width).items():
            self.add_module(name, head)
        self.momentum_encoder = base_encoder()
        self.momentum_projector = projector(width)
        self.momentum_pairs = MomentumPairs([self.base_encoder, self.projector],
                                            [self.momentum_encoder, self.momentum_projector])
        if fused_views:
            normalise_per_view(self, 2)

    def update_momentum(self, m: float) -> None:
        """EMA ``θ_m ← m·θ_m + (1−m)·θ_b`` over trunk and projector parameters."""
        self.momentum_pairs.update(m)

    def per_view(self, fn: Callable[[Tensor], Tensor], xs: Sequence[Tensor]) -> list[Tensor]:
        """``[fn(x) for x in xs]``, in one call over the concatenated views with ``fused_views``."""
        return per_view(fn, xs, self.fused_views)
