"""MoCo v3's InfoNCE (w2ssl.losses.infonce) against the published loss written out one pair at a time."""
import math

import pytest
import torch

from w2ssl.losses.infonce import infonce


def reference_ctr(q: torch.Tensor, k: torch.Tensor, temperature: float, offset: int) -> torch.Tensor:
    """MoCo v3's ``contrastive_loss`` written out, one query and one key at a time:
    ``2T · mean_i −log( exp(cos(q_i, k_{offset+i})/T) / Σ_j exp(cos(q_i, k_j)/T) )``."""
    total = q.new_zeros(())
    for i in range(q.shape[0]):
        sims = torch.stack([q[i] @ k[j] / (q[i].norm() * k[j].norm()) / temperature for j in range(k.shape[0])])
        total = total - (sims[offset + i] - torch.log(sum(torch.exp(s) for s in sims)))
    return 2 * temperature * total / q.shape[0]


def test_infonce_equals_the_loop_with_offset_and_hand_value():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(3, 5, generator=g, dtype=torch.float64), torch.randn(9, 5, generator=g, dtype=torch.float64)
    for offset in (0, 3, 6):
        loss, _ = infonce(q, k, 0.2, offset)
        torch.testing.assert_close(loss.double(), reference_ctr(q, k, 0.2, offset), rtol=1e-6, atol=0)
    # unit rows, diagonal positives: CE = log(e^{1/T} + 2) − 1/T, scaled by 2T; every query finds its key
    q = torch.eye(3, 4) * 5.0
    for t in (1.0, 0.5):
        loss, top1 = infonce(q, q.clone(), t)
        assert loss.item() == pytest.approx((math.log(math.exp(1 / t) + 2) - 1 / t) * 2 * t, rel=1e-6)
        assert top1.item() == 1.0
    assert infonce(q, q.roll(1, dims=0), 1.0)[1].item() == 0.0
