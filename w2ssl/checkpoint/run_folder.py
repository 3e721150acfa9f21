"""The checkpoint files of a pre-training run folder (``--save-dir``): their names, newest first, pruning."""
from __future__ import annotations

from pathlib import Path

LAST = "checkpoint_last.pth.tar"


def epoch_name(epoch: int) -> str:
    """File name of the checkpoint written after epoch index ``epoch`` (0-based), as the authors'."""
    return f"checkpoint_{epoch:04d}.pth.tar"


def candidates(save_dir: str | Path) -> list[Path]:
    """Checkpoints in ``save_dir``, newest first (modification time, then name)."""
    files = [p for p in Path(save_dir).glob("checkpoint_*.pth.tar") if p.is_file()]
    return sorted(files, key=lambda p: (p.stat().st_mtime_ns, p.name), reverse=True)


def prune(save_dir: str | Path, keep: int) -> None:
    """Keep the ``keep`` newest epoch checkpoints (``keep <= 0``: keep all)."""
    if keep <= 0:
        return
    epochs = sorted(p for p in Path(save_dir).glob("checkpoint_[0-9][0-9][0-9][0-9].pth.tar"))
    for old in epochs[:-keep]:
        old.unlink(missing_ok=True)
