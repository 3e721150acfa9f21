"""Per-step schedules as values (METHOD §6): what a method declares and the trainer applies at every step (DINO's
precomputed schedules, here as curves of the fractional epoch ``t = epoch + iteration / iterations``).

The learning rate and weight decay go to the optimiser's groups (times a group's ``lr_scale`` /
``wd_scale``); every ``forward`` curve is passed to the model's ``forward`` under its name (MoCo v3's EMA
momentum ``m``; a DINO teacher temperature would be one more), and logged under ``names`` (default: its own).
"""
from __future__ import annotations

import math
from argparse import Namespace
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

Curve = Callable[[float], float]  # fractional epoch -> value


def lr_at(epoch: float, lr: float, warmup_epochs: float, epochs: float) -> float:
    """Linear warm-up from 0 over ``warmup_epochs``, then half-cosine to 0 at ``epochs``."""
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    return lr * 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup_epochs) / (epochs - warmup_epochs)))


def momentum_at(epoch: float, epochs: float, base_m: float, cosine: bool) -> float:
    """EMA coefficient: ``1 − ½(1 + cos(π·t/epochs))(1 − base_m)`` with ``cosine``, else ``base_m``."""
    if not cosine:
        return base_m
    return 1.0 - 0.5 * (1.0 + math.cos(math.pi * epoch / epochs)) * (1.0 - base_m)


def cosine(start: float, end: float, epochs: float) -> Curve:
    """``end + ½(start − end)(1 + cos(π·t/epochs))``: ``start`` at 0, ``end`` at ``epochs`` (DINO's
    ``cosine_scheduler`` without warm-up, e.g. a weight decay rising from 0.04 to 0.4)."""
    return lambda t: end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * t / epochs))


@dataclass(frozen=True)
class Schedules:
    """``lr(t)``; ``weight_decay(t)`` or None (each group keeps its constant decay); ``forward``: name ->
    curve, the model's scheduled keyword inputs; ``names``: the logged name of a forward value."""

    lr: Curve
    weight_decay: Curve | None = None
    forward: Mapping[str, Curve] = field(default_factory=lambda: MappingProxyType({}))
    names: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))

    def inputs(self, t: float) -> dict[str, float]:
        """The model's scheduled keyword inputs at ``t``."""
        return {name: curve(t) for name, curve in self.forward.items()}

    def logged(self, lr: float, weight_decay: float | None, inputs: Mapping[str, float]) -> dict[str, float]:
        """What the monitor records for one step: ``lr``, ``weight_decay`` when scheduled, the inputs by log name."""
        wd = {} if weight_decay is None else {"weight_decay": weight_decay}
        return {"lr": lr, **wd, **{self.names.get(k, k): v for k, v in inputs.items()}}


def standard(args: Namespace, lr: float) -> Schedules:
    """A method's schedules unless it declares its own: linear warm-up over ``--warmup-epochs`` to ``lr``,
    then a half-cosine to 0 at ``--epochs`` (METHOD §6); a constant weight decay; no scheduled inputs."""
    return Schedules(lr=lambda t: lr_at(t, lr, args.warmup_epochs, args.epochs))
