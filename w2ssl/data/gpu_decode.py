"""Decoding for ``--gpu-aug``: workers read the files' bytes, the training device decodes them in batches.

On CUDA, JPEGs that nvjpeg decodes correctly go through one batched ``decode_jpeg(..., device=...)``
call; every other file (CMYK, RGB-coded or 12-bit JPEGs, other formats such as a PNG named ``.JPEG``) is
decoded by libjpeg/libpng on the CPU and copied over, because nvjpeg may decode some of them without an
error but with wrong colours. On the CPU every file goes through torchvision's ``decode_image``.
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor
from torchvision.datasets import ImageFolder
from torchvision.io import ImageReadMode, decode_image, decode_jpeg

from w2ssl.errors import UserError

NVJPEG_FRAMES = (0xC0, 0xC1, 0xC2)  # SOF0-2: baseline, extended and progressive Huffman JPEG
RGB_IDS = (0x52, 0x47, 0x42)  # component ids "R", "G", "B": libjpeg reads such a JPEG as RGB, not YCbCr


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


def nvjpeg_decodable(data: Tensor) -> bool:
    """Whether the encoded file ``data`` (uint8 1-D, on the host) is a JPEG whose colours nvjpeg gets right.

    Reads the markers up to the frame header: yes for an 8-bit baseline/extended/progressive Huffman JPEG
    with 1 (grey) or 3 (YCbCr) components; no for 4 components (CMYK, YCCK), 3 components coded as RGB
    (Adobe APP14 transform 0, or component ids R, G, B), other precisions and codings, and any other format.
    """
    buf = memoryview(data.numpy())
    if len(buf) < 4 or buf[0] != 0xFF or buf[1] != 0xD8:
        return False
    pos, adobe_transform = 2, None
    while pos + 4 <= len(buf):
        if buf[pos] != 0xFF:
            return False
        marker = buf[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        length = buf[pos + 2] << 8 | buf[pos + 3]
        if marker == 0xEE and length >= 12 and buf[pos + 4:pos + 9] == b"Adobe":
            adobe_transform = buf[pos + 15] if pos + 15 < len(buf) else None
        elif 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # a frame header (SOFn)
            if marker not in NVJPEG_FRAMES or pos + 10 > len(buf) or buf[pos + 4] != 8:
                return False
            components = buf[pos + 9]
            ids = tuple(buf[pos + 10:pos + 19:3])
            return components == 1 or (components == 3 and adobe_transform != 0 and ids != RGB_IDS)
        elif marker in (0xD9, 0xDA):  # end of image or start of scan before any frame header
            return False
        pos += 2 + length
    return False


def _decode_cpu(data: Tensor, index: int) -> Tensor:
    try:
        return decode_image(data, mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError) as err:
        raise ValueError(f"image {index} of the batch cannot be decoded: {err}") from err


def decode_batch(data: list[Tensor], device: torch.device | str) -> list[Tensor]:
    """Decode encoded images (host uint8 1-D tensors) to uint8 ``[3, H, W]`` RGB tensors on ``device``.

    On CUDA, the JPEGs of :func:`nvjpeg_decodable` go through one batched nvjpeg call; if it fails,
    each one is retried alone on the GPU, then on the CPU, so that the bad file can be named. All
    other files, and all files for a CPU device, use ``decode_image`` on the CPU. A file that cannot
    be decoded raises ``ValueError`` naming its index in ``data``.

    CUDA work runs on a side stream that the current stream then waits for, and every output is
    marked as used by the current stream: torchvision's nvjpeg decoder writes from a private
    stream that does not wait for the stream its output memory was allocated on (pytorch/vision
    PR 9606), so its outputs must never come from memory that queued kernels may still read.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return [_decode_cpu(d, i).to(device) for i, d in enumerate(data)]
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
    jpegs = [i for i, d in enumerate(data) if nvjpeg_decodable(d)]
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


def decode_tolerant(data: list[Tensor], paths: list[str], device: torch.device,
                    usable: Callable[[Tensor], bool] = lambda image: True) -> tuple[list[Tensor], list[str]]:
    """Like :func:`decode_batch`, but a file that cannot be decoded, or whose image is not ``usable``
    (e.g. too small), is replaced by a good one of the batch; returns the images and the paths of the bad files."""
    try:
        decoded: list[Tensor | None] = decode_batch(data, device)
    except ValueError:
        decoded = [_decode_or_none(d, device) for d in data]
    images: list[Tensor | None] = []
    bad = []
    for image, path in zip(decoded, paths):
        ok = image is not None and usable(image)
        images.append(image if ok else None)
        if not ok:
            bad.append(path)
    if not bad:
        return images, []
    good = [img for img in images if img is not None]
    if not good:
        raise UserError(f"no image of a batch can be decoded and used (first: {paths[0]}): check the dataset")
    return [img if img is not None else good[i % len(good)] for i, img in enumerate(images)], bad


def _decode_or_none(data: Tensor, device: torch.device) -> Tensor | None:
    try:
        return decode_batch([data], device)[0]
    except ValueError:
        return None
