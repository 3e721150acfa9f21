"""The supervised-contrastive "what" loss (METHOD §5), a pure function."""
from __future__ import annotations

import torch
from torch import Tensor


def rows_with_positive(labels: Tensor) -> Tensor:
    """How many of ``labels [n]`` occur more than once (rows that have a positive): a 0-d tensor.

    Sorting instead of an ``[n, n]`` comparison or ``unique``: O(n log n), and no host sync on GPUs.
    """
    ordered = labels.sort().values
    same = ordered[1:] == ordered[:-1]
    has = torch.zeros_like(ordered, dtype=torch.bool)
    has[1:] |= same
    has[:-1] |= same
    return has.sum()


def supcon_loss(z: Tensor, labels: Tensor, temperature: float = 0.3, base_temperature: float = 0.07,
                anchors: Tensor | None = None) -> Tensor:
    """Supervised contrastive loss; with ``anchors``, those rows' share of it.

    ``z [n, d]`` (rows L2-normalised), ``labels [n]``. For anchor ``i`` the positives are the other
    rows with the same label; the denominator runs over all rows but ``i``. The loss is the mean over
    all rows that have a positive. ``anchors [a]`` (indices into ``z``; default all rows) limits the sum
    to those rows, still divided by the count over all rows: the shares of a partition of the rows add
    up to the loss, so each process can take its own rows as anchors against the gathered ``z`` at
    ``a / n`` of the cost. Computed in float32 (float64 stays float64) even under autocast.
    """
    if z.ndim != 2 or labels.shape != z.shape[:1]:
        raise ValueError(f"supcon_loss needs z [n, d] and labels [n]; got {tuple(z.shape)} and {tuple(labels.shape)}")
    dtype = torch.float64 if z.dtype == torch.float64 else torch.float32
    every = torch.arange(len(z), device=z.device)
    rows = every if anchors is None else anchors
    with torch.autocast(device_type=z.device.type, enabled=False):
        z = z.to(dtype)
        logits = z[rows] @ z.T / temperature  # [a, n]
        self_mask = rows[:, None] == every[None, :]
        # Max-subtraction for stability; it cancels in logits - logsumexp.
        logits = logits - logits.detach().max(dim=1, keepdim=True).values
        logits = logits.masked_fill(self_mask, float("-inf"))
        log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
        positives = (labels[rows][:, None] == labels[None, :]) & ~self_mask
        n_pos = positives.sum(dim=1)
        pos_log_prob = log_prob.masked_fill(~positives, 0.0).sum(dim=1)
        # Anchors without a positive add 0 (their sum is empty) and are not counted: no boolean
        # indexing, so no data-dependent shape and no host sync on GPUs.
        per_anchor = -(temperature / base_temperature) * pos_log_prob / n_pos.clamp_min(1)
        return per_anchor.sum() / rows_with_positive(labels).to(dtype)
