"""Atomic checkpoint writes: a temporary file beside the target, fsynced, renamed over it; extra names are
hard links to the same bytes. A crash or a full disk leaves the previous file intact."""
from __future__ import annotations

import errno
import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch

from w2ssl.errors import UserError
from w2ssl.system.disk import format_bytes, free_bytes


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
