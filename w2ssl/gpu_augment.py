"""The GPU input pipeline of pre-training (``--gpu-aug``): workers read bytes, the device decodes and augments.

``EncodedImageFolder`` + ``collate_encoded`` deliver the files' bytes, ``decode_batch`` decodes them
(batched nvjpeg for JPEGs on CUDA), ``GpuFourCrop`` makes the SPEC §1 tiles for the whole batch at once.
The PIL pipeline (``w2ssl.augment``) stays the default and the reference: every random parameter
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
* JPEG decoding by nvjpeg may differ from libjpeg by a few levels; the draws differ from PIL's
  (a ``torch.Generator`` on the device), their distributions do not.
"""
from __future__ import annotations

import functools

import numpy as np
import torch
from torch import Tensor, nn
from torchvision.datasets import ImageFolder
from torchvision.io import ImageReadMode, decode_image, decode_jpeg

from . import gpu_ops as G
from .augment import CROSS, MEAN, STD
from .errors import UserError

JPEG_MAGIC = [0xFF, 0xD8, 0xFF]
PAD_SLACK = 1.25  # a padded group of images may hold at most 25 % more pixels than its images


def read_bytes(path: str) -> Tensor:
    """The file's bytes as a uint8 1-D tensor."""
    return torch.from_numpy(np.fromfile(path, dtype=np.uint8))


class EncodedImageFolder(ImageFolder):
    """``ImageFolder`` whose items are ``(uint8 1-D tensor of the file's bytes, class index)``."""

    def __init__(self, root: str, is_valid_file=None, allow_empty: bool = False):
        super().__init__(root, loader=read_bytes, is_valid_file=is_valid_file, allow_empty=allow_empty)


def collate_encoded(batch: list[tuple[Tensor, int]]) -> tuple[list[Tensor], Tensor]:
    """Keep the variable-length byte tensors as a list; stack the labels into an int64 tensor."""
    return [data for data, _ in batch], torch.tensor([label for _, label in batch], dtype=torch.int64)


def _decode_cpu(data: Tensor, index: int) -> Tensor:
    try:
        return decode_image(data, mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError) as err:
        raise ValueError(f"image {index} of the batch cannot be decoded: {err}") from err


def decode_batch(data: list[Tensor], device: torch.device | str) -> list[Tensor]:
    """Decode encoded images to uint8 ``[3, H, W]`` RGB tensors on ``device``.

    On CUDA, JPEGs go through one batched ``decode_jpeg(..., device=device)`` call; if it fails,
    each one is retried alone on the GPU, then on the CPU (e.g. CMYK JPEGs), so that the bad file
    can be named. Other formats and all images for a CPU device use ``decode_image``. A file that
    cannot be decoded raises ``ValueError`` naming its index in ``data``.

    CUDA work runs on a side stream that the current stream then waits for, and every output is
    marked as used by the current stream: torchvision's nvjpeg decoder writes from a private
    stream that does not wait for the stream its output memory was allocated on (pytorch/vision
    PR 9606), so its outputs must never come from memory that queued kernels may still read.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return [_decode_cpu(d, i) for i, d in enumerate(data)]
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    current, side = torch.cuda.current_stream(device), _side_stream(device)
    with torch.cuda.stream(side):
        out = _decode_on_device(data, device)
    current.wait_stream(side)
    for image in out:
        image.record_stream(current)
    return out


@functools.cache
def _side_stream(device: torch.device) -> torch.cuda.Stream:
    return torch.cuda.Stream(device)


def _decode_on_device(data: list[Tensor], device: torch.device) -> list[Tensor]:
    out: list[Tensor | None] = [None] * len(data)
    jpegs = [i for i, d in enumerate(data) if d[:3].tolist() == JPEG_MAGIC]
    if jpegs:
        try:
            decoded = decode_jpeg([data[i] for i in jpegs], mode=ImageReadMode.RGB, device=device)
        except RuntimeError:
            decoded = [_decode_one_cuda(data[i], i, device) for i in jpegs]
        for i, image in zip(jpegs, decoded):
            out[i] = image
    return [image if image is not None else _decode_cpu(d, i).to(device, non_blocking=True)
            for i, (d, image) in enumerate(zip(data, out))]


def _decode_one_cuda(data: Tensor, index: int, device: torch.device) -> Tensor:
    try:
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        return _decode_cpu(data, index).to(device, non_blocking=True)


def _to_device(t: Tensor, device: torch.device) -> Tensor:
    """Host tensor -> device without a stream synchronisation (pinned, non-blocking on CUDA)."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def regions(width: int, cross: float = CROSS) -> tuple[tuple[int, int], tuple[int, int]]:
    """``((start, width) of the left region, (start, width) of the right region)`` along the width.

    Left columns ``[0, w//2 + cross·w)``, right ``[w//2 − cross·w, w)``, rounded as PIL's ``crop``.
    """
    left_end = round(width // 2 + cross * width)
    right_start = round(width // 2 - cross * width)
    return (0, left_end), (right_start, width - right_start)


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

    The batched equivalent of ``w2ssl.augment.FourCrop``: the output is float32, normalised with
    the ImageNet mean/std, on the images' device; pass a ``generator`` on that device to make the
    randomness reproducible. ``pad_slack`` bounds the padding of differently sized images that
    are resized together (see :func:`pad_groups`); it changes speed and memory, not the result.
    """

    def __init__(self, tile_size: int = 112, crop_min: float = 0.2, pad_slack: float = PAD_SLACK):
        super().__init__()
        if tile_size < 1:
            raise UserError(f"--tile-size must be >= 1, got {tile_size}")
        if not 0 < crop_min <= 1:
            raise UserError(f"--crop-min must be in (0, 1], got {crop_min}")
        self.tile_size, self.crop_min, self.pad_slack = tile_size, crop_min, pad_slack

    def forward(self, images: list[Tensor], generator: torch.Generator | None = None
                ) -> tuple[list[Tensor], list[Tensor]]:
        sizes = _check_images(images)
        device, b, t = images[0].device, len(images), self.tile_size
        tiles = self._crops(images, sizes, device, generator).reshape(4 * b, 3, t, t).div_(255)
        p = sample_tile_params(b, device, generator)
        tiles = G.color_jitter(tiles, *p["jitter"])
        tiles = G.random_grayscale(tiles, p["gray"])
        tiles = G.gaussian_blur(tiles, p["sigma"], p["blur"])
        tiles = G.solarize(tiles, p["solarize"])
        tiles = G.hflip(tiles, p["flip"])
        out = tiles.view(b, 4, 3, t, t).transpose(0, 1).contiguous()  # [4, b, 3, t, t]
        for c in range(3):
            out[:, :, c].sub_(MEAN[c]).div_(STD[c])
        return [out[0], out[1]], [out[2], out[3]]

    def _crops(self, images: list[Tensor], sizes: list[tuple[int, int]], device: torch.device,
               generator: torch.Generator | None) -> Tensor:
        """RandomResizedCrop of the four regions of every image: ``[b, 4, 3, tile, tile]`` in 0..255."""
        b = len(images)
        meta = []  # per tile: (region start, region width, height)
        for h, w in sizes:
            left, right = regions(w)
            meta += [(*left, h), (*right, h), (*left, h), (*right, h)]
        meta_d = _to_device(torch.tensor(meta, dtype=torch.float64), device)
        boxes = G.sample_crop_boxes(meta_d[:, 1], meta_d[:, 2], (self.crop_min, 1.0), generator=generator)
        boxes[:, 1] += meta_d[:, 0].long()  # region coordinates -> image coordinates
        boxes = boxes.view(b, 4, 4)
        groups = pad_groups(sizes, self.pad_slack)
        if len(groups) == 1:
            return G.resized_crops(_padded(images), boxes, self.tile_size)
        order = [i for g in groups for i in g]
        index = _to_device(torch.tensor([order, np.argsort(order).tolist()]), device)
        boxes, start, parts = boxes[index[0]], 0, []
        for g in groups:
            parts.append(G.resized_crops(_padded([images[i] for i in g]), boxes[start:start + len(g)],
                                         self.tile_size))
            start += len(g)
        return torch.cat(parts)[index[1]]


def sample_tile_params(b: int, device: torch.device, generator: torch.Generator | None = None) -> dict:
    """Random parameters of the ``4b`` tiles (image-major: v1 left, v1 right, v2 left, v2 right).

    ``jitter``: :func:`gpu_ops.sample_jitter` (p = 0.8); ``gray`` p = 0.2; ``blur`` p = 1.0 (view 1) /
    0.1 (view 2) with ``sigma ~ U(0.1, 2)``; ``solarize`` p = 0 / 0.2; ``flip`` p = 0.5. Masks are ``[4b]`` bool.
    """
    n = 4 * b
    view2 = torch.arange(n, device=device) % 4 >= 2

    def coin(p: Tensor | float) -> Tensor:
        return torch.rand(n, generator=generator, device=device) < p

    return {"jitter": G.sample_jitter(n, device, generator), "gray": coin(0.2),
            "blur": coin(torch.where(view2, 0.1, 1.0)), "sigma": G.uniform((n,), *G.BLUR_SIGMA, device, generator),
            "solarize": view2 & coin(0.2), "flip": coin(0.5)}


def _check_images(images: list[Tensor]) -> list[tuple[int, int]]:
    """``(H, W)`` of each image; ValueError unless all are uint8 ``[3, H, W]`` (W >= 2) on one device."""
    if not images:
        raise ValueError("GpuFourCrop needs at least one image")
    for i, im in enumerate(images):
        if im.dtype != torch.uint8 or im.ndim != 3 or im.shape[0] != 3 or im.shape[2] < 2:
            raise ValueError(f"image {i}: expected uint8 [3, H, W] with W >= 2, got {im.dtype} {list(im.shape)}")
        if im.device != images[0].device:
            raise ValueError(f"image {i} is on {im.device}, image 0 on {images[0].device}")
    return [(im.shape[1], im.shape[2]) for im in images]


def encoded_with_path(path: str) -> tuple[Tensor, str]:
    """Loader for :class:`w2ssl.data.PretrainDataset` in ``--gpu-aug`` mode: the bytes and the path."""
    return read_bytes(path), path


def collate_pretrain(batch: list[tuple[tuple[Tensor, str], str]]) -> tuple[tuple[list[Tensor], list[str]], list[str]]:
    """``((bytes, path), bad)`` items -> ``((bytes list, path list), bad list)``."""
    return ([data for (data, _), _ in batch], [path for (_, path), _ in batch]), [bad for _, bad in batch]


def decode_tolerant(data: list[Tensor], paths: list[str], device: torch.device) -> tuple[list[Tensor], list[str]]:
    """Like :func:`decode_batch`, but a file that cannot be decoded is replaced by a readable one of
    the batch; returns the images and the paths of the bad files."""
    try:
        return decode_batch(data, device), []
    except ValueError:
        pass
    images: list[Tensor | None] = []
    bad = []
    for d, path in zip(data, paths):
        try:
            images.append(decode_batch([d], device)[0])
        except ValueError:
            images.append(None)
            bad.append(path)
    good = [img for img in images if img is not None]
    if not good:
        raise UserError(f"no image of a batch can be decoded (first: {paths[0]}): check the dataset")
    return [img if img is not None else good[i % len(good)] for i, img in enumerate(images)], bad
