"""Joining torchrun's process group (shared by the entry scripts and transfer/finetune_torchvision.py)."""
import socket

import torch
import torch.distributed as dist

from w2ssl.dist import distributed as D


def test_init_torchrun_joins_on_the_cpu_with_gloo(monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1", "RANK": "0", "WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    ctx = D.init_torchrun(cuda=False)
    try:
        assert ctx == D.Context(torch.device("cpu"), rank=0, world_size=1, local_rank=0, local_world_size=1)
        assert D.is_dist() and dist.get_backend() == "gloo"
    finally:
        dist.destroy_process_group()
