"""The trunk registry: names, families, feature-map trunks, shapes on the meta device, bad names."""
from __future__ import annotations

import pytest
import torch
import torchvision

from w2ssl.trunks import Family, build_trunk, register_trunk, registry, trunk_names, trunk_shapes, trunk_spec
from w2ssl.trunks.resnet import RESNET


def test_resnets_are_registered_as_feature_map_trunks():
    assert trunk_names("resnet") == ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnet18_cifar",
                                     "resnet34_cifar", "resnet50_cifar")
    trunk = build_trunk("resnet18").eval()
    out = trunk(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, trunk.num_features, 2, 2) and trunk.num_features == 512


def test_shapes_are_torchvision_keys_without_fc():
    expected = {k: tuple(v.shape) for k, v in torchvision.models.resnet50().state_dict().items()
                if not k.startswith("fc.")}
    assert trunk_shapes("resnet50") == expected


def test_registering_a_trunk_is_one_decorator(monkeypatch):
    monkeypatch.setattr(registry, "_TRUNKS", dict(registry._TRUNKS))

    @register_trunk("tiny_cnn", RESNET)
    def tiny_cnn(**_options) -> torch.nn.Module:
        net = torch.nn.Conv2d(3, 8, 4, stride=4)
        net.num_features = 8
        return net

    assert trunk_spec("tiny_cnn").family is RESNET and "tiny_cnn" in trunk_names()
    assert build_trunk("tiny_cnn")(torch.zeros(1, 3, 16, 16)).shape == (1, 8, 4, 4)
    with pytest.raises(ValueError, match="already registered"):
        register_trunk("tiny_cnn", RESNET)(tiny_cnn)


def test_unknown_names_and_families_are_refused():
    with pytest.raises(ValueError, match="unknown trunk 'resnet7'.*resnet18"):
        build_trunk("resnet7")
    with pytest.raises(TypeError, match="family must be a Family, got str"):
        register_trunk("x", "mlp")
    with pytest.raises(ValueError, match="needs an 'avg' read-out"):
        Family("mlp", readouts={}, exports={})
    with pytest.raises(ValueError, match="resnet trunks have no 'cls' read-out; choose one of avg"):
        RESNET.readout("cls")
