"""The pre-trained trunk inside a checkpoint: extraction, architecture inference from its shapes, checks.

Our pre-training checkpoints hold ``state_dict`` with trunk keys ``base_encoder.<key>``; the authors'
W2SSL checkpoints and MoCo v3's use ``module.base_encoder.<key>`` plus heads (``fc``, ``fc_crop``,
``fc_loc`` for ResNets, ``head`` for ViTs) and, for ViTs, a ``pos_embed`` weight that our trunks compute
(METHOD §11). All yield the same trunk here, with the names of the registered trunk (torchvision's for
ResNets, timm's for ViTs). Which architectures exist is the registry's business (:mod:`w2ssl.trunks`).
"""
from __future__ import annotations

from pathlib import Path

from torch import Tensor

from w2ssl.checkpoint import describe, load
from w2ssl.errors import UserError, key_list
from w2ssl.trunks import trunk_names, trunk_shapes, trunk_spec

DEFAULT_ARCH = "resnet50"  # when a checkpoint says nothing about its architecture


def _trunk_roots() -> frozenset[str]:
    """First components of every registered trunk's keys (``conv1``, ``layer4``, ``blocks``, ``cls_token`` …):
    a ``base_encoder`` key outside them is a head or a fixed buffer, not a trunk weight. Not cached: trunks
    may register after a first call, and the shapes it reads are (per registered trunk)."""
    return frozenset(key.split(".")[0] for name in trunk_names() for key in trunk_shapes(name))


def _model_weights(ckpt: dict) -> dict[str, Tensor]:
    for key in ("state_dict", "model"):
        if isinstance(ckpt.get(key), dict):
            return ckpt[key]
    if ckpt and all(isinstance(v, Tensor) for v in ckpt.values()):
        return ckpt
    raise UserError(f"no weights found: top-level keys are {key_list(sorted(map(str, ckpt)), 8)}")


def extract_trunk(ckpt: dict) -> dict[str, Tensor]:
    """The trunk weights (no prefix, no heads, no ``pos_embed``) of our, the authors' or MoCo v3's checkpoint."""
    weights = _model_weights(ckpt)
    trunk, roots = {}, _trunk_roots()
    for key, value in weights.items():
        key = key.removeprefix("module.")
        if key.startswith("base_encoder.") and key.split(".")[1] in roots:
            trunk[key.removeprefix("base_encoder.")] = value
    if not trunk:
        raise UserError(f"no pre-trained trunk (base_encoder.*) in this checkpoint; found {describe(ckpt)} "
                        f"with keys like {key_list(sorted(weights), 4)}: pass a W2SSL, MoCo v3 or w2ssl "
                        f"pre-training checkpoint")
    return trunk


def trunk_mismatch(trunk: dict[str, Tensor], arch: str) -> str | None:
    """How ``trunk`` differs from the registered trunk ``arch`` (first difference), or None if it is one."""
    expected = trunk_shapes(arch)
    missing = [k for k in expected if k not in trunk]
    extra = [k for k in trunk if k not in expected]
    wrong = [k for k in expected if k in trunk and tuple(trunk[k].shape) != expected[k]]
    if missing:
        return f"missing {key_list(missing, 2)}"
    if extra:
        return f"unexpected {key_list(extra, 2)}"
    if wrong:
        return f"shape of {wrong[0]} is {tuple(trunk[wrong[0]].shape)}, {arch} has {expected[wrong[0]]}"
    return None


def stored_arch(ckpt: dict) -> str | None:
    """The registered architecture a checkpoint names: its ``arch`` field, else that of its saved arguments."""
    args = ckpt.get("args")
    for value in (ckpt.get("arch"), args.get("arch") if isinstance(args, dict) else getattr(args, "arch", None)):
        if value in trunk_names():
            return value
    return None


def trunk_arch(trunk: dict[str, Tensor], ckpt: dict | None = None) -> str | None:
    """The registered trunk that ``trunk`` is exactly (its names and shapes decide), else the one ``ckpt``
    names, else None."""
    found = next((arch for arch in trunk_names() if trunk_mismatch(trunk, arch) is None), None)
    return found or (stored_arch(ckpt) if ckpt is not None else None)


def check_trunk(trunk: dict[str, Tensor], arch: str, ckpt: dict | None = None) -> None:
    """Raise :class:`UserError` unless ``trunk`` is exactly the registered trunk ``arch``, naming the
    architecture the checkpoint holds when it is another."""
    if arch not in trunk_names():
        raise UserError(f"unknown --arch {arch}: choose one of {', '.join(trunk_names())}")
    problem = trunk_mismatch(trunk, arch)
    if problem is None:
        return
    own = trunk_arch(trunk, ckpt)
    if own is not None and own != arch:
        raise UserError(f"checkpoint trunk is a {own} but --arch {arch} was given: drop --arch (it defaults to the "
                        f"checkpoint's own) or pass --arch {own}")
    raise UserError(f"checkpoint trunk does not match --arch {arch} ({problem}) nor any of {', '.join(trunk_names())}:"
                    f" pass the arch it was trained with")


def read_trunk(path: str | Path, arch: str | None = None, trust: bool = False,
               family: str | None = None) -> tuple[dict[str, Tensor], str]:
    """Load ``path``; return its trunk and its architecture: ``arch`` if given (checked), else the checkpoint's
    own (from the trunk's shapes, then its ``arch`` field, then resnet50). With ``family`` (e.g. ``"resnet"``
    for a consumer that only takes ResNets), a trunk of another family is refused."""
    ckpt = load(path, trust)
    trunk = extract_trunk(ckpt)
    arch = arch or trunk_arch(trunk, ckpt) or DEFAULT_ARCH
    check_trunk(trunk, arch, ckpt)
    if family is not None and trunk_spec(arch).family.name != family:
        raise UserError(f"checkpoint {path} holds a {arch} trunk; this tool takes a {family} "
                        f"({', '.join(trunk_names(family))}): pass a {family} checkpoint")
    return trunk, arch


def load_trunk(path: str | Path, arch: str | None = None, trust: bool = False) -> dict[str, Tensor]:
    """Load ``path`` and return its trunk, checked (see :func:`read_trunk`)."""
    return read_trunk(path, arch, trust)[0]
