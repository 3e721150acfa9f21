"""Classification metrics of the linear probe, summed exactly over processes."""
from __future__ import annotations

import torch
from torch import Tensor


def topk_hits(logits: Tensor, target: Tensor) -> Tensor:
    """``logits [B, K]``, ``target [B]`` -> ``[2]``: rows whose target is the top-1, and among the top-5.

    Top-5 is clipped to ``K`` classes (a 3-class set has top-3 for "top-5").
    """
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    hits = top == target[:, None]
    return torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum()])


def stats_text(last: list[float], total: list[float]) -> str:
    """MoCo v3's ``Loss v (avg)  Acc@1 v (avg)  Acc@5 v (avg)`` from ``[loss sum, top-1 hits, top-5 hits, rows]``."""
    def fields(s: list[float]) -> tuple[float, float, float]:
        n = max(s[3], 1.0)
        return s[0] / n, 100.0 * s[1] / n, 100.0 * s[2] / n
    (l0, a0, b0), (l1, a1, b1) = fields(last), fields(total)
    return f"Loss {l0:.4e} ({l1:.4e})\tAcc@1 {a0:6.2f} ({a1:6.2f})\tAcc@5 {b0:6.2f} ({b1:6.2f})"


class Tally:
    """Running ``[loss sum, top-1 hits, top-5 hits, rows]`` of a probe's batches, kept on the device (no host
    sync per batch): :attr:`last` is the newest batch's, :attr:`total` their sum."""

    def __init__(self, device: torch.device):
        self.total = torch.zeros(4, device=device)
        self.last = self.total.clone()

    def add(self, loss_sum: Tensor, logits: Tensor, target: Tensor) -> None:
        """One batch: its summed loss (0-d), ``[B, K]`` logits and ``[B]`` targets."""
        self.last = torch.cat([loss_sum[None].float(), topk_hits(logits, target).float(),
                               logits.new_tensor([len(target)], dtype=torch.float32)])
        self.total += self.last

    def text(self) -> str:
        return stats_text(self.last.tolist(), self.total.tolist())


def coverage(rows: int, size: int) -> str:
    """``100 val images``, or ``98 of 100 val images (2 unreadable skipped)``."""
    return f"{size} val images" if rows == size else f"{rows} of {size} val images ({size - rows} unreadable skipped)"
