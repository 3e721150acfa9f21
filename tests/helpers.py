"""Small builders shared by tests."""
from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image
from torch import nn
from torchvision.models.resnet import BasicBlock, conv1x1

from w2ssl.data.augment import FourCrop
from w2ssl.data.twocrop import TwoCrop
from w2ssl.methods.w2ssl import W2SSL
from w2ssl.trunks import build_trunk, registry
from w2ssl.trunks.resnet import RESNET, ResNetTrunk


def group_norm(channels: int) -> nn.Module:
    """A normalisation without batch statistics, so results do not depend on how a batch is split."""
    return nn.GroupNorm(4, channels)


def small_resnet(width: int = 8, norm_layer: Callable[[int], nn.Module] | None = None,
                 zero_init_residual: bool = False) -> ResNetTrunk:
    """A :class:`ResNetTrunk` laid out as torchvision's resnet18 (conv1, bn1, relu, maxpool, layer1-4 of
    ``BasicBlock``s, stride 32, the same key names) with one block per stage and widths ``w, 2w, 4w, 8w``:
    the code paths of a real ResNet at a fraction of its cost. ``num_features = 8 * width``."""
    norm = norm_layer or nn.BatchNorm2d
    trunk = ResNetTrunk.__new__(ResNetTrunk)
    nn.Module.__init__(trunk)
    trunk.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
    trunk.bn1, trunk.relu, trunk.maxpool = norm(width), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)
    inplanes = width
    for stage in range(4):
        planes, stride = width * 2 ** stage, 1 if stage == 0 else 2
        down = None if stage == 0 else nn.Sequential(conv1x1(inplanes, planes, stride), norm(planes))
        block = BasicBlock(inplanes, planes, stride, down, norm_layer=norm)
        if zero_init_residual:  # as torchvision's: each residual branch's last norm starts at 0
            nn.init.zeros_(block.bn2.weight)
        trunk.add_module(f"layer{stage + 1}", nn.Sequential(block))
        inplanes = planes
    trunk.num_features = inplanes
    return trunk


SMALL = "small_resnet"  # --arch of small_resnet in the tests that register it


def register_small_resnet(monkeypatch) -> None:  # noqa: ANN001 - pytest's MonkeyPatch
    """:func:`small_resnet` as ``--arch small_resnet`` for this test only (the CLIs read the registry when they
    build their parsers): in-process runs whose point is not the trunk's size."""
    monkeypatch.setitem(registry._TRUNKS, SMALL, registry.TrunkSpec(SMALL, RESNET, small_resnet))


def tiny_model(norm: bool = False, arch: str | None = None, **kw) -> W2SSL:
    """W2SSL with small heads on :func:`small_resnet` (or on the registered trunk ``arch``); ``norm=True``
    swaps BatchNorm2d for GroupNorm."""
    options = {"norm_layer": group_norm} if norm else {}
    trunk = functools.partial(small_resnet, **options) if arch is None else functools.partial(build_trunk, arch,
                                                                                              **options)
    return W2SSL(trunk, **{"dim": 16, "mlp_dim": 32, **kw})


def random_views(b: int, tile: int, seed: int = 0, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(seed)
    tiles = [torch.randn(b, 3, tile, tile, generator=g, dtype=dtype) for _ in range(4)]
    return [tiles[0], tiles[1]], [tiles[2], tiles[3]]


ROOT = Path(__file__).resolve().parents[1]
TINY = ["-a", "resnet18", "--tile-size", "16", "--moco-mlp-dim", "64", "--crop_proj_dim", "32",
        "--seed", "0", "--print-freq", "1"]


def cpu_env(env: dict | None = None) -> dict[str, str]:
    """This process's environment for a child that must run on the CPU, even where a GPU is visible:
    2 ranks on a 1-GPU machine would both ask for their own GPU, and the comparisons with CPU references
    (and bit-equal resumes) need CPU kernels. One thread each: the test machines are small."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", **(env or {})}


def hide_gpus(monkeypatch) -> None:  # noqa: ANN001 - pytest's MonkeyPatch
    """Processes this test spawns see no GPU (spawn copies ``os.environ``): ranks run on the CPU with gloo."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")


def root_env(env: dict | None = None) -> dict[str, str]:
    """This process's environment (and ``env``) with the repository root first on PYTHONPATH: a child
    started as ``python -m bench.<tool>`` (or ``transfer.<tool>``) in another folder imports this checkout."""
    path = os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))
    return {**os.environ, "PYTHONPATH": path, **(env or {})}


def run_script(script: str, *args: str, timeout: float = 600, env: dict | None = None,
               launcher: Sequence[str] | None = None) -> subprocess.CompletedProcess:
    """Run ``script`` (a file relative to the repo root, e.g. ``main_moco.py``; or a dotted module name, e.g.
    ``tests.f64_run``, run with ``-m`` from the repo root) in a fresh interpreter on the CPU; capture its output."""
    target = [str(ROOT / script)] if script.endswith(".py") else ["-m", script]
    cmd = [*(launcher or [sys.executable]), *target, *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=cpu_env(env))


def logged_losses(log: Path) -> dict[tuple[int, int], str]:
    """``(epoch, iteration) -> that iteration's loss`` (as printed) from a ``log.txt``; a later line
    for the same iteration (after a resume) replaces an earlier one."""
    out = {}
    for line in log.read_text().splitlines():
        m = re.match(r"Epoch: \[(\d+)\]\[\s*(\d+)/\d+\].*?\tLoss (\S+)", line)
        if m:
            out[int(m[1]), int(m[2])] = m[3]
    return out


FLAT_RGB = (200, 90, 30)


@functools.cache  # the same reference for the GPU and the fast pipelines (800 PIL runs: ~1 s): here,
# not in a test module, which pytest imports once more under its own name when another module imports it
def pil_flat_colours(two_crop: bool, n: int = 800) -> torch.Tensor:
    """``[n, tiles, 3]``: the top-left pixel of every tile the PIL pipeline (tile size 4; MoCo v3's two crops
    if ``two_crop``, else the four) makes of ``n`` flat ``FLAT_RGB`` 16x12 images, torch seed 0."""
    crop = TwoCrop(4) if two_crop else FourCrop(tile_size=4)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return torch.stack([torch.stack([t[:, 0, 0] for t in crop(Image.new("RGB", (16, 12), FLAT_RGB))])
                            for _ in range(n)])
