"""Several views in one module call, each BatchNorm still normalising every view on its own.

MoCo v3, and W2SSL after it, call each encoder and head once per view, so every BatchNorm normalises a
view with that view's own statistics. Concatenating the views into one call halves the number of
convolution and matmul calls, which saves the part of their cost that does not grow with the batch
(weight gradients, oneDNN weight reorders, kernel launches): large on CPUs and with small per-GPU
batches. Splitting the input of every BatchNorm back into the views keeps the math: the same outputs,
gradients and running statistics (updated once per view, in view order) as separate calls, to rounding.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import cache

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm


class PerViewNorm:
    """Mixin over a BatchNorm class: with ``views > 1``, batch statistics are taken per view.

    The input ``[views * n, C, ...]`` holds the views one after another along the batch dimension.
    """

    views: int = 1

    def forward(self, x: Tensor) -> Tensor:
        uses_batch_stats = self.training or self.running_mean is None
        if self.views == 1 or not uses_batch_stats:  # running statistics: one call is the same math
            return super().forward(x)
        if x.shape[0] % self.views:
            raise ValueError(f"a batch of {x.shape[0]} does not split into {self.views} equal views")
        norm = super().forward
        return torch.cat([norm(view) for view in x.chunk(self.views)])


@cache
def _per_view_class(cls: type) -> type:
    return type(f"PerView{cls.__name__}", (PerViewNorm, cls), {"__module__": __name__})


def normalise_per_view(module: nn.Module, views: int) -> nn.Module:
    """Make every BatchNorm in ``module`` normalise ``views`` equal batch chunks separately, in place.

    Each BatchNorm's class becomes a subclass of its own (``BatchNorm2d``, ``SyncBatchNorm``, …), so
    parameter names, state dicts and ``isinstance`` checks do not change; ``views=1`` undoes it. Apply
    it again after ``SyncBatchNorm.convert_sync_batchnorm``, which builds new modules.
    """
    if views < 1:
        raise ValueError(f"views must be >= 1; got {views}")
    for m in module.modules():
        if isinstance(m, _BatchNorm):
            if not isinstance(m, PerViewNorm):
                m.__class__ = _per_view_class(type(m))
            m.views = views
    return module


def per_view(fn: Callable[[Tensor], Tensor], xs: Sequence[Tensor], fused: bool) -> list[Tensor]:
    """``[fn(x) for x in xs]``; with ``fused``, as one call ``fn(cat(xs))`` split back into views.

    ``fused`` needs every BatchNorm inside ``fn`` made per-view by :func:`normalise_per_view` with
    ``len(xs)`` views, and all ``xs`` of the same batch size.
    """
    if not fused:
        return [fn(x) for x in xs]
    return list(fn(torch.cat(list(xs))).chunk(len(xs)))
