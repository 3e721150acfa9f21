"""Backbones that map images to feature maps, built by name through the registry (:mod:`.registry`).

Adding a backbone is one module that calls :func:`register_trunk` with its :class:`Family`, imported here,
plus its tests.
"""
from w2ssl.trunks import resnet, timm_cnn, vit  # noqa: F401  (importing them registers their trunks)
from w2ssl.trunks.registry import (
    Export,
    Family,
    HeadDepths,
    Readout,
    TrunkSpec,
    average_map,
    build_trunk,
    readout_names,
    register_trunk,
    trunk_names,
    trunk_shapes,
    trunk_spec,
)

__all__ = ["Export", "Family", "HeadDepths", "Readout", "TrunkSpec", "average_map", "build_trunk", "readout_names",
           "register_trunk", "trunk_names", "trunk_shapes", "trunk_spec"]
