import torch
from PIL import Image

from w2ssl.data.augment import FourCrop, split_left_right, view


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


def test_views_differ_in_blur_and_solarize():
    names1 = [type(t).__name__ for t in view(112, 0.2, blur_p=1.0, solarize_p=0.0).transforms]
    names2 = [type(t).__name__ for t in view(112, 0.2, blur_p=0.1, solarize_p=0.2).transforms]
    assert names1 == ["RandomResizedCrop", "RandomApply", "RandomGrayscale", "RandomApply",
                      "RandomHorizontalFlip", "ToTensor", "Normalize"]
    assert names2 == ["RandomResizedCrop", "RandomApply", "RandomGrayscale", "RandomApply", "RandomApply",
                      "RandomHorizontalFlip", "ToTensor", "Normalize"]
    v2 = view(112, 0.3, blur_p=0.1, solarize_p=0.2).transforms
    assert v2[0].scale == (0.3, 1.0) and v2[3].p == 0.1 and v2[4].p == 0.2
