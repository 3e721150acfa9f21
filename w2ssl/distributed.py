"""Process-group helpers. With no process group every helper is the one-process identity."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def is_main() -> bool:
    return rank() == 0


@torch.no_grad()
def gather(x: Tensor) -> Tensor:
    """Concatenate ``x`` of every process along dim 0, in rank order, without gradient."""
    if not is_dist():
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


class _GatherWithGrad(torch.autograd.Function):
    """All-gather whose backward sums the gradient of every process and keeps this process's slice.

    Every process computes the same global loss from the gathered tensor, so the gradient of a local
    slice is the sum over processes (DDP then averages it back to the one-process gradient).
    ``torch.distributed.nn.functional.all_gather`` (deprecated) returned wrong gradients on gloo with
    torch 2.14 in tests/test_distributed.py, hence this small function on plain collectives.
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # noqa: ANN001 - autograd's signature
        ctx.rows = x.shape[0]
        return gather(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # noqa: ANN001
        grad = grad.contiguous()
        dist.all_reduce(grad)
        start = rank() * ctx.rows
        return grad[start:start + ctx.rows]


def gather_with_grad(x: Tensor) -> Tensor:
    """Like :func:`gather`, with gradient (see :class:`_GatherWithGrad`)."""
    if not is_dist():
        return x
    return _GatherWithGrad.apply(x)


def broadcast(x: Tensor, src: int = 0) -> Tensor:
    """``x`` of process ``src`` on every process (in place)."""
    if is_dist():
        dist.broadcast(x, src)
    return x


def all_reduce_mean(x: Tensor) -> Tensor:
    """Mean of ``x`` over processes (a copy; for logging)."""
    if not is_dist():
        return x
    x = x.detach().clone()
    dist.all_reduce(x)
    return x / world_size()


def barrier() -> None:
    if is_dist():
        dist.barrier()
