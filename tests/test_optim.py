import math

import pytest
import torch

from w2ssl.optim import LARS, build_optimizer, lr_at, momentum_at, norms, scaled_lr


def test_linear_scaling():
    assert scaled_lr(0.6, 512) == pytest.approx(1.2)
    assert scaled_lr(0.6, 2048) == pytest.approx(4.8)
    assert scaled_lr(0.1, 256) == pytest.approx(0.1)


@pytest.mark.parametrize("epoch, expected", [
    (0.0, 0.0),
    (2.5, 1.2 * 0.25),                       # warm-up: linear from 0 over 10 epochs
    (10.0, 1.2),                             # peak
    (105.0, 1.2 * 0.5),                      # middle of the cosine: cos(π/2) = 0
    (200.0, 0.0),
    (55.0, 1.2 * 0.5 * (1 + math.cos(math.pi * 45 / 190))),
])
def test_lr_schedule(epoch, expected):
    assert lr_at(epoch, 1.2, 10, 200) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("epoch, expected", [
    (0.0, 0.99), (100.0, 0.995), (200.0, 1.0), (50.0, 1 - 0.5 * (1 + math.cos(math.pi / 4)) * 0.01)])
def test_momentum_cosine(epoch, expected):
    assert momentum_at(epoch, 200, 0.99, cosine=True) == pytest.approx(expected, abs=1e-12)
    assert momentum_at(epoch, 200, 0.99, cosine=False) == 0.99


def test_lars_one_step_by_hand():
    w = torch.tensor([[3.0, 4.0]], requires_grad=True)    # ‖w‖ = 5
    b = torch.tensor([1.0, -1.0], requires_grad=True)
    w.grad = torch.tensor([[0.0, 1.0]])
    b.grad = torch.tensor([0.5, 0.5])
    opt = LARS([w, b], lr=2.0, weight_decay=0.1, momentum=0.9, trust_coefficient=0.001)
    opt.step()
    g = torch.tensor([[0.3, 1.4]])                         # grad + wd * w
    g = g * (0.001 * 5.0 / g.norm())
    torch.testing.assert_close(w.detach(), torch.tensor([[3.0, 4.0]]) - 2.0 * g)
    torch.testing.assert_close(b.detach(), torch.tensor([1.0, -1.0]) - 2.0 * torch.tensor([0.5, 0.5]))
    # second step: momentum buffer carries 0.9 x the first update
    w.grad = torch.tensor([[0.0, 1.0]])
    b.grad = torch.tensor([0.5, 0.5])
    before = b.detach().clone()
    opt.step()
    torch.testing.assert_close(b.detach(), before - 2.0 * (0.9 * 0.5 + 0.5) * torch.ones(2))


def test_norms_match_float64_for_every_layout_and_dtype():
    g = torch.Generator().manual_seed(0)
    conv = torch.randn(64, 32, 3, 3, generator=g)
    tensors = [conv, conv.to(memory_format=torch.channels_last), torch.randn(300, 200, generator=g).double(),
               torch.zeros(3, 3), torch.tensor([[3.0, 4.0]])]
    expected = torch.stack([t.double().norm() for t in tensors])
    torch.testing.assert_close(norms(tensors).double(), expected, rtol=1e-6, atol=0)
    assert norms(tensors)[-1].item() == 5.0
    half = torch.randn(50, 40, generator=g).bfloat16()  # not for BLAS: computed in its own precision
    torch.testing.assert_close(norms([half]).double(), half.double().norm().view(1), rtol=1e-2, atol=0)


def test_lars_zero_norms_get_plain_gradient():
    w = torch.zeros(2, 2, requires_grad=True)
    w.grad = torch.ones(2, 2)
    LARS([w], lr=1.0, weight_decay=0.0, momentum=0.0).step()
    torch.testing.assert_close(w.detach(), -torch.ones(2, 2))


def test_build_optimizer_skips_frozen_and_rejects_unknown():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    model[1].weight.requires_grad = False
    opt = build_optimizer("adamw", model, 1e-3, 0.0, 0.9)
    assert isinstance(opt, torch.optim.AdamW) and len(opt.param_groups[0]["params"]) == 3
    with pytest.raises(ValueError, match="unknown optimizer"):
        build_optimizer("sgd", model, 1e-3, 0.0, 0.9)


def test_lars_rejects_momentum_of_one():
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\)"):
        LARS([torch.zeros(2, requires_grad=True)], momentum=1.0)
