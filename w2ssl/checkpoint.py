"""Checkpoint I/O: atomic saves, safe loads, what a file is, and resume discovery.

The trunk inside a checkpoint (extraction, architecture, checks) is :mod:`w2ssl.trunk_weights`.
"""
from __future__ import annotations

import errno
import hashlib
import os
import pickle
import secrets
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import Tensor

from w2ssl.errors import UserError, key_list
from w2ssl.system.disk import format_bytes, free_bytes

LAST = "checkpoint_last.pth.tar"


def epoch_name(epoch: int) -> str:
    """File name of the checkpoint written after epoch index ``epoch`` (0-based), as the authors'."""
    return f"checkpoint_{epoch:04d}.pth.tar"


def _temp_beside(path: Path) -> Path:
    """An unused hidden name in ``path``'s folder (same file system, so a rename is atomic)."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def _os_error(e: BaseException) -> OSError | None:
    """The :class:`OSError` behind ``e``: torch's writer turns a failed ``write`` into a RuntimeError
    ("unexpected pos …") whose context is the real error (ENOSPC, EDQUOT, …)."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def _fsync_dir(folder: Path) -> None:
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_atomic(obj: Any, path: str | Path, dump: Callable[[Any, BinaryIO], None] | None = None) -> None:
    """Write ``obj`` (with ``dump``, default ``torch.save``) to a temporary file beside ``path``, fsync,
    then rename over ``path``. A crash or a full disk leaves the previous file at ``path`` intact; an I/O
    failure is raised as the :class:`OSError` behind it. The file's mode follows the umask, as ``open``'s.
    """
    path = Path(path)
    tmp = _temp_beside(path)
    try:
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as f:
            (dump or torch.save)(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        cause = _os_error(e)
        if cause is not None and cause is not e:
            raise cause from None
        raise
    _fsync_dir(path.parent)


def link_atomic(source: Path, path: Path) -> None:
    """Make ``path`` a hard link to ``source``, atomically (link to a temporary name, rename over
    ``path``): the same bytes on disk once. Where hard links are unsupported, copy instead."""
    tmp = _temp_beside(path)
    try:
        os.link(source, tmp)
    except OSError:
        save_atomic(source, path, dump=_copy_into)
        return
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _copy_into(source: Path, f: BinaryIO) -> None:
    with open(source, "rb") as src:
        shutil.copyfileobj(src, f)


def save_all(obj: Any, paths: list[Path], dump: Callable[[Any, BinaryIO], None] | None = None) -> None:
    """:func:`save_atomic` to ``paths[0]``, then hard links to it at the other paths (one copy on disk).
    A failed write (full disk, …) becomes a :class:`UserError` naming the file and the free space."""
    paths = [Path(p) for p in paths]
    for i, path in enumerate(paths):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if i == 0:
                save_atomic(obj, path, dump)
            else:
                link_atomic(paths[0], path)
        except OSError as e:
            raise UserError(_write_failure(path, e)) from None


def _write_failure(path: Path, e: OSError) -> str:
    """One line for a checkpoint that could not be written: the file, the reason, the space left."""
    reason = e.strerror or str(e)
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"could not write checkpoint {path}: {reason} ({format_bytes(free_bytes(path.parent))} free "
                f"in {path.parent}); the previous checkpoints are intact: free space there (pre-training keeps "
                f"fewer with --keep N), then run the same command again")
    return (f"could not write checkpoint {path} ({reason}); the previous one is intact: fix the folder or pass "
            f"another --save-dir, then resume")


ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default (zip) format
LEGACY_MAGIC = b"\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")  # its legacy format's first pickle


def load(path: str | Path, trust: bool = False) -> dict:
    """Read a checkpoint on the CPU with ``weights_only=True``; with ``trust``, allow full unpickling.

    Raises :class:`UserError` for a missing, unreadable or unsafe file, naming which of these it is.
    """
    path = Path(path)
    if path.is_dir():
        raise UserError(f"checkpoint {path} is a directory: pass a checkpoint file in it, e.g. {path / LAST}")
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist: check the path")
    with open(path, "rb") as f:
        head = f.read(32)
    if not head:
        raise UserError(f"checkpoint {path} is empty (0 bytes): an interrupted copy or save; use another file")
    if not (head.startswith(ZIP_MAGIC) or (head.startswith(b"\x80") and LEGACY_MAGIC in head)):
        raise UserError(f"{path} is not a PyTorch checkpoint (torch.save writes a zip archive or its legacy "
                        f"format; this file is neither): check the path")
    try:
        obj = _torch_load(path, weights_only=True)
    except pickle.UnpicklingError as e:
        # A well-formed file beyond the weights-only subset: Python objects, or pickle opcodes it lacks.
        if not trust:
            blocked = next((line.strip() for line in str(e).splitlines() if "GLOBAL" in line), None) or _reason(e)
            raise UserError(f"checkpoint {path} holds more than plain tensors ({blocked}) and needs "
                            f"--trust-checkpoint (only for files you trust: unpickling can run code)") from None
        try:
            obj = _torch_load(path, weights_only=False)
        except Exception as e2:
            raise UserError(f"checkpoint {path} is corrupt ({type(e2).__name__}: {first_line(e2)})") from None
    except Exception as e:  # a truncated zip or pickle stream fails in many ways (KeyError, EOFError, ...)
        raise UserError(f"checkpoint {path} is truncated or corrupt ({type(e).__name__}: {first_line(e)})") from None
    if not isinstance(obj, dict):
        raise UserError(f"checkpoint {path} holds a {type(obj).__name__}, not a dict of weights")
    return obj


def _torch_load(path: Path, weights_only: bool) -> Any:
    """``torch.load`` on the CPU, its warnings (e.g. about the pickle protocol) kept quiet: errors say enough."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.load(path, map_location="cpu", weights_only=weights_only)


def _reason(e: pickle.UnpicklingError) -> str:
    """The specific line of a weights-only unpickling error (torch puts generic advice first)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    for i, line in enumerate(lines[:-1]):
        if line.startswith("WeightsUnpickler error"):
            return lines[i + 1]
    return lines[-1] if lines else type(e).__name__



def kind(ckpt: dict) -> str:
    """What a loaded checkpoint is, in words: ``a pre-training checkpoint``, ``a linear-probe checkpoint …``,
    ``an exported trunk …``, ``a detector checkpoint …`` or ``a dict with keys …``."""
    weights = ckpt.get("state_dict")
    names = [k.removeprefix("module.") for k in weights] if isinstance(weights, dict) else []
    if "best_acc1" in ckpt or (names and any(k.startswith("fc.") for k in names)
                               and not any(k.startswith("base_encoder.") for k in names)):
        return "a linear-probe checkpoint (main_lincls.py)"
    if any(k.startswith("base_encoder.") for k in names):
        return "a pre-training checkpoint"
    if isinstance(ckpt.get("model"), dict) and "iter" in ckpt:
        return "a detector checkpoint (finetune_torchvision.py)"
    if ckpt and all(isinstance(v, Tensor) for v in ckpt.values()):
        return "an exported trunk (a plain dict of tensors, no training state)"
    return f"a dict with keys {key_list(sorted(map(str, ckpt)))}"


def load_into(module: torch.nn.Module, weights: dict[str, Tensor], path: str | Path, fits: str) -> None:
    """``module.load_state_dict(weights)``; a mismatch says that checkpoint ``path`` does not fit ``fits``,
    naming a few of the keys concerned (never all of them)."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    wrong = [k for k in expected if k in weights and isinstance(weights[k], Tensor)
             and weights[k].shape != expected[k].shape]
    problems = ([f"missing {key_list(missing)}"] if missing else []) \
        + ([f"unexpected {key_list(unexpected)}"] if unexpected else []) \
        + ([f"shape of {wrong[0]} is {tuple(weights[wrong[0]].shape)}, expected {tuple(expected[wrong[0]].shape)}"]
           if wrong else [])
    if problems:
        raise UserError(f"checkpoint {path} does not fit {fits}: {'; '.join(problems)}")
    try:
        module.load_state_dict(weights)
    except RuntimeError as e:
        raise UserError(f"checkpoint {path} does not fit {fits}: {first_line(e)[:200]}") from None


def first_line(e: BaseException) -> str:
    """The first line of an exception's message, cut to its first sentence when long (torch's are)."""
    text = str(e).strip()
    line = text.splitlines()[0] if text else type(e).__name__
    return line.split(". ")[0] if len(line) > 120 else line


def candidates(save_dir: str | Path) -> list[Path]:
    """Checkpoints in ``save_dir``, newest first (modification time, then name)."""
    files = [p for p in Path(save_dir).glob("checkpoint_*.pth.tar") if p.is_file()]
    return sorted(files, key=lambda p: (p.stat().st_mtime_ns, p.name), reverse=True)


def find_resumable(save_dir: str | Path, trust: bool = False,
                   warn: Callable[[str], None] = warnings.warn) -> tuple[Path, dict] | None:
    """The newest pre-training checkpoint in ``save_dir`` that loads; each one skipped is warned about,
    saying which file is tried next, so that a skip is never mistaken for a fresh start."""
    files = candidates(save_dir)
    for i, path in enumerate(files):
        try:
            ckpt = load(path, trust)
            problem = None if "state_dict" in ckpt and "epoch" in ckpt else f"it is {kind(ckpt)}"
        except UserError as e:
            problem = str(e)
        if problem is None:
            return path, ckpt
        following = f"trying {files[i + 1].name}" if i + 1 < len(files) else "no older checkpoint left"
        warn(f"skipping {path}: {problem}; {following}")
    return None


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes (names exactly which checkpoint a probe was trained on)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
    found = kind(ckpt)
    if found != "a pre-training checkpoint":
        raise UserError(f"--resume {path} is {found}, not a pre-training checkpoint: pass one of main_moco.py's "
                        f"checkpoint_*.pth.tar (or --resume auto)")
    missing = [k for k in ("epoch", "optimizer") if k not in ckpt]
    if missing:
        raise UserError(f"--resume {path} is a pre-training checkpoint without {' or '.join(missing)}, so training "
                        f"cannot continue from it: pass it to the probe or the exporter, or start anew")
    return ckpt


def prune(save_dir: str | Path, keep: int) -> None:
    """Keep the ``keep`` newest epoch checkpoints (``keep <= 0``: keep all)."""
    if keep <= 0:
        return
    epochs = sorted(p for p in Path(save_dir).glob("checkpoint_[0-9][0-9][0-9][0-9].pth.tar"))
    for old in epochs[:-keep]:
        old.unlink(missing_ok=True)
