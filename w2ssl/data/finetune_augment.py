"""The training transform of fine-tuning: the probe's crop and flip, or MAE's / DeiT's augmentation.

MAE fine-tunes ViTs with timm's ``create_transform``: RandomResizedCrop (bicubic) and flip, RandAugment
``rand-m9-mstd0.5-inc1``, then random erasing (p 0.25, per-pixel noise) after normalisation. The same call
builds it here, so the policy strings (``--aa``) are timm's. With no RandAugment and no erasing (the ResNet
recipe) it is the probe's :func:`~w2ssl.data.datasets.train_transform`, unchanged.
"""
from __future__ import annotations

from collections.abc import Callable

from w2ssl.data.augment import MEAN, STD
from w2ssl.data.datasets import train_transform
from w2ssl.errors import UserError

NO_AUGMENT = "none"


def finetune_transform(size: int, auto_augment: str = NO_AUGMENT, reprob: float = 0.0) -> Callable:
    """PIL image -> ``[3, size, size]`` normalised tensor; ``auto_augment`` a timm policy (``rand-m9-mstd0.5-inc1``)
    or ``none``, ``reprob`` the random-erasing probability."""
    if auto_augment == NO_AUGMENT and reprob == 0:
        return train_transform(size)
    from timm.data import create_transform

    policy = None if auto_augment == NO_AUGMENT else auto_augment
    try:
        return create_transform(size, is_training=True, auto_augment=policy, interpolation="bicubic",
                                re_prob=reprob, re_mode="pixel", re_count=1, mean=MEAN, std=STD)
    except (AssertionError, KeyError, ValueError) as e:
        raise UserError(f"--aa {auto_augment} is not a timm augmentation policy ({e}): pass e.g. "
                        f"rand-m9-mstd0.5-inc1 (MAE's) or none") from None
