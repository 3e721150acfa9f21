"""The linear-probe network (METHOD §7, §11): a frozen registered trunk, its one-vector read-out, a linear ``fc``.

Also the check that closes a probe run: which trunk weights moved (none may).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from w2ssl.errors import UserError
from w2ssl.eval.knn import pooled_features
from w2ssl.trunk_weights import read_trunk
from w2ssl.trunks import Readout, average_map, build_trunk, trunk_spec


class Probe(nn.Module):
    """``[B, 3, H, W] -> [B, num_classes]``: ``fc(pooled_features(trunk(x)))``, no BatchNorm in the head.

    The state dict is flat, the trunk's own keys plus ``fc.*``: for a ResNet exactly torchvision's
    ``resnet*(num_classes)`` (probe checkpoints load there), for a ViT timm's names plus ``fc.*``.
    ``readout`` is one of the trunk family's read-outs (a ViT: ``avg`` patch tokens or ``cls``).
    """

    def __init__(self, trunk: nn.Module, num_classes: int, readout: Readout = average_map):
        super().__init__()
        self.trunk, self.readout = trunk, readout
        self.fc = nn.Linear(trunk.num_features, num_classes)
        # ``trunk.`` is our module structure, not part of the weights' names
        self.register_state_dict_post_hook(_drop_trunk_prefix)
        self.register_load_state_dict_pre_hook(_add_trunk_prefix)

    def features(self, x: Tensor) -> Tensor:
        """``[B, 3, H, W] -> [B, C]`` (:func:`~w2ssl.eval.knn.pooled_features`)."""
        return pooled_features(self.trunk, x, self.readout)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x))


def _drop_trunk_prefix(module: nn.Module, state: dict, prefix: str, local_metadata: dict) -> None:
    inner = prefix + "trunk."
    items = list(state.items())
    state.clear()
    state.update((prefix + k[len(inner):] if k.startswith(inner) else k, v) for k, v in items)


def _add_trunk_prefix(module: nn.Module, state: dict, prefix: str, *_) -> None:
    for key in [k for k in state if k.startswith(prefix) and not k.startswith(prefix + "fc.")]:
        state[prefix + "trunk." + key[len(prefix):]] = state.pop(key)


def load_pretrained(path: str | Path, arch: str | None, trust: bool) -> tuple[dict[str, Tensor], str]:
    """The trunk of pre-training checkpoint ``path`` (ours, the authors' or MoCo v3's) with the registered
    trunk's keys, and its architecture (``arch`` if given, checked; else the checkpoint's own)."""
    try:
        return read_trunk(path, arch, trust)
    except UserError as e:
        where = "--pretrained: " if str(path) in str(e) else f"--pretrained {path}: "
        raise UserError(where + str(e)) from None


def build_model(arch: str, num_classes: int, pretrained: str | Path | None = None, trust: bool = False,
                vit_feature: str = "avg", head_std: float = 0.01,
                **trunk_options) -> tuple[Probe, dict[str, Tensor] | None]:
    """:class:`Probe` of the registered trunk ``arch`` with only ``fc`` trainable, in eval mode, and the trunk
    weights it was loaded with.

    ``fc.weight ~ N(0, head_std)`` (MoCo v3's probe: 0.01), ``fc.bias = 0``. The second value is the loaded
    trunk (the reference of :func:`changed_weights`), or None without ``pretrained``. ``trunk_options`` go to
    the trunk's builder (fine-tuning: a ViT's ``drop_path_rate``).
    """
    trunk = build_trunk(arch, **trunk_options)
    reference = None
    if pretrained:
        reference, _ = load_pretrained(pretrained, arch, trust)
        trunk.load_state_dict(reference)
    model = Probe(trunk.requires_grad_(False), num_classes, trunk_spec(arch).family.readout(vit_feature))
    nn.init.normal_(model.fc.weight, mean=0.0, std=head_std)
    nn.init.zeros_(model.fc.bias)
    return model.eval(), reference


def trunk_state(model: nn.Module) -> dict[str, Tensor]:
    """A CPU copy of every trunk parameter and buffer (all but ``fc``)."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if not k.startswith("fc.")}


def changed_weights(state: dict[str, Tensor], reference: dict[str, Tensor]) -> list[str]:
    """Keys of ``reference`` whose tensor in ``state`` is missing or not exactly equal."""
    return [k for k, v in reference.items() if k not in state or not torch.equal(state[k].detach().cpu(), v)]
