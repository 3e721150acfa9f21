"""What a loaded checkpoint is (:class:`Kind`, decided from its keys), and how a message says it."""
from __future__ import annotations

from enum import Enum, auto

from torch import Tensor

from w2ssl.errors import key_list


class Kind(Enum):
    """The kinds of file the tools meet; code compares these, messages use :func:`describe`."""

    PRETRAINING = auto()  # main_moco.py's, the authors' W2SSL or MoCo v3's: base_encoder.* weights
    PROBE = auto()  # main_lincls.py's
    DETECTOR = auto()  # finetune_torchvision.py's
    TRUNK = auto()  # an exported trunk
    OTHER = auto()


WORDS = {Kind.PRETRAINING: "a pre-training checkpoint",
         Kind.PROBE: "a linear-probe checkpoint (main_lincls.py)",
         Kind.DETECTOR: "a detector checkpoint (finetune_torchvision.py)",
         Kind.TRUNK: "an exported trunk (a plain dict of tensors, no training state)"}


def kind(ckpt: dict) -> Kind:
    """The :class:`Kind` of a loaded checkpoint ``ckpt`` (a probe's ``fc.*`` without ``base_encoder.*``
    weights, or its ``best_acc1``, make it a probe, even when the ``module.`` prefix of DDP is kept)."""
    weights = ckpt.get("state_dict")
    names = [k.removeprefix("module.") for k in weights] if isinstance(weights, dict) else []
    if "best_acc1" in ckpt or (names and any(k.startswith("fc.") for k in names)
                               and not any(k.startswith("base_encoder.") for k in names)):
        return Kind.PROBE
    if any(k.startswith("base_encoder.") for k in names):
        return Kind.PRETRAINING
    if isinstance(ckpt.get("model"), dict) and "iter" in ckpt:
        return Kind.DETECTOR
    if ckpt and all(isinstance(v, Tensor) for v in ckpt.values()):
        return Kind.TRUNK
    return Kind.OTHER


def describe(ckpt: dict) -> str:
    """What ``ckpt`` is, in words for a message: ``a pre-training checkpoint``, ``an exported trunk (…)``,
    … or, for any other dict, ``a dict with keys …`` (a few of them)."""
    found = kind(ckpt)
    return WORDS[found] if found in WORDS else f"a dict with keys {key_list(sorted(map(str, ckpt)))}"
