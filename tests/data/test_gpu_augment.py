"""The GPU input pipeline (w2ssl.data.gpu_ops, w2ssl.data.gpu_augment) on the CPU, against torchvision and PIL."""
from __future__ import annotations

import functools
import io
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from torch.utils.data import DataLoader
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import InterpolationMode, RandomResizedCrop
from torchvision.transforms.v2 import functional as TF

from bench import data as bench_data
from tests.helpers import FLAT_RGB, TINY, logged_losses, pil_flat_colours, run_script
from w2ssl.data import gpu_decode
from w2ssl.data import gpu_ops as G
from w2ssl.data.augment import MEAN, STD, split_left_right
from w2ssl.data.datasets import PretrainDataset
from w2ssl.data.gpu_augment import GpuFourCrop, augment_batch, collate_pretrain, encoded_with_path, pad_groups
from w2ssl.data.gpu_decode import EncodedImageFolder, collate_encoded, decode_batch, nvjpeg_decodable
from w2ssl.data.gpu_params import crop_boxes, jitter_params, jitter_plan, regions, sample_keys, tile_params, uniforms
from w2ssl.data.sampler import ResumableSampler
from w2ssl.errors import UserError

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")  # torchvision 0.29's io


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def keys(n: int, seed: int = 0, epoch: int = 0) -> np.ndarray:
    """Per-sample keys of the samples ``0 .. n-1``."""
    return sample_keys(seed, [epoch] * n, range(n))


def crop_uniforms(n: int, seed: int = 0) -> torch.Tensor:
    """``[n, 22]`` uniforms of RandomResizedCrop (10 attempts) from the per-sample SplitMix64 draws."""
    return torch.from_numpy(uniforms(keys(n, seed), 22))


def tv_distance(a: torch.Tensor, b: torch.Tensor, low: float, high: float, bins: int = 10) -> float:
    """Total variation distance between the histograms of two samples."""
    ha = torch.histc(a.float(), bins, low, high) / len(a)
    hb = torch.histc(b.float(), bins, low, high) / len(b)
    return 0.5 * (ha - hb).abs().sum().item()


# ---- RandomResizedCrop parameters -------------------------------------------------------------

def box_features(boxes: torch.Tensor, width: int, height: int) -> dict[str, torch.Tensor]:
    top, left, h, w = boxes.double().unbind(1)
    return {"area": h * w / (width * height), "log_ratio": torch.log(w / h),
            "centre_x": (left + w / 2) / width, "centre_y": (top + h / 2) / height}


FEATURE_RANGES = {"area": (0, 1), "log_ratio": (-0.6, 0.6), "centre_x": (0, 1), "centre_y": (0, 1)}


def test_crop_boxes_follow_torchvision_distribution():
    width, height, n = 200, 120, 20000  # wider than 4/3: many attempts fail, some fall back
    torch.manual_seed(0)
    image = torch.zeros(1, height, width)
    ref = torch.tensor([RandomResizedCrop.get_params(image, [0.2, 1.0], [3 / 4, 4 / 3]) for _ in range(3000)])
    ref_f = box_features(ref, width, height)

    u = crop_uniforms(n)

    def distances(scale: tuple[float, float], columns: list[int] | slice = slice(None)) -> dict[str, float]:
        boxes = crop_boxes(torch.full((n,), width), torch.full((n,), height), u[:, columns], scale)
        f = box_features(boxes, width, height)
        return {k: tv_distance(f[k], ref_f[k], *FEATURE_RANGES[k]) for k in f}

    assert max(distances((0.2, 1.0)).values()) < 0.05
    # the check has power: a wrong scale or a single attempt is caught
    assert distances((0.08, 1.0))["area"] > 0.1
    assert distances((0.2, 1.0), [0, 10, 20, 21])["area"] > 0.05


def test_crop_boxes_lie_inside_their_regions():
    n = 4000
    width = torch.randint(2, 300, (n,), generator=gen(1))
    height = torch.randint(1, 300, (n,), generator=gen(2))
    top, left, h, w = crop_boxes(width, height, crop_uniforms(n, seed=3)).unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (h >= 1).all() and (w >= 1).all()
    assert (top + h <= height).all() and (left + w <= width).all()


@pytest.mark.parametrize("width,height", [(100, 10), (10, 100), (41, 5)])
def test_crop_boxes_fall_back_to_torchvision_central_crop(width, height):
    # no attempt can fit such a thin region, so the box is deterministic
    expected = RandomResizedCrop.get_params(torch.zeros(1, height, width), [0.2, 1.0], [3 / 4, 4 / 3])
    boxes = crop_boxes(torch.full((50,), width), torch.full((50,), height), crop_uniforms(50))
    assert (boxes == torch.tensor(expected)).all()


def test_regions_match_pil_split():
    for width in [2, 3, 5, 10, 17, 100, 460, 461, 999]:
        columns = np.tile(np.arange(width, dtype=np.int32), (3, 1))
        left, right = split_left_right(Image.fromarray(columns, mode="I"))
        (ls, lw), (rs, rw) = regions(width)
        assert (ls, lw) == (np.asarray(left)[0, 0], left.size[0])
        assert (rs, rw) == (np.asarray(right)[0, 0], right.size[0])


# ---- crop + resize ------------------------------------------------------------------------------

def test_resample_weights_hand_computed():
    down = G.resample_weights(torch.tensor([1]), torch.tensor([2]), out_size=1, in_size=4)
    torch.testing.assert_close(down, torch.tensor([[[0.0, 0.5, 0.5, 0.0]]]))
    up = G.resample_weights(torch.tensor([0]), torch.tensor([2]), out_size=4, in_size=3)
    expected = torch.tensor([[1.0, 0, 0], [0.75, 0.25, 0], [0.25, 0.75, 0], [0, 1.0, 0]])
    torch.testing.assert_close(up[0], expected)


BOXES = [[3, 5, 30, 41], [0, 0, 40, 50], [10, 20, 5, 7], [7, 1, 16, 16], [0, 30, 23, 20]]  # top, left, h, w


def test_resized_crops_equal_torchvision_antialiased_resize():
    images = torch.rand(2, 3, 40, 50, generator=gen()) * 255
    boxes = torch.tensor([BOXES[:4], BOXES[1:]])
    out = G.resized_crops(images, boxes, 16)
    for b in range(2):
        for k in range(4):
            ref = TF.resized_crop(images[b], *boxes[b, k].tolist(), [16, 16], InterpolationMode.BILINEAR,
                                  antialias=True)
            torch.testing.assert_close(out[b, k], ref, atol=2e-3, rtol=0)


def test_resized_crops_match_pil_within_rounding():
    pixels = torch.randint(0, 256, (3, 40, 50), generator=gen(), dtype=torch.uint8)
    pil = Image.fromarray(pixels.permute(1, 2, 0).numpy())
    out = G.resized_crops(pixels[None].float(), torch.tensor([BOXES]), 16)[0]
    for k, (top, left, h, w) in enumerate(BOXES):
        ref = pil.crop((left, top, left + w, top + h)).resize((16, 16), Image.BILINEAR)
        ref = torch.from_numpy(np.array(ref)).permute(2, 0, 1).float()
        assert (out[k] - ref).abs().max() <= 1.0


# ---- colour ops ---------------------------------------------------------------------------------

def tiles(n: int = 4, size: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=gen(seed))


@pytest.mark.parametrize("op,ref,factors", [
    (G.adjust_brightness, TF.adjust_brightness, [0.6, 0.9, 1.0, 1.4]),
    (G.adjust_contrast, TF.adjust_contrast, [0.6, 0.9, 1.0, 1.4]),
    (G.adjust_saturation, TF.adjust_saturation, [0.8, 0.9, 1.0, 1.2]),
    (G.adjust_hue, TF.adjust_hue, [-0.1, -0.03, 0.0, 0.1]),
])
def test_color_ops_equal_torchvision(op, ref, factors):
    x = tiles()
    out = op(x, torch.tensor(factors))
    for k, f in enumerate(factors):
        torch.testing.assert_close(out[k], ref(x[k], f), atol=2e-6, rtol=0)


def test_color_jitter_applies_ops_in_each_tiles_order():
    x = tiles(4)
    factors = torch.tensor([[1.3, 0.7, 1.2, 0.08], [0.7, 1.4, 0.8, -0.1], [1.3, 0.7, 1.2, 0.08], [0.6, 1.2, 1.1, 0.05]])
    order = torch.tensor([[3, 1, 0, 2], [0, 1, 2, 3], [0, 2, 1, 3], [2, 3, 1, 0]])
    applied = torch.tensor([True, True, False, True])
    out = G.color_jitter(x, factors, *jitter_plan(applied, order))
    refs = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    for k in (0, 1, 3):
        expected = x[k]
        for op_id in order[k].tolist():
            expected = refs[op_id](expected, factors[k, op_id].item())
        torch.testing.assert_close(out[k], expected, atol=1e-5, rtol=0)
    assert torch.equal(out[2], x[2])
    reordered = G.color_jitter(x, factors, *jitter_plan(applied, order.flip(1)))  # order matters
    assert (reordered[0] - out[0]).abs().max() > 1e-3
    none = G.color_jitter(x, factors, *jitter_plan(torch.zeros(4, dtype=torch.bool), order))
    assert torch.equal(none, x)


def test_jitter_plan_lists_each_jittered_tile_once_per_step():
    applied, _, order = jitter_params(torch.from_numpy(uniforms(keys(200), 9)))
    index, counts = jitter_plan(applied, order)
    jittered = applied.nonzero().flatten()
    assert index.shape == (4, len(jittered)) and len(jittered) > 100
    for step in range(4):
        assert sorted(index[step].tolist()) == jittered.tolist() and sum(counts[step]) == len(jittered)
        for op, block in enumerate(index[step].split(counts[step])):
            assert (order[block, step] == op).all()


def test_jitter_params_ranges_probability_and_order():
    n = 40000
    applied, factors, order = jitter_params(torch.from_numpy(uniforms(keys(n // 4), 36)).view(n, 9))
    assert abs(applied.float().mean().item() - 0.8) < 0.01
    for k, (low, high) in enumerate([(0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1)]):
        f = factors[:, k]
        assert low <= f.min() < low + 0.01 and high - 0.01 < f.max() <= high
        assert abs(f.mean().item() - (low + high) / 2) < 0.01 * (high - low)
    assert torch.equal(order.sort(dim=1).values, torch.arange(4).expand(n, 4))
    position_freq = torch.stack([(order == op).float().mean(0) for op in range(4)])  # [op, step]
    assert (position_freq - 0.25).abs().max() < 0.01


def test_grayscale_solarize_flip_equal_torchvision():
    x = tiles(4)
    mask, index = torch.tensor([True, False, True, False]), torch.tensor([0, 2])
    ops = [
        (G.random_grayscale(x, index), lambda t: TF.rgb_to_grayscale(t, num_output_channels=3)),
        (G.solarize(x, index), lambda t: TF.solarize(t, 128 / 255)),
        (G.hflip(x, index), TF.horizontal_flip),
    ]
    for out, ref in ops:
        for k in range(4):
            assert torch.equal(out[k], ref(x[k]) if mask[k] else x[k])
    levels = torch.tensor([127.0, 128.0]).view(1, 1, 1, 2) / 255  # PIL inverts uint8 values >= 128
    out = G.solarize(levels, torch.tensor([0])).flatten()
    assert out[0] == levels.flatten()[0] and out[1] == 1 - levels.flatten()[1]


# ---- blur ---------------------------------------------------------------------------------------

def test_blur_radius_and_box_kernels_hand_computed():
    radius = G.blur_radius(torch.tensor([1.0, 2.0]))
    torch.testing.assert_close(radius, torch.tensor([0.25, 1.375], dtype=torch.float64))  # l = 0 and l = 1
    kernels = G.box_kernels(radius)
    torch.testing.assert_close(kernels[0], torch.tensor([0, 1, 4, 1, 0]) / 6)  # [0.25, 1, 0.25] / 1.5
    torch.testing.assert_close(kernels[1], torch.tensor([0.375, 1, 1, 1, 0.375]) / 3.75)
    assert (G.box_kernels(G.blur_radius(torch.linspace(0.1, 2.0, 50))).sum(1) - 1).abs().max() < 1e-6


def test_gaussian_blur_impulse_response_and_mask():
    x = torch.zeros(2, 3, 15, 15)
    x[:, :, 7, 7] = 1.0
    out = G.gaussian_blur(x, torch.tensor([1.0, 1.0]), torch.tensor([0]))
    profile = torch.tensor([1, 12, 51, 88, 51, 12, 1]) / 216  # ([1, 4, 1] / 6) convolved three times
    expected = torch.zeros(15, 15)
    expected[4:11, 4:11] = profile[:, None] * profile[None, :]
    torch.testing.assert_close(out[0], expected.expand(3, 15, 15))
    assert torch.equal(out[1], x[1])
    flat = G.gaussian_blur(torch.full((1, 3, 5, 5), 0.3), torch.tensor([2.0]), torch.tensor([0]))
    torch.testing.assert_close(flat, torch.full((1, 3, 5, 5), 0.3))  # replicated edges keep a flat tile flat


def test_gaussian_blur_equals_pil_within_rounding():
    rng = np.random.default_rng(0)
    pixels = np.kron(rng.integers(0, 256, (8, 8, 3)), np.ones((4, 4, 1))).astype(np.uint8)  # 32x32 blocks
    x = torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255
    for sigma in [0.3, 1.0, 1.7, 2.0]:
        ref = np.asarray(Image.fromarray(pixels).filter(ImageFilter.GaussianBlur(radius=sigma)), dtype=np.float64)
        out = G.gaussian_blur(x, torch.tensor([sigma]), torch.tensor([0]))[0].permute(1, 2, 0).numpy() * 255
        assert np.abs(out - ref).mean() < 0.6 and np.abs(out - ref).max() < 3.5  # PIL rounds after each pass


# ---- the whole transform ------------------------------------------------------------------------

def images(sizes) -> list[torch.Tensor]:
    return [torch.randint(0, 256, (3, h, w), generator=gen(i), dtype=torch.uint8) for i, (h, w) in enumerate(sizes)]


def test_tile_params_probabilities_per_view():
    n = 20000
    p, counts = tile_params(keys(n // 4), torch.full((n,), 50), torch.full((n,), 40), 0.2)
    view1 = torch.arange(n) % 4 < 2
    expected = {"gray": (0.2, 0.2), "blur": (1.0, 0.1), "solarize": (0.0, 0.2), "flip": (0.5, 0.5)}
    for key, (p1, p2) in expected.items():
        mask = torch.zeros(n, dtype=torch.bool).index_fill_(0, p[key], True)
        assert abs(mask[view1].float().mean().item() - p1) < 0.015, key
        assert abs(mask[~view1].float().mean().item() - p2) < 0.015, key
    assert abs(p["jitter_index"].shape[1] / n - 0.8) < 0.015 and sum(counts[0]) == p["jitter_index"].shape[1]
    assert 0.1 <= p["sigma"].min() < 0.11 and 1.99 < p["sigma"].max() <= 2.0
    assert p["boxes"].shape == (n, 4) and p["factors"].shape == (n, 4)


def test_uniforms_are_splitmix64_and_uniform():
    # SplitMix64 seeded with 0: its first output is 0xE220A8397B1DCDAF (Steele et al.'s reference code)
    assert uniforms(np.array([0], dtype=np.uint64), 1)[0, 0] == (0xE220A8397B1DCDAF >> 11) * 2.0**-53
    u = uniforms(keys(1000), 144)
    assert 0 <= u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.002
    hist = np.histogram(u, bins=16, range=(0, 1))[0] / u.size
    assert np.abs(hist - 1 / 16).max() < 0.003
    assert abs(np.corrcoef(u[:, 0], u[:, 1])[0, 1]) < 0.1 and abs(np.corrcoef(u[:-1, 0], u[1:, 0])[0, 1]) < 0.1


def test_pad_groups_bound_the_padding():
    assert pad_groups([(30, 40)] * 5) == [[0, 1, 2, 3, 4]]
    sizes = [(10, 10), (100, 120), (11, 10), (100, 100), (10, 12)]
    groups = pad_groups(sizes)
    assert sorted(i for g in groups for i in g) == list(range(5)) and len(groups) == 2
    for g in groups:
        padded = max(sizes[i][0] for i in g) * max(sizes[i][1] for i in g) * len(g)
        assert padded <= 1.25 * sum(sizes[i][0] * sizes[i][1] for i in g)


def test_four_crop_shapes_and_reproducibility():
    batch = images([(24, 30)] * 3)
    crop = GpuFourCrop(tile_size=8, crop_min=0.3)
    view1, view2 = crop(batch, keys(3, seed=5))
    assert len(view1) == len(view2) == 2
    for t in view1 + view2:
        assert t.shape == (3, 3, 8, 8) and t.dtype == torch.float32 and t.is_contiguous()
    again1, again2 = crop(batch, keys(3, seed=5))
    assert all(torch.equal(a, b) for a, b in zip(view1 + view2, again1 + again2))
    other1, _ = crop(batch, keys(3, seed=6))
    assert not torch.equal(view1[0], other1[0])


def test_four_crop_is_independent_of_size_grouping():
    batch = images([(20, 30), (40, 26), (20, 30), (33, 17)])
    one = GpuFourCrop(tile_size=8, pad_slack=math.inf)(batch, keys(4, seed=1))
    split = GpuFourCrop(tile_size=8, pad_slack=1.0)(batch, keys(4, seed=1))
    for a, b in zip(one[0] + one[1], split[0] + split[1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_four_crop_colour_statistics_match_pil_pipeline():
    # On a flat-colour image, crops, blur and flips are identities: the tile colour is set by
    # jitter, grayscale and solarize alone, so its distribution must match the PIL pipeline's.
    n = 800
    flat = torch.tensor(FLAT_RGB, dtype=torch.uint8).view(3, 1, 1).expand(3, 12, 16).contiguous()
    view1, view2 = GpuFourCrop(tile_size=4)([flat] * n, keys(n))
    gpu = [torch.cat(v)[:, :, 0, 0] for v in (view1, view2)]  # [2n, 3] per view
    pil = [pil_flat_colours(False, n)[:, ks].transpose(0, 1).reshape(-1, 3) for ks in ((0, 1), (2, 3))]
    for g, p in zip(gpu, pil):
        for c in range(3):
            low, high = -MEAN[c] / STD[c], (1 - MEAN[c]) / STD[c]
            assert tv_distance(g[:, c], p[:, c], low, high, bins=8) < 0.08
    # the check has power: solarize (view 2 only) separates the views (solarize p 0.4 gives 0.17)
    assert tv_distance(gpu[0][:, 0], pil[1][:, 0], -MEAN[0] / STD[0], (1 - MEAN[0]) / STD[0], bins=8) > 0.12


def test_four_crop_rejects_bad_input():
    with pytest.raises(ValueError, match="at least one"):
        GpuFourCrop()([], keys(0))
    with pytest.raises(ValueError, match="image 1"):
        GpuFourCrop()([torch.zeros(3, 8, 8, dtype=torch.uint8), torch.zeros(3, 8, 8)], keys(2))
    with pytest.raises(ValueError, match="image 0"):
        GpuFourCrop()([torch.zeros(1, 8, 8, dtype=torch.uint8)], keys(1))
    with pytest.raises(ValueError, match="2 keys"):
        GpuFourCrop()([torch.zeros(3, 8, 8, dtype=torch.uint8)], keys(2))
    with pytest.raises(UserError, match="--crop-min"):
        GpuFourCrop(crop_min=0.0)
    with pytest.raises(UserError, match="--tile-size"):
        GpuFourCrop(tile_size=0)


# ---- per-sample parameters: the same tiles whatever the batch, the split or the world size ---------

def per_sample(views: tuple[list[torch.Tensor], list[torch.Tensor]]) -> torch.Tensor:
    """``(view1 [l, r], view2 [l, r])`` of ``[b, 3, t, t]`` -> ``[b, 4, 3, t, t]``."""
    return torch.stack(views[0] + views[1], dim=1)


def test_tiles_depend_on_the_sample_alone():
    batch = images([(20 + 3 * i, 26 + 5 * (i % 3)) for i in range(6)])
    k = keys(6, seed=3)
    crop = GpuFourCrop(tile_size=8)
    whole = per_sample(crop(batch, k))
    subset = [4, 1, 5]  # another batch: other neighbours, other places, other size groups
    torch.testing.assert_close(per_sample(crop([batch[i] for i in subset], k[subset])), whole[subset],
                               atol=1e-4, rtol=0)
    other_epoch = per_sample(crop(batch, keys(6, seed=3, epoch=1)))
    assert all((other_epoch[i] - whole[i]).abs().max() > 0.1 for i in range(6))


def write_mixed_folder(root, n: int = 8):
    """``root/c<k>/<i>.JPEG``: JPEGs of different sizes, one CMYK, one grey and one PNG named ``.JPEG``."""
    rng = np.random.default_rng(0)
    for i in range(n):
        path = root / f"c{i % 2}" / f"{i}.JPEG"
        path.parent.mkdir(parents=True, exist_ok=True)
        image = Image.fromarray(rng.integers(0, 256, (18 + 2 * i, 24 + 3 * (i % 3), 3), dtype=np.uint8))
        image = {1: image.convert("CMYK"), 2: image.convert("L")}.get(i, image)
        image.save(path, format="PNG" if i == 3 else "JPEG", quality=90)
    return root


def tiles_by_sample(dataset: PretrainDataset, world: int, batch: int, epoch: int = 1) -> dict[int, torch.Tensor]:
    """``sample index -> [4, 3, t, t]`` tiles of one epoch, every rank's batches through ``augment_batch``."""
    crop, out = GpuFourCrop(tile_size=8), {}
    for rank in range(world):
        sampler = ResumableSampler(len(dataset), batch // world, world, rank, dataset.seed)
        sampler.set_epoch(epoch)
        for encoded, bad in DataLoader(dataset, batch_size=batch // world, sampler=sampler,
                                       collate_fn=collate_pretrain):
            assert not any(bad) and encoded.epochs == [epoch] * (batch // world)
            tiles, _ = augment_batch(encoded, crop, dataset.seed, torch.device("cpu"))
            for j, index in enumerate(encoded.indices):
                out[index] = torch.stack([t[j] for t in tiles])
    return out


def test_gpu_aug_tiles_are_the_same_on_one_and_two_processes(tmp_path):
    dataset = PretrainDataset(write_mixed_folder(tmp_path), None, seed=7, loader=encoded_with_path)
    one, two = tiles_by_sample(dataset, world=1, batch=8), tiles_by_sample(dataset, world=2, batch=8)
    assert sorted(one) == sorted(two) == list(range(8))
    for i in range(8):
        torch.testing.assert_close(two[i], one[i], atol=1e-4, rtol=0)
    four = tiles_by_sample(dataset, world=2, batch=4)  # and in batches of 2 per process
    assert all(torch.allclose(four[i], one[i], atol=1e-4, rtol=0) for i in range(8))


def test_ranks_draw_different_parameters(tmp_path):
    # the k-th image of every rank once got the same parameters (a per-batch seed without the rank): with
    # eight copies of one picture, equal parameters would show as equal tiles
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 28, 3), dtype=np.uint8))
    for i in range(8):
        (tmp_path / "c").mkdir(exist_ok=True)
        picture.save(tmp_path / "c" / f"{i}.png")
    dataset = PretrainDataset(tmp_path, None, seed=7, loader=encoded_with_path)
    tiles = list(tiles_by_sample(dataset, world=2, batch=8, epoch=0).values())
    assert len(tiles) == 8
    assert all((tiles[i] - tiles[j]).abs().amax(dim=(1, 2, 3)).min() > 0.1 for i in range(8) for j in range(i))


def test_augment_batch_replaces_and_reports_too_narrow_images(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i, size in enumerate([(12, 10), (1, 1), (10, 14)]):  # (width, height); the 1x1 has no left region
        paths.append(str(tmp_path / f"{i}.jpg"))
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(paths[-1])
    batch = collate_pretrain([(((encoded_with_path(p)), i, 0), "") for i, p in enumerate(paths)])[0]
    tiles, bad = augment_batch(batch, GpuFourCrop(tile_size=8), 0, torch.device("cpu"))
    assert bad == [paths[1]]
    assert [tuple(t.shape) for t in tiles] == [(3, 3, 8, 8)] * 4 and all(torch.isfinite(t).all() for t in tiles)


@pytest.mark.slow
def test_main_moco_gpu_aug_on_cpu(image_root, tmp_path):
    out = tmp_path / "run"
    res = run_script("main_moco.py", image_root, *TINY, "-b", "8", "--workers", "1", "--epochs", "1", "--gpu-aug",
                     "--save-dir", out)
    assert res.returncode == 0, res.stderr
    losses = logged_losses(out / "log.txt")
    assert len(losses) == 3 and all("nan" not in v and "inf" not in v for v in losses.values())


# ---- bytes in, images out -----------------------------------------------------------------------

def encode(array: np.ndarray, fmt: str) -> torch.Tensor:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)


def test_decode_batch_png_jpeg_gray_and_bad_file():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (10, 14, 3), dtype=np.uint8)
    gray = rng.integers(0, 256, (6, 5), dtype=np.uint8)
    smooth = np.kron(rng.integers(0, 256, (2, 3, 3)), np.ones((8, 8, 1))).astype(np.uint8)
    jpeg = encode(smooth, "JPEG")
    out = decode_batch([encode(rgb, "PNG"), encode(gray, "PNG"), jpeg], "cpu")
    assert torch.equal(out[0], torch.from_numpy(rgb).permute(2, 0, 1))
    assert torch.equal(out[1], torch.from_numpy(gray).expand(3, 6, 5))
    pil = np.array(Image.open(io.BytesIO(jpeg.numpy().tobytes())).convert("RGB"))
    assert out[2].shape == (3, 16, 24) and (out[2].permute(1, 2, 0).int() - torch.from_numpy(pil)).abs().max() <= 2
    with pytest.raises(ValueError, match="image 1 of the batch"):
        decode_batch([jpeg, torch.tensor([1, 2, 3], dtype=torch.uint8), jpeg], "cpu")


@functools.cache
def special_files() -> dict[str, torch.Tensor]:
    """One smooth picture as: YCbCr, progressive, grey, CMYK and RGB-coded JPEGs, and a PNG named .JPEG."""
    rgb = Image.fromarray(smooth_rgb())

    def save(image: Image.Image, fmt: str = "JPEG", **kw) -> torch.Tensor:
        buffer = io.BytesIO()
        image.save(buffer, format=fmt, **kw)
        return torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)

    return {"rgb.JPEG": save(rgb, quality=95), "progressive.JPEG": save(rgb, quality=95, progressive=True),
            "gray.JPEG": save(rgb.convert("L"), quality=95), "cmyk.JPEG": save(rgb.convert("CMYK"), quality=95),
            "rgb-coded.JPEG": save(rgb, quality=95, keep_rgb=True), "png.JPEG": save(rgb, "PNG")}


def pil_rgb(data: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.array(Image.open(io.BytesIO(data.numpy().tobytes())).convert("RGB"))).permute(2, 0, 1)


def test_nvjpeg_gets_only_the_jpegs_whose_colours_it_gets_right():
    decodable = {name: nvjpeg_decodable(data) for name, data in special_files().items()}
    assert decodable == {"rgb.JPEG": True, "progressive.JPEG": True, "gray.JPEG": True, "cmyk.JPEG": False,
                         "rgb-coded.JPEG": False, "png.JPEG": False}
    jpeg = bytearray(special_files()["rgb.JPEG"].numpy().tobytes())
    frame = jpeg.index(b"\xff\xc0")
    for pos, value in [(frame + 4, 12), (frame + 1, 0xC9)]:  # 12-bit samples; arithmetic coding
        other = jpeg.copy()
        other[pos] = value
        assert not nvjpeg_decodable(torch.frombuffer(other, dtype=torch.uint8))
    assert not nvjpeg_decodable(torch.tensor([255, 216, 255], dtype=torch.uint8))  # truncated


def test_unusual_files_never_reach_nvjpeg(monkeypatch):
    # nvjpeg may decode a CMYK file without an error but with wrong colours: stand in for it with a decoder
    # that returns black images, and see that only files it gets right reach it
    def black_nvjpeg(data: list[torch.Tensor], mode: ImageReadMode, device: torch.device) -> list[torch.Tensor]:
        return [torch.zeros_like(decode_image(d, mode=mode)) for d in data]

    monkeypatch.setattr(gpu_decode, "decode_jpeg", black_nvjpeg)
    files = special_files()
    out = gpu_decode._decode_on_device(list(files.values()), torch.device("cpu"))
    for (name, data), image in zip(files.items(), out):
        if name in ("cmyk.JPEG", "rgb-coded.JPEG", "png.JPEG"):
            assert torch.equal(image, pil_rgb(data)), name  # decoded on the CPU, with PIL's colours
        else:
            assert image.max() == 0, name
    for (name, data), image in zip(files.items(), decode_batch(list(files.values()), "cpu")):
        assert image.shape == (3, 48, 64) and (image.int() - pil_rgb(data).int()).abs().max() <= 1, name


def test_encoded_image_folder_and_collate(tmp_path):
    rng = np.random.default_rng(0)
    files = []
    for cls in ["a", "b"]:
        (tmp_path / cls).mkdir()
        path = tmp_path / cls / "x.png"
        Image.fromarray(rng.integers(0, 256, (4, 6, 3), dtype=np.uint8)).save(path)
        files.append(path.read_bytes())
    dataset = EncodedImageFolder(str(tmp_path))
    items = [dataset[i] for i in range(len(dataset))]
    assert [label for _, label in items] == [0, 1]
    assert [bytes(data.numpy()) for data, _ in items] == files
    data, labels = collate_encoded(items)
    assert isinstance(data, list) and labels.dtype == torch.int64 and labels.tolist() == [0, 1]
    assert decode_batch(data, "cpu")[1].shape == (3, 4, 6)


def smooth_rgb(h: int = 48, w: int = 64) -> np.ndarray:
    """A smooth colour gradient: decoders may differ by rounding only, not at hard colour edges."""
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    return (np.stack([xx, yy, 1 - xx * yy], axis=-1) * 200 + 20).astype(np.uint8)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_path_matches_cpu():
    dev = torch.device("cuda")
    rng = np.random.default_rng(0)
    edges = encode(np.kron(rng.integers(0, 256, (3, 4, 3)), np.ones((8, 8, 1))).astype(np.uint8), "JPEG")
    smooth = encode(smooth_rgb(), "JPEG")
    png = encode(rng.integers(0, 256, (10, 14, 3), dtype=np.uint8), "PNG")
    batch = [edges, png, smooth, special_files()["cmyk.JPEG"], special_files()["gray.JPEG"]]
    on_cpu, on_gpu = decode_batch(batch, "cpu"), decode_batch(batch, dev)
    for c, g in zip(on_cpu, on_gpu):
        assert g.device.type == "cuda" and g.shape == c.shape
    diff = [(g.cpu().float() - c.float()).abs() for c, g in zip(on_cpu, on_gpu)]
    # nvjpeg and libjpeg upsample chroma differently: large differences at hard colour edges are
    # expected, so the edges bound the mean (as torchvision's own test) and the smooth image the maximum
    assert diff[0].mean() < 2 and diff[0].max() < 128
    assert diff[2].mean() < 1 and diff[2].max() <= 6
    assert diff[1].max() == 0 and diff[3].max() == 0  # PNG and CMYK: decoded on the CPU
    assert diff[4].mean() < 1
    with pytest.raises(ValueError, match="image 1 of the batch"):
        decode_batch([edges, torch.tensor([255, 216, 255, 0], dtype=torch.uint8)], dev)
    x = tiles(4, size=20)
    images_255, boxes = x * 255, torch.tensor([BOXES[:2], BOXES[2:4]])
    torch.testing.assert_close(G.resized_crops(images_255[:2].to(dev), boxes.to(dev), 16).cpu(),
                               G.resized_crops(images_255[:2], boxes, 16), atol=0.3, rtol=0)  # TF32 if enabled
    applied, factors, order = jitter_params(torch.from_numpy(uniforms(keys(1), 36)).view(4, 9))
    index, counts = jitter_plan(applied, order)
    torch.testing.assert_close(G.color_jitter(x.to(dev), factors.to(dev), index.to(dev), counts).cpu(),
                               G.color_jitter(x, factors, index, counts), atol=1e-5, rtol=0)
    sigma, index = torch.tensor([0.3, 1.0, 2.0, 1.5]), torch.tensor([0, 1, 2])
    torch.testing.assert_close(G.gaussian_blur(x.to(dev), sigma.to(dev), index.to(dev)).cpu(),
                               G.gaussian_blur(x, sigma, index), atol=1e-5, rtol=0)
    host = images([(40, 52), (40, 52), (30, 20)])
    crop = GpuFourCrop(tile_size=16)
    first = crop([im.to(dev) for im in host], keys(3))
    again = crop([im.to(dev) for im in host], keys(3))
    on_host = crop(host, keys(3))  # the parameters are drawn on the host: the same tiles as on the CPU
    for a, b, c in zip(first[0] + first[1], again[0] + again[1], on_host[0] + on_host[1]):
        assert a.device.type == "cuda" and a.shape == (3, 3, 16, 16) and torch.equal(a, b)
        assert (a.cpu() - c).abs().mean() < 5e-3  # the resize may run in TF32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_four_crop_never_waits_for_the_gpu():
    # every parameter is drawn on the host and copied without a sync: the host can run ahead
    batch = [im.cuda() for im in images([(40, 52), (33, 20), (40, 52)])]
    crop = GpuFourCrop(tile_size=16, pad_slack=1.0)  # two size groups: the regrouping path too
    crop(batch, keys(3))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        crop(batch, keys(3))
    finally:
        torch.cuda.set_sync_debug_mode(0)


# ---- the data benchmark -------------------------------------------------------------------------

def test_bench_data_runs_every_pipeline_on_cpu(tmp_path, capsys):
    argv = ["--root", str(tmp_path), "--images", "6", "--classes", "2", "--batch-size", "3", "--workers", "0",
            "--tile-size", "16", "--iters", "1", "--rounds", "1", "--warmup", "0", "--device", "cpu",
            "--pipelines", "core,loader,gpu"]
    assert bench_data.main(argv) == 0
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    for key in ["decode_only", "pil_fourcrop", "fast_fourcrop", "pil_twocrop", "fast_twocrop", "loader_pil_fourcrop",
                "loader_fast_fourcrop", "gpu_pipeline_img_s", "gpu_decode_img_s", "gpu_augment_img_s"]:
        assert result[key] > 0, key
    assert result["ratio_fast_vs_pil"] == result["fast_fourcrop"] / result["pil_fourcrop"]
    assert "fast / PIL per core: four-crop" in out and "decode only" in out
    assert result["workers"] == 0 and result["image_size"] == [500, 375] and 20 < result["mean_file_kb"] < 120
    assert len(list(tmp_path.glob("c*/*.jpg"))) == 6
    assert bench_data.main(["--images", "3", "--batch-size", "4"]) == 2  # more per batch than images
    assert bench_data.main(argv[:-1] + ["cpu,tpu"]) == 2
    assert "error: --pipelines" in capsys.readouterr().err


def test_bench_images_are_photo_like_not_noise():
    image = bench_data.synthetic_image(0).astype(np.float64)
    neighbours = np.abs(np.diff(image, axis=1)).mean()  # noise: ~80 levels between neighbours
    assert neighbours < 12 and image.std() > 30  # smooth almost everywhere, yet far from flat
