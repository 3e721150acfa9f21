"""Measured training FLOPs per source image of each method: one real step counted by FlopCounterMode.

A step of ``--method`` (its own transform, inputs and model, as main_moco.py builds them) runs forward
and backward on ``BATCH`` random images inside ``torch.utils.flop_counter.FlopCounterMode``, which counts
matrix multiplies and convolutions (not BatchNorm, activations or the optimizer) forward and backward,
per module. "Trunk" is the base encoder (forward + backward) plus the momentum encoder (forward, no
gradient); "model" adds the heads and losses. Supervised: one view of ``2 x tile`` pixels, forward and
backward through the trunk and a linear classifier.
"""
from __future__ import annotations

from argparse import Namespace

import numpy as np
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from bench.quality_supervised import Classifier
from w2ssl.methods.registry import StepKey, build_model, method_spec

BATCH = 4  # source images: the smallest batch both methods accept with two montages/images per BatchNorm
TRUNKS = ("base_encoder", "momentum_encoder")


def _module_total(counts: dict[str, dict], suffix: str) -> int:
    """Sum of FLOPs over the modules whose name (``Model.base_encoder``) ends in ``.suffix``."""
    return sum(sum(ops.values()) for name, ops in counts.items() if name.endswith(f".{suffix}"))


def _images(n: int, size: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def method_gflops(args: Namespace) -> dict[str, float]:
    """``{"trunk": GFLOPs, "model": GFLOPs}`` per source image of one training step of ``args.method``.

    ``args``: main_moco.py's parsed arguments (method, arch, tile size, heads). The model is built and
    run in train mode on the CPU; FLOP counts do not depend on the device or the weights.
    """
    method = method_spec(args.method)
    transform = method.transform(args)
    samples = [transform(img) for img in _images(BATCH, 4 * args.tile_size)]
    views = [torch.stack(parts) for parts in zip(*samples)]
    model = build_model(args).train()
    counter = FlopCounterMode(display=False)
    with counter:
        out = model(**method.inputs(views, StepKey(0, 0, 0, 1)), m=0.99)
        out["loss"].backward()
    counts = counter.get_flop_counts()
    trunk = sum(_module_total(counts, name) for name in TRUNKS)
    return {"trunk": trunk / BATCH / 1e9, "model": counter.get_total_flops() / BATCH / 1e9}


def supervised_gflops(arch: str, size: int, classes: int) -> dict[str, float]:
    """The same dict for a supervised step: one ``size``-pixel view per image, trunk + linear classifier."""
    model = Classifier(arch, classes).train()
    counter = FlopCounterMode(display=False)
    with counter:
        model(torch.randn(BATCH, 3, size, size)).logsumexp(dim=1).sum().backward()
    trunk = _module_total(counter.get_flop_counts(), "base_encoder")
    return {"trunk": trunk / BATCH / 1e9, "model": counter.get_total_flops() / BATCH / 1e9}
