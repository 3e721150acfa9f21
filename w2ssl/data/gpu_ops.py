"""Batched tensor versions of the METHOD §1 augmentation ops (their parameters: ``w2ssl.data.gpu_params``).

Every function works on a batch of ``n`` tiles with per-tile parameters, on any device, without
host synchronisation; images are float ``[n, 3, H, W]`` in ``[0, 1]`` unless stated otherwise.
The colour ops, solarize and flip follow ``torchvision.transforms.v2.functional`` on float tensors;
the resize and the blur follow PIL's filters (antialiased bilinear; three extended-box passes). See
``gpu_augment`` for what still differs.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from w2ssl.data.augment import MEAN, STD

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


def _on_tiles(x: Tensor, index: Tensor, op: Callable[[Tensor], Tensor]) -> Tensor:
    """``x`` with ``op`` applied to the tiles ``index [m]`` (int64) alone; the others are unchanged.

    Only the listed tiles are computed, and ``index``'s length is known on the host: no device sync.
    """
    if index.numel() == 0:
        return x
    return x.index_copy(0, index, op(x.index_select(0, index)))


def _blend(x: Tensor, other: Tensor, factor: Tensor) -> Tensor:
    return (x * _per_tile(factor)).add_(other * _per_tile(1 - factor)).clamp_(0, 1)


def grayscale(x: Tensor) -> Tensor:
    """Luma ``[n, 1, H, W]`` with torchvision's tensor weights."""
    r, g, b = x.unbind(dim=1)
    return r.mul(GRAY_WEIGHTS[0]).add_(g, alpha=GRAY_WEIGHTS[1]).add_(b, alpha=GRAY_WEIGHTS[2]).unsqueeze(1)


def adjust_brightness(x: Tensor, factor: Tensor) -> Tensor:
    return (x * _per_tile(factor)).clamp_(0, 1)


def adjust_contrast(x: Tensor, factor: Tensor) -> Tensor:
    return _blend(x, grayscale(x).mean(dim=(1, 2, 3), keepdim=True), factor)


def adjust_saturation(x: Tensor, factor: Tensor) -> Tensor:
    return _blend(x, grayscale(x), factor)


def _is_max(channel: Tensor, maxc: Tensor) -> Tensor:
    """1.0 where ``channel == maxc`` (``channel <= maxc``), else 0.0, in float arithmetic (no bool tensors,
    which are slow on the CPU): differences of values in ``[0, 1]`` are at least ``2^-126`` or zero."""
    return (channel - maxc).mul_(2.0**126).add_(1).clamp_(0, 1)


def adjust_hue(x: Tensor, factor: Tensor) -> Tensor:
    """Rotate the HSV hue by ``factor [n]`` turns; value and saturation are kept.

    Hue in sixths of a turn: ``(g − b)/C`` where red is the maximum, else ``2 + (b − r)/C`` where green
    is, else ``4 + (r − g)/C`` (``C`` = max − min). Output by the closed form of HSV -> RGB: channel
    ``= max − C·clamp(min(k, 4 − k), 0, 1)`` with ``k = (n + 6·hue) mod 6`` and ``n = 5, 3, 1`` for R, G, B.
    Branch-free float arithmetic throughout.
    """
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    maxc = torch.maximum(torch.maximum(r, g), b)
    chroma = maxc - torch.minimum(torch.minimum(r, g), b)
    inv = chroma.clamp_min(2.0**-100).reciprocal_()  # grey pixels: any hue, C = 0 keeps them grey
    red = _is_max(r, maxc)
    green = _is_max(g, maxc).mul_(1 - red)  # red wins ties, as the branch order above
    hue_r, hue_g, hue_b = (g - b).mul_(inv), (b - r).mul_(inv).add_(2), (r - g).mul_(inv).add_(4)
    hue6 = hue_b + red * (hue_r - hue_b) + green * (hue_g - hue_b)  # in [-1, 5]
    hue6 += 6 * factor.view(-1, 1, 1)
    out = torch.empty_like(x)
    for c, offset in enumerate((5.0, 3.0, 1.0)):
        k = hue6 + offset  # in [-1.6, 12): one wrap at most, by floor division
        k -= torch.floor(k * (1 / 6)).mul_(6)
        torch.minimum(k, 4 - k, out=k).clamp_(0, 1)
        torch.sub(maxc, chroma * k, out=out[:, c])
    return out


COLOR_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def color_jitter(x: Tensor, factors: Tensor, index: Tensor, counts: list[list[int]]) -> Tensor:
    """ColorJitter of ``x [n, 3, H, W]`` in each tile's own op order; each op runs once per jittered tile.

    ``index [4, m]`` and ``counts`` (4 x 4 ints, known on the host) are :func:`gpu_params.jitter_plan`'s:
    at step ``s`` op ``k`` takes the ``counts[s][k]`` tiles of its block of ``index[s]``, with its factor
    ``factors[:, k]`` (``[n, 4]``). The blocks of a step are disjoint, so each op reads the tiles as the
    previous step left them. Tiles that ``index`` does not list are unchanged. The jittered tiles are
    gathered once, in each step's order, and written back once.
    """
    if index.shape[1] == 0:
        return x
    tiles, f = x.index_select(0, index[0]), factors.index_select(0, index[0])
    where = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
    for step, step_counts in enumerate(counts):
        if step:  # reorder the gathered tiles from the previous step's order to this step's
            where.index_copy_(0, index[step - 1], torch.arange(index.shape[1], device=x.device))
            order = where.index_select(0, index[step])
            tiles, f = tiles.index_select(0, order), f.index_select(0, order)
        start = 0
        for k, (op, count) in enumerate(zip(COLOR_OPS, step_counts)):
            if count:
                tiles[start:start + count] = op(tiles[start:start + count], f[start:start + count, k])
            start += count
    return x.index_copy(0, index[-1], tiles)


def random_grayscale(x: Tensor, index: Tensor) -> Tensor:
    """Replace the tiles ``index [m]`` by their luma repeated over 3 channels."""
    return _on_tiles(x, index, lambda t: grayscale(t).expand_as(t))


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


def _box_passes(x: Tensor, weights: Tensor, dim: int) -> Tensor:
    """``BLUR_PASSES`` unnormalised extended-box passes along ``dim`` (2: rows, 3: columns), edges replicated.

    ``weights [n, BOX_REACH + 1]``: the centre tap's weight (1), then the weight of the two taps at each
    distance. Each pass reads shifted views of a padded buffer and writes the interior of another, whose
    edges are then replicated: no padding copy and no convolution (both slow on the CPU).
    """
    size, r = x.shape[dim], BOX_REACH
    pad = [0, 0, 0, 0]
    pad[2 * (3 - dim):2 * (3 - dim) + 2] = r, r
    src = F.pad(x, tuple(pad), mode="replicate")
    dst, pair = torch.empty_like(src), torch.empty_like(x)
    for _ in range(BLUR_PASSES):
        inner = dst.narrow(dim, r, size)
        inner.copy_(src.narrow(dim, r, size))
        for d in range(1, r + 1):
            torch.add(src.narrow(dim, r - d, size), src.narrow(dim, r + d, size), out=pair)
            inner.addcmul_(pair, _per_tile(weights[:, d]))
        dst.narrow(dim, 0, r).copy_(dst.narrow(dim, r, 1).expand_as(dst.narrow(dim, 0, r)))
        dst.narrow(dim, r + size, r).copy_(dst.narrow(dim, r + size - 1, 1).expand_as(dst.narrow(dim, 0, r)))
        src, dst = dst, src
    return src.narrow(dim, r, size)


def gaussian_blur(x: Tensor, sigma: Tensor, index: Tensor) -> Tensor:
    """PIL's ``GaussianBlur(radius=sigma)`` of the tiles ``index [m]``, per-tile ``sigma [n]``.

    As PIL: three extended-box passes per axis (:func:`blur_radius`, :func:`box_kernels`), each with
    replicated edges. The passes run unnormalised (centre weight 1) and the six passes' normalisation
    is one product at the end: the passes are linear.
    """
    def blur(tiles: Tensor) -> Tensor:
        kernels = box_kernels(blur_radius(sigma.index_select(0, index)))[:, BOX_REACH:]  # centre, then outwards
        centre = kernels[:, :1]
        tiles = _box_passes(tiles, kernels / centre, 3)
        tiles = _box_passes(tiles, kernels / centre, 2)
        return tiles * _per_tile(centre[:, 0] ** (2 * BLUR_PASSES))

    return _on_tiles(x, index, blur)


def solarize(x: Tensor, index: Tensor, threshold: float = 128 / 255) -> Tensor:
    """Invert values ``>= threshold`` of the tiles ``index [m]`` (PIL ``ImageOps.solarize(img, 128)``)."""
    def invert(tiles: Tensor) -> Tensor:
        # 1.0 where tiles >= threshold, else 0.0 (floats near the threshold differ from it by >= 2^-25);
        # products with an exact 0 or 1 and sums with 0 are exact: the result is 1 − x or x to the bit
        above = (tiles - threshold).mul_(2.0**40).add_(1).clamp_(0, 1)
        return above * (1 - tiles) + (1 - above) * tiles

    return _on_tiles(x, index, invert)


def hflip(x: Tensor, index: Tensor) -> Tensor:
    """Mirror the tiles ``index [m]`` left to right."""
    return _on_tiles(x, index, lambda t: t.flip(-1))


def normalize(x: Tensor) -> Tensor:
    """``(x − mean) / std`` per channel with the ImageNet statistics, in place."""
    mean = torch.tensor(MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=x.device).view(1, 3, 1, 1)
    return x.sub_(mean).div_(std)


def augment_tiles(x: Tensor, p: dict[str, Tensor], counts: list[list[int]]) -> Tensor:
    """METHOD §1 after the crop, in its order: colour jitter, grayscale, blur, solarize, then normalise.

    ``x [n, 3, t, t]`` float in ``[0, 1]``; ``p`` and ``counts`` are ``gpu_params.tile_params``' (on ``x``'s
    device). Returns the normalised tiles ``[n, 3, t, t]``. The flip (``p["flip"]``) is the caller's: it
    commutes with every op here (pointwise ops, a tile's mean, a mirror-symmetric blur with replicated
    edges), so it may run at any point, e.g. on the uint8 tiles.
    """
    x = color_jitter(x, p["factors"], p["jitter_index"], counts)
    x = random_grayscale(x, p["gray"])
    x = gaussian_blur(x, p["sigma"], p["blur"])
    return normalize(solarize(x, p["solarize"]))
