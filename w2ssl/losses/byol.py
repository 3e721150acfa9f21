"""BYOL's loss (Grill et al. 2020, eq. 2): the normalised prediction regressed onto the normalised target."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def byol_loss(p: Tensor, z: Tensor) -> Tensor:
    """``mean_i ‖p̄_i − z̄_i‖² = mean_i (2 − 2·cos(p_i, z_i))`` for predictions ``p`` and targets ``z`` ``[n, d]``.

    ``z`` is the target network's projection (no gradient flows into it); computed in float32 at least.
    """
    if p.shape != z.shape or p.ndim != 2:
        raise ValueError(f"p and z must both be [n, d]; got {tuple(p.shape)} and {tuple(z.shape)}")
    dtype = torch.promote_types(p.dtype, torch.float32)
    cos = (F.normalize(p.to(dtype), dim=1) * F.normalize(z.detach().to(dtype), dim=1)).sum(dim=1)
    return (2 - 2 * cos).mean()
