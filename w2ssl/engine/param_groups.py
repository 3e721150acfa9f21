"""Parameter groups for fine-tuning: no weight decay on norms, biases and tokens; layer-wise lr decay for ViTs.

The rules are MAE's ``util/lr_decay.py`` (after BEiT's ``optim_factory.py``): a ViT parameter's layer is
0 for ``cls_token``, ``pos_embed`` and ``patch_embed.*``, ``i + 1`` for ``blocks.i.*`` and ``depth + 1``
for the rest (final norm, classifier); its lr is scaled by ``layer_decay ** (depth + 1 - layer)``, so the
classifier trains at the full rate and the patch embedding at ``layer_decay ** (depth + 1)`` of it.
1-D parameters (norm weights, biases) and the tokens get no weight decay. :func:`w2ssl.engine.optim.set_lr`
applies a group's ``lr_scale``.
"""
from __future__ import annotations

from torch import nn

NO_DECAY = ("cls_token", "pos_embed", "dist_token")


def vit_layer(name: str, depth: int) -> int:
    """The layer of ViT parameter ``name`` (timm's names, no prefix) in a ``depth``-block ViT: 0 ... depth + 1."""
    if name in ("cls_token", "pos_embed") or name.startswith("patch_embed."):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def decays(name: str, ndim: int) -> bool:
    """Whether weight decay applies: matrices and kernels, not norms, biases or the tokens."""
    return ndim > 1 and name not in NO_DECAY


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float = 1.0, depth: int | None = None,
                 prefix: str = "") -> list[dict]:
    """The trainable parameters of ``model`` in groups of equal ``(lr_scale, weight_decay)``.

    ``depth`` (a ViT's block count) turns on layer-wise decay for the parameters named ``prefix + <timm
    name>`` (e.g. ``trunk.`` in a :class:`~w2ssl.eval.probe_model.Probe`; others count as the top layer).
    Without it every group has ``lr_scale`` 1. Groups come in order of first appearance.
    """
    groups: dict[tuple[float, float], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        own = name.removeprefix(prefix) if name.startswith(prefix) else ""
        scale = 1.0 if depth is None else layer_decay ** (depth + 1 - vit_layer(own, depth))
        wd = weight_decay if decays(own or name, p.ndim) else 0.0
        group = groups.setdefault((scale, wd), {"params": [], "names": [], "lr_scale": scale, "weight_decay": wd})
        group["params"].append(p)
        group["names"].append(name)
    return list(groups.values())
