"""BYOL's loss (w2ssl.losses.byol) against numbers worked out by hand."""
import math

import pytest
import torch

from w2ssl.losses.byol import byol_loss


def test_byol_loss_hand_computed():
    p = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    z = torch.tensor([[1.0, 1.0], [0.0, -1.0]])
    # cosines 1/sqrt(2) and -1: per row 2 - sqrt(2) and 4
    assert byol_loss(p, z).item() == pytest.approx((6 - math.sqrt(2)) / 2)
    pn, zn = p / p.norm(dim=1, keepdim=True), z / z.norm(dim=1, keepdim=True)
    assert byol_loss(p, z).item() == pytest.approx(((pn - zn) ** 2).sum(1).mean().item())  # ||p - z||^2 of unit rows
    assert byol_loss(z, 3 * z).item() == pytest.approx(0.0, abs=1e-7)  # scale-free


def test_byol_loss_sends_no_gradient_to_the_target_and_checks_shapes():
    p, z = torch.randn(4, 3, requires_grad=True), torch.randn(4, 3, requires_grad=True)
    byol_loss(p, z).backward()
    assert p.grad is not None and z.grad is None
    with pytest.raises(ValueError, match="both be"):
        byol_loss(torch.randn(4, 3), torch.randn(4, 2))
