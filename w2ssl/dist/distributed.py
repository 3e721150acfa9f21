"""Launch modes and process-group helpers. With no process group every helper is the identity."""
from __future__ import annotations

import inspect
import os
import sys
from argparse import Namespace
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor

from w2ssl.system import failfast
from w2ssl.errors import StoppedByPeer, TrainingStopped, UserError


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

    Each process's loss is one term of a sum over processes (W2SSL: its anchors' share of the global loss,
    times W), so the gradient of a local slice is the sum of every process's gradient for it (DDP then
    averages it back to the one-process gradient).
    ``torch.distributed.nn.functional.all_gather`` (deprecated) returned wrong gradients on gloo with
    torch 2.14 in tests/dist/test_distributed.py, hence this small function on plain collectives.
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


@torch.no_grad()
def all_to_all(x: Tensor, send_counts: list[int], recv_counts: list[int]) -> Tensor:
    """Rows of ``x`` grouped by destination (``send_counts[r]`` rows to process ``r``) -> the rows sent
    to this process, grouped by source (``recv_counts[r]`` from process ``r``)."""
    out = x.new_empty((sum(recv_counts), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), recv_counts, send_counts)
    return out


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


@dataclass
class Context:
    """Where this process runs: its device, global rank and world size, and its node-local rank."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _backend(args: Namespace, device: torch.device) -> str:
    return args.dist_backend if device.type == "cuda" else "gloo"


def _cuda_device(index: int) -> torch.device:
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def init_torchrun(cuda_backend: str = "nccl", cuda: bool | None = None) -> Context:
    """Join torchrun's process group (``env://``) on GPU ``LOCAL_RANK`` (with ``cuda_backend``) or the CPU
    (gloo). ``cuda``: whether to use the GPUs (default: when one is visible)."""
    local_rank, local_world = int(os.environ["LOCAL_RANK"]), int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    use_cuda = torch.cuda.is_available() if cuda is None else cuda
    device = _cuda_device(local_rank) if use_cuda else torch.device("cpu")
    dist.init_process_group(cuda_backend if use_cuda else "gloo", init_method="env://")
    return Context(device, dist.get_rank(), dist.get_world_size(), local_rank, local_world)


def _spawned(gpu: int, worker: Callable[[Context, Namespace], None], args: Namespace, ngpus: int) -> None:
    nodes, node_rank = max(args.world_size, 1), max(args.rank, 0)
    # launch() spawns only on GPU machines; the CPU fallback lets tests run this path with gloo.
    device = _cuda_device(gpu) if torch.cuda.is_available() else torch.device("cpu")
    world, rank_ = nodes * ngpus, node_rank * ngpus + gpu
    dist.init_process_group(_backend(args, device), init_method=args.dist_url, world_size=world, rank=rank_)
    _run_worker(worker, Context(device, rank_, world, gpu, ngpus), args)


def _run_worker(worker: Callable[[Context, Namespace], None], ctx: Context, args: Namespace) -> None:
    try:
        with failfast.Watcher():
            worker(ctx, args)
    except UserError as e:
        failfast.ignore_stop_signals()
        if failfast.mark_failed(2):  # the first process to fail speaks for all
            print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except StoppedByPeer as e:  # the process that met the error prints it
        failfast.ignore_stop_signals()
        sys.exit(e.code)
    except TrainingStopped as e:  # every process stops at the same step: rank 0 speaks for all
        failfast.ignore_stop_signals()
        if ctx.is_main:
            print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(e.code)
    except Exception:
        failfast.ignore_stop_signals()
        failfast.end_loader_workers()
        code = failfast.failed_before()
        if code is not None:  # this failure follows from another process's, which said why
            sys.exit(code)
        failfast.mark_failed(1)
        raise
    finally:
        if is_dist():
            dist.destroy_process_group()


def launch(worker: Callable[[Context, Namespace], None], args: Namespace) -> None:
    """Run ``worker(ctx, args)`` in the launch mode the environment and flags ask for.

    * torchrun (``LOCAL_RANK`` set): one process per launcher slot, ``env://`` rendezvous;
    * ``--multiprocessing-distributed``: one spawned process per GPU of this node (the authors' way);
    * ``--world-size > 1`` with ``--dist-url``: one process per node;
    * otherwise a single process, on ``--gpu``, the first GPU, or the CPU, with no process group.
    """
    if "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ:
        _run_worker(worker, init_torchrun(args.dist_backend), args)
    elif args.multiprocessing_distributed:
        ngpus = torch.cuda.device_count()
        if ngpus == 0:
            raise UserError("--multiprocessing-distributed starts one process per GPU and this machine has no "
                            "GPU: drop the flag to train in one process on the CPU, or use "
                            "torchrun --nproc_per_node=K for K CPU processes")
        try:
            mp.spawn(_spawned, nprocs=ngpus, args=(worker, args, ngpus))
        except mp.ProcessExitedException as e:
            sys.exit(e.exit_code)
    elif args.world_size > 1:
        device = _single_device(args.gpu)
        dist.init_process_group(_backend(args, device), init_method=args.dist_url,
                                world_size=args.world_size, rank=max(args.rank, 0))
        _run_worker(worker, Context(device, dist.get_rank(), args.world_size), args)
    else:
        _run_worker(worker, Context(_single_device(args.gpu)), args)


def _single_device(gpu: int | None) -> torch.device:
    """``--gpu`` (which must exist), else the first GPU, else the CPU."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpu is not None and not 0 <= gpu < count:
        visible = f"only GPUs 0..{count - 1} are visible" if count else "no GPU is visible"
        raise UserError(f"--gpu {gpu} but {visible}: drop --gpu to run on " + ("GPU 0" if count else "the CPU"))
    return _cuda_device(gpu or 0) if count else torch.device("cpu")


def all_reduce_max(x: Tensor) -> Tensor:
    """Element-wise maximum of ``x`` over processes (a copy)."""
    x = x.detach().clone()
    if is_dist():
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x


def host_group() -> dist.ProcessGroup:
    """A group of every process whose collectives run on host tensors: the default group under gloo, else a
    new gloo group (every process must call this at the same point)."""
    return dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")


def host_max(value: int, group: dist.ProcessGroup) -> int:
    """The maximum of the host integer ``value`` over ``group`` (no device involved, so no wait for it)."""
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return int(t.item())


def ddp(module: torch.nn.Module) -> torch.nn.parallel.DistributedDataParallel:
    """DDP over the default group, without re-sending buffers before each forward.

    Synchronised BatchNorm (:mod:`w2ssl.dist.syncbn`) keeps the running statistics equal on every process,
    and DDP's construction still sends rank 0's parameters and buffers to all. No ``device_ids``: inputs
    are already on the device (and the host-side tile permutation must stay on the host).
    ``forward_sync_buffers`` (torch 2.14) replaces the deprecated ``broadcast_buffers``.
    """
    params = inspect.signature(torch.nn.parallel.DistributedDataParallel).parameters
    flag = "forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"
    return torch.nn.parallel.DistributedDataParallel(module, **{flag: False})
