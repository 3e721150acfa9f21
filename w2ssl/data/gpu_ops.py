"""Batched tensor versions of the METHOD §1 augmentation ops (their parameters: ``w2ssl.data.gpu_params``).

Every function works on a batch of ``n`` tiles with per-tile parameters, on any device, without
host synchronisation; images are float ``[n, 3, H, W]`` in ``[0, 1]`` unless stated otherwise.
The colour ops, solarize and flip follow ``torchvision.transforms.v2.functional`` on float tensors;
the resize and the blur follow PIL's filters (antialiased bilinear; three extended-box passes). See
``gpu_augment`` for what still differs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

BLUR_SIGMA = (0.1, 2.0)
BLUR_PASSES = 3  # PIL's GaussianBlur: three box blurs
BOX_REACH = 2  # taps each side of a box kernel: floor(r) + 1 <= 2 for σ <= 2
JITTER = (0.4, 0.4, 0.2, 0.1)  # ColorJitter(brightness, contrast, saturation, hue)
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's tensor rgb_to_grayscale (PIL uses 0.299)


def resample_weights(start: Tensor, length: Tensor, out_size: int, in_size: int) -> Tensor:
    """Antialiased bilinear resampling matrices ``[m, out_size, in_size]`` (PIL's ``BILINEAR`` resize).

    Row ``i`` of matrix ``k`` maps the ``in_size`` pixels of an axis to output pixel ``i`` of the crop
    ``[start_k, start_k + length_k)`` resized to ``out_size``: a triangle filter centred on
    ``start + (i + 0.5)·s`` (``s = length / out_size``), widened by ``max(s, 1)``, restricted to the
    crop's pixels and normalised — PIL's ``precompute_coeffs``; plain bilinear when upsampling.
    """
    start, length = start.float(), length.float()
    scale = length / out_size
    support = scale.clamp(min=1.0)
    rel = torch.arange(in_size, device=start.device, dtype=torch.float32)[None] - start[:, None]  # [m, in]
    centre = (torch.arange(out_size, device=start.device, dtype=torch.float32)[None] + 0.5) * scale[:, None]
    weights = (1 - (rel[:, None, :] + 0.5 - centre[:, :, None]).abs() / support[:, None, None]).clamp(min=0)
    inside = (rel >= 0) & (rel < length[:, None])
    weights = weights * inside[:, None, :]
    return weights / weights.sum(dim=-1, keepdim=True)


def resized_crops(images: Tensor, boxes: Tensor, size: int) -> Tensor:
    """Crop ``boxes [B, K, 4]`` ``(top, left, h, w)`` of ``images [B, C, H, W]`` and resize to ``size``.

    Returns ``[B, K, C, size, size]`` in the images' value range, computed as two batched matrix
    products (columns, then rows) with :func:`resample_weights`; equal to cropping then resizing
    with antialiased bilinear interpolation.
    """
    b, c, hgt, wid = images.shape
    k = boxes.shape[1]
    flat = boxes.reshape(b * k, 4)
    rows = resample_weights(flat[:, 0], flat[:, 2], size, hgt).view(b, k, size, hgt)
    cols = resample_weights(flat[:, 1], flat[:, 3], size, wid).view(b, k * size, wid)
    narrow = torch.bmm(images.reshape(b, c * hgt, wid), cols.transpose(1, 2))  # [B, C·H, K·size]
    narrow = narrow.view(b, c, hgt, k, size)
    return torch.einsum("bkyh,bchkx->bkcyx", rows, narrow)


def _per_tile(values: Tensor) -> Tensor:
    """``[n]`` -> ``[n, 1, 1, 1]`` for broadcasting over tiles."""
    return values.view(-1, 1, 1, 1)


def _blend(x: Tensor, other: Tensor, factor: Tensor) -> Tensor:
    return (x * _per_tile(factor) + other * _per_tile(1 - factor)).clamp(0, 1)


def grayscale(x: Tensor) -> Tensor:
    """Luma ``[n, 1, H, W]`` with torchvision's tensor weights."""
    r, g, b = x.unbind(dim=1)
    return r.mul(GRAY_WEIGHTS[0]).add_(g, alpha=GRAY_WEIGHTS[1]).add_(b, alpha=GRAY_WEIGHTS[2]).unsqueeze(1)


def adjust_brightness(x: Tensor, factor: Tensor) -> Tensor:
    return (x * _per_tile(factor)).clamp(0, 1)


def adjust_contrast(x: Tensor, factor: Tensor) -> Tensor:
    return _blend(x, grayscale(x).mean(dim=(1, 2, 3), keepdim=True), factor)


def adjust_saturation(x: Tensor, factor: Tensor) -> Tensor:
    return _blend(x, grayscale(x), factor)


def adjust_hue(x: Tensor, factor: Tensor) -> Tensor:
    """Rotate the HSV hue by ``factor [n]`` turns; value and saturation are kept.

    Uses the closed form of HSV -> RGB: channel ``= max − (max − min)·clamp(min(k, 4 − k), 0, 1)``
    with ``k = (n + 6·hue) mod 6`` and ``n = 5, 3, 1`` for R, G, B.
    """
    minc, maxc = torch.aminmax(x, dim=1, keepdim=True)
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    rc, gc, bc = ((maxc - x) / safe).unbind(dim=1)
    r, g = x[:, 0], x[:, 1]
    m = maxc[:, 0]
    hue6 = torch.where(m == r, bc - gc, torch.where(m == g, 2 + rc - bc, 4 + gc - rc)).unsqueeze(1)
    hue6 = hue6 + 6 * _per_tile(factor)
    offsets = torch.arange(5.0, 0.0, -2.0, device=x.device).view(1, 3, 1, 1)  # R, G, B: 5, 3, 1
    k = torch.remainder(offsets + hue6, 6)
    return maxc - delta * torch.minimum(k, 4 - k).clamp(0, 1)


COLOR_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def color_jitter(x: Tensor, factors: Tensor, index: Tensor, counts: list[list[int]]) -> Tensor:
    """ColorJitter of ``x [n, 3, H, W]`` in each tile's own op order; each op runs once per jittered tile.

    ``index [4, m]`` and ``counts`` (4 x 4 ints, known on the host) are :func:`gpu_params.jitter_plan`'s:
    at step ``s`` op ``k`` takes the ``counts[s][k]`` tiles of its block of ``index[s]``, with its factor
    ``factors[:, k]`` (``[n, 4]``). The blocks of a step are disjoint, so each op reads the tiles as the
    previous step left them. Tiles that ``index`` does not list are unchanged.
    """
    x = x.clone()
    for row, row_counts in zip(index, counts):
        for op, factor, tiles in zip(COLOR_OPS, factors.unbind(1), row.split(row_counts)):
            if tiles.numel():
                x.index_copy_(0, tiles, op(x.index_select(0, tiles), factor.index_select(0, tiles)))
    return x


def random_grayscale(x: Tensor, mask: Tensor) -> Tensor:
    """Replace tiles where ``mask [n]`` by their luma repeated over 3 channels."""
    return torch.where(_per_tile(mask), grayscale(x).expand_as(x), x)


def blur_radius(sigma: Tensor, passes: int = BLUR_PASSES) -> Tensor:
    """PIL's extended-box radius ``[n]`` for Gaussian ``sigma [n]``: ``passes`` boxes of this radius have variance σ².

    Integer part ``l = floor((sqrt(12σ²/p + 1) − 1) / 2)``, fraction
    ``(2l + 1)(l(l + 1) − 3σ²/p) / (6(σ²/p − (l + 1)²))`` (Gwosdek et al. 2011, as PIL's ``BoxBlur.c``).
    """
    var = sigma.double() ** 2 / passes
    whole = torch.floor((torch.sqrt(12 * var + 1) - 1) / 2)
    return whole + (2 * whole + 1) * (whole * (whole + 1) - 3 * var) / (6 * (var - (whole + 1) ** 2))


def box_kernels(radius: Tensor) -> Tensor:
    """Extended box kernels ``[n, 2·BOX_REACH + 1]``: weight 1 within ``floor(r)``, ``r − floor(r)`` one step beyond.

    Kernel size rule: a pass of radius ``r`` has ``2·floor(r) + 3`` taps; ``r <= 1.375`` for σ <= 2,
    so every kernel fits in 5 taps (13 for the three passes together).
    """
    taps = torch.arange(-BOX_REACH, BOX_REACH + 1, device=radius.device, dtype=torch.float64).abs()
    whole, r = torch.floor(radius)[:, None], radius[:, None]
    weights = torch.where(taps <= whole, 1.0, torch.where(taps == whole + 1, r - whole, 0.0))
    return (weights / (2 * r + 1)).float()


def gaussian_blur(x: Tensor, sigma: Tensor, mask: Tensor) -> Tensor:
    """PIL's ``GaussianBlur(radius=sigma)`` for tiles where ``mask [n]``, per-tile ``sigma [n]``.

    As PIL: three extended-box passes per axis (:func:`blur_radius`, :func:`box_kernels`), each with
    replicated edges; each pass is one depthwise convolution over all ``n·3`` channels.
    """
    n, c, hgt, wid = x.shape
    kernels = box_kernels(blur_radius(sigma)).repeat_interleave(c, dim=0)  # [n·c, taps]
    flat = x.reshape(1, n * c, hgt, wid)
    for pad, shape in (((BOX_REACH, BOX_REACH, 0, 0), (1, -1)), ((0, 0, BOX_REACH, BOX_REACH), (-1, 1))):
        weight = kernels.view(n * c, 1, *shape)
        for _ in range(BLUR_PASSES):
            flat = F.conv2d(F.pad(flat, pad, mode="replicate"), weight, groups=n * c)
    return torch.where(_per_tile(mask), flat.view(n, c, hgt, wid), x)


def solarize(x: Tensor, mask: Tensor, threshold: float = 128 / 255) -> Tensor:
    """Invert values ``>= threshold`` of the tiles where ``mask [n]`` (PIL ``ImageOps.solarize(img, 128)``)."""
    return torch.where(_per_tile(mask) & (x >= threshold), 1 - x, x)


def hflip(x: Tensor, mask: Tensor) -> Tensor:
    """Mirror the tiles where ``mask [n]`` left to right."""
    return torch.where(_per_tile(mask), x.flip(-1), x)
