"""The method registry: a name (``--method``) -> what the trainer needs to run that method.

A method supplies its model (from the run's arguments and a trunk builder), its per-sample data
transform, how a batch on the device becomes the model's inputs, and its console line. The model's
``forward(**inputs, m=momentum)`` returns ``{"loss": ..., **named detached scalars}``; the trainer
steps on ``loss`` and the monitor logs every scalar (names ending in ``_acc`` as percentages).
Adding a method is one module that calls :func:`register_method`, listed in :data:`BUILTIN`, plus its tests.
"""
from __future__ import annotations

import functools
import importlib
from argparse import Namespace
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from w2ssl.trunks import build_trunk, trunk_spec

# imported at the first look-up: they register
BUILTIN = ("w2ssl.methods.w2ssl", "w2ssl.methods.mocov3", "w2ssl.methods.byol")

TrunkBuilder = Callable[..., nn.Module]  # keyword options (e.g. zero_init_residual) -> a new trunk


@dataclass(frozen=True)
class StepKey:
    """Where a batch is in the run: the random draws of a step depend on these alone (every process
    computes the same ones); ``world`` processes each hold ``1 / world`` of the batch."""

    seed: int
    epoch: int
    iteration: int
    world: int


@dataclass(frozen=True)
class Method:
    """A registered method.

    * ``build(args, trunk, family)``: the model; ``trunk(**options)`` builds a new trunk of ``--arch``,
      ``family`` is its :func:`~w2ssl.trunks.registry.trunk_spec` family (``"resnet"`` or ``"vit"``).
    * ``transform(args)``: PIL image -> sample (a list of ``[3, s, s]`` tensors, collated per position):
      the reference pipeline, ``--cpu-aug pil``.
    * ``fast_transform(args)``: the same views batched on the CPU, ``--cpu-aug fast`` (the default;
      ``w2ssl.data.fast_augment.FastViews``), or None if the method has none (then ``transform`` runs).
    * ``inputs(views, key)``: the collated sample tensors on the device -> ``forward``'s keyword inputs.
    * ``check_batch(batch_size, world)``: raise :class:`~w2ssl.errors.UserError` for a batch it cannot split.
    * ``input_size(tile)``: the side of the images the trunk sees for ``--tile-size`` (for checks).
    * ``min_map``: the smallest side of the trunk's feature map at which the method can learn (W2SSL: 2,
      one cell per tile); smaller maps get a warning before the run.
    * ``gpu_transform(args)``: the ``--gpu-aug`` device transform (``w2ssl.data.gpu_augment``), or None if
      the method has none.
    * ``console(current, average)``: the method's fields of the console line (None: every scalar).
    * ``preview(views, epoch)``: tag -> normalised images ``[n, 3, h, w]`` shown in TensorBoard.
    """

    name: str
    build: Callable[[Namespace, TrunkBuilder, str], nn.Module]
    transform: Callable[[Namespace], Callable[[Any], list[Tensor]]]
    inputs: Callable[[list[Tensor], StepKey], dict[str, Any]]
    check_batch: Callable[[int, int], None]
    input_size: Callable[[int], int]
    min_map: int = 1
    fast_transform: Callable[[Namespace], Any] | None = None
    gpu_transform: Callable[[Namespace], nn.Module] | None = None
    console: Callable[[dict[str, float], dict[str, float]], str] | None = None
    preview: Callable[[list[Tensor], int], dict[str, Tensor]] | None = None


_METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Register ``method`` under its name (unique); returns it."""
    if method.name in _METHODS:
        raise ValueError(f"method {method.name!r} is already registered")
    _METHODS[method.name] = method
    return method


def _load_builtin() -> None:
    for module in BUILTIN:
        importlib.import_module(module)


def method_names() -> tuple[str, ...]:
    """Registered names in registration order (the built-in methods first)."""
    _load_builtin()
    return tuple(_METHODS)


def method_spec(name: str) -> Method:
    _load_builtin()
    if name not in _METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(_METHODS)}")
    return _METHODS[name]


def build_model(args: Namespace) -> nn.Module:
    """The model of ``args.method`` on the trunk ``args.arch`` (``--stop-grad-conv1`` passed to a ViT's builder)."""
    options = {"stop_grad_conv1": True} if args.stop_grad_conv1 else {}
    return method_spec(args.method).build(args, functools.partial(build_trunk, args.arch, **options),
                                          trunk_spec(args.arch).family)
