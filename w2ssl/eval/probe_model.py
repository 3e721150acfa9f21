"""The linear-probe network (METHOD §7): torchvision ResNet, pre-trained trunk, only ``fc`` trainable.

Also the check that closes a probe run: which trunk weights moved (none may).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn

from w2ssl import checkpoint as ckpt_io
from w2ssl.errors import UserError


def load_pretrained(path: str | Path, arch: str | None, trust: bool) -> tuple[dict[str, Tensor], str]:
    """The trunk of pre-training checkpoint ``path`` (ours, the authors' or MoCo v3's) with torchvision keys,
    and its architecture (``arch`` if given, checked; else the checkpoint's own)."""
    try:
        return ckpt_io.read_trunk(path, arch, trust)
    except UserError as e:
        where = "--pretrained: " if str(path) in str(e) else f"--pretrained {path}: "
        raise UserError(where + str(e)) from None


def build_model(arch: str, num_classes: int, pretrained: str | Path | None = None,
                trust: bool = False) -> tuple[nn.Module, dict[str, Tensor] | None]:
    """torchvision ``arch`` with only ``fc`` trainable, in eval mode, and the trunk it was loaded with.

    ``fc.weight ~ N(0, 0.01)``, ``fc.bias = 0``. The second value is the loaded trunk (the reference
    of :func:`changed_weights`), or None without ``pretrained``.
    """
    model = torchvision.models.__dict__[arch](num_classes=num_classes)
    reference = None
    if pretrained:
        reference, _ = load_pretrained(pretrained, arch, trust)
        model.load_state_dict({**model.state_dict(), **reference})
    for name, p in model.named_parameters():
        p.requires_grad = name.startswith("fc.")
    nn.init.normal_(model.fc.weight, mean=0.0, std=0.01)
    nn.init.zeros_(model.fc.bias)
    return model.eval(), reference


def trunk_state(model: nn.Module) -> dict[str, Tensor]:
    """A CPU copy of every trunk parameter and buffer (all but ``fc``)."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if not k.startswith("fc.")}


def changed_weights(state: dict[str, Tensor], reference: dict[str, Tensor]) -> list[str]:
    """Keys of ``reference`` whose tensor in ``state`` is missing or not exactly equal."""
    return [k for k, v in reference.items() if k not in state or not torch.equal(state[k].detach().cpu(), v)]
