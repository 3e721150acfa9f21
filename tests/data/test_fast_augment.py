"""The default CPU pipeline (w2ssl.data.fast_augment, w2ssl.data.cpu_kernels) against PIL, torchvision and gpu_ops."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter, ImageOps
from torch.utils.data import DataLoader

from tests.data.test_gpu_augment import gen, keys, tv_distance, write_mixed_folder
from tests.helpers import FLAT_RGB, pil_flat_colours
from w2ssl.data import cpu_kernels as K
from w2ssl.data import gpu_ops as G
from w2ssl.data.augment import MEAN, STD, split_left_right
from w2ssl.data.datasets import PretrainDataset
from w2ssl.data.fast_augment import FastCollate, fast_four_crop, fast_two_crop, kernel_params, load_uint8, resize_crops
from w2ssl.data.gpu_augment import GpuFourCrop
from w2ssl.data.gpu_params import FOUR_CROP, TWO_CROP, four_crop_regions, image_tile_params, tile_params
from w2ssl.data.sampler import ResumableSampler
from w2ssl.errors import UserError


def photo(h: int = 48, w: int = 64, seed: int = 0) -> np.ndarray:
    """``[h, w, 3]`` uint8: smooth colour gradients, hard-edged blocks and mild noise (a photo's mixture)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    smooth = np.stack([200 * xx + 30, 180 * yy + 40, 120 * (1 - xx) * (1 - yy) + 60], axis=-1)
    blocks = np.kron(rng.integers(0, 256, (-(-h // 8), -(-w // 8), 3)), np.ones((8, 8, 1)))[:h, :w]
    mix = np.where((xx > 0.5)[..., None], blocks, smooth) + rng.normal(0, 3, (h, w, 3))
    return np.clip(mix, 0, 255).astype(np.uint8)


def to_levels(x: np.ndarray) -> np.ndarray:
    """float ``[3, H, W]`` in [0, 1] -> ``[H, W, 3]`` float grey levels, to compare with PIL's uint8."""
    return x.transpose(1, 2, 0).astype(np.float64) * 255


def as_float(pixels: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(pixels.transpose(2, 0, 1), dtype=np.float32) / np.float32(255)


# ---- each op against PIL, for the same parameter -------------------------------------------------
# PIL works in uint8 and truncates or rounds after every op; the kernels stay in float. Tolerances, in grey
# levels, measured on three photo-like tiles: brightness and saturation blend in PIL then truncate (errors in
# [0, 1), mean ~0.5; saturation's grey is PIL's 299/587/114 integer luma); contrast also blends towards PIL's
# rounded mean luma (+ up to 0.5 x (1 - factor)); hue is the hard one: PIL shifts the uint8 H of its uint8 HSV
# by int(255 x factor) steps of 1/256 turn (truncated, and 255 for 256) and rounds H, S and V, so a
# saturated pixel moves by up to ~13 levels; on average under one level. (Against torchvision's float
# tensor ops, gpu_ops agree to 2e-6, and the kernels with gpu_ops to 1e-5: the tests below.)

@pytest.mark.parametrize("op,pil_op,factors,max_err,mean_err", [
    (K._brightness, TF.adjust_brightness, [0.6, 0.93, 1.4], 1.0, 0.55),
    (K._contrast, TF.adjust_contrast, [0.6, 0.93, 1.4], 1.3, 0.65),
    (lambda x, f: K._saturation(x, f, np.empty(x.shape[2], np.float32)), TF.adjust_saturation,
     [0.8, 0.93, 1.2], 1.2, 0.55),
    (lambda x, f: K._hue(x, f, np.empty((3, x.shape[2]), np.float32)), TF.adjust_hue,
     [-0.1, -0.02, 0.05, 0.1], 16.0, 1.0),
])
def test_colour_kernels_match_pil(op, pil_op, factors, max_err, mean_err):
    pixels = photo()
    for f in factors:
        x = as_float(pixels)
        op(x, np.float32(f))
        ref = np.asarray(pil_op(Image.fromarray(pixels), f), dtype=np.float64)
        err = np.abs(to_levels(x) - ref)
        assert err.max() <= max_err and err.mean() <= mean_err, (f, err.max(), err.mean())


def test_grayscale_solarize_and_blur_kernels_match_pil():
    pixels = photo()
    x = as_float(pixels)
    K._grayscale(x)
    ref = np.asarray(Image.fromarray(pixels).convert("L"), dtype=np.float64)  # luma rounded to uint8
    assert np.abs(to_levels(x) - ref[..., None]).max() <= 1.0
    x = as_float(pixels)
    K._solarize_normalize(x, True)
    restored = x * np.array(STD, np.float32)[:, None, None] + np.array(MEAN, np.float32)[:, None, None]
    assert np.abs(to_levels(restored) - np.asarray(ImageOps.solarize(Image.fromarray(pixels)))).max() < 1e-3  # exact
    rows, cols = np.empty((2, 52, 64), np.float32), np.empty((2, 68), np.float32)
    for sigma in [0.3, 1.0, 1.7, 2.0]:
        x = as_float(pixels)
        w1, w2, scale = kernel_params_for_sigma(sigma)
        K._blur(x, w1, w2, scale, rows, cols)
        ref = np.asarray(Image.fromarray(pixels).filter(ImageFilter.GaussianBlur(radius=sigma)), dtype=np.float64)
        err = np.abs(to_levels(x) - ref)
        assert err.mean() < 0.6 and err.max() < 3.5, sigma  # PIL rounds after each of its six passes


def kernel_params_for_sigma(sigma: float) -> tuple[np.float32, np.float32, np.float32]:
    kernel = G.box_kernels(G.blur_radius(torch.tensor([sigma]))).numpy()[0]
    return (np.float32(kernel[3] / kernel[2]), np.float32(kernel[4] / kernel[2]),
            np.float32(float(kernel[2]) ** 6))


def test_resize_crops_match_pil_crop_and_resize():
    pixels = photo(60, 80)
    image = torch.from_numpy(pixels).permute(2, 0, 1)
    boxes = torch.tensor([[0, 0, 60, 80], [5, 7, 31, 40], [10, 3, 9, 12], [2, 60, 50, 20]])  # down- and upscaling
    out = resize_crops([image], boxes, torch.tensor([3]), 24)
    for k, (top, left, h, w) in enumerate(boxes.tolist()):
        ref = Image.fromarray(pixels).crop((left, top, left + w, top + h)).resize((24, 24), Image.BILINEAR)
        ref = np.asarray(ref.transpose(Image.FLIP_LEFT_RIGHT) if k == 3 else ref, dtype=np.int64)
        diff = np.abs(out[k].permute(1, 2, 0).numpy().astype(np.int64) - ref)
        assert diff.max() <= 1 and diff.mean() < (0.2 if min(h, w) < 24 else 0.05), k  # PIL's fixed point;
        # upscaling (k = 2, 3) lands on rounding ties more often


# ---- the whole pipeline ---------------------------------------------------------------------------

def test_kernels_equal_gpu_ops_pipeline():
    images = [torch.randint(0, 256, (3, 40, 52), generator=gen(i), dtype=torch.uint8) for i in range(12)]
    k = keys(12, seed=3)
    p, counts = image_tile_params([(40, 52)] * 12, k, 0.2, four_crop_regions, FOUR_CROP)
    assert len(p["gray"]) and len(p["solarize"]) and len(p["blur"]) < 48  # every op is exercised
    tiles = resize_crops(images, p["boxes"], p["flip"], 16)
    reference = G.augment_tiles(tiles.float().div_(255), p, counts)
    out = torch.empty(4, 12, 3, 16, 16)
    K.augment(tiles.numpy(), out.numpy(), 0, *kernel_params(p, counts, len(tiles)))
    torch.testing.assert_close(out.transpose(0, 1).reshape(-1, 3, 16, 16), reference, atol=1e-5, rtol=0)


def test_flip_commutes_with_the_other_ops():
    x = torch.rand(8, 3, 12, 12, generator=gen(1))
    p, counts = tile_params(keys(2), torch.full((8,), 20), torch.full((8,), 20), 0.2)
    p["blur"] = torch.arange(8)
    everything = torch.arange(8)
    torch.testing.assert_close(G.augment_tiles(G.hflip(x, everything), p, counts),
                               G.hflip(G.augment_tiles(x, p, counts), everything), atol=1e-5, rtol=0)


def test_four_crop_is_a_function_of_the_sample_alone():
    images = [load_uint8_array(photo(40 + 4 * i, 50 + 6 * (i % 3), seed=i)) for i in range(10)]
    k = keys(10, seed=5)
    crop = fast_four_crop(16, 0.2)
    whole = torch.stack(crop(images, k), dim=1)  # [b, 4, 3, t, t]
    assert whole.shape == (10, 4, 3, 16, 16) and whole.dtype == torch.float32
    assert torch.equal(whole, torch.stack(crop(images, k), dim=1))  # reproducible
    subset = [7, 2, 9]  # other neighbours, another chunking
    assert torch.equal(torch.stack(crop([images[i] for i in subset], k[subset]), dim=1), whole[subset])
    one_at_a_time = torch.stack(fast_four_crop(16, 0.2).__class__(16, 0.2, four_crop_regions, FOUR_CROP, chunk=1)(
        images, k), dim=1)
    assert torch.equal(one_at_a_time, whole)
    other_epoch = torch.stack(crop(images, keys(10, seed=5, epoch=1)), dim=1)
    assert all((other_epoch[i] - whole[i]).abs().max() > 0.1 for i in range(10))


def load_uint8_array(pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(pixels).permute(2, 0, 1)


@pytest.mark.parametrize("fast,two_crop,per_view", [(fast_four_crop(4), False, ((0, 1), (2, 3))),
                                                    (fast_two_crop(4), True, ((0,), (1,)))])
def test_colour_statistics_match_pil_pipeline(fast, two_crop, per_view):
    # on a flat colour, crops, blur and flips are identities: the colour follows jitter, grey and solarize
    n = 800
    flat = torch.tensor(FLAT_RGB, dtype=torch.uint8).view(3, 1, 1).expand(3, 12, 16)
    views = fast([flat] * n, keys(n))
    pil_out = pil_flat_colours(two_crop, n)
    for ks in per_view:
        ours = torch.cat([views[k][:, :, 0, 0] for k in ks])
        theirs = pil_out[:, ks].transpose(0, 1).reshape(-1, 3)
        for c in range(3):
            low, high = -MEAN[c] / STD[c], (1 - MEAN[c]) / STD[c]
            assert tv_distance(ours[:, c], theirs[:, c], low, high, bins=8) < 0.08


def test_two_crop_views_draw_their_own_probabilities():
    n = 20000
    p, _ = tile_params(keys(n // 2), torch.full((n,), 50), torch.full((n,), 40), 0.2, TWO_CROP)
    view1 = torch.arange(n) % 2 == 0
    for key, (p1, p2) in {"gray": (0.2, 0.2), "blur": (1.0, 0.1), "solarize": (0.0, 0.2), "flip": (0.5, 0.5)}.items():
        mask = torch.zeros(n, dtype=torch.bool).index_fill_(0, p[key], True)
        assert abs(mask[view1].float().mean().item() - p1) < 0.015, key
        assert abs(mask[~view1].float().mean().item() - p2) < 0.015, key


def test_two_crop_views_cover_the_whole_image():
    image = load_uint8_array(photo(60, 90))
    p, _ = image_tile_params([(60, 90)] * 400, keys(400), 0.2, lambda w: [(0, w)] * 2, TWO_CROP)
    boxes = p["boxes"]
    assert boxes[:, 1].min() == 0 and (boxes[:, 1] + boxes[:, 3]).max() == 90 and boxes[:, 3].max() >= 75
    assert [t.shape for t in fast_two_crop(8)([image] * 3, keys(3))] == [(3, 3, 8, 8)] * 2


def tiles_by_sample(dataset: PretrainDataset, world: int, batch: int, epoch: int = 1) -> dict[int, torch.Tensor]:
    """``sample index -> [4, 3, t, t]``: every rank's batches of one epoch through the fast collate."""
    out, collate = {}, FastCollate(fast_four_crop(8), dataset.seed)
    for rank in range(world):
        sampler = ResumableSampler(len(dataset), batch // world, world, rank, dataset.seed)
        sampler.set_epoch(epoch)
        indices = [index for index, _ in sampler]
        for views, bad in DataLoader(dataset, batch_size=batch // world, sampler=sampler, collate_fn=collate):
            assert not any(bad)
            for j in range(len(views[0])):
                out[indices.pop(0)] = torch.stack([v[j] for v in views])
    return out


def test_tiles_are_the_same_on_one_and_two_processes(tmp_path):
    dataset = PretrainDataset(write_mixed_folder(tmp_path), None, seed=7, loader=load_uint8)
    one, two = tiles_by_sample(dataset, world=1, batch=8), tiles_by_sample(dataset, world=2, batch=8)
    assert sorted(one) == sorted(two) == list(range(8))
    assert all(torch.equal(two[i], one[i]) for i in range(8))  # bit for bit: per-tile loops, per-sample draws


def test_a_too_narrow_image_is_skipped_and_counted(tmp_path):
    (tmp_path / "c").mkdir()
    Image.new("RGB", (1, 5)).save(tmp_path / "c" / "0.png")
    Image.fromarray(photo(20, 30)).save(tmp_path / "c" / "1.png")
    with pytest.raises(ValueError, match="too small"):
        load_uint8(str(tmp_path / "c" / "0.png"))
    dataset = PretrainDataset(tmp_path, None, seed=0, loader=load_uint8)
    (image, index, epoch), bad = dataset[(0, 0)]
    assert bad.endswith("0.png") and image.shape == (3, 20, 30) and (index, epoch) == (0, 0)
    views, bads = FastCollate(fast_four_crop(8), 0)([dataset[(0, 0)], dataset[(1, 0)]])
    assert len(views) == 4 and views[0].shape == (2, 3, 8, 8) and bads[0].endswith("0.png") and bads[1] == ""


def test_bad_arguments():
    with pytest.raises(UserError, match="--tile-size"):
        fast_four_crop(0)
    with pytest.raises(UserError, match="--crop-min"):
        fast_two_crop(8, crop_min=1.5)
    with pytest.raises(ValueError, match="2 keys"):
        fast_four_crop(8)([load_uint8_array(photo())], keys(2))


def test_where_diagnostic_knobs_reach_every_pipeline():
    # --flip-p 0: no tile is mirrored on any path; --cross 0: the regions meet at the middle, as PIL's split
    n = 400
    p, _ = image_tile_params([(40, 60)] * n, keys(n), 0.2, four_crop_regions, FOUR_CROP, flip_p=0.0)
    assert len(p["flip"]) == 0
    p, _ = image_tile_params([(40, 60)] * n, keys(n), 0.2, four_crop_regions, FOUR_CROP, flip_p=1.0)
    assert len(p["flip"]) == 4 * n
    assert four_crop_regions(60, cross=0.0) == [(0, 30), (30, 30)] * 2
    left, right = split_left_right(Image.new("RGB", (60, 40)), cross=0.0)
    assert (left.size, right.size) == ((30, 40), (30, 40))
    image = load_uint8_array(photo(40, 60))
    unflipped = fast_four_crop(8, 0.2, cross=0.0, flip_p=0.0)([image], keys(1))
    p, counts = image_tile_params([(40, 60)], keys(1), 0.2, lambda w: four_crop_regions(w, 0.0), FOUR_CROP, 0.0)
    assert int(p["boxes"][1, 1]) >= 30 and int(p["boxes"][0, 1] + p["boxes"][0, 3]) <= 30  # right tile, right half
    gpu = GpuFourCrop(8, 0.2, cross=0.0, flip_p=0.0)([image.contiguous()], keys(1))
    for a, b in zip(unflipped, gpu[0] + gpu[1]):
        assert (a - b).abs().mean() < 0.05  # the same crops: fixed-point vs float resize only
