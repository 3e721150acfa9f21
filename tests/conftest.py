"""Fixtures: tiny JPEG ImageFolders written on the fly (no downloads)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

# One intra-op thread for every in-process test (children get OMP_NUM_THREADS=1 from helpers.cpu_env): the
# tensors are tiny and the machines small and shared, where a second thread mostly spin-waits for a core that
# another process holds (measured under load: 1.5-3x the wall time of one thread).
torch.set_num_threads(1)


def write_folder(root: Path, classes: int = 3, per_class: int = 8, size: tuple[int, int] = (48, 36),
                 seed: int = 0) -> Path:
    """``root/<class>/<i>.jpg``: each class a distinct colour pattern plus noise."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        d = root / f"class{c}"
        d.mkdir(parents=True, exist_ok=True)
        base = rng.integers(0, 256, size=3)
        for i in range(per_class):
            w, h = size
            xx = np.linspace(0, 1, w)[None, :, None]
            img = base * (0.5 + 0.5 * np.sin(xx * (c + 1) * 6)) + rng.normal(0, 20, (h, w, 3))
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(d / f"{i}.jpg", quality=85)
    return root


@pytest.fixture(scope="session")
def image_root(tmp_path_factory) -> Path:
    """``DATA/train`` (24 images, 3 classes) and ``DATA/val`` (12 images)."""
    root = tmp_path_factory.mktemp("data")
    write_folder(root / "train", per_class=8, seed=0)
    write_folder(root / "val", per_class=4, seed=1)
    return root
