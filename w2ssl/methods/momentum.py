"""Momentum (EMA) copies of modules, as in MoCo v3: pairing, initialisation, the update."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class MomentumPairs:
    """The parameters of ``base`` modules paired with those of same-shaped ``momentum`` modules.

    On construction the momentum parameters become copies of the base ones and stop taking gradients.
    """

    def __init__(self, base: Sequence[nn.Module], momentum: Sequence[nn.Module]):
        self.base = [p for m in base for p in m.parameters()]
        self.momentum = [p for m in momentum for p in m.parameters()]
        if [p.shape for p in self.base] != [p.shape for p in self.momentum]:
            raise ValueError("base and momentum modules must have the same parameter shapes")
        with torch.no_grad():
            for b, m in zip(self.base, self.momentum):
                m.copy_(b)
                m.requires_grad = False

    @torch.no_grad()
    def update(self, m: float) -> None:
        """``θ_m ← m·θ_m + (1−m)·θ_b`` for every pair, in one fused call."""
        torch._foreach_lerp_(self.momentum, self.base, 1.0 - m)

