"""w2ssl.dist.syncbn: two gloo processes, each with a part of a batch, equal plain BatchNorm on the whole batch
(outputs, input and parameter gradients, running statistics over several steps, eval mode)."""
import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from tests.dist.test_distributed import free_port
from w2ssl.dist.syncbn import SyncNorm, convert
from w2ssl.dist.viewnorm import PerViewNorm, normalise_per_view

STEPS = 3
# name -> (module builder, per-process input shape of rank r (rows may differ), views)
CASES = {
    "bn2d": (lambda: nn.BatchNorm2d(4), lambda r: (4, 4, 3, 3), 1),
    "bn1d_cumulative_unequal_rows": (lambda: nn.BatchNorm1d(5, momentum=None), lambda r: (3 + 2 * r, 5), 1),
    "bn1d_3d_no_affine": (lambda: nn.BatchNorm1d(3, affine=False), lambda r: (2, 3, 4), 1),
    "bn2d_per_view": (lambda: normalise_per_view(nn.BatchNorm2d(4), 2), lambda r: (4, 4, 2, 2), 2),
    "bn2d_no_running_stats": (lambda: nn.BatchNorm2d(4, track_running_stats=False), lambda r: (2, 4, 3, 3), 1),
}
WORLD = 2


def inputs(name: str, step: int, world: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(x, dy)`` of every process, float64, each view offset so that a shared mean matters."""
    g = torch.Generator().manual_seed(100 * list(CASES).index(name) + step)
    shape = CASES[name][1]
    out = []
    for r in range(world):
        x = 3.0 + 2.0 * torch.randn(shape(r), generator=g, dtype=torch.float64)
        out.append((x, torch.randn(shape(r), generator=g, dtype=torch.float64)))
    return out


def split_views(t: torch.Tensor, views: int) -> list[torch.Tensor]:
    return list(t.chunk(views))


def reference(name: str, world: int) -> list[dict]:
    """Plain BatchNorm on the concatenated batch (view by view for per-view modules)."""
    build, _, views = CASES[name]
    torch.manual_seed(0)
    module = build().double()
    results = []
    for step in range(STEPS):
        parts = inputs(name, step, world)
        # Global batch of each view: that view's rows of every process, in rank order.
        xs = [torch.cat([split_views(x, views)[v] for x, _ in parts]).requires_grad_() for v in range(views)]
        dys = [torch.cat([split_views(dy, views)[v] for _, dy in parts]) for v in range(views)]
        module.zero_grad()
        if views == 1:
            ys = [module(xs[0])]
        else:
            ys = [super(PerViewNorm, module).forward(x) for x in xs]  # one plain call per view
        sum((y * dy).sum() for y, dy in zip(ys, dys)).backward()
        grads = {n: p.grad.clone() for n, p in module.named_parameters()}
        results.append({"y": ys, "dx": [x.grad for x in xs], "params": grads,
                        "buffers": copy.deepcopy(dict(module.named_buffers()))})
    module.eval()
    results.append({"eval": module(inputs(name, STEPS, world)[0][0])})
    return results


def worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    got = {}
    for name, (build, _, _) in CASES.items():
        torch.manual_seed(0)
        module = convert(build().double())
        steps = []
        for step in range(STEPS):
            x, dy = inputs(name, step, world)[rank]
            x.requires_grad_()
            module.zero_grad()
            y = module(x)
            (y * dy).sum().backward()
            grads = {n: p.grad.clone() for n, p in module.named_parameters()}
            for g in grads.values():
                dist.all_reduce(g)  # the sum over processes: the gradient of the sum of their losses
            steps.append({"y": y.detach(), "dx": x.grad, "params": grads,
                          "buffers": copy.deepcopy(dict(module.named_buffers()))})
        module.eval()
        steps.append({"eval": module(inputs(name, STEPS, world)[0][0]).detach()})
        got[name] = steps
    torch.save(got, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_equal_batchnorm_on_the_whole_batch(tmp_path):
    mp.start_processes(worker, args=(WORLD, free_port(), str(tmp_path)), nprocs=WORLD, start_method="spawn")
    got = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    close = {"rtol": 1e-10, "atol": 1e-12}
    for name, (_, _, views) in CASES.items():
        ref = reference(name, WORLD)
        for step in range(STEPS):
            rows = [[len(v) for v in split_views(inputs(name, step, WORLD)[r][0], views)] for r in range(WORLD)]
            for r in range(WORLD):
                res, exp = got[r][name][step], ref[step]
                for key in ("y", "dx"):
                    ours = split_views(res[key], views)
                    for v in range(views):
                        start = sum(rows[q][v] for q in range(r))
                        torch.testing.assert_close(ours[v], exp[key][v][start:start + rows[r][v]], **close,
                                                   msg=f"{name} step {step} rank {r} {key}")
                for kind in ("params", "buffers"):
                    assert res[kind].keys() == exp[kind].keys()
                    for k in exp[kind]:
                        torch.testing.assert_close(res[kind][k], exp[kind][k], **close, msg=f"{name} {step} {k}")
        for r in range(WORLD):
            torch.testing.assert_close(got[r][name][STEPS]["eval"], ref[STEPS]["eval"].detach(), **close)


def test_convert_keeps_identity_keys_and_per_view():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), normalise_per_view(nn.BatchNorm2d(4), 2), nn.Flatten(),
                          nn.BatchNorm1d(4 * 9, affine=False))
    weight, keys = model[1].weight, list(model.state_dict())
    assert convert(model) is model
    assert list(model.state_dict()) == keys and model[1].weight is weight
    assert isinstance(model[1], nn.BatchNorm2d) and isinstance(model[1], SyncNorm)
    assert isinstance(model[1], PerViewNorm) and model[1].views == 2
    assert type(model[1]).__mro__.index(PerViewNorm) < type(model[1]).__mro__.index(SyncNorm)  # views split first
    assert isinstance(model[3], nn.BatchNorm1d) and isinstance(model[3], SyncNorm)
    convert(model)  # idempotent
    assert isinstance(model[1], PerViewNorm) and model[1].views == 2


def test_without_a_process_group_it_is_plain_batchnorm():
    torch.manual_seed(0)
    plain = nn.BatchNorm2d(4, momentum=None)
    synced = convert(copy.deepcopy(plain))
    x = torch.randn(6, 4, 3, 3)
    for _ in range(2):
        torch.testing.assert_close(synced(x), plain(x), rtol=0, atol=0)
    assert torch.equal(synced.running_var, plain.running_var)
    assert synced.num_batches_tracked.item() == 2


def compile_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    eager = nn.Sequential(nn.Conv2d(3, 4, 3), normalise_per_view(nn.BatchNorm2d(4), 2), nn.ReLU(), nn.Flatten(),
                          nn.Linear(64, 8), nn.BatchNorm1d(8, momentum=None))
    convert(eager)
    compiled = copy.deepcopy(eager)
    compiled.compile(fullgraph=True, backend="aot_eager")  # in place: still indexable
    x = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(rank))
    outs = []
    for module in (eager, compiled):
        y = module(x)
        y.square().sum().backward()
        outs.append({"y": y.detach(), "grad": module[0].weight.grad, "var": module[5].running_var})
    torch.save(outs, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
def test_compiles_into_one_graph_with_the_same_result(tmp_path):
    """``fullgraph=True``: a graph break (PyTorch's SyncBatchNorm makes one per call) would be an error."""
    mp.start_processes(compile_worker, args=(WORLD, free_port(), str(tmp_path)), nprocs=WORLD, start_method="spawn")
    for r in range(WORLD):
        eager, compiled = torch.load(tmp_path / f"rank{r}.pt", weights_only=True)
        for key in eager:
            torch.testing.assert_close(compiled[key], eager[key], rtol=1e-5, atol=1e-6, msg=key)
