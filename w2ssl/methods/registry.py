"""The method registry: a name (``--method``) -> what the trainer needs to run that method.

A method supplies its model (an :class:`~w2ssl.methods.base.SSLModel`, from the run's arguments and a
trunk builder), its per-sample data transform, how a batch on the device becomes the model's inputs, its
schedules, its own command-line arguments and defaults, and its console line. The model's
``forward(**inputs, **scheduled values)`` returns ``{"loss": ..., **named detached scalars}``; the trainer
steps on ``loss`` and the monitor logs every scalar (names ending in ``_acc`` as percentages).
Adding a method is one module that calls :func:`register_method`, listed in :data:`BUILTIN`, plus its tests.
"""
from __future__ import annotations

import functools
import importlib
from argparse import Namespace, _ArgumentGroup
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from torch import Tensor, nn

from w2ssl import schedules as schedules_
from w2ssl.schedules import Schedules
from w2ssl.trunks import Family, build_trunk, trunk_spec

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


# What a resumed run does with another value of a flag than its checkpoint's (w2ssl.train.resume_args).
REFUSE, KEEP, NEW = "refuse", "keep", "new"


@dataclass(frozen=True, eq=False)  # one value per group: compared and hashed by identity
class Arguments:
    """A group of command-line flags: ``add(group)`` adds them to an argparse group titled ``title``.
    Methods that share flags (the EMA's ``--moco-m``) list the same value, and it is added once.
    ``on_resume``: ``dest`` -> :data:`REFUSE` (another model or state), :data:`KEEP` or :data:`NEW` (a
    deliberate change), for the flags that change the run's trajectory."""

    title: str
    add: Callable[[_ArgumentGroup], None]
    on_resume: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True)
class Method:
    """A registered method.

    * ``build(args, trunk, family)``: the model (an :class:`~w2ssl.methods.base.SSLModel`);
      ``trunk(**options)`` builds a new trunk of ``--arch``, ``family`` is its
      :class:`~w2ssl.trunks.registry.Family` (read-outs, head depths, zero-init options).
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
    * ``schedules(args, lr)``: the run's :class:`~w2ssl.schedules.Schedules` for peak (scaled) ``lr``: the
      learning rate, the weight decay, the model's scheduled inputs (the EMA momentum ``m``).
    * ``arguments``: the method's flag groups (``main_moco.py --help`` shows each once); ``defaults``:
      ``dest`` -> the method's own default of any ``main_moco.py`` flag (its published recipe).
    """

    name: str
    build: Callable[[Namespace, TrunkBuilder, Family], nn.Module]
    transform: Callable[[Namespace], Callable[[Any], list[Tensor]]]
    inputs: Callable[[list[Tensor], StepKey], dict[str, Any]]
    check_batch: Callable[[int, int], None]
    input_size: Callable[[int], int]
    min_map: int = 1
    fast_transform: Callable[[Namespace], Any] | None = None
    gpu_transform: Callable[[Namespace], nn.Module] | None = None
    console: Callable[[dict[str, float], dict[str, float]], str] | None = None
    preview: Callable[[list[Tensor], int], dict[str, Tensor]] | None = None
    schedules: Callable[[Namespace, float], Schedules] = schedules_.standard
    arguments: tuple[Arguments, ...] = ()
    defaults: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))


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
    """Registered names: the built-in methods in :data:`BUILTIN` order (whichever was imported first), then the
    others in registration order."""
    _load_builtin()
    def rank(name: str) -> int:
        module = _METHODS[name].build.__module__
        return BUILTIN.index(module) if module in BUILTIN else len(BUILTIN)
    return tuple(sorted(_METHODS, key=rank))  # sorted is stable: registration order within a rank


def method_spec(name: str) -> Method:
    if name not in method_names():
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(method_names())}")
    return _METHODS[name]


def method_arguments() -> tuple[Arguments, ...]:
    """Every registered method's flag groups, each once, in registration order."""
    return tuple(dict.fromkeys(a for name in method_names() for a in method_spec(name).arguments))


def build_model(args: Namespace) -> nn.Module:
    """The model of ``args.method`` on the trunk ``args.arch``; the trunk's switches that are on in ``args``
    (``--stop-grad-conv1``) go to its builder."""
    spec = trunk_spec(args.arch)
    options = {name: True for name in sorted(spec.switches) if getattr(args, name, False)}
    return method_spec(args.method).build(args, functools.partial(build_trunk, args.arch, **options), spec.family)
