"""Mixed precision and the one optimiser step every training loop takes.

Precision names and their defaults live here once; :class:`TrainStep` runs a step (learning rate,
zeroed gradients, forward under autocast, scaled backward, optimiser, scaler update) for pre-training,
the linear probe, the step benchmark and detection fine-tuning alike.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import torch
from torch import Tensor

from w2ssl.engine.optim import set_lr, set_weight_decay
from w2ssl.errors import UserError

# Autocast dtype per ``--precision``; ``None`` means plain float32.
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}

Out = TypeVar("Out")


def check_precision(precision: str) -> torch.dtype | None:
    """The autocast dtype of ``precision`` (a key of :data:`PRECISIONS`); ``UserError`` for another name."""
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    return PRECISIONS[precision]


def resolve_precision(name: str | None, device: torch.device) -> str:
    """``name`` if given; else bf16 on GPUs that support it, fp16 on other GPUs, fp32 on CPU."""
    if name:
        check_precision(name)
        return name
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The autocast context for ``precision`` on ``device`` (none for fp32)."""
    dtype = check_precision(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def loss_of(outputs: Any) -> Tensor:
    """The loss in a model's outputs: the ``"loss"`` entry of a mapping, or the tensor itself."""
    return outputs["loss"] if isinstance(outputs, Mapping) else outputs


class TrainStep:
    """One optimiser step of ``optimizer`` in ``precision`` on ``device``.

    fp16 scales the loss (its range needs it: a ``GradScaler`` that skips a step with a non-finite
    gradient and halves its scale); bf16 and fp32 use a disabled scaler, which changes nothing, so
    :attr:`scaler` can always be checkpointed. ``zero_grad_first`` frees the old gradients before the
    forward (lower peak memory) instead of after it. ``clip_grad`` > 0 clips the gradients' global L2
    norm to it before the step (``--clip-grad``; 0: no clipping, as published).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, device: torch.device, precision: str,
                 zero_grad_first: bool = False, clip_grad: float = 0.0):
        self.optimizer, self.device, self.precision = optimizer, device, precision
        self.scaler = torch.amp.GradScaler(device.type, enabled=check_precision(precision) == torch.float16)
        self.zero_grad_first, self.clip_grad = zero_grad_first, clip_grad

    def __call__(self, forward: Callable[[], Out], lr: float | None = None,
                 loss: Callable[[Out], Tensor] = loss_of, weight_decay: float | None = None,
                 after_backward: Callable[[], None] | None = None) -> Out:
        """Run ``forward()`` under autocast, back-propagate ``loss(outputs)`` and step; return the outputs.

        ``loss`` runs outside autocast, before any gradient is touched: an exception there leaves the
        model and optimiser as they were. ``lr`` and ``weight_decay`` (if given) are set on every parameter
        group first. ``after_backward()`` runs between the backward and the step, on unscaled gradients
        (before the clipping), e.g. to cancel some gradients.
        """
        if lr is not None:
            set_lr(self.optimizer, lr)
        if weight_decay is not None:
            set_weight_decay(self.optimizer, weight_decay)
        if self.zero_grad_first:
            self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device, self.precision):
            outputs = forward()
        total = loss(outputs)
        if not self.zero_grad_first:
            self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        if after_backward is not None or self.clip_grad:
            self.scaler.unscale_(self.optimizer)  # a no-op unless fp16: hooks and the clip see true gradients
            if after_backward is not None:
                after_backward()
            if self.clip_grad:
                params = [p for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
                torch.nn.utils.clip_grad_norm_(params, self.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return outputs
