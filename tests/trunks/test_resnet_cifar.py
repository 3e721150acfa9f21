"""The small-image (CIFAR-stem) ResNet trunks: torchvision's layers with a 3x3 stride-1 conv1 and no max-pool."""
from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from main_moco import check_tile_size
from w2ssl.methods.registry import method_spec
from w2ssl.trunks import build_trunk, trunk_shapes, trunk_spec


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_cifar_trunks_are_torchvision_resnets_with_the_small_image_stem(arch):
    trunk = build_trunk(f"{arch}_cifar")
    assert trunk_spec(f"{arch}_cifar").family.name == "resnet"
    assert isinstance(trunk.maxpool, nn.Identity)
    assert (trunk.conv1.kernel_size, trunk.conv1.stride, trunk.conv1.padding) == ((3, 3), (1, 1), (1, 1))
    expected = {k: tuple(v.shape) for k, v in torchvision.models.__dict__[arch]().state_dict().items()
                if not k.startswith("fc.")}
    expected["conv1.weight"] = (64, 3, 3, 3)
    assert trunk_shapes(f"{arch}_cifar") == expected


@pytest.mark.parametrize("arch, side", [("resnet18_cifar", 4), ("resnet50_cifar", 4), ("resnet18", 1)])
def test_a_16px_tile_leaves_w2ssl_a_2x2_cell_per_tile(arch, side):
    """W2SSL's montage of four 16-px tiles is 32 px: the CIFAR stem leaves a 4x4 map (2x2 per tile, >= the
    method's min_map), the ImageNet stem 1x1 (one feature for four tiles)."""
    method = method_spec("w2ssl")
    assert method.input_size(16) == 32 and method.min_map == 2
    with torch.device("meta"):
        trunk = build_trunk(arch).eval()
    assert check_tile_size(16, arch, method.input_size, trunk) == side
    real = build_trunk(arch).eval()
    with torch.no_grad():
        assert real(torch.randn(2, 3, 32, 32)).shape == (2, real.num_features, side, side)
