"""ResNet trunk with 2x2 grid pooling (METHOD §3).

The trunk keeps torchvision's parameter names (``conv1``, ``bn1``, ``layer1`` … ``layer4``), so its
state dict loads into ``torchvision.models.<arch>()`` with only ``fc.*`` missing.
"""
from __future__ import annotations

from collections.abc import Callable
from functools import cache, partial

import torch
import torchvision
from torch import Tensor, nn

from w2ssl.trunks.registry import register_trunk

ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
TRUNK_LAYERS = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")


@cache
def _pool_matrix(size: int) -> Tensor:
    """``[2, size]`` float64 matrix equal to bilinear resize to 8 (align_corners=False), then mean of 4.

    PyTorch's source coordinate for output ``i`` is ``max((i + 0.5) * size / 8 - 0.5, 0)``.
    """
    resize = torch.zeros(8, size, dtype=torch.float64)
    scale = size / 8
    for i in range(8):
        src = max((i + 0.5) * scale - 0.5, 0.0)
        lo = min(int(src), size - 1)
        hi = min(lo + 1, size - 1)
        frac = src - lo
        resize[i, lo] += 1.0 - frac
        resize[i, hi] += frac
    return resize.view(2, 4, size).mean(dim=1)


@torch.compiler.disable
@cache
def _pool_matrix_on(size: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """:func:`_pool_matrix` already on ``device``: a per-step copy from host memory would make the
    host wait for the GPU in the middle of the forward. Kept out of ``torch.compile`` graphs, which
    would otherwise rebuild the matrix on the host and copy it over at every call."""
    return _pool_matrix(size).to(device=device, dtype=dtype)


def grid_pool(fmap: Tensor) -> Tensor:
    """Pool a feature map to a 2x2 grid: ``[B, C, H, W] -> [B, C, 2, 2]``.

    Equals ``adaptive_avg_pool2d(interpolate(fmap, (8, 8), mode="bilinear", align_corners=False), 2)``
    computed as the separable linear map it is (cheap backward, any memory format).
    """
    rows = _pool_matrix_on(fmap.shape[-2], fmap.device, fmap.dtype)
    cols = _pool_matrix_on(fmap.shape[-1], fmap.device, fmap.dtype)
    return torch.einsum("ih,bchw,jw->bcij", rows, fmap, cols)


class ResNetTrunk(nn.Module):
    """torchvision ResNet without ``avgpool``/``fc``: ``[B, 3, H, W] -> [B, C, H/32, W/32]`` (layer4 output).

    ``zero_init_residual`` is torchvision's (MoCo v3 passes it): each residual branch's last norm starts at 0.
    """

    def __init__(self, arch: str = "resnet50", norm_layer: Callable[[int], nn.Module] | None = None,
                 zero_init_residual: bool = False):
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
        net = torchvision.models.__dict__[arch](norm_layer=norm_layer, zero_init_residual=zero_init_residual)
        for name in TRUNK_LAYERS:
            self.add_module(name, getattr(net, name))
        self.num_features: int = net.fc.in_features

    def forward(self, x: Tensor) -> Tensor:
        for name in TRUNK_LAYERS:
            x = getattr(self, name)(x)
        return x


for _arch in ARCHS:
    register_trunk(_arch, "resnet")(partial(ResNetTrunk, _arch))

