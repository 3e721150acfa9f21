"""Mixup and CutMix with soft targets (w2ssl.eval.mixup) against hand-computed values and timm's semantics."""
import numpy as np
import pytest
import torch

from w2ssl.eval.mixup import Mixer, cutmix_box, smoothed_one_hot, soft_cross_entropy


class FixedRng:
    """A stand-in generator with chosen draws: ``random()`` (mixup or CutMix), ``beta`` (λ), ``integers``
    (the box centre)."""

    def __init__(self, switch: float, lam: float, centre: tuple[int, int] = (0, 0)):
        self.switch, self.lam, self.centre = switch, lam, list(centre)

    def random(self):
        return self.switch

    def beta(self, a, b):
        return self.lam

    def integers(self, low, high):
        return self.centre.pop(0)


def test_smoothed_one_hot_puts_the_smoothing_mass_evenly():
    soft = smoothed_one_hot(torch.tensor([2, 0]), classes=4, smoothing=0.1)
    assert torch.allclose(soft, torch.tensor([[0.025, 0.025, 0.925, 0.025], [0.925, 0.025, 0.025, 0.025]]))


def test_mixup_blends_each_sample_with_the_reversed_batch():
    x = torch.arange(3 * 2 * 2 * 2, dtype=torch.float32).view(3, 2, 2, 2)
    target = torch.tensor([0, 1, 2])
    mixed, soft = Mixer(0.8, 0.0, 0.0, classes=3)(x, target, FixedRng(switch=0.9, lam=0.7))
    assert torch.allclose(mixed, 0.7 * x + 0.3 * x.flip(0))
    assert torch.allclose(soft, torch.tensor([[0.7, 0.0, 0.3], [0.0, 1.0, 0.0], [0.3, 0.0, 0.7]]))


def test_cutmix_pastes_a_box_and_weighs_targets_by_its_area():
    x = torch.zeros(2, 1, 8, 8)
    x[1] = 1.0
    # λ 0.75: sides sqrt(0.25) x 8 = 4, centred at (row 2, col 6): rows 0..4, cols 4..8 (clipped), 16 of 64 px
    assert cutmix_box(8, 8, 0.75, FixedRng(0, 0, (2, 6))) == (0, 4, 4, 8)
    rng = FixedRng(switch=0.2, lam=0.75, centre=(2, 6))
    mixed, soft = Mixer(0.8, 1.0, 0.0, classes=2)(x, torch.tensor([0, 1]), rng)
    assert mixed[0, 0, :4, 4:].eq(1).all() and mixed[0].sum() == 16 and mixed[1].sum() == 64 - 16
    assert torch.allclose(soft, torch.tensor([[0.75, 0.25], [0.25, 0.75]]))  # 1 - 16/64 of the own label


def test_a_clipped_box_corrects_lambda_to_the_area_pasted():
    x = torch.zeros(2, 1, 8, 8)
    x[1] = 1.0
    # λ 0.75, centre (0, 0): the 4x4 box clips to rows 0..2, cols 0..2: 4 of 64 px, λ = 60/64
    mixed, soft = Mixer(0.0, 1.0, 0.0, classes=2)(x, torch.tensor([0, 1]), FixedRng(switch=0.0, lam=0.75))
    assert mixed[0].sum() == 4 and soft[0, 0] == pytest.approx(60 / 64)


def test_mixup_and_cutmix_alternate_half_the_batches_and_draws_are_seeded():
    x, target = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    mixer = Mixer(0.8, 1.0, 0.1, classes=4)
    cutmix = 0
    for seed in range(400):
        mixed, soft = mixer(x, target, np.random.default_rng(seed))
        assert torch.allclose(soft.sum(1), torch.ones(4))
        # CutMix leaves pixels that equal one of the two sources exactly; mixup (λ strictly inside) none
        cutmix += bool(((mixed == x) | (mixed == x.flip(0))).all())
    assert 160 < cutmix < 240  # switch_prob 0.5 over 400 draws: 5 sigma is ±50
    a, b = mixer(x, target, np.random.default_rng(7)), mixer(x, target, np.random.default_rng(7))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_soft_cross_entropy_is_cross_entropy_for_one_hot_and_smoothed_targets():
    logits, target = torch.randn(5, 4), torch.tensor([0, 3, 1, 1, 2])
    assert torch.allclose(soft_cross_entropy(logits, smoothed_one_hot(target, 4, 0.0)),
                          torch.nn.functional.cross_entropy(logits, target))
    assert torch.allclose(soft_cross_entropy(logits, smoothed_one_hot(target, 4, 0.1)),
                          torch.nn.functional.cross_entropy(logits, target, label_smoothing=0.1))
