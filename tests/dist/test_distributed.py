"""World-size invariance (lightly-style): W gloo processes on the CPU, each holding 1/W of a global batch,
compute the same losses, (after DDP's averaging) the same gradients and the same BatchNorm running
statistics as one process with the whole batch. Each process runs trunks and heads on its own tiles only,
every BatchNorm synchronised (``convert_sync_batchnorm``); the one-process reference uses plain
BatchNorm and a call per view. GroupNorm trunks (no batch statistics) and BatchNorm trunks, both views
in one call (``fused_views``) or a call per view, 2 and 4 processes."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from tests.helpers import hide_gpus, random_views, tiny_model
from w2ssl.dist.distributed import ddp

N, TILE = 16, 16


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def step(model, view1, view2, perm):
    out = model(view1, view2, m=0.9, perm=perm)
    out["loss"].backward()
    grads = {n.removeprefix("module."): p.grad.detach().clone() for n, p in model.named_parameters()
             if p.grad is not None}
    return out, grads


def close(actual, expected, name: str, **tol) -> None:
    torch.testing.assert_close(actual, expected, **tol, msg=lambda m: f"{name}: {m}")


def build(group_norm: bool, fused: bool) -> nn.Module:
    """The momentum weights start away from the base ones, so that the step's EMA moves them."""
    torch.manual_seed(0)
    model = tiny_model(norm=group_norm, fused_views=fused).double()
    with torch.no_grad():
        for p in momentum_state(model).values():
            p.add_(0.1 * torch.randn_like(p))
    return model


def momentum_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if n.startswith("momentum_")}


def worker(rank: int, world: int, port: int, out_dir: str, group_norm: bool, fused: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model = build(group_norm, fused)
    model.convert_sync_batchnorm()
    net = ddp(model)
    view1, view2 = random_views(N, TILE, dtype=torch.float64)
    part = slice(rank * N // world, (rank + 1) * N // world)
    local1, local2 = [t[part] for t in view1], [t[part] for t in view2]
    perm = torch.randperm(2 * N, generator=torch.Generator().manual_seed(1))
    out, grads = step(net, local1, local2, perm)  # DDP averages the gradients
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    momentum = {n: p.detach().clone() for n, p in momentum_state(model).items()}
    torch.save({"out": out, "grads": grads, "buffers": buffers, "momentum": momentum}, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("world, group_norm, fused", [
    (2, True, True),  # GroupNorm trunks: only the heads' statistics are synchronised
    (2, False, True),
    (2, False, False),
    (4, False, True),
])
def test_processes_equal_one(tmp_path, monkeypatch, world, group_norm, fused):
    hide_gpus(monkeypatch)
    model = build(group_norm, fused=False)  # the reference runs a call per view
    start = {n: p.clone() for n, p in momentum_state(model).items()}
    view1, view2 = random_views(N, TILE, dtype=torch.float64)
    perm = torch.randperm(2 * N, generator=torch.Generator().manual_seed(1))
    ref_out, ref_grads = step(model, view1, view2, perm)
    ref_buffers = dict(model.named_buffers())
    ref_momentum = momentum_state(model)
    assert all(not torch.equal(p, start[n]) for n, p in ref_momentum.items()), "the step's EMA must move them"

    args = (world, free_port(), str(tmp_path), group_norm, fused)
    mp.start_processes(worker, args=args, nprocs=world, start_method="spawn")
    for rank in range(world):
        res = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for key in ("loss", "loss_what", "loss_where", "where_acc"):
            close(res["out"][key].detach(), ref_out[key].detach(), key, rtol=1e-9, atol=0)
        assert res["grads"].keys() == ref_grads.keys()
        for name, g in ref_grads.items():
            close(res["grads"][name], g, name, rtol=1e-7, atol=1e-12)
        assert res["buffers"].keys() == ref_buffers.keys()
        for name, b in ref_buffers.items():
            close(res["buffers"][name], b, name, rtol=1e-9, atol=1e-12)
        assert res["momentum"].keys() == ref_momentum.keys()
        for name, p in ref_momentum.items():
            close(res["momentum"][name], p, name, rtol=0, atol=0)


def report_context(ctx, args) -> None:
    torch.save({"rank": ctx.rank, "world": ctx.world_size, "local": ctx.local_rank, "device": ctx.device.type,
                "group_world": dist.get_world_size()}, f"{args.out_dir}/ctx{ctx.rank}.pt")


@pytest.mark.slow
def test_spawn_launch_ranks_for_the_published_flags(tmp_path, monkeypatch):
    """The ``--multiprocessing-distributed --world-size 1 --rank 0 --dist-url tcp://…`` path: one
    spawned process per device, global rank = node rank x devices + local index."""
    from argparse import Namespace

    from w2ssl.dist.distributed import _spawned

    hide_gpus(monkeypatch)  # 2 ranks on a 1-GPU machine would ask for cuda:1
    args = Namespace(world_size=1, rank=0, dist_url=f"tcp://127.0.0.1:{free_port()}", dist_backend="nccl",
                     out_dir=str(tmp_path))
    mp.spawn(_spawned, nprocs=2, args=(report_context, args, 2))
    got = [torch.load(tmp_path / f"ctx{r}.pt", weights_only=True) for r in range(2)]
    assert got == [{"rank": r, "world": 2, "local": r, "device": "cpu", "group_world": 2} for r in range(2)]
