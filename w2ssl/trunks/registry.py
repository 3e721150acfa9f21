"""The trunk registry: a name (``--arch``) -> how to build that backbone and what goes with it, as timm's registry.

A trunk is a module with ``num_features`` (``C``) whose ``forward`` maps images ``[B, 3, H, W]`` to a
feature map ``[B, C, h, w]``. Its state dict uses the key names of the library the architecture comes
from (torchvision for ResNets, timm for ViTs and timm CNNs), so that exported weights load there unchanged.

What differs between kinds of trunk lives in one :class:`Family` value, declared next to the builders:
how to read one vector per image, the depths of MoCo v3's heads for it, its default pre-training and
fine-tuning recipes, its layer-wise decay and drop path, and its export targets. The rest of the code
asks the family, never a name, so a new kind of trunk is one module.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor, nn

Readout = Callable[[nn.Module, Tensor], Tensor]  # (trunk, images [B, 3, H, W]) -> one vector per image [B, C]
StateDict = dict[str, Tensor]


def average_map(trunk: nn.Module, x: Tensor) -> Tensor:
    """The trunk's feature map averaged over ``h, w``: ``[B, 3, H, W] -> [B, C]`` (torchvision's ``avgpool``)."""
    return trunk(x).mean(dim=(2, 3))


@dataclass(frozen=True)
class HeadDepths:
    """MoCo v3's MLP heads for a kind of trunk (METHOD §4, §11): ``projector_layers`` Linear layers, and
    whether the predictor ends in a BatchNorm without scale or shift (ResNets: 2 and no; ViTs: 3 and yes)."""

    projector_layers: int = 2
    predictor_last_bn: bool = False


@dataclass(frozen=True)
class Export:
    """One export target (``python -m w2ssl.export --to <name>``): ``convert(trunk_state, arch)`` gives the
    weights in that library's names, ``hint(arch)`` says how to load them there."""

    convert: Callable[[StateDict, str], StateDict]
    hint: Callable[[str], str]


def _frozen(mapping: Mapping[str, Any] | None = None) -> Mapping[str, Any]:
    return MappingProxyType(dict(mapping or {}))


@dataclass(frozen=True, eq=False)
class Family:
    """What a kind of trunk brings besides its builder.

    * ``readouts``: name -> :data:`Readout`; ``"avg"`` always (the probe's and kNN's default), ``"cls"``
      for trunks with a class token (``--vit-feature cls``; MoCo v3 reads it where there is one).
    * ``heads``: MoCo v3's projector/predictor depths for this kind of trunk.
    * ``exports``: target name -> :class:`Export`.
    * ``zero_init``: the builder options that start each residual branch at zero (MoCo v3 asks for them).
    * ``pretrain_recipe`` / ``finetune_recipe``: defaults of ``main_moco.py`` / ``main_finetune.py`` flags
      (``dest`` names) for this kind of trunk, under the config file's and the command line's values.
    * ``layer_depth(trunk)``: the block count for layer-wise lr decay, or None if the trunk has no blocks
      (``--layer-decay`` is refused); ``drop_path``: whether the builder takes ``drop_path_rate``.
    """

    name: str
    readouts: Mapping[str, Readout]
    exports: Mapping[str, Export]
    heads: HeadDepths = HeadDepths()
    zero_init: Mapping[str, Any] = field(default_factory=_frozen)
    pretrain_recipe: Mapping[str, Any] = field(default_factory=_frozen)
    finetune_recipe: Mapping[str, Any] = field(default_factory=_frozen)
    layer_depth: Callable[[nn.Module], int] | None = None
    drop_path: bool = False

    def __post_init__(self) -> None:
        if "avg" not in self.readouts:
            raise ValueError(f"trunk family {self.name!r} needs an 'avg' read-out")
        for name in ("readouts", "exports", "zero_init", "pretrain_recipe", "finetune_recipe"):
            object.__setattr__(self, name, _frozen(getattr(self, name)))

    def readout(self, mode: str = "avg") -> Readout:
        if mode not in self.readouts:
            raise ValueError(f"{self.name} trunks have no {mode!r} read-out; choose one of {', '.join(self.readouts)}")
        return self.readouts[mode]


@dataclass(frozen=True)
class TrunkSpec:
    """A registered trunk: ``build(**options) -> nn.Module``, its :class:`Family`, and ``switches``: the
    boolean builder options it takes from the command line (e.g. ``stop_grad_conv1``)."""

    name: str
    family: Family
    build: Callable[..., nn.Module]
    switches: frozenset[str] = frozenset()


_TRUNKS: dict[str, TrunkSpec] = {}


def register_trunk(name: str, family: Family, switches: tuple[str, ...] = ()
                   ) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: register ``build`` under ``name`` (unique) in ``family``."""
    if not isinstance(family, Family):
        raise TypeError(f"trunk {name!r}: family must be a Family, got {type(family).__name__}")

    def add(build: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _TRUNKS:
            raise ValueError(f"trunk {name!r} is already registered")
        _TRUNKS[name] = TrunkSpec(name, family, build, frozenset(switches))
        return build
    return add


def trunk_names(family: str | None = None) -> tuple[str, ...]:
    """Registered names in registration order, all or those of the family named ``family``."""
    return tuple(name for name, spec in _TRUNKS.items() if family in (None, spec.family.name))


def readout_names() -> tuple[str, ...]:
    """Every read-out some registered trunk has (``--vit-feature``'s choices), ``"avg"`` first."""
    return tuple(dict.fromkeys(r for spec in _TRUNKS.values() for r in spec.family.readouts))


def trunk_spec(name: str) -> TrunkSpec:
    if name not in _TRUNKS:
        raise ValueError(f"unknown trunk {name!r}; choose one of {', '.join(_TRUNKS)}")
    return _TRUNKS[name]


def build_trunk(name: str, **options) -> nn.Module:
    """The trunk ``name``, built with ``options`` (e.g. ``norm_layer``; ``stop_grad_conv1`` for ViTs)."""
    return trunk_spec(name).build(**options)


def trunk_shapes(name: str) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the trunk's state dict (built on the meta device: no memory, no initialisation)."""
    return _shapes(trunk_spec(name))


@functools.cache  # keyed on the registered spec, not the name: a name registered anew is built anew
def _shapes(spec: TrunkSpec) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        trunk = spec.build()
    return {k: tuple(v.shape) for k, v in trunk.state_dict().items()}
