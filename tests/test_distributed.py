"""World-size invariance (lightly-style): two gloo processes on CPU, each holding half of a global
batch, compute the same loss and (after DDP-style averaging) the same gradients as one process with
the whole batch. The trunk uses GroupNorm because batch statistics differ per process on CPU (SyncBN
needs CUDA); the projector's BatchNorm1d sees the gathered global batch, so it stays. The two
processes run both views in one call (``fused_views``), the one-process reference a call per view."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.helpers import hide_gpus, random_views, tiny_model

N, TILE = 8, 16


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def step(model, view1, view2, perm):
    out = model(view1, view2, m=0.9, perm=perm)
    out["loss"].backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = tiny_model(norm=True, fused_views=True).double()  # the reference runs a call per view
    view1, view2 = random_views(N, TILE, dtype=torch.float64)
    half = slice(rank * N // world, (rank + 1) * N // world)
    local1, local2 = [t[half] for t in view1], [t[half] for t in view2]
    perm = torch.randperm(2 * N, generator=torch.Generator().manual_seed(1))
    out, grads = step(model, local1, local2, perm)
    for g in grads.values():  # what DDP does
        dist.all_reduce(g)
        g /= world
    # Without an explicit permutation, rank 0's is broadcast: different seeds still agree.
    torch.manual_seed(100 + rank)
    model.zero_grad()
    loss_bcast = model(local1, local2, m=0.9)["loss"].detach()
    gathered = [torch.zeros_like(loss_bcast) for _ in range(world)]
    dist.all_gather(gathered, loss_bcast)
    torch.save({"out": out, "grads": grads, "bcast": gathered,
                "momentum": model.momentum_encoder.state_dict()}, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path, monkeypatch):
    hide_gpus(monkeypatch)
    torch.manual_seed(0)
    model = tiny_model(norm=True).double()
    view1, view2 = random_views(N, TILE, dtype=torch.float64)
    perm = torch.randperm(2 * N, generator=torch.Generator().manual_seed(1))
    ref_out, ref_grads = step(model, view1, view2, perm)

    mp.start_processes(worker, args=(2, free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    for rank in range(2):
        res = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for key in ("loss", "loss_what", "loss_where", "where_acc"):
            torch.testing.assert_close(res["out"][key].detach(), ref_out[key].detach(), rtol=1e-5, atol=0)
        assert res["grads"].keys() == ref_grads.keys()
        for name, g in ref_grads.items():
            torch.testing.assert_close(res["grads"][name], g, rtol=1e-5, atol=1e-12, msg=name)
        assert torch.equal(res["bcast"][0], res["bcast"][1])


def report_context(ctx, args) -> None:
    torch.save({"rank": ctx.rank, "world": ctx.world_size, "local": ctx.local_rank, "device": ctx.device.type,
                "group_world": dist.get_world_size()}, f"{args.out_dir}/ctx{ctx.rank}.pt")


@pytest.mark.slow
def test_spawn_launch_ranks_for_the_published_flags(tmp_path, monkeypatch):
    """The ``--multiprocessing-distributed --world-size 1 --rank 0 --dist-url tcp://…`` path: one
    spawned process per device, global rank = node rank x devices + local index."""
    from argparse import Namespace

    from w2ssl.distributed import _spawned

    hide_gpus(monkeypatch)  # 2 ranks on a 1-GPU machine would ask for cuda:1
    args = Namespace(world_size=1, rank=0, dist_url=f"tcp://127.0.0.1:{free_port()}", dist_backend="nccl",
                     out_dir=str(tmp_path))
    mp.spawn(_spawned, nprocs=2, args=(report_context, args, 2))
    got = [torch.load(tmp_path / f"ctx{r}.pt", weights_only=True) for r in range(2)]
    assert got == [{"rank": r, "world": 2, "local": r, "device": "cpu", "group_world": 2} for r in range(2)]
