"""The trunk registry: a name (``--arch``) -> how to build that backbone, as timm's model registry.

A trunk is a module with ``num_features`` (``C``) whose ``forward`` maps images ``[B, 3, H, W]`` to a
feature map ``[B, C, h, w]``. Its state dict uses the key names of the library the architecture comes
from (torchvision for ResNets, timm for ViTs), so that exported weights load there unchanged. Methods
read the map their own way (W2SSL: 2x2 grid pooling; MoCo v3 and evaluation: global average).
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

FAMILIES = ("resnet", "vit")


@dataclass(frozen=True)
class TrunkSpec:
    """A registered trunk: ``build(**options) -> nn.Module``; ``family`` says which heads and which recipe
    the methods pair with it (MoCo v3 builds different MLPs and optimisers for ResNets and ViTs)."""

    name: str
    family: str
    build: Callable[..., nn.Module]


_TRUNKS: dict[str, TrunkSpec] = {}


def register_trunk(name: str, family: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: register ``build`` under ``name``. Names are unique; ``family`` is one of :data:`FAMILIES`."""
    if family not in FAMILIES:
        raise ValueError(f"unknown trunk family {family!r}; choose one of {', '.join(FAMILIES)}")

    def add(build: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _TRUNKS:
            raise ValueError(f"trunk {name!r} is already registered")
        _TRUNKS[name] = TrunkSpec(name, family, build)
        return build
    return add


def trunk_names(family: str | None = None) -> tuple[str, ...]:
    """Registered names in registration order, all or those of one ``family``."""
    return tuple(name for name, spec in _TRUNKS.items() if family in (None, spec.family))


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
