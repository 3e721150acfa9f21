import math

import pytest
import torch
import torch.nn.functional as F

from w2ssl.losses.supcon import rows_with_positive, supcon_loss


def reference(z: torch.Tensor, y: torch.Tensor, tau: float = 0.3, tau_b: float = 0.07) -> torch.Tensor:
    """METHOD §5 written out with plain loops, float64."""
    n = len(z)
    total, anchors = 0.0, 0
    for i in range(n):
        denom = sum(math.exp(float(z[i] @ z[j]) / tau) for j in range(n) if j != i)
        pos = [j for j in range(n) if j != i and y[j] == y[i]]
        if not pos:
            continue
        mean_logp = sum(float(z[i] @ z[j]) / tau - math.log(denom) for j in pos) / len(pos)
        total += -(tau / tau_b) * mean_logp
        anchors += 1
    return torch.tensor(total / anchors, dtype=torch.float64)


LABELS = {
    "three_positives": torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2]),
    "mixed": torch.tensor([0, 0, 1, 1, 1, 2, 2, 2, 2, 3, 3, 0]),
    "one_positive": torch.tensor([0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5]),
}


@pytest.mark.parametrize("pattern", LABELS)
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_double_loop_reference(pattern, seed):
    g = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(12, 5, generator=g, dtype=torch.float64), dim=1)
    y = LABELS[pattern]
    torch.testing.assert_close(supcon_loss(z, y), reference(z, y), rtol=1e-10, atol=1e-10)


def test_temperatures_are_used():
    z = F.normalize(torch.randn(8, 4, dtype=torch.float64), dim=1)
    y = torch.tensor([0, 1, 2, 3] * 2)
    torch.testing.assert_close(supcon_loss(z, y, 0.5, 0.1), reference(z, y, 0.5, 0.1))


def test_gradcheck():
    z = F.normalize(torch.randn(6, 3, dtype=torch.float64), dim=1).requires_grad_()
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    assert torch.autograd.gradcheck(lambda x: supcon_loss(x, y), (z,))


def test_float32_under_autocast_and_stable_for_sharp_logits():
    z = F.normalize(torch.randn(16, 8), dim=1)
    y = torch.arange(8).repeat(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = supcon_loss(z.bfloat16(), y)
    assert out.dtype == torch.float32
    # Tiny temperature: exp would overflow without max-subtraction.
    sharp = supcon_loss(z.double(), y, temperature=1e-3, base_temperature=1e-3)
    assert torch.isfinite(sharp)


def test_known_value_for_orthogonal_pairs():
    # Two identical pairs of orthogonal unit vectors: anchor i has 1 positive (s = 1/τ) and 3 rows in
    # the denominator: one positive (e^{1/τ}) and two orthogonal (e^0).
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    y = torch.tensor([0, 1, 0, 1])
    tau, tau_b = 0.3, 0.07
    expected = -(tau / tau_b) * (1 / tau - math.log(math.exp(1 / tau) + 2))
    assert supcon_loss(z, y).item() == pytest.approx(expected, rel=1e-12)


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="labels"):
        supcon_loss(torch.randn(4, 3), torch.zeros(3, dtype=torch.long))


@pytest.mark.parametrize("pattern", LABELS)
def test_anchor_shares_add_up_to_the_loss(pattern):
    """Each part of a partition of the rows as anchors: the parts' losses add up to the reference, and
    their gradients to the full loss's gradient (the per-process "what" loss)."""
    g = torch.Generator().manual_seed(2)
    z = F.normalize(torch.randn(12, 5, generator=g, dtype=torch.float64), dim=1).requires_grad_()
    y = LABELS[pattern]
    parts = torch.randperm(12, generator=g).chunk(3)
    shares = [supcon_loss(z, y, anchors=rows) for rows in parts]
    torch.testing.assert_close(sum(shares), reference(z.detach(), y), rtol=1e-10, atol=1e-10)
    (full_grad,) = torch.autograd.grad(supcon_loss(z, y), z)
    (share_grad,) = torch.autograd.grad(sum(shares), z)
    torch.testing.assert_close(share_grad, full_grad, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(lambda x: supcon_loss(x, y, anchors=parts[0]), (z,))


def test_rows_with_positive():
    assert rows_with_positive(torch.tensor([3, 1, 3, 2, 1, 7, 3])).item() == 5
    assert rows_with_positive(torch.tensor([0, 1, 2])).item() == 0
