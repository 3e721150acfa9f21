"""The four-crop transform and the two augmentation views of METHOD §1 (PIL, the reference pipeline)."""
from __future__ import annotations

import random

from PIL import Image, ImageFilter, ImageOps
from torch import Tensor
from torchvision import transforms

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
CROSS = 0.3
# The narrowest image whose left and right regions both keep a column (a 1-px-wide image has an empty
# left region): narrower ones are skipped and counted as unreadable, in both pipelines.
MIN_WIDTH = 2


class GaussianBlur:
    """PIL Gaussian blur with radius ``sigma ~ U(sigma_min, sigma_max)`` (SimCLR/MoCo v3)."""

    def __init__(self, sigma: tuple[float, float] = (0.1, 2.0)):
        self.sigma = sigma

    def __call__(self, img: Image.Image) -> Image.Image:
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(*self.sigma)))


class Solarize:
    """PIL solarize at threshold 128."""

    def __call__(self, img: Image.Image) -> Image.Image:
        return ImageOps.solarize(img)


def view(tile_size: int = 112, crop_min: float = 0.2, blur_p: float = 1.0,
         solarize_p: float = 0.0, flip_p: float = 0.5) -> transforms.Compose:
    """One augmentation pipeline: PIL image -> normalised ``[3, tile, tile]`` tensor (``flip_p``: horizontal
    flip probability, 0.5 as published)."""
    steps = [
        transforms.RandomResizedCrop(tile_size, scale=(crop_min, 1.0)),
        transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
        transforms.RandomGrayscale(p=0.2),
        transforms.RandomApply([GaussianBlur()], p=blur_p),
    ]
    if solarize_p > 0:
        steps.append(transforms.RandomApply([Solarize()], p=solarize_p))
    steps += [transforms.RandomHorizontalFlip(flip_p), transforms.ToTensor(), transforms.Normalize(MEAN, STD)]
    return transforms.Compose(steps)


def load_splittable(path: str) -> Image.Image:
    """Pre-training's PIL loader: an RGB image at least :data:`MIN_WIDTH` wide (ValueError otherwise, which
    :class:`w2ssl.data.datasets.PretrainDataset` counts as an unreadable file)."""
    with open(path, "rb") as f:
        img = Image.open(f).convert("RGB")
    if img.width < MIN_WIDTH:
        raise ValueError(f"{path} is {img.width} px wide, narrower than the {MIN_WIDTH} px its two regions need")
    return img


def split_left_right(img: Image.Image, cross: float = CROSS) -> tuple[Image.Image, Image.Image]:
    """Left columns ``[0, w//2 + cross·w)`` and right columns ``[w//2 − cross·w, w)``, all rows."""
    w, h = img.size
    return img.crop((0, 0, w // 2 + cross * w, h)), img.crop((w // 2 - cross * w, 0, w, h))


class FourCrop:
    """PIL image -> ``[v1(left), v1(right), v2(left), v2(right)]``, each ``[3, tile, tile]``.

    ``cross`` (overlap, :func:`split_left_right`) and ``flip_p`` default to the published values."""

    def __init__(self, tile_size: int = 112, crop_min: float = 0.2, cross: float = CROSS, flip_p: float = 0.5):
        self.cross = cross
        self.view1 = view(tile_size, crop_min, blur_p=1.0, solarize_p=0.0, flip_p=flip_p)
        self.view2 = view(tile_size, crop_min, blur_p=0.1, solarize_p=0.2, flip_p=flip_p)

    def __call__(self, img: Image.Image) -> list[Tensor]:
        left, right = split_left_right(img, self.cross)
        return [self.view1(left), self.view1(right), self.view2(left), self.view2(right)]
