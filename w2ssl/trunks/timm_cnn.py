"""CNN trunks from timm, registered by timm's names so that their weights export to timm as they are.

ResNet-D (He et al. 2019, *Bag of Tricks*: a deep 3-conv stem and an average-pool shortcut) as timm builds
it, without its classifier: ``[B, 3, H, W] -> [B, C, H/32, W/32]``, ``num_features`` C. The state dict is
``timm.create_model(name)``'s without ``fc.*``. Like our torchvision ResNets, a trunk starts with every
residual branch live (timm's ``zero_init_last=False``); MoCo v3 asks for the zero start (``Family.zero_init``).
"""
from __future__ import annotations

from functools import partial

import timm
from torch import nn

from w2ssl.trunks.registry import Export, Family, StateDict, average_map, register_trunk
from w2ssl.trunks.resnet import RESNET

TIMM_CNNS = ("resnet18d", "resnet26d", "resnet34d", "resnet50d", "resnet101d")


def build_timm_cnn(name: str, zero_init_last: bool = False, **options) -> nn.Module:
    """timm's ``name`` without pooling or classifier; ``options`` go to timm (``norm_layer``, ``drop_path_rate``)."""
    return timm.create_model(name, pretrained=False, num_classes=0, global_pool="", zero_init_last=zero_init_last,
                             **options)


def _same_names(trunk: StateDict, arch: str) -> StateDict:
    return dict(trunk)


def _hint(arch: str) -> str:
    return f"load into timm.create_model(\"{arch}\") with strict=False: only fc.weight and fc.bias are missing"


# A ResNet in all but its names: MoCo v3's ResNet heads and SimCLR's fine-tuning recipe.
TIMM_CNN = Family("timm", readouts={"avg": average_map}, exports={"timm": Export(_same_names, _hint)},
                  heads=RESNET.heads, zero_init={"zero_init_last": True}, finetune_recipe=RESNET.finetune_recipe,
                  drop_path=True)

for _name in TIMM_CNNS:
    register_trunk(_name, TIMM_CNN)(partial(build_timm_cnn, _name))
