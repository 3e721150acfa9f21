"""What ``torch.compile`` makes of a trunk with synchronised BatchNorm: 2 gloo processes on the CPU.

Each process converts a ``ResNetTrunk`` with :func:`w2ssl.dist.syncbn.convert` (per-view with ``--views 2``),
compiles it and runs forward and backward three times; rank 0 prints dynamo's counts of graphs, graph
breaks (with their reasons) and recompiles as one JSON line. PyTorch's ``nn.SyncBatchNorm`` breaks the
graph at every call. Add ``TORCH_LOGS=graph_breaks,recompiles`` for dynamo's own log. Example:
``TORCH_LOGS=graph_breaks,recompiles python -m bench.compile_graphs -a resnet50``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bench.heads import free_port
from w2ssl.cli import run_main
from w2ssl.dist.syncbn import convert
from w2ssl.dist.viewnorm import normalise_per_view
from w2ssl.trunks import build_trunk, trunk_names


def worker(rank: int, world: int, port: int, args: argparse.Namespace) -> None:
    from torch._dynamo.utils import counters

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    trunk = convert(normalise_per_view(build_trunk(args.arch), args.views))
    trunk.compile()
    x = torch.randn(2 * args.views, 3, 2 * args.tile_size, 2 * args.tile_size)
    for _ in range(3):
        trunk(x).square().sum().backward()
    if rank == 0:
        breaks = {reason.split("\n")[0]: count for reason, count in counters["graph_break"].items()}
        print(json.dumps({"arch": args.arch, "views": args.views, "unique_graphs": counters["stats"]["unique_graphs"],
                          "graph_breaks": breaks, "recompiles": sum(counters["recompiles"].values()),
                          "torch": torch.__version__}), flush=True)
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-a", "--arch", default="resnet18", choices=trunk_names("resnet"))
    p.add_argument("--views", type=int, default=1, choices=(1, 2), help="2: per-view BatchNorm (--fused-views)")
    p.add_argument("--tile-size", type=int, default=16)
    args = p.parse_args(argv)
    mp.start_processes(worker, args=(2, free_port(), args), nprocs=2, start_method="spawn")


if __name__ == "__main__":
    sys.exit(run_main(main))
