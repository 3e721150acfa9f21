"""Classification metrics of the probe and fine-tuning, summed exactly over processes, and the validation loop."""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor

from w2ssl.dist import distributed as D
from w2ssl.engine.monitor import AverageMeter


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


@torch.no_grad()
def evaluate(classify: Callable[[Tensor], Tensor], batches: Iterable, n: int, device: torch.device,
             info: Callable[[str], None] | None, print_freq: int) -> tuple[int, float, float]:
    """``classify(images) -> [B, K]`` logits over ``n`` ``(images, targets, ...)`` batches of this process;
    the rows seen by all processes and their top-1 and top-5 (%), a progress line every ``print_freq``
    batches through ``info`` (None: quiet)."""
    batch_time = AverageMeter("Time", ":6.3f")
    tally, end = Tally(device), time.perf_counter()
    for i, (x, target, *_) in enumerate(batches):
        target = target.to(device, non_blocking=True)
        logits = classify(x)
        tally.add(F.cross_entropy(logits, target, reduction="sum"), logits, target)
        batch_time.update(time.perf_counter() - end)
        if i % print_freq == 0 and info is not None:
            info(f"Test: [{i:>{len(str(n))}}/{n}]\t{batch_time}\t{tally.text()}")
        end = time.perf_counter()
    _, hits1, hits5, rows = D.gather(tally.total[None]).sum(dim=0).tolist()
    rows = int(rows)
    return rows, 100.0 * hits1 / max(rows, 1), 100.0 * hits5 / max(rows, 1)
