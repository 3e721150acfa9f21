"""Synchronised BatchNorm without host syncs, on any device and backend (METHOD §9.2).

PyTorch's ``nn.SyncBatchNorm`` indexes with a boolean mask in its forward (the host waits for the GPU at
every call), runs on CUDA only, and splits ``torch.compile`` graphs at every call. This one exchanges
per-channel sums with one functional all-reduce in the forward (sum, shifted sum of squares, count) and one
in the backward (the two per-channel gradient sums): no value is read on the host, gloo on the CPU runs
the same code as NCCL on GPUs, and dynamo traces the collectives into its graphs.

The result equals plain BatchNorm on the concatenation of every process's batch: outputs, gradients
(after DDP's averaging of parameter gradients) and running statistics (unbiased variance, ``momentum``
including ``None`` for a cumulative average). With no process group, or one process, it is plain
BatchNorm. :func:`convert` re-classes the BatchNorms of a model in place, so parameters, buffers,
state-dict keys, ``isinstance`` checks and the per-view mixin (:mod:`w2ssl.dist.viewnorm`) are kept.
"""
from __future__ import annotations

from functools import cache

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from w2ssl.dist.viewnorm import PerViewNorm, normalise_per_view


def _all_reduce(x: Tensor, group: dist.ProcessGroup) -> Tensor:
    """Sum of ``x`` over the processes of ``group``: a functional collective, traced by dynamo."""
    return funcol.wait_tensor(funcol.all_reduce(x, "sum", group))


def _channel_view(t: Tensor, ndim: int) -> Tensor:
    """``[C] -> [1, C, 1, ...]`` to broadcast against an ``ndim``-d input."""
    return t.view(1, -1, *([1] * (ndim - 2)))


class _SyncBatchNorm(torch.autograd.Function):
    """Batch statistics over every process of ``group``; ``x [n, C, *]`` on each, ``n`` may differ."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, shift: Tensor,  # noqa: ANN001
                eps: float, group: dist.ProcessGroup) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        dims = [0, *range(2, x.ndim)]
        dtype = shift.dtype  # float32 for half inputs
        var, mean = torch.var_mean(x.to(dtype), dims, correction=0)
        n = x.numel() // x.shape[1]
        # Sums around a shift that every process shares (the running mean): the variance then does not
        # come from the difference of two large sums of squares.
        d = mean - shift
        local = torch.cat([d * n, (var + d * d) * n, d.new_full((1,), n)])
        total = _all_reduce(local, group)
        c = x.shape[1]
        count = total[2 * c:]
        d = total[:c] / count
        mean, var = shift + d, (total[c:2 * c] / count - d * d).clamp_min(0)
        invstd = torch.rsqrt(var + eps)
        ctx.save_for_backward(x, weight, mean, invstd, count)
        ctx.group = group
        y = F.batch_norm(x, mean, var, weight, bias, False, 0.0, eps)
        ctx.mark_non_differentiable(mean, var, count)
        return y, mean, var, count

    @staticmethod
    def backward(ctx, dy: Tensor, *_: Tensor) -> tuple[Tensor | None, ...]:  # noqa: ANN001
        x, weight, mean, invstd, count = ctx.saved_tensors
        dims = [0, *range(2, x.ndim)]
        dtype = mean.dtype
        xmu = x.to(dtype) - _channel_view(mean, x.ndim)
        dy32 = dy.to(dtype)
        sum_dy, sum_dy_xmu = dy32.sum(dims), (dy32 * xmu).sum(dims)
        c = x.shape[1]
        total = _all_reduce(torch.cat([sum_dy, sum_dy_xmu]), ctx.group) / count
        scale = invstd if weight is None else invstd * weight.to(dtype)
        dx = None
        if ctx.needs_input_grad[0]:
            k = _channel_view(total[c:] * invstd * invstd, x.ndim)
            dx = ((dy32 - _channel_view(total[:c], x.ndim) - xmu * k) * _channel_view(scale, x.ndim)).to(x.dtype)
        # Parameter gradients stay local: DDP averages them over the processes.
        grad_weight = (sum_dy_xmu * invstd).to(weight.dtype) if ctx.needs_input_grad[1] else None
        grad_bias = sum_dy.to(weight.dtype) if ctx.needs_input_grad[2] else None
        return dx, grad_weight, grad_bias, None, None, None


class SyncNorm:
    """Mixin over a BatchNorm class: batch statistics over all processes of ``process_group``.

    ``process_group`` None means the default group; without an initialised group (or with one
    process) the forward is the base class's plain BatchNorm.
    """

    process_group: dist.ProcessGroup | None = None

    def forward(self, x: Tensor) -> Tensor:
        uses_batch_stats = self.training or self.running_mean is None
        if not uses_batch_stats or not dist.is_available() or not dist.is_initialized():
            return super().forward(x)
        group = self.process_group or dist.group.WORLD
        if dist.get_world_size(group) == 1:
            return super().forward(x)
        self._check_input_dim(x)
        dtype = torch.promote_types(x.dtype, torch.float32)
        track = self.training and self.track_running_stats
        shift = self.running_mean.detach().to(dtype) if track else x.new_zeros(x.shape[1], dtype=dtype)
        y, mean, var, count = _SyncBatchNorm.apply(x, self.weight, self.bias, shift, self.eps, group)
        if track:
            self._update_running_stats(mean, var, count)
        return y

    @torch.no_grad()
    def _update_running_stats(self, mean: Tensor, var: Tensor, count: Tensor) -> None:
        """As ``_BatchNorm``: ``r ← (1 − f)·r + f·batch``, the variance unbiased; ``f = momentum``, or
        ``1 / num_batches_tracked`` for ``momentum=None`` (kept on the device: no host read)."""
        self.num_batches_tracked.add_(1)
        f = self.momentum if self.momentum is not None else 1.0 / self.num_batches_tracked.to(self.running_mean.dtype)
        unbiased = var * count / (count - 1)
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), f)
        self.running_var.lerp_(unbiased.to(self.running_var.dtype), f)


@cache
def _sync_class(cls: type) -> type:
    return type(f"Sync{cls.__name__}", (SyncNorm, cls), {"__module__": __name__})


def _plain_class(cls: type) -> type:
    """The BatchNorm class under the per-view mixin, if any: ``PerViewBatchNorm2d -> BatchNorm2d``."""
    return next(c for c in cls.__mro__ if not issubclass(c, PerViewNorm))


def convert(module: nn.Module, process_group: dist.ProcessGroup | None = None) -> nn.Module:
    """Make every BatchNorm in ``module`` synchronised over ``process_group`` (default: all), in place.

    Like ``nn.SyncBatchNorm.convert_sync_batchnorm``, but each module keeps its identity (parameters,
    buffers, hooks, state-dict keys; ``BatchNorm2d`` stays an instance of ``BatchNorm2d``): its class
    becomes a synchronised subclass, under the per-view mixin when it had one. Returns ``module``.
    """
    for m in module.modules():
        if isinstance(m, _BatchNorm):
            if not isinstance(m, SyncNorm):
                views = m.views if isinstance(m, PerViewNorm) else 1
                m.__class__ = _sync_class(_plain_class(type(m)))
                if views > 1:
                    normalise_per_view(m, views)
            m.process_group = process_group
    return module
