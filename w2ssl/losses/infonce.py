"""MoCo v3's contrastive (InfoNCE) loss (METHOD §10): a pure function of queries and keys."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def infonce(q: Tensor, k: Tensor, temperature: float, offset: int = 0) -> tuple[Tensor, Tensor]:
    """MoCo v3's contrastive loss of queries ``q [n, d]`` against keys ``k [m, d]`` (all processes' keys).

    The positive of query ``i`` is key ``offset + i`` (``offset = rank * n``), every other key a negative:
    ``2T · mean_i CE(q̂_i·k̂ᵀ / T, offset + i)`` with rows L2-normalised, in float32 at least. Returns the
    loss and (detached) the fraction of queries whose most similar key is their positive.
    """
    dtype = torch.promote_types(q.dtype, torch.float32)
    q, k = F.normalize(q.to(dtype), dim=1), F.normalize(k.to(dtype), dim=1)
    logits = q @ k.T / temperature
    labels = torch.arange(offset, offset + q.shape[0], device=q.device)
    loss = F.cross_entropy(logits, labels) * (2 * temperature)
    top1 = (logits.detach().argmax(dim=1) == labels).float().mean()
    return loss, top1
