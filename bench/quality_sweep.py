"""bench/quality.py ``--lr-sweep``: each method's base lr chosen on a validation split of the training images.

The reported val images are never seen: the split holds out ``HOLD_OUT`` of each class's *training*
images (a seeded draw) as its own ``val/``, as links, so nothing is copied. Every kind trains once per lr
(seed 0, the same budget as the final runs) on the rest and is scored by its last-epoch kNN top-1 on the
held-out images; the best lr per kind (ties: the smaller) is then used for all its seeds.
"""
from __future__ import annotations

import os
import random
from collections.abc import Callable
from pathlib import Path

from w2ssl.data.datasets import image_folder
from w2ssl.errors import UserError

HOLD_OUT = 0.2  # of each class's training images
DEFAULT_LRS = (2.0, 8.0, 32.0)


def parse_lrs(text: str) -> list[float]:
    """``--lr-sweep 2,8,32`` -> ``[2.0, 8.0, 32.0]``: at least three positive, distinct base lrs."""
    try:
        lrs = sorted({float(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise UserError(f"--lr-sweep {text!r}: give comma-separated base lrs, e.g. --lr-sweep 2,8,32") from None
    if len(lrs) < 3 or min(lrs) <= 0:
        raise UserError(f"--lr-sweep {text!r}: give at least three distinct positive base lrs, e.g. 2,8,32")
    return lrs


def carve_validation(data: str | Path, out: Path, seed: int = 0) -> Path:
    """``out/{train,val}/<class>/`` linking to ``data/train``: per class, a seeded ``HOLD_OUT`` of the images
    (at least one, and at least one left to train on) in ``val``, the rest in ``train``. Returns ``out``."""
    folder = image_folder(Path(data) / "train")
    by_class: dict[int, list[str]] = {}
    for path, label in folder.samples:
        by_class.setdefault(label, []).append(path)
    for label, paths in by_class.items():
        if len(paths) < 2:
            raise UserError(f"class {folder.classes[label]} has {len(paths)} training image(s): --lr-sweep needs "
                            f"two per class to hold one out")
        held = set(random.Random(f"{seed}-{folder.classes[label]}").sample(paths, max(1, round(HOLD_OUT * len(paths)))))
        if len(held) == len(paths):
            held.pop()
        for path in paths:
            link = out / ("val" if path in held else "train") / folder.classes[label] / Path(path).name
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.exists():
                os.symlink(Path(path).resolve(), link)
    return out


def choose(scores: dict[str, dict[float, float]]) -> dict[str, float]:
    """The best base lr per kind from ``{kind: {lr: kNN top-1}}`` (ties: the smaller lr)."""
    return {kind: max(sorted(by_lr), key=lambda lr: by_lr[lr]) for kind, by_lr in scores.items()}


def sweep(kinds: list[str], lrs: list[float], score: Callable[[str, float], float]) -> dict[str, dict[float, float]]:
    """``{kind: {lr: score(kind, lr)}}`` for every kind and lr (``score`` trains and evaluates one run)."""
    return {kind: {lr: score(kind, lr) for lr in lrs} for kind in kinds}
