"""Convert the ResNet trunk of a pre-training checkpoint to a detectron2 weight file.

Usage: ``python -m transfer.convert_pretrain_to_detectron2 CKPT OUT.pkl [--arch ARCH]`` from the repository root
(or ``python transfer/convert-pretrain-to-detectron2.py ...``, MoCo's name, from any folder).

Reads our checkpoints (``base_encoder.<key>``), the authors' W2SSL and MoCo v3's
(``module.base_encoder.<key>``); drops every head and the momentum encoder, renames the trunk to
detectron2's ResNet names and writes ``{"model": {name: ndarray}, "__author__": "W2SSL",
"matching_heuristics": True}``, which detectron2's checkpointer maps onto C4 and FPN models alike.
"""
from __future__ import annotations

import argparse
import pickle
import re
import sys
from pathlib import Path

import numpy as np
from torch import Tensor

from w2ssl.checkpoint import save_all
from w2ssl.cli import add_trust_checkpoint, check_file, run_main
from w2ssl.errors import UserError
from w2ssl.trunk_weights import read_trunk
from w2ssl.trunks import trunk_names

AUTHOR = "W2SSL"
_BN_FIELDS = ("weight", "bias", "running_mean", "running_var")
_BLOCK = re.compile(r"layer([1-4])\.(\d+)\.(.+)")


def _block_part(rest: str) -> str | None:
    """detectron2 name of a key inside one residual block (``conv2.weight``, ``bn2.bias``, ``downsample.1.x``)."""
    if m := re.fullmatch(r"conv([1-3])\.weight", rest):
        return f"conv{m[1]}.weight"
    if (m := re.fullmatch(r"bn([1-3])\.(\w+)", rest)) and m[2] in _BN_FIELDS:
        return f"conv{m[1]}.norm.{m[2]}"
    if rest == "downsample.0.weight":
        return "shortcut.weight"
    if (m := re.fullmatch(r"downsample\.1\.(\w+)", rest)) and m[1] in _BN_FIELDS:
        return f"shortcut.norm.{m[1]}"
    return None


def detectron2_name(key: str) -> str | None:
    """detectron2 ResNet name of torchvision trunk key ``key``; ``None`` for ``num_batches_tracked``.

    ``conv1.weight -> stem.conv1.weight``, ``bn1.x -> stem.conv1.norm.x``,
    ``layer{i}.{j}.conv{k}.weight -> res{i+1}.{j}.conv{k}.weight``, ``layer{i}.{j}.bn{k}.x -> …conv{k}.norm.x``,
    ``layer{i}.{j}.downsample.{0,1} -> res{i+1}.{j}.shortcut{,.norm}``.
    """
    if key.endswith(".num_batches_tracked"):
        return None
    if key == "conv1.weight":
        return "stem.conv1.weight"
    if (m := re.fullmatch(r"bn1\.(\w+)", key)) and m[1] in _BN_FIELDS:
        return f"stem.conv1.norm.{m[1]}"
    if (m := _BLOCK.fullmatch(key)) and (part := _block_part(m[3])) is not None:
        return f"res{int(m[1]) + 1}.{m[2]}.{part}"
    raise ValueError(f"no detectron2 name for trunk key {key!r}")


def convert(trunk: dict[str, Tensor]) -> dict[str, np.ndarray]:
    """Rename a torchvision trunk to detectron2 names, as float32 numpy arrays (shapes kept)."""
    out: dict[str, np.ndarray] = {}
    for key, value in trunk.items():
        name = detectron2_name(key)
        if name is None:
            continue
        if name in out:
            raise ValueError(f"two trunk keys map to {name}")
        out[name] = value.detach().cpu().float().numpy()
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Convert a pre-training checkpoint's ResNet trunk to detectron2 weights.")
    p.add_argument("checkpoint", help="pre-training checkpoint (.pth.tar): ours, the authors' W2SSL or MoCo v3")
    p.add_argument("output", help="detectron2 weight file to write; must end in .pkl")
    p.add_argument("--arch", default=None, choices=trunk_names("resnet"),
                   help="trunk the checkpoint was trained with (default: the checkpoint's own, read from its weights)")
    add_trust_checkpoint(p)
    return p.parse_args(argv)


def run(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    check_file(args.checkpoint, "CHECKPOINT")
    check_file(args.output, "OUTPUT", output=True)
    out = Path(args.output)
    # detectron2 picks its loader by extension: only ".pkl" reads a pickle of numpy arrays.
    if out.suffix != ".pkl":
        raise UserError(f"output {out} must end in .pkl so that detectron2 reads it as converted weights")
    if not out.parent.is_dir():
        raise UserError(f"output folder {out.parent} does not exist: create it first")
    trunk, arch = read_trunk(args.checkpoint, args.arch, args.trust_checkpoint, family="resnet")
    model = convert(trunk)
    save_all({"model": model, "__author__": AUTHOR, "matching_heuristics": True}, [out], dump=pickle.dump)
    print(f"wrote {len(model)} {arch} trunk tensors in detectron2 names to {out}")


def main(argv: list[str] | None = None) -> int:
    """Exit code 0, or 2 with one ``error:`` line."""
    return run_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
