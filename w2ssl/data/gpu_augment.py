"""The GPU input pipeline of pre-training (``--gpu-aug``): workers read bytes, the device decodes and augments.

``PretrainDataset`` with :func:`encoded_with_path` and :func:`collate_pretrain` deliver the files' bytes
and the samples' ``(index, epoch)``; :func:`augment_batch` decodes them on the training device
(``w2ssl.data.gpu_decode``) and ``GpuFourCrop`` makes the METHOD §1 tiles for the whole batch at once, with
every random parameter drawn per sample on the host (``w2ssl.data.gpu_params``). The same code runs on the
CPU. The PIL pipeline (``w2ssl.data.augment``) stays the default and the reference: every random parameter
has its distribution (RandomResizedCrop with the 10-attempt fallback, ColorJitter(0.4, 0.4, 0.2,
0.1) with p = 0.8 in a random order per tile, grayscale p = 0.2, blur σ ~ U(0.1, 2) with p = 1.0 /
0.1, solarize p = 0 / 0.2, flip p = 0.5, for view 1 / view 2). Small differences from PIL remain:

* values stay float32 in [0, 1] from the resize on; PIL rounds to uint8 after every op;
* resize: PIL's antialiased bilinear filter, computed in float (not PIL's fixed point) as two
  matrix products per batch, which run in TF32 if ``torch.backends.cuda.matmul.allow_tf32`` is set
  (errors ~0.1 grey level);
* colour ops use torchvision's tensor formulas: luma weights 0.2989/0.587/0.114 (PIL 0.299/0.587/
  0.114 in integers), contrast blends towards the float mean luma (PIL: the rounded mean), hue
  rotates in float HSV (PIL: uint8 HSV, hue quantised to 1/256 of a turn);
* blur: PIL's own filter (three extended-box passes per axis whose variance is σ², replicated
  edges), in float; PIL rounds after each pass, which is visible for σ < 0.3 (PIL leaves most
  pixels unchanged there);
* solarize inverts float values ``>= 128/255`` (PIL: uint8 values ``>= 128``);
* nvjpeg's decoding differs from libjpeg's by under 2 levels on average, more at hard colour edges
  (another chroma upsampling); the draws differ from PIL's (SplitMix64 per sample instead of the
  global Python and torch generators), their distributions do not.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from w2ssl.data import gpu_ops as G
from w2ssl.data.augment import CROSS, MIN_WIDTH
from w2ssl.data.gpu_decode import decode_tolerant, read_bytes
from w2ssl.data.gpu_params import FOUR_CROP, TILES, four_crop_regions, image_tile_params, sample_keys
from w2ssl.errors import UserError

PAD_SLACK = 1.25  # a padded group of images may hold at most 25 % more pixels than its images


def pad_groups(sizes: list[tuple[int, int]], slack: float = PAD_SLACK) -> list[list[int]]:
    """Group image indices by size so that padding a group to its largest ``(H, W)`` wastes little.

    Images sorted by ``(H, W)`` join the current group while the padded group holds at most
    ``slack`` times its images' pixels; one group when all sizes are equal.
    """
    groups: list[list[int]] = []
    current: list[int] = []
    pixels = max_h = max_w = 0
    for i in sorted(range(len(sizes)), key=lambda k: sizes[k]):
        h, w = sizes[i]
        grown_h, grown_w = max(max_h, h), max(max_w, w)
        if current and grown_h * grown_w * (len(current) + 1) > slack * (pixels + h * w):
            groups.append(current)
            current, pixels, grown_h, grown_w = [], 0, h, w
        current.append(i)
        pixels, max_h, max_w = pixels + h * w, grown_h, grown_w
    groups.append(current)
    return groups


def _padded(images: list[Tensor]) -> Tensor:
    """uint8 ``[3, H_i, W_i]`` images -> float ``[n, 3, max H, max W]``, zero-padded bottom and right."""
    if all(im.shape == images[0].shape for im in images):
        return torch.stack(images).float()
    h, w = max(im.shape[1] for im in images), max(im.shape[2] for im in images)
    canvas = images[0].new_zeros((len(images), 3, h, w), dtype=torch.float32)
    for k, im in enumerate(images):
        canvas[k, :, : im.shape[1], : im.shape[2]] = im
    return canvas


class GpuFourCrop(nn.Module):
    """Decoded images -> ``(view1 [left, right], view2 [left, right])``, each ``[b, 3, tile, tile]``.

    The batched equivalent of ``w2ssl.data.augment.FourCrop``: the output is float32, normalised with
    the ImageNet mean/std, on the images' device. Image ``i``'s tiles are a function of the image and
    ``keys[i]`` alone (:func:`w2ssl.data.gpu_params.sample_keys`), whatever the rest of the batch. All
    parameters are drawn on the host and reach the device in one copy, without a host sync.
    ``pad_slack`` bounds the padding of differently sized images that are resized together (see
    :func:`pad_groups`); it changes speed and memory, not the result.
    """

    def __init__(self, tile_size: int = 112, crop_min: float = 0.2, pad_slack: float = PAD_SLACK,
                 cross: float = CROSS, flip_p: float = 0.5):
        super().__init__()
        if tile_size < 1:
            raise UserError(f"--tile-size must be >= 1, got {tile_size}")
        if not 0 < crop_min <= 1:
            raise UserError(f"--crop-min must be in (0, 1], got {crop_min}")
        self.tile_size, self.crop_min, self.pad_slack = tile_size, crop_min, pad_slack
        self.layout, self.flip_p = functools.partial(four_crop_regions, cross=cross), flip_p

    def forward(self, images: list[Tensor], keys: np.ndarray) -> tuple[list[Tensor], list[Tensor]]:
        sizes = _check_images(images)
        if len(keys) != len(images):
            raise ValueError(f"{len(images)} images but {len(keys)} keys")
        device, b, t = images[0].device, len(images), self.tile_size
        host, counts = image_tile_params(sizes, keys, self.crop_min, self.layout, FOUR_CROP, self.flip_p)
        groups = pad_groups(sizes, self.pad_slack)
        if len(groups) > 1:  # boxes in group order; "restore" puts the groups' tiles back in batch order
            order = torch.tensor([i for g in groups for i in g])
            host["boxes"] = host["boxes"].view(b, TILES, 4)[order].view(-1, 4)
            host["restore"] = order.argsort()
        p = _to_device(host, device)
        tiles = self._crops(images, groups, p).reshape(TILES * b, 3, t, t).div_(255)
        tiles = G.augment_tiles(G.hflip(tiles, p["flip"]), p, counts)
        out = tiles.view(b, TILES, 3, t, t).transpose(0, 1).contiguous()
        return [out[0], out[1]], [out[2], out[3]]

    def _crops(self, images: list[Tensor], groups: list[list[int]], p: dict[str, Tensor]) -> Tensor:
        """RandomResizedCrop of the four regions of every image: ``[b, 4, 3, tile, tile]`` in 0..255."""
        boxes = p["boxes"].view(-1, TILES, 4)
        if len(groups) == 1:
            return G.resized_crops(_padded(images), boxes, self.tile_size)
        parts, start = [], 0
        for g in groups:
            parts.append(G.resized_crops(_padded([images[i] for i in g]), boxes[start:start + len(g)],
                                         self.tile_size))
            start += len(g)
        return torch.cat(parts)[p["restore"]]


def _to_device(tensors: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    """Small host tensors -> ``device`` in one copy, pinned and non-blocking on CUDA (as float64, which
    holds bool, float32 and int64 below 2^53 exactly)."""
    if device.type == "cpu":
        return tensors
    flat = torch.cat([t.reshape(-1).double() for t in tensors.values()])
    flat = (flat.pin_memory() if device.type == "cuda" else flat).to(device, non_blocking=True)
    parts = flat.split([t.numel() for t in tensors.values()])
    return {name: part.view(t.shape).to(t.dtype) for (name, t), part in zip(tensors.items(), parts)}


def _check_images(images: list[Tensor]) -> list[tuple[int, int]]:
    """``(H, W)`` of each image; ValueError unless all are uint8 ``[3, H, W]`` (W >= MIN_WIDTH) on one device."""
    if not images:
        raise ValueError("GpuFourCrop needs at least one image")
    for i, im in enumerate(images):
        if im.dtype != torch.uint8 or im.ndim != 3 or im.shape[0] != 3 or im.shape[2] < MIN_WIDTH:
            raise ValueError(f"image {i}: expected uint8 [3, H, W] with W >= {MIN_WIDTH}, got {im.dtype} "
                             f"{list(im.shape)}")
        if im.device != images[0].device:
            raise ValueError(f"image {i} is on {im.device}, image 0 on {images[0].device}")
    return [(im.shape[1], im.shape[2]) for im in images]


def encoded_with_path(path: str) -> tuple[Tensor, str]:
    """Loader for :class:`w2ssl.data.datasets.PretrainDataset` in ``--gpu-aug`` mode: the bytes and the path."""
    return read_bytes(path), path


class EncodedBatch(NamedTuple):
    """A ``--gpu-aug`` batch as the loader delivers it: the files' bytes, paths, and sample keys."""
    data: list[Tensor]
    paths: list[str]
    indices: list[int]
    epochs: list[int]


def collate_pretrain(batch: list[tuple[tuple[tuple[Tensor, str], int, int], str]]) -> tuple[EncodedBatch, list[str]]:
    """``(((bytes, path), index, epoch), bad)`` items of ``PretrainDataset`` -> ``(EncodedBatch, bad list)``."""
    return (EncodedBatch([data for ((data, _), _, _), _ in batch], [path for ((_, path), _, _), _ in batch],
                         [index for (_, index, _), _ in batch], [epoch for (_, _, epoch), _ in batch]),
            [bad for _, bad in batch])


def augment_batch(batch: EncodedBatch, crop: GpuFourCrop, seed: int, device: torch.device
                  ) -> tuple[list[Tensor], list[str]]:
    """The four ``[b, 3, t, t]`` tile batches of ``batch`` on ``device`` (view 1 left, right, view 2 left,
    right), each sample's from ``(seed, epoch, index)`` alone, and the files that failed to decode or are
    narrower than :data:`~w2ssl.data.augment.MIN_WIDTH` (each replaced by a good image of the batch, as the
    PIL pipeline replaces them by the next readable file)."""
    images, bad = decode_tolerant(batch.data, batch.paths, device, usable=lambda im: im.shape[2] >= MIN_WIDTH)
    view1, view2 = crop(images, sample_keys(seed, batch.epochs, batch.indices))
    return [*view1, *view2], bad
