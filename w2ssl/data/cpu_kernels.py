"""Compiled CPU loops for the METHOD §1 ops after the crop (``--cpu-aug fast``): one call per chunk of tiles.

The formulas are those of ``w2ssl.data.gpu_ops`` (torchvision's tensor colour ops, PIL's three-pass
extended-box blur), written as per-pixel loops that numba compiles once (and caches on disk): each op
makes one pass over a tile that stays in the core's cache, where PyTorch's eager ops make tens of
passes per op over tensors of many tiles. Results equal ``gpu_ops.augment_tiles`` within float32
rounding (``tests/data/test_cpu_kernels.py``).
"""
from __future__ import annotations

import math

import numba as nb
import numpy as np

from w2ssl.data.augment import MEAN, STD
from w2ssl.data.gpu_ops import BOX_REACH, GRAY_WEIGHTS

WR, WG, WB = (np.float32(w) for w in GRAY_WEIGHTS)
THRESHOLD = np.float32(128 / 255)  # solarize: PIL inverts uint8 values >= 128
MEAN32, STD32 = np.array(MEAN, dtype=np.float32), np.array(STD, dtype=np.float32)
JIT = {"cache": True, "fastmath": True, "nogil": True}


@nb.njit(**JIT)
def _clamp01(v):
    return min(max(v, np.float32(0)), np.float32(1))


@nb.njit(**JIT)
def _brightness(x, f):
    for c in range(3):
        for i in range(x.shape[1]):
            for j in range(x.shape[2]):
                x[c, i, j] = _clamp01(x[c, i, j] * f)


@nb.njit(**JIT)
def _contrast(x, f):
    total = 0.0
    for i in range(x.shape[1]):
        for j in range(x.shape[2]):
            total += WR * x[0, i, j] + WG * x[1, i, j] + WB * x[2, i, j]
    mean = np.float32(total / (x.shape[1] * x.shape[2])) * (np.float32(1) - f)
    for c in range(3):
        for i in range(x.shape[1]):
            for j in range(x.shape[2]):
                x[c, i, j] = _clamp01(x[c, i, j] * f + mean)


@nb.njit(**JIT)
def _saturation(x, f, row):
    rest = np.float32(1) - f
    for i in range(x.shape[1]):
        for j in range(x.shape[2]):
            row[j] = (WR * x[0, i, j] + WG * x[1, i, j] + WB * x[2, i, j]) * rest
        for c in range(3):
            for j in range(x.shape[2]):
                x[c, i, j] = _clamp01(x[c, i, j] * f + row[j])


@nb.njit(**JIT)
def _hue(x, f, scratch):
    """HSV hue rotation by ``f`` turns, as ``gpu_ops.adjust_hue``; ``scratch [3, W]``. Row by row: the
    hue, then each channel, in loops without branches, which the compiler vectorises."""
    shift = np.float32(6) * f
    for i in range(x.shape[1]):
        r, g, b = x[0, i], x[1, i], x[2, i]
        for j in range(x.shape[2]):
            top = max(r[j], max(g[j], b[j]))
            chroma = top - min(r[j], min(g[j], b[j]))
            inv = np.float32(1) / max(chroma, np.float32(2.0**-100))  # grey: any hue, chroma 0 keeps it grey
            hue = (r[j] - g[j]) * inv + np.float32(4)
            hue = (b[j] - r[j]) * inv + np.float32(2) if g[j] == top else hue
            hue = (g[j] - b[j]) * inv if r[j] == top else hue  # red wins ties
            scratch[0, j], scratch[1, j], scratch[2, j] = top, chroma, hue + shift
        for c in range(3):
            offset, out = np.float32(5 - 2 * c), x[c, i]
            for j in range(x.shape[2]):
                k = scratch[2, j] + offset
                k -= np.float32(6) * math.floor(k * np.float32(1 / 6))
                out[j] = scratch[0, j] - scratch[1, j] * _clamp01(min(k, np.float32(4) - k))


@nb.njit(**JIT)
def _grayscale(x):
    for i in range(x.shape[1]):
        for j in range(x.shape[2]):
            gray = WR * x[0, i, j] + WG * x[1, i, j] + WB * x[2, i, j]
            for c in range(3):
                x[c, i, j] = gray


@nb.njit(**JIT)
def _blur(x, w1, w2, scale, rows, cols):
    """Three extended-box passes along each axis, edges replicated; ``w1, w2``: the taps at distance 1
    and 2 relative to the centre's 1; ``scale``: the six passes' normalisation. ``rows [2, H + 4, W]``,
    ``cols [2, W + 4]``: scratch buffers."""
    h, w, r = x.shape[1], x.shape[2], BOX_REACH
    for c in range(3):
        for i in range(h):  # passes along the columns of each row
            src = 0
            for j in range(w):
                cols[0, r + j] = x[c, i, j]
            for _ in range(3):
                cols[src, 0] = cols[src, 1] = cols[src, r]
                cols[src, r + w] = cols[src, r + w + 1] = cols[src, r + w - 1]
                for j in range(w):
                    cols[1 - src, r + j] = (cols[src, r + j] + w1 * (cols[src, r + j - 1] + cols[src, r + j + 1])
                                            + w2 * (cols[src, r + j - 2] + cols[src, r + j + 2]))
                src = 1 - src
            for j in range(w):
                rows[0, r + i, j] = cols[src, r + j]
        src = 0
        for _ in range(3):  # passes along the rows, vectorised across the columns
            for j in range(w):
                rows[src, 0, j] = rows[src, 1, j] = rows[src, r, j]
                rows[src, r + h, j] = rows[src, r + h + 1, j] = rows[src, r + h - 1, j]
            for i in range(h):
                for j in range(w):
                    rows[1 - src, r + i, j] = (rows[src, r + i, j]
                                               + w1 * (rows[src, r + i - 1, j] + rows[src, r + i + 1, j])
                                               + w2 * (rows[src, r + i - 2, j] + rows[src, r + i + 2, j]))
            src = 1 - src
        for i in range(h):
            for j in range(w):
                x[c, i, j] = rows[src, r + i, j] * scale


@nb.njit(**JIT)
def _solarize_normalize(x, solarize):
    for c in range(3):
        mean, scale = MEAN32[c], np.float32(1) / STD32[c]
        for i in range(x.shape[1]):
            for j in range(x.shape[2]):
                v = x[c, i, j]
                if solarize:
                    v = np.float32(1) - v if v >= THRESHOLD else v
                x[c, i, j] = (v - mean) * scale


@nb.njit(**JIT)
def augment(tiles, out, first, factors, order, jittered, gray, blur, taps, solarize):
    """``tiles [n, 3, t, t]`` uint8 (image-major, ``v`` tiles per image) -> ``out [v, b, 3, t, t]`` float32,
    normalised, tile by tile: tile ``k`` is ``out[k % v, first + k // v]``.

    Per tile: ``factors [n, 4]`` float32 (brightness, contrast, saturation, hue), ``order [n, 4]`` int64
    (op ids in order), ``jittered``, ``gray``, ``blur``, ``solarize [n]`` bool, ``taps [n, 3]`` float32
    (blur ``w1, w2, scale``, see :func:`_blur`).
    """
    h, w = tiles.shape[2], tiles.shape[3]
    rows = np.empty((2, h + 2 * BOX_REACH, w), dtype=np.float32)
    cols = np.empty((2, w + 2 * BOX_REACH), dtype=np.float32)
    scratch = np.empty((3, w), dtype=np.float32)
    for k in range(tiles.shape[0]):
        x = out[k % out.shape[0], first + k // out.shape[0]]
        for c in range(3):
            for i in range(h):
                for j in range(w):
                    x[c, i, j] = np.float32(tiles[k, c, i, j]) / np.float32(255)
        if jittered[k]:
            for step in range(4):
                op, f = order[k, step], factors[k, order[k, step]]
                if op == 0:
                    _brightness(x, f)
                elif op == 1:
                    _contrast(x, f)
                elif op == 2:
                    _saturation(x, f, scratch[0])
                else:
                    _hue(x, f, scratch)
        if gray[k]:
            _grayscale(x)
        if blur[k]:
            _blur(x, taps[k, 0], taps[k, 1], taps[k, 2], rows, cols)
        _solarize_normalize(x, solarize[k])


def compile_now() -> None:
    """Compile (or load from numba's disk cache) the kernels in this process: loader workers forked after
    this inherit the machine code instead of each compiling it again."""
    tile = np.zeros((1, 3, 2, 2), dtype=np.uint8)
    flags = np.ones(1, dtype=np.bool_)
    augment(tile, np.empty((1, 1, 3, 2, 2), dtype=np.float32), 0, np.ones((1, 4), dtype=np.float32),
            np.arange(4, dtype=np.int64)[None], flags, flags, flags, np.ones((1, 3), dtype=np.float32), flags)
