"""Checkpoint I/O: atomic saves, safe loads, resume discovery, and trunk extraction.

Our pre-training checkpoints hold ``state_dict`` with trunk keys ``base_encoder.<torchvision key>``.
The authors' W2SSL checkpoints and MoCo v3's use ``module.base_encoder.<key>`` plus heads
(``fc``, ``fc_crop``, ``fc_loc``); all three yield the same torchvision trunk here.
"""
from __future__ import annotations

import errno
import os
import pickle
import secrets
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch
import torchvision
from torch import Tensor

from .disk import format_bytes, free_bytes
from .encoder import TRUNK_LAYERS
from .errors import UserError

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


def load(path: str | Path, trust: bool = False) -> dict:
    """Read a checkpoint on the CPU with ``weights_only=True``; with ``trust``, allow full unpickling.

    Raises :class:`UserError` for a missing, unreadable or unsafe file.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist: check the path")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        blocked = next((line.strip() for line in str(e).splitlines() if "GLOBAL" in line), None)
        if blocked is None:
            raise UserError(f"checkpoint {path} is truncated or corrupt ({first_line(e)})") from None
        if not trust:
            raise UserError(f"checkpoint {path} needs arbitrary unpickling, which can run code ({blocked}); "
                            f"pass --trust-checkpoint only if you trust its source") from None
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e2:
            raise UserError(f"checkpoint {path} is corrupt ({type(e2).__name__}: {first_line(e2)})") from None
    except Exception as e:  # a truncated zip or pickle stream fails in many ways (KeyError, EOFError, ...)
        raise UserError(f"checkpoint {path} is truncated or corrupt ({type(e).__name__}: {first_line(e)})") from None
    if not isinstance(obj, dict):
        raise UserError(f"checkpoint {path} holds a {type(obj).__name__}, not a dict of weights")
    return obj


def load_into(module: torch.nn.Module, weights: dict[str, Tensor], path: str | Path, fits: str) -> None:
    """``module.load_state_dict(weights)``; a mismatch says that checkpoint ``path`` does not fit ``fits``."""
    try:
        module.load_state_dict(weights)
    except RuntimeError as e:
        # torch's message is a header line, then one line per problem: name the first problem.
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        raise UserError(f"checkpoint {path} does not fit {fits}: {lines[min(1, len(lines) - 1)]}") from None


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def candidates(save_dir: str | Path) -> list[Path]:
    """Checkpoints in ``save_dir``, newest first (modification time, then name)."""
    files = [p for p in Path(save_dir).glob("checkpoint_*.pth.tar") if p.is_file()]
    return sorted(files, key=lambda p: (p.stat().st_mtime_ns, p.name), reverse=True)


def find_resumable(save_dir: str | Path, trust: bool = False,
                   warn: Callable[[str], None] = warnings.warn) -> tuple[Path, dict] | None:
    """The newest checkpoint in ``save_dir`` that loads, skipping bad ones with a warning."""
    for path in candidates(save_dir):
        try:
            ckpt = load(path, trust)
        except UserError as e:
            warn(f"skipping {path}: {e}")
            continue
        if "state_dict" in ckpt and "epoch" in ckpt:
            return path, ckpt
        warn(f"skipping {path}: not a pre-training checkpoint")
    return None


def prune(save_dir: str | Path, keep: int) -> None:
    """Keep the ``keep`` newest epoch checkpoints (``keep <= 0``: keep all)."""
    if keep <= 0:
        return
    epochs = sorted(p for p in Path(save_dir).glob("checkpoint_[0-9][0-9][0-9][0-9].pth.tar"))
    for old in epochs[:-keep]:
        old.unlink(missing_ok=True)


def _model_weights(ckpt: dict) -> dict[str, Tensor]:
    for key in ("state_dict", "model"):
        if isinstance(ckpt.get(key), dict):
            return ckpt[key]
    if ckpt and all(isinstance(v, Tensor) for v in ckpt.values()):
        return ckpt
    raise UserError(f"no weights found: top-level keys are {sorted(ckpt)[:8]}")


def extract_trunk(ckpt: dict) -> dict[str, Tensor]:
    """torchvision-named trunk weights (no ``fc``) from our, the authors' or MoCo v3's checkpoint."""
    weights = _model_weights(ckpt)
    trunk = {}
    for key, value in weights.items():
        key = key.removeprefix("module.")
        if not key.startswith("base_encoder."):
            continue
        key = key.removeprefix("base_encoder.")
        if key.split(".")[0] in TRUNK_LAYERS:
            trunk[key] = value
    if not trunk:
        sample = ", ".join(sorted(weights)[:4])
        kind = "a linear-probe or supervised checkpoint" if any(k.removeprefix("module.").startswith("fc.")
                                                                for k in weights) else "an unknown layout"
        raise UserError(f"no pre-trained trunk (base_encoder.*) in this checkpoint; found {kind} "
                        f"with keys like {sample}: pass a W2SSL, MoCo v3 or w2ssl pre-training checkpoint")
    return trunk


def check_trunk(trunk: dict[str, Tensor], arch: str) -> None:
    """Raise :class:`UserError` unless ``trunk`` is exactly ``arch``'s torchvision trunk."""
    expected = {k: v.shape for k, v in torchvision.models.__dict__[arch]().state_dict().items()
                if not k.startswith("fc.")}
    missing = sorted(set(expected) - set(trunk))
    extra = sorted(set(trunk) - set(expected))
    wrong = sorted(k for k in set(expected) & set(trunk) if tuple(trunk[k].shape) != tuple(expected[k]))
    if missing or extra or wrong:
        detail = (missing[:2] and f"missing {missing[:2]}") or (extra[:2] and f"unexpected {extra[:2]}") \
            or f"shape of {wrong[0]} is {tuple(trunk[wrong[0]].shape)}"
        raise UserError(f"checkpoint trunk does not match --arch {arch} ({detail}): pass the arch it was trained with")


def load_trunk(path: str | Path, arch: str = "resnet50", trust: bool = False) -> dict[str, Tensor]:
    """Load ``path`` and return its ``arch`` trunk with torchvision keys, checked."""
    trunk = extract_trunk(load(path, trust))
    check_trunk(trunk, arch)
    return trunk
