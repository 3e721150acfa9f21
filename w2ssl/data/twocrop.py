"""MoCo v3's asymmetric two-crop augmentation (METHOD §10), built from the views of METHOD §1."""
from __future__ import annotations

from PIL import Image
from torch import Tensor

from w2ssl.data.augment import view


class TwoCrop:
    """PIL image -> ``[view1(img), view2(img)]``, each ``[3, size, size]``, two independent draws.

    Both views: RandomResizedCrop(size, scale ``(crop_min, 1)``), ColorJitter(0.4, 0.4, 0.2, 0.1) with
    p 0.8, grayscale p 0.2, then Gaussian blur (p 1.0 / 0.1), solarize (never / p 0.2), flip, normalise:
    W2SSL's two views, applied to the whole image instead of its left and right regions.
    """

    def __init__(self, size: int = 224, crop_min: float = 0.2):
        self.view1 = view(size, crop_min, blur_p=1.0, solarize_p=0.0)
        self.view2 = view(size, crop_min, blur_p=0.1, solarize_p=0.2)

    def __call__(self, img: Image.Image) -> list[Tensor]:
        return [self.view1(img), self.view2(img)]


def two_crop(tile_size: int = 112, crop_min: float = 0.2) -> TwoCrop:
    """The transform at ``2 x tile_size`` px (224 for W2SSL's 112 px tiles, MoCo v3's own size): per source
    image two such views, twice the pixels of W2SSL's four tiles (METHOD §2)."""
    return TwoCrop(2 * tile_size, crop_min)
