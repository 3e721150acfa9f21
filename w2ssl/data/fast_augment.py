"""The default CPU input pipeline of pre-training (``--cpu-aug fast``): METHOD §1's views, batched in the workers.

Each loader worker decodes its files with PIL, as the reference pipeline (``w2ssl.data.augment``), into
uint8 tensors (:func:`load_uint8`). Its collate function (:class:`FastCollate`) then makes the batch's
views with :class:`FastViews`:

* every random parameter is drawn per sample from ``(seed, epoch, index)`` by the code ``--gpu-aug``
  uses (``w2ssl.data.gpu_params``): one code decides which crop and which jitter, on either path;
* each tile is cropped and resized by PyTorch's uint8 antialiased bilinear resize, a port of
  Pillow-SIMD's fixed-point filter: PIL's ``BILINEAR`` resize within one grey level;
* colour jitter, grayscale, blur, solarize, flip and normalisation are ``gpu_ops``' batched float ops,
  a few images at a time (:data:`CHUNK`), so that each op's call overhead is shared by many tiles
  while the tiles stay in the core's cache.

Where the result differs from PIL's, and by how much, is in ``tests/data/test_fast_augment.py`` and
METHOD §1: PIL rounds to uint8 after every op, these ops stay in float.
"""
from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from w2ssl.data import cpu_kernels
from w2ssl.data import gpu_ops as G
from w2ssl.data.augment import CROSS
from w2ssl.data.datasets import load_rgb
from w2ssl.data.gpu_params import (
    FOUR_CROP,
    TWO_CROP,
    four_crop_regions,
    image_tile_params,
    sample_keys,
    two_crop_regions,
)
from w2ssl.errors import UserError

CHUNK = 8  # images augmented together: 32 tiles of 112 px (4.8 MB of float) sit in the L2/L3 caches


def load_uint8(path: str) -> Tensor:
    """``[3, H, W]`` uint8 view (channels-last strides, no copy) of the RGB image at ``path``.

    ValueError for an image narrower than 2 pixels: it has no left and right regions (METHOD §1), and
    the dataset replaces and counts it like an unreadable file.
    """
    img: Image.Image = load_rgb(path)
    if img.width < 2:
        raise ValueError(f"{path}: {img.width}x{img.height} px, too small to crop")
    with warnings.catch_warnings():  # a read-only array (PIL's bytes): never written, only resized
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.asarray(img)).permute(2, 0, 1)


def resize_crops(images: list[Tensor], boxes: Tensor, flip: Tensor, size: int) -> Tensor:
    """``[n, 3, size, size]`` uint8: crop ``boxes [n, 4]`` ``(top, left, h, w)`` of the images, resize, and
    mirror the tiles ``flip [m]``.

    Tile ``k`` is cut from ``images[k // (n / len(images))]`` (image-major tiles). PyTorch's uint8
    antialiased bilinear resize, PIL's filter in fixed point, on channels-last views: no copy of the image.
    """
    per_image, mirrored = len(boxes) // len(images), set(flip.tolist())
    out = torch.empty(len(boxes), 3, size, size, dtype=torch.uint8)
    for k, (top, left, h, w) in enumerate(boxes.tolist()):
        crop = images[k // per_image][None, :, top:top + h, left:left + w]
        tile = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True)[0]
        out[k] = tile.flip(-1) if k in mirrored else tile
    return out


def kernel_params(p: dict[str, Tensor], counts: list[list[int]], n: int) -> tuple[np.ndarray, ...]:
    """``gpu_params.tile_params``' output for ``n`` tiles as the per-tile arrays of ``cpu_kernels.augment``."""
    order = np.zeros((n, 4), dtype=np.int64)
    for step, (row, row_counts) in enumerate(zip(p["jitter_index"].tolist(), counts)):
        ops = np.repeat(np.arange(4), row_counts)  # the op of each block of the step's tiles
        order[row, step] = ops
    masks = {}
    for name in ("gray", "blur", "solarize"):
        masks[name] = np.zeros(n, dtype=np.bool_)
        masks[name][p[name].numpy()] = True
    jittered = np.zeros(n, dtype=np.bool_)
    jittered[p["jitter_index"][0].numpy()] = True
    kernels = G.box_kernels(G.blur_radius(p["sigma"])).numpy()  # [n, 5]: outer, inner, centre, inner, outer
    centre = kernels[:, G.BOX_REACH]
    taps = np.stack([kernels[:, G.BOX_REACH + 1] / centre, kernels[:, G.BOX_REACH + 2] / centre,
                     centre.astype(np.float64) ** (2 * G.BLUR_PASSES)], axis=1).astype(np.float32)
    return (p["factors"].numpy(), order, jittered, masks["gray"], masks["blur"], taps, masks["solarize"])


class FastViews:
    """uint8 images and sample keys -> the views' tiles, one ``[b, 3, size, size]`` float batch per tile.

    ``layout(W)`` gives the ``(start, width)`` region of each tile of an image of width ``W``, ``views``
    each tile's view (1 or 2, as ``gpu_params.tile_params``): :func:`fast_four_crop` and
    :func:`fast_two_crop` are W2SSL's and MoCo v3's. Tiles are normalised with the ImageNet mean and std.
    """

    def __init__(self, size: int, crop_min: float, layout: Callable[[int], list[tuple[int, int]]],
                 views: Sequence[int], chunk: int = CHUNK, flip_p: float = 0.5):
        if size < 1:
            raise UserError(f"--tile-size must be >= 1, got {size}")
        if not 0 < crop_min <= 1:
            raise UserError(f"--crop-min must be in (0, 1], got {crop_min}")
        self.size, self.crop_min, self.layout, self.views, self.chunk = size, crop_min, layout, tuple(views), chunk
        self.flip_p = flip_p

    def __call__(self, images: list[Tensor], keys: np.ndarray) -> list[Tensor]:
        if len(keys) != len(images):
            raise ValueError(f"{len(images)} images but {len(keys)} keys")
        out = torch.empty(len(self.views), len(images), 3, self.size, self.size)
        for i in range(0, len(images), self.chunk):
            self._augment(images[i:i + self.chunk], keys[i:i + self.chunk], out, i)
        return list(out)

    def _augment(self, images: list[Tensor], keys: np.ndarray, out: Tensor, first: int) -> None:
        """Write the normalised tiles of a chunk of images, the samples ``first, first + 1, ...`` of ``out``."""
        sizes = [(im.shape[1], im.shape[2]) for im in images]
        p, counts = image_tile_params(sizes, keys, self.crop_min, self.layout, self.views, self.flip_p)
        tiles = resize_crops(images, p["boxes"], p["flip"], self.size)
        cpu_kernels.augment(tiles.numpy(), out.numpy(), first, *kernel_params(p, counts, len(tiles)))


def fast_four_crop(tile_size: int = 112, crop_min: float = 0.2, cross: float = CROSS, flip_p: float = 0.5
                   ) -> FastViews:
    """W2SSL's four tiles per image (``w2ssl.data.augment.FourCrop``): view 1 left, right, view 2 left, right;
    ``cross`` (the regions' overlap) and ``flip_p`` default to the published values."""
    return FastViews(tile_size, crop_min, functools.partial(four_crop_regions, cross=cross), FOUR_CROP,
                     flip_p=flip_p)


def fast_two_crop(size: int = 224, crop_min: float = 0.2) -> FastViews:
    """MoCo v3's two views of the whole image (``w2ssl.data.twocrop.TwoCrop``)."""
    return FastViews(size, crop_min, two_crop_regions, TWO_CROP)


class FastCollate:
    """``collate_fn`` for :class:`w2ssl.data.datasets.PretrainDataset` items loaded by :func:`load_uint8`.

    ``(((image, index, epoch), bad))`` items -> ``(views, bad list)``: the same structure as the PIL
    pipeline's batches, each sample's tiles a function of ``(seed, epoch, index)`` alone.
    """

    def __init__(self, views: FastViews, seed: int):
        self.views, self.seed = views, seed
        cpu_kernels.compile_now()  # built in the main process, before the loader forks its workers

    def __call__(self, batch: list[tuple[tuple[Tensor, int, int], str]]) -> tuple[list[Tensor], list[str]]:
        keys = sample_keys(self.seed, [epoch for (_, _, epoch), _ in batch], [index for (_, index, _), _ in batch])
        return self.views([image for (image, _, _), _ in batch], keys), [bad for _, bad in batch]
