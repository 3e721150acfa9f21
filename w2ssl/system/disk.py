"""Disk space: how large a pre-training checkpoint is, how many a run keeps, and whether they fit."""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from w2ssl.errors import UserError

if TYPE_CHECKING:  # a leaf: torch is not loaded to size a checkpoint's disk need
    from torch import nn

# Optimiser state tensors per trainable parameter: LARS's momentum; AdamW's two moments.
OPTIMIZER_SLOTS = {"lars": 1, "adamw": 2}


def format_bytes(n: float) -> str:
    """``1234567 -> '1.2 MB'`` (powers of 1000, as disk sizes are sold and ``df -H`` prints them)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def free_bytes(folder: str | Path) -> int:
    """Bytes free to this user on the disk of ``folder``, or of its nearest existing parent."""
    folder = Path(folder).absolute()
    while not folder.exists():
        folder = folder.parent
    return shutil.disk_usage(folder).free


def checkpoint_bytes(model: nn.Module, optimizer: str) -> int:
    """Tensor bytes of a checkpoint of ``model`` trained with ``optimizer`` (``lars``/``adamw``): its state
    plus the optimiser's per-parameter state. Works on the meta device, before anything is allocated."""
    state = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return state + OPTIMIZER_SLOTS[optimizer] * trainable


def refuse_if_too_small(save_dir: str | Path, per_file: int) -> None:
    """:class:`UserError` unless two checkpoints fit: the one kept while the next is written."""
    free = free_bytes(save_dir)
    if free < 2 * per_file:
        raise UserError(f"{save_dir} has {format_bytes(free)} free, less than two checkpoints of "
                        f"{format_bytes(per_file)} (the last one is kept while the next is written): free space "
                        f"there or pass a --save-dir on a larger disk")


@dataclass(frozen=True)
class DiskPlan:
    """A run's checkpoints in ``save_dir``: ``epoch_files`` epoch checkpoints, plus one more for
    ``checkpoint_last`` (a separate file after a mid-epoch save) or the file being written."""

    save_dir: Path
    per_file: int
    epoch_files: int
    free: int

    @classmethod
    def of(cls, save_dir: str | Path, per_file: int, epochs_left: int, keep: int) -> DiskPlan:
        """The plan for ``epochs_left`` more epochs with ``--keep keep`` (0: every epoch checkpoint stays)."""
        files = epochs_left if keep <= 0 else min(keep, epochs_left)
        return cls(Path(save_dir), per_file, max(files, 0), free_bytes(save_dir))

    @property
    def needed(self) -> int:
        return self.per_file * (self.epoch_files + 1)

    @property
    def fits(self) -> bool:
        return self.needed <= self.free

    def message(self) -> str:
        """What the run will write and, when it does not fit, the fix (``--keep N`` that fits)."""
        what = (f"{self.epoch_files} epoch checkpoint(s) of {format_bytes(self.per_file)} kept, and one more being "
                f"written or as a mid-epoch checkpoint_last: up to {format_bytes(self.needed)}, with "
                f"{format_bytes(self.free)} free in {self.save_dir}")
        if self.fits:
            return f"=> disk: {what}"
        keep = max(self.free // self.per_file - 1, 1)
        return f"this run may run out of disk space: {what}; pass --keep {keep} (or fewer --epochs) or free space"
