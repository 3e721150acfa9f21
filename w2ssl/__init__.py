"""W2SSL: learning what and where to learn, in PyTorch.

The names below load on first use, so ``import w2ssl.errors`` (or any leaf module) does not import torch
and the whole model.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {"W2SSL": "w2ssl.methods.w2ssl", "grid_pool": "w2ssl.methods.gridpool", "supcon_loss": "w2ssl.losses.supcon",
            "assemble": "w2ssl.methods.montage", "split_grid": "w2ssl.methods.montage",
            "tile_labels": "w2ssl.methods.montage"}

__all__ = list(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'w2ssl' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
