"""Safe checkpoint reads: on the CPU, weights-only unless trusted (unpickling can run code), with one line
saying whether a file is missing, empty, not PyTorch's, truncated, or holds more than tensors."""
from __future__ import annotations

import hashlib
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch

from w2ssl.checkpoint.run_folder import LAST
from w2ssl.errors import UserError

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


def first_line(e: BaseException) -> str:
    """The first line of an exception's message, cut to its first sentence when long (torch's are)."""
    text = str(e).strip()
    line = text.splitlines()[0] if text else type(e).__name__
    return line.split(". ")[0] if len(line) > 120 else line


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes (names exactly which checkpoint a probe was trained on)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
