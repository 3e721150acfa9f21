"""ResNet trunks (METHOD §3): torchvision ResNets without ``avgpool``/``fc``, registered by name.

The trunk keeps torchvision's parameter names (``conv1``, ``bn1``, ``layer1`` … ``layer4``), so its
state dict loads into ``torchvision.models.<arch>()`` with only ``fc.*`` missing.

``<arch>_cifar``: the small-image stem of the CIFAR ResNets (He et al. 2016 §4.2; SimCLR's and
solo-learn's CIFAR trunks): a 3x3 stride-1 ``conv1`` and no max-pool, so the map is the input / 8
(not / 32): a 32-px montage of 16-px tiles leaves a 4x4 map, 2x2 cells per tile. Its ``conv1`` is
``[64, 3, 3, 3]``; loading it into torchvision needs the same two changes to the model.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from functools import partial

import torch
import torchvision
from torch import Tensor, nn

from w2ssl.errors import UserError
from w2ssl.trunks.registry import Export, Family, StateDict, average_map, register_trunk

ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
CIFAR_ARCHS = ("resnet18", "resnet34", "resnet50")  # registered as resnet18_cifar, ...
TRUNK_LAYERS = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")


class ResNetTrunk(nn.Module):
    """torchvision ResNet without ``avgpool``/``fc``: ``[B, 3, H, W] -> [B, C, H/32, W/32]`` (layer4 output).

    ``zero_init_residual`` is torchvision's (MoCo v3 passes it): each residual branch's last norm starts at 0.
    """

    def __init__(self, arch: str = "resnet50", norm_layer: Callable[[int], nn.Module] | None = None,
                 zero_init_residual: bool = False, small_images: bool = False):
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
        net = torchvision.models.__dict__[arch](norm_layer=norm_layer, zero_init_residual=zero_init_residual)
        if small_images:  # the CIFAR stem: [B, 3, H, W] -> [B, C, H/8, W/8]; initialised as torchvision's conv1
            net.conv1 = nn.Conv2d(3, net.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
            nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
            net.maxpool = nn.Identity()
        for name in TRUNK_LAYERS:
            self.add_module(name, getattr(net, name))
        self.num_features: int = net.fc.in_features

    def forward(self, x: Tensor) -> Tensor:
        for name in TRUNK_LAYERS:
            x = getattr(self, name)(x)
        return x


def to_timm(trunk: StateDict, arch: str) -> StateDict:
    """torchvision-named ResNet trunk -> timm ``arch`` names.

    timm's ResNet keeps torchvision's parameter and buffer names (``conv1``, ``bn1``, ``layer1.0.downsample.0``
    … checked for timm 1.0), so the map is the identity; this verifies it against the installed timm.
    """
    try:
        import timm
    except ImportError as e:
        raise UserError("timm is not installed: pip install timm, or export --to torchvision") from e
    with torch.device("meta"):  # names and shapes only, no memory or init time
        model = timm.create_model(arch, pretrained=False)
    classifier = model.pretrained_cfg.get("classifier", "fc")
    expected = {k: v.shape for k, v in model.state_dict().items() if not k.startswith(f"{classifier}.")}
    differ = sorted(set(expected) ^ set(trunk)) or sorted(k for k in expected if expected[k] != trunk[k].shape)
    if differ:
        raise UserError(f"timm {timm.__version__} names {arch}'s weights differently from torchvision "
                        f"(first difference: {differ[0]}): export --to torchvision and map the keys")
    return dict(trunk)


def _hint(arch: str) -> str:
    return "load with strict=False: only fc.weight and fc.bias are missing"


def _cifar_hint(arch: str) -> str:
    base = arch.removesuffix("_cifar")
    return (f"load into torchvision.models.{base}() after setting conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False) and "
            f"maxpool = nn.Identity(), with strict=False: only fc.weight and fc.bias are missing")


# SimCLR's fine-tuning (appendix B.5): SGD with Nesterov momentum, no decay, no warm-up, 60 epochs
RESNET = Family(
    "resnet", readouts={"avg": average_map},
    exports={"torchvision": Export(lambda trunk, arch: trunk, _hint), "timm": Export(to_timm, _hint)},
    zero_init={"zero_init_residual": True},
    finetune_recipe=dict(optimizer="sgd", lr=0.05, weight_decay=0.0, epochs=60, warmup_epochs=0.0, layer_decay=1.0,
                         drop_path=0.0, smoothing=0.0, mixup=0.0, cutmix=0.0, aa="none", reprob=0.0,
                         head_init_std=0.01))  # SimCLR's supervised head
# The CIFAR stem has no timm counterpart; torchvision takes it with the two changes of the stem.
RESNET_CIFAR = dataclasses.replace(RESNET, exports={"torchvision": Export(lambda trunk, arch: trunk, _cifar_hint)})

for _arch in ARCHS:
    register_trunk(_arch, RESNET)(partial(ResNetTrunk, _arch))
for _arch in CIFAR_ARCHS:
    register_trunk(f"{_arch}_cifar", RESNET_CIFAR)(partial(ResNetTrunk, _arch, small_images=True))

