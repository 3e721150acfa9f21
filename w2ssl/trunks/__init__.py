"""Backbones that map images to feature maps, built by name through the registry (:mod:`.registry`).

Adding a backbone is one module that calls :func:`register_trunk`, imported here, plus its tests.
"""
from w2ssl.trunks import resnet, vit  # noqa: F401  (importing them registers their trunks)
from w2ssl.trunks.registry import (
    FAMILIES,
    TrunkSpec,
    build_trunk,
    register_trunk,
    trunk_names,
    trunk_shapes,
    trunk_spec,
)

__all__ = ["FAMILIES", "TrunkSpec", "build_trunk", "register_trunk", "trunk_names", "trunk_shapes", "trunk_spec"]
