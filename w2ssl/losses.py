"""The supervised-contrastive "what" loss (SPEC §5), a pure function."""
from __future__ import annotations

import torch
from torch import Tensor


def supcon_loss(z: Tensor, labels: Tensor, temperature: float = 0.3,
                base_temperature: float = 0.07) -> Tensor:
    """Supervised contrastive loss over all rows as anchors.

    ``z [n, d]`` (rows L2-normalised), ``labels [n]``. For anchor ``i`` the positives are the other
    rows with the same label; the denominator runs over all rows but ``i``. Anchors without a
    positive are left out of the mean. Computed in float32 (float64 stays float64) even under autocast.
    """
    if z.ndim != 2 or labels.shape != z.shape[:1]:
        raise ValueError(f"supcon_loss needs z [n, d] and labels [n]; got {tuple(z.shape)} and {tuple(labels.shape)}")
    dtype = torch.float64 if z.dtype == torch.float64 else torch.float32
    with torch.autocast(device_type=z.device.type, enabled=False):
        z = z.to(dtype)
        logits = z @ z.T / temperature
        self_mask = torch.eye(len(z), dtype=torch.bool, device=z.device)
        # Max-subtraction for stability; it cancels in logits - logsumexp.
        logits = logits - logits.detach().max(dim=1, keepdim=True).values
        logits = logits.masked_fill(self_mask, float("-inf"))
        log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
        positives = (labels[:, None] == labels[None, :]) & ~self_mask
        n_pos = positives.sum(dim=1)
        pos_log_prob = log_prob.masked_fill(~positives, 0.0).sum(dim=1)
        has_pos = (n_pos > 0).to(dtype)
        # Masked mean instead of boolean indexing: no data-dependent shape, so no host sync on GPUs.
        per_anchor = -(temperature / base_temperature) * pos_log_prob / n_pos.clamp_min(1)
        return (per_anchor * has_pos).sum() / has_pos.sum()
