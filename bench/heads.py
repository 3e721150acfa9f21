"""Per-process cost of W2SSL's heads and losses with W processes (gloo on the CPU), W = 1, 2, 4, ...

Each process runs ``W2SSL.heads`` (projector, predictor, momentum projector, where head, both losses;
BatchNorms synchronised) forward and backward on random trunk features of its own ``2N/W`` tiles per
view, with ResNet-50's widths by default. Before heads ran per process, every process ran them on all
``2N`` tiles: the cost of the ``W = 1`` row at any W. Prints a markdown table and one JSON line.
DDP's gradient all-reduce is not included. Example: ``python -m bench.heads --batch-size 32``.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from functools import partial

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from w2ssl.cli import run_main
from w2ssl.errors import UserError
from w2ssl.methods.w2ssl import W2SSL
from w2ssl.trunks import build_trunk


def head_flops(n: int, world: int, width: int = 2048, hidden: int = 4096, dim: int = 256) -> float:
    """Matmul FLOPs of one process's heads and losses per step, forward + backward (backward = 2x forward
    for what takes gradients; the momentum projector runs forward only). ``n`` = N source images."""
    r = 2 * n // world  # tiles per view on this process
    projector = 2 * r * (width * hidden + hidden * dim)
    predictor = 2 * r * 2 * dim * hidden
    where = 2 * r * width * 2  # view 1 only
    supcon = 2 * (2 * r) * (4 * n) * dim  # 2r anchors against 4N rows, per SupCon term
    with_grad = 2 * projector + 2 * predictor + where + 2 * supcon
    return 3 * with_grad + 2 * projector


def worker(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    torch.set_num_threads(args.threads)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = W2SSL(partial(build_trunk, "resnet50"), args.dim, args.mlp_dim, fused_views=args.fused_views)
    model.convert_sync_batchnorm()
    n, width = args.batch_size, model.base_encoder.num_features
    rows = 2 * n // world
    g = torch.Generator().manual_seed(rank)
    q1, q2 = [torch.randn(rows, width, generator=g).requires_grad_() for _ in range(2)]
    f1, f2 = [torch.randn(rows, width, generator=g) for _ in range(2)]
    perm = torch.randperm(2 * n, generator=torch.Generator().manual_seed(1))
    walls, cpus = [], []
    for i in range(args.warmup + args.iters):
        dist.barrier()
        wall, cpu = time.perf_counter(), time.process_time()
        model.heads(q1, q2, f1, f2, perm, n)["loss"].backward()
        if i >= args.warmup:
            walls.append(time.perf_counter() - wall)
            cpus.append(time.process_time() - cpu)
    torch.save({"wall": statistics.median(walls), "cpu": statistics.median(cpus)}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch-size", type=int, default=32, help="N, global source images (default 32)")
    p.add_argument("--worlds", default="1,2,4", help="process counts, comma-separated (default 1,2,4)")
    p.add_argument("--mlp-dim", type=int, default=4096)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--fused-views", action="store_true")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    args = p.parse_args(argv)
    worlds = [int(w) for w in args.worlds.split(",")]
    for w in worlds:
        if w < 1 or args.batch_size % (4 * w):
            raise UserError(f"--batch-size {args.batch_size} must be divisible by 4 x each world size ({w}): "
                            "N/2 montages split over the processes")
    rows = []
    for w in worlds:
        with tempfile.TemporaryDirectory() as out:
            mp.start_processes(worker, args=(w, free_port(), args, out), nprocs=w, start_method="spawn")
            res = [torch.load(f"{out}/rank{r}.pt", weights_only=True) for r in range(w)]
        rows.append({"world": w, "tiles_per_view": 2 * args.batch_size // w,
                     "gflop": round(head_flops(args.batch_size, w, 2048, args.mlp_dim, args.dim) / 1e9, 2),
                     "wall_ms": round(1e3 * max(r["wall"] for r in res), 1),
                     "cpu_ms": round(1e3 * statistics.mean(r["cpu"] for r in res), 1)})
    print("| W | tiles per view per process | head GFLOP per process (fwd+bwd) | wall ms (slowest process) "
          "| CPU ms per process |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['world']} | {r['tiles_per_view']} | {r['gflop']} | {r['wall_ms']} | {r['cpu_ms']} |")
    print(json.dumps({"batch_size": args.batch_size, "fused_views": args.fused_views, "threads": args.threads,
                      "torch": torch.__version__, "rows": rows}))


if __name__ == "__main__":
    sys.exit(run_main(main))
