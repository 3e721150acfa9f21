"""Which pre-training checkpoint a run continues from: ``--resume PATH`` checked, or with ``auto`` the
newest in the run folder that loads (each one skipped said so)."""
from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

from w2ssl.checkpoint.kinds import Kind, describe, kind
from w2ssl.checkpoint.read import load
from w2ssl.checkpoint.run_folder import candidates
from w2ssl.errors import UserError


def find_resumable(save_dir: str | Path, trust: bool = False,
                   warn: Callable[[str], None] = warnings.warn) -> tuple[Path, dict] | None:
    """The newest pre-training checkpoint in ``save_dir`` that loads; each one skipped is warned about,
    saying which file is tried next, so that a skip is never mistaken for a fresh start."""
    files = candidates(save_dir)
    for i, path in enumerate(files):
        try:
            ckpt = load(path, trust)
            problem = None if "state_dict" in ckpt and "epoch" in ckpt else f"it is {describe(ckpt)}"
        except UserError as e:
            problem = str(e)
        if problem is None:
            return path, ckpt
        following = f"trying {files[i + 1].name}" if i + 1 < len(files) else "no older checkpoint left"
        warn(f"skipping {path}: {problem}; {following}")
    return None


def check_resume_path(resume: str) -> None:
    """``--resume PATH`` must name a file (``auto``, ``none`` and ``''`` pass): one clear line otherwise."""
    if resume in ("", "auto", "none"):
        return
    path = Path(resume)
    if path.is_dir():
        raise UserError(f"--resume {resume} is a directory: pass a checkpoint file in it, or --resume auto with "
                        f"--save-dir {resume}")
    if not path.is_file():
        raise UserError(f"--resume {resume} does not exist: pass a checkpoint file or 'auto'")


def load_pretraining(path: str | Path, trust: bool = False) -> dict:
    """The pre-training checkpoint ``--resume path`` (weights, optimizer, epoch), or a :class:`UserError`
    saying what the file is instead (a probe checkpoint, an exported trunk, ...)."""
    ckpt = load(path, trust)
    if kind(ckpt) is not Kind.PRETRAINING:
        raise UserError(f"--resume {path} is {describe(ckpt)}, not a pre-training checkpoint: pass one of "
                        f"main_moco.py's checkpoint_*.pth.tar (or --resume auto)")
    missing = [k for k in ("epoch", "optimizer") if k not in ckpt]
    if missing:
        raise UserError(f"--resume {path} is a pre-training checkpoint without {' or '.join(missing)}, so training "
                        f"cannot continue from it: pass it to the probe or the exporter, or start anew")
    return ckpt
