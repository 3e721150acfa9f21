"""W2SSL's read-out of a montage's feature map: exact 2x2 grid pooling, one vector per tile (METHOD §3).

The authors resize the map to 8x8 (bilinear) and average 4x4 blocks; that is a fixed linear map per
axis, applied here as two small matrices, so any trunk's map (ResNet layer 4, a ViT's token map) works.
"""
from __future__ import annotations

from functools import cache

import torch
from torch import Tensor


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
