"""The random parameters of ``--gpu-aug``, drawn on the host from (seed, epoch, sample index) alone.

Every parameter of a sample's four tiles (crop box, colour-jitter coin, factors and order, grayscale,
blur and its σ, solarize, flip) is a function of the run's seed, the epoch and the sample's index in the
dataset: a sample gets the same tiles whatever the number of processes, the batch it falls in or its
place there, and two processes share draws only where they hold the same sample. The draws come from
SplitMix64 (Steele, Lea and Flood 2014), a counter-based generator: output ``j`` for the key ``k`` is
``mix(k + (j + 1)·γ)``, so a whole batch is drawn at once in numpy, without generator state and
without touching the device. Distributions are those of the PIL pipeline (torchvision's
``RandomResizedCrop.get_params``, ``ColorJitter``, ``RandomGrayscale``, ``RandomHorizontalFlip``).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from w2ssl.data.augment import CROSS
from w2ssl.data.datasets import sample_seed
from w2ssl.data.gpu_ops import BLUR_SIGMA, JITTER

AUG_STREAM = 0x6770752D61756721  # b"gpu-aug!": keys of --gpu-aug's draws, apart from the PIL path's seeds
GAMMA = np.uint64(0x9E3779B97F4A7C15)  # SplitMix64's increment (and its two mixing constants below)
CROP_ATTEMPTS = 10  # RandomResizedCrop's attempts before its central-crop fallback
# A tile's uniforms, column by column; a sample draws its four tiles' rows in one go.
AREA, RATIO, PLACE = slice(0, 10), slice(10, 20), slice(20, 22)  # crop: area and log-ratio per attempt, top/left
JITTER_COIN, FACTORS, ORDER = 22, slice(23, 27), slice(27, 31)  # colour jitter: p, factors, op order keys
GRAY, BLUR, SIGMA, SOLARIZE, FLIP = 31, 32, 33, 34, 35
DRAWS_PER_TILE = 36
FOUR_CROP = (1, 1, 2, 2)  # the view of each tile of a W2SSL sample: view 1 left, right, view 2 left, right
TWO_CROP = (1, 2)  # MoCo v3: one tile per view, the whole image
TILES = len(FOUR_CROP)


def sample_keys(seed: int, epochs: Sequence[int], indices: Sequence[int]) -> np.ndarray:
    """``[b]`` uint64 keys of the samples ``indices`` in ``epochs`` (``sample_seed`` in the ``AUG_STREAM``)."""
    return np.array([sample_seed(seed, e, i) ^ AUG_STREAM for e, i in zip(epochs, indices)], dtype=np.uint64)


def uniforms(keys: np.ndarray, count: int) -> np.ndarray:
    """``[b, count]`` float64 in ``[0, 1)``: the first ``count`` SplitMix64 outputs for each of ``keys [b]``."""
    z = keys.astype(np.uint64)[:, None] + np.arange(1, count + 1, dtype=np.uint64)[None] * GAMMA  # wraps mod 2^64
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    return (z >> np.uint64(11)).astype(np.float64) * 2.0**-53


def tile_uniforms(keys: np.ndarray, tiles: int = TILES) -> Tensor:
    """``[tiles·b, DRAWS_PER_TILE]`` float64 uniforms of the tiles of the samples ``keys [b]`` (image-major)."""
    return torch.from_numpy(uniforms(keys, tiles * DRAWS_PER_TILE).reshape(-1, DRAWS_PER_TILE))


def crop_boxes(width: Tensor, height: Tensor, u: Tensor, scale: tuple[float, float] = (0.2, 1.0),
               ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> Tensor:
    """RandomResizedCrop boxes ``[n, 4]`` int64 ``(top, left, h, w)`` for regions ``width, height [n]``.

    ``u [n, 2·a + 2]``: per attempt an area and a log-ratio uniform, then top and left (``AREA``,
    ``RATIO``, ``PLACE`` with ``a = CROP_ATTEMPTS``). As ``RandomResizedCrop.get_params``: area fraction
    ``U(scale)`` and log aspect ratio ``U(log ratio)``, rounded half to even; the first attempt that fits is
    placed uniformly; if none fits, the central crop with the aspect ratio clamped to ``ratio``.
    """
    attempts = (u.shape[1] - 2) // 2
    width, height, u = width.double(), height.double(), u.double()
    area = (width * height)[:, None]
    target = area * (scale[0] + (scale[1] - scale[0]) * u[:, :attempts])
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_low + (log_high - log_low) * u[:, attempts:2 * attempts])
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    fits = (w > 0) & (w <= width[:, None]) & (h > 0) & (h <= height[:, None])
    first = (fits.cumsum(dim=1) == 0).sum(dim=1, keepdim=True).clamp(max=attempts - 1)  # first fitting attempt
    found = fits.any(dim=1)
    in_ratio = width / height
    fallback_w = torch.where(in_ratio > ratio[1], torch.round(height * ratio[1]), width)
    fallback_h = torch.where(in_ratio < ratio[0], torch.round(width / ratio[0]), height)
    w = torch.where(found, w.gather(1, first).squeeze(1), fallback_w)
    h = torch.where(found, h.gather(1, first).squeeze(1), fallback_h)
    place = u[:, 2 * attempts:]
    top = torch.where(found, torch.floor(place[:, 0] * (height - h + 1)).clamp(max=height - h),
                      torch.floor((height - h) / 2))
    left = torch.where(found, torch.floor(place[:, 1] * (width - w + 1)).clamp(max=width - w),
                       torch.floor((width - w) / 2))
    return torch.stack([top, left, h, w], dim=1).long()


def jitter_params(u: Tensor, p: float = 0.8) -> tuple[Tensor, Tensor, Tensor]:
    """ColorJitter(0.4, 0.4, 0.2, 0.1) applied with probability ``p``, from uniforms ``u [n, 9]``.

    Returns ``applied [n]`` bool, ``factors [n, 4]`` float32 (brightness and contrast in ``[0.6, 1.4]``,
    saturation in ``[0.8, 1.2]``, hue in ``[-0.1, 0.1]``) and ``order [n, 4]``: a uniform random
    permutation of the four ops (0 brightness, 1 contrast, 2 saturation, 3 hue) per tile.
    """
    b, c, s, h = JITTER
    low = torch.tensor([1 - b, 1 - c, 1 - s, -h], dtype=torch.float64)
    high = torch.tensor([1 + b, 1 + c, 1 + s, h], dtype=torch.float64)
    factors = (low + (high - low) * u[:, 1:5]).float()
    return u[:, 0] < p, factors, u[:, 5:9].argsort(dim=1)


def jitter_plan(applied: Tensor, order: Tensor) -> tuple[Tensor, list[list[int]]]:
    """Which tiles each colour op takes at each step: ``index [4, m]`` int64 and ``counts`` (4 x 4 ints).

    Row ``s`` of ``index`` lists the ``m`` jittered tiles (``applied [n]``) sorted by the op ``order [n, 4]``
    puts at step ``s``: the first ``counts[s][0]`` take op 0, the next ``counts[s][1]`` op 1, and so on.
    """
    tiles = applied.nonzero().flatten()
    ops = order[tiles]
    rows, counts = [], []
    for step in range(order.shape[1]):
        sorted_ops, perm = ops[:, step].sort(stable=True)
        rows.append(tiles[perm])
        counts.append(torch.bincount(sorted_ops, minlength=order.shape[1]).tolist())
    return torch.stack(rows), counts


def tile_params(keys: np.ndarray, width: Tensor, height: Tensor, crop_min: float,
                views: Sequence[int] = FOUR_CROP, flip_p: float = 0.5) -> tuple[dict[str, Tensor], list]:
    """Host parameters of the ``n = len(views)·b`` tiles of the samples ``keys [b]``, image-major.

    ``views`` gives the view (1 or 2) of each tile of a sample; ``width, height [n]`` are the tiles'
    regions. Returns ``{"boxes": [n, 4] int64 (top, left, h, w) in region coordinates, "factors": [n, 4]
    float32, "jitter_index": [4, m] int64, "sigma": [n] float32, "gray", "blur", "solarize", "flip": int64
    indices of the tiles that take the op}`` and the jitter plan's counts (:func:`jitter_plan`).
    Grayscale p = 0.2; blur p = 1.0 (view 1) / 0.1 (view 2) with ``σ ~ U(0.1, 2)``; solarize p = 0 / 0.2;
    flip p = ``flip_p`` (0.5 as published).
    """
    u = tile_uniforms(keys, len(views))
    view2 = torch.tensor([v == 2 for v in views]).repeat(len(keys))
    applied, factors, order = jitter_params(u[:, JITTER_COIN:ORDER.stop])
    index, counts = jitter_plan(applied, order)
    sigma = BLUR_SIGMA[0] + (BLUR_SIGMA[1] - BLUR_SIGMA[0]) * u[:, SIGMA]
    masks = {"gray": u[:, GRAY] < 0.2, "blur": u[:, BLUR] < torch.where(view2, 0.1, 1.0),
             "solarize": view2 & (u[:, SOLARIZE] < 0.2), "flip": u[:, FLIP] < flip_p}
    return {"boxes": crop_boxes(width, height, u[:, AREA.start:PLACE.stop], (crop_min, 1.0)),
            "factors": factors, "jitter_index": index, "sigma": sigma.float(),
            **{name: mask.nonzero().flatten() for name, mask in masks.items()}}, counts


def regions(width: int, cross: float = CROSS) -> tuple[tuple[int, int], tuple[int, int]]:
    """``((start, width) of the left region, (start, width) of the right region)`` along the width.

    Left columns ``[0, w//2 + cross·w)``, right ``[w//2 − cross·w, w)``, rounded as PIL's ``crop``.
    """
    left_end = round(width // 2 + cross * width)
    right_start = round(width // 2 - cross * width)
    return (0, left_end), (right_start, width - right_start)


def four_crop_regions(width: int, cross: float = CROSS) -> list[tuple[int, int]]:
    """``(start, width)`` of the region of each W2SSL tile (``FOUR_CROP``): left, right, left, right."""
    return list(regions(width, cross)) * 2


def two_crop_regions(width: int) -> list[tuple[int, int]]:
    """``(start, width)`` of the region of each MoCo v3 view (``TWO_CROP``): the whole image, twice."""
    return [(0, width)] * 2


def tile_regions(sizes: list[tuple[int, int]], layout: Callable[[int], list[tuple[int, int]]]) -> Tensor:
    """``[n, 3]`` int64 ``(start, width, height)`` of every tile's region, image-major, for images of ``sizes``
    ``(H, W)``; ``layout(W)`` gives an image's ``(start, width)`` per tile (all rows are kept)."""
    return torch.tensor([[*r, h] for h, w in sizes for r in layout(w)], dtype=torch.int64)


def image_tile_params(sizes: list[tuple[int, int]], keys: np.ndarray, crop_min: float,
                      layout: Callable[[int], list[tuple[int, int]]], views: Sequence[int], flip_p: float = 0.5
                      ) -> tuple[dict[str, Tensor], list]:
    """:func:`tile_params` of the tiles of images of ``sizes`` ``(H, W)``, their crop boxes in image coordinates.

    ``layout(W)`` is each tile's region (e.g. :func:`four_crop_regions`), ``views`` each tile's view.
    """
    region = tile_regions(sizes, layout)
    host, counts = tile_params(keys, region[:, 1], region[:, 2], crop_min, views, flip_p)
    host["boxes"][:, 1] += region[:, 0]  # region coordinates -> image coordinates
    return host, counts
