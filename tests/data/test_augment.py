import random

import numpy as np
import pytest
import torch
from PIL import Image

from w2ssl.data.augment import MEAN, MIN_WIDTH, STD, FourCrop, load_splittable, split_left_right


def test_left_right_regions_follow_the_spec():
    img = Image.new("RGB", (100, 40))
    left, right = split_left_right(img)
    # left: columns [0, 50 + 30), right: [50 - 30, 100); all rows
    assert left.size == (80, 40) and right.size == (80, 40)
    img = Image.new("RGB", (101, 7))
    for x in range(101):
        img.putpixel((x, 0), (x, 0, 0))
    left, right = split_left_right(img)
    assert left.size[0] == 80 and left.getpixel((79, 0))[0] == 79
    assert right.getpixel((0, 0))[0] == 20 and right.size[0] == 81


def test_four_crop_order_and_shapes():
    img = Image.new("RGB", (64, 48), "white")
    for x in range(32):
        for y in range(48):
            img.putpixel((x, y), (0, 0, 0))   # left half black
    torch.manual_seed(0)
    tiles = FourCrop(tile_size=16)(img)
    assert len(tiles) == 4 and all(t.shape == (3, 16, 16) for t in tiles)
    # [v1(left), v1(right), v2(left), v2(right)]: left regions are darker than right ones on average
    assert tiles[0].mean() < tiles[1].mean() and tiles[2].mean() < tiles[3].mean()


def blurred_and_solarized(tile: torch.Tensor) -> tuple[bool, bool]:
    """For a tile of the half-white, half-checkerboard image below: whether the checkerboard rows lost
    their pixel-to-pixel alternation (blur), and whether the white rows came out dark (solarize)."""
    x = tile * torch.tensor(STD)[:, None, None] + torch.tensor(MEAN)[:, None, None]
    board = x[0, 11:]
    alternation = (board[:, 1:] - board[:, :-1]).abs().mean() / (board.max() - board.min()).clamp_min(1e-6)
    return bool(alternation < 0.5), bool(x[:, :3].mean() < 0.5)


def test_views_differ_in_blur_and_solarize():
    """METHOD §1: view 1 always blurs and never solarizes; view 2 blurs with p = 0.1, solarizes with p = 0.2.
    A 20x16 image cut into two 16x16 regions; --crop-min 1 keeps each whole. White (255) stays >= 153
    through colour jitter and comes out <= 102 when solarized; a 1-px checkerboard keeps its alternation
    unless blurred."""
    pixels = np.full((16, 20, 3), 255, np.uint8)
    pixels[8:] = (np.indices((8, 20)).sum(0) % 2 * 255)[..., None]
    img = Image.fromarray(pixels)
    torch.manual_seed(0)
    random.seed(0)
    four = FourCrop(tile_size=16, crop_min=1.0)
    seen = torch.tensor([[blurred_and_solarized(t) for t in four(img)] for _ in range(100)], dtype=torch.float64)
    rates = seen.view(100, 2, 2, 2).mean(dim=(0, 2))  # [view, (blurred, solarized)]
    # Blur radius ~ U(0.1, 2): below ~0.5 it leaves a checkerboard almost intact, so "always" reads ~0.75.
    assert rates[0, 0] > 0.55 and rates[1, 0] < 0.3, rates
    assert rates[0, 1] == 0 and 0.1 < rates[1, 1] < 0.3, rates


def test_load_splittable_refuses_images_without_a_left_region(tmp_path):
    Image.new("RGB", (1, 5)).save(tmp_path / "thin.png")
    Image.new("RGB", (MIN_WIDTH, 1)).save(tmp_path / "ok.png")
    assert split_left_right(Image.new("RGB", (1, 5)))[0].size[0] == 0  # why: the left region is empty
    with pytest.raises(ValueError, match="1 px wide"):
        load_splittable(str(tmp_path / "thin.png"))
    assert load_splittable(str(tmp_path / "ok.png")).size == (MIN_WIDTH, 1)
