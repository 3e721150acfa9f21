"""Speed options that keep the math: memory format and torch.compile (mixed precision: :mod:`w2ssl.engine.step`).

Shared by the benchmarks and the training entry points, so that both measure and run the same thing.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


def prepare_model(model: nn.Module, channels_last: bool = False, compile: bool = False,
                  compile_children: Sequence[str] | None = None) -> nn.Module:
    """Apply the speed options to ``model`` in place and return it.

    ``channels_last`` stores 4-D weights as NHWC; convolutions then produce NHWC activations from
    NCHW inputs too (cuDNN and oneDNN follow the weight's format). ``compile`` compiles the named
    children in place (``nn.Module.compile``: parameter names and ``state_dict`` keys do not change),
    or the whole model when ``compile_children`` is None. Compiling only the trunks keeps the
    Python-heavy step logic (permutation, gathers, masks of data-dependent size) eager.
    """
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if compile:
        names = [""] if compile_children is None else list(compile_children)
        for name in names:
            model.get_submodule(name).compile()
    return model


def to_memory_format(x: Tensor, channels_last: bool) -> Tensor:
    """An image batch ``[B, C, H, W]`` in NHWC (``channels_last``) or NCHW layout; same values."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return x.contiguous(memory_format=fmt)

