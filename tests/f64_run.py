"""Test-only launcher: ``main_moco.py`` in float64 end to end (weights, activations, the optimiser), to show
that one process and two compute the same run up to float64 rounding. The PIL pipeline's tiles are made
float64 as they reach the model; nothing in the production code changes.

    python -m tests.f64_run MAIN_MOCO_ARGS...   (from the repository root; or under torchrun -m)
"""
from __future__ import annotations

import torch

import main_moco
from w2ssl.cli import with_error_boundary
from w2ssl.train.pretrain import Pretrainer

if __name__ == "__main__":
    torch.set_default_dtype(torch.float64)
    views = Pretrainer._views

    def double_views(self: Pretrainer, batch: object) -> tuple[list[torch.Tensor], list[str]]:
        tiles, bad = views(self, batch)
        return [t.double() for t in tiles], bad

    Pretrainer._views = double_views
    with_error_boundary(main_moco.main)()
