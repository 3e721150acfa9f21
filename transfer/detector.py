"""torchvision Faster / Mask R-CNN on a ResNet-FPN backbone initialised from a pre-trained trunk.

The trunk is the torchvision-named dict from :func:`w2ssl.trunk_weights.load_trunk`; every one of its
tensors is loaded into the backbone and compared back after loading (:func:`verify_backbone`).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.ops.misc import FrozenBatchNorm2d

from w2ssl.data.augment import MEAN, STD

MODELS = {"faster": FasterRCNN, "mask": MaskRCNN}
NORMS: dict[str, Callable[[int], nn.Module]] = {
    "frozen": FrozenBatchNorm2d,  # pre-training statistics and affine kept fixed
    "sync": nn.SyncBatchNorm,  # fine-tuned, statistics over all processes (plain BN in one process)
    "bn": nn.BatchNorm2d,  # fine-tuned, statistics per process
}
# Trunk stages from the top, as torchvision's ``trainable_layers`` counts them (5 = everything).
STAGES = ("layer4", "layer3", "layer2", "layer1", "conv1")


def frozen_stages(trainable_layers: int) -> list[str]:
    """Top-level trunk modules whose weights stay fixed; ``bn1`` goes with ``conv1``."""
    frozen = list(STAGES[trainable_layers:])
    return frozen + ["bn1"] if "conv1" in frozen else frozen


def freeze_norms(module: nn.Module) -> nn.Module:
    """``module`` with every BatchNorm (incl. SyncBN) replaced by a FrozenBatchNorm2d with its values.

    Frozen stages must not update running statistics in ``train()`` mode either.
    """
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        frozen = FrozenBatchNorm2d(module.num_features, eps=module.eps)
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(frozen, name).copy_(getattr(module, name).detach())
        return frozen
    for name, child in module.named_children():
        setattr(module, name, freeze_norms(child))
    return module


def verify_backbone(body: nn.Module, trunk: dict[str, Tensor]) -> int:
    """Check that ``body`` holds exactly ``trunk``'s tensors; returns how many were compared.

    ``num_batches_tracked`` is not a weight (FrozenBatchNorm2d has none) and is skipped.
    """
    state = body.state_dict()
    checked = 0
    for key, value in trunk.items():
        if key.endswith("num_batches_tracked"):
            continue
        if key not in state:
            raise RuntimeError(f"trunk tensor {key} has no place in the detection backbone")
        if not torch.equal(state[key].cpu(), value.to(state[key].dtype)):
            raise RuntimeError(f"backbone tensor {key} differs from the checkpoint after loading")
        checked += 1
    missing = sorted(k for k in state if k not in trunk and not k.endswith("num_batches_tracked"))
    if missing:
        raise RuntimeError(f"backbone tensors not in the checkpoint: {missing[:3]}")
    return checked


def build_detector(trunk: dict[str, Tensor], num_classes: int, *, model: str = "faster", arch: str = "resnet50",
                   norm: str = "frozen", trainable_layers: int = 5, min_size: tuple[int, ...] = (800,),
                   max_size: int = 1333, **detector_kwargs) -> nn.Module:
    """A ``FasterRCNN`` / ``MaskRCNN`` whose FPN backbone starts from ``trunk`` (torchvision keys).

    ``num_classes`` counts the background. Training picks a random size from ``min_size`` for the
    shorter side; evaluation uses the last. Inputs are RGB in [0, 1], normalised with ImageNet mean/std
    as in pre-training. ``detector_kwargs`` go to torchvision's ``FasterRCNN`` / ``MaskRCNN`` (e.g. sampling
    sizes).
    """
    backbone = resnet_fpn_backbone(backbone_name=arch, weights=None, norm_layer=NORMS[norm],
                                   trainable_layers=trainable_layers)
    body = backbone.body
    body.load_state_dict(trunk)
    for name in frozen_stages(trainable_layers):
        setattr(body, name, freeze_norms(getattr(body, name)))
    verify_backbone(body, trunk)
    return MODELS[model](backbone, num_classes=num_classes, min_size=min_size, max_size=max_size,
                         image_mean=list(MEAN), image_std=list(STD), **detector_kwargs)
