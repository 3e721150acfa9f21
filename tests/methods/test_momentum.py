import pytest
import torch
from torch import nn

from w2ssl.methods.momentum import MomentumPairs


def test_copy_freeze_and_update():
    base, mom = nn.Linear(3, 2), nn.Linear(3, 2)
    pairs = MomentumPairs([base], [mom])
    pairs_ = zip(pairs.base, pairs.momentum)
    assert all(torch.equal(b, m) and not m.requires_grad and b.requires_grad for b, m in pairs_)
    with torch.no_grad():
        base.weight.fill_(1.0)
        mom.weight.fill_(3.0)
    pairs.update(0.75)
    torch.testing.assert_close(mom.weight, torch.full((2, 3), 0.75 * 3.0 + 0.25 * 1.0))


def test_mismatched_modules_are_refused():
    with pytest.raises(ValueError, match="same parameter shapes"):
        MomentumPairs([nn.Linear(3, 2)], [nn.Linear(2, 2)])
