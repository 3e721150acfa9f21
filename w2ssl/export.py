"""Export a pre-trained trunk as a plain state dict for torchvision or timm.

    python -m w2ssl.export CKPT OUT --to {torchvision,timm} [--arch ARCH] [--trust-checkpoint]

CKPT may be ours, the authors' W2SSL or MoCo v3's pre-training checkpoint. OUT is a ``torch.save``'d
dict of tensors that the target library's model loads with ``strict=False``, reporting only its
classifier missing: ``torchvision.models.<arch>()`` or ``timm.create_model("<arch>")`` for a ResNet
(``fc.*``), timm's ``VisionTransformer`` for a ViT (``head.*``; METHOD §11), ``timm.create_model("<arch>")``
for a timm CNN. Each trunk family declares its targets (``Family.exports``).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from torch import Tensor

from w2ssl.checkpoint import save_all
from w2ssl.cli import add_trust_checkpoint, check_file, run_main
from w2ssl.errors import UserError
from w2ssl.trunk_weights import read_trunk
from w2ssl.trunks import trunk_names, trunk_spec

TARGETS = ("torchvision", "timm")


def convert(trunk: dict[str, Tensor], arch: str, to: str) -> dict[str, Tensor]:
    """The trunk in ``to``'s names, by the export its family declares (``Family.exports``)."""
    exports = trunk_spec(arch).family.exports
    if to not in exports:
        raise UserError(f"a {arch} trunk has no {to} counterpart with these weights: export --to "
                        f"{' or --to '.join(exports)}")
    return exports[to].convert(trunk, arch)


def loading_hint(arch: str, to: str) -> str:
    """How to load the exported file, and what is missing then."""
    return trunk_spec(arch).family.exports[to].hint(arch)


def export(ckpt: str | Path, out: str | Path, to: str = "torchvision", arch: str | None = None,
           trust: bool = False) -> tuple[dict[str, Tensor], str]:
    """Write ``ckpt``'s trunk to ``out`` with ``to``'s key names; return what was written and the
    architecture (``arch`` if given, checked; else the checkpoint's own)."""
    ckpt, out = Path(ckpt), Path(out)
    if to not in TARGETS:
        raise UserError(f"unknown export target {to!r}: choose one of {', '.join(TARGETS)}")
    if out.is_dir():
        raise UserError(f"output {out} is a directory: pass a file name such as {out / 'resnet50.pth'}")
    if not out.parent.is_dir():
        raise UserError(f"output folder {out.parent} does not exist: create it first")
    if out.exists() and ckpt.exists() and out.resolve() == ckpt.resolve():
        raise UserError(f"output {out} is the input checkpoint: choose another file name")
    trunk, arch = read_trunk(ckpt, arch, trust)
    weights = {k: v.detach().contiguous() for k, v in convert(trunk, arch, to).items()}
    save_all(weights, [out])
    return weights, arch


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m w2ssl.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("ckpt", help="pre-training checkpoint (ours, the authors' W2SSL or MoCo v3)")
    parser.add_argument("out", help="output file: a plain state dict of the trunk, without a classifier")
    parser.add_argument("--to", required=True, choices=TARGETS, help="key layout of the output (ViTs: timm only)")
    parser.add_argument("--arch", default=None, choices=trunk_names(),
                        help="trunk architecture (default: the checkpoint's own, read from its weights)")
    add_trust_checkpoint(parser)
    return parser.parse_args(argv)


def run(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    check_file(args.ckpt, "CKPT")
    check_file(args.out, "OUT", output=True)
    weights, arch = export(args.ckpt, args.out, args.to, args.arch, args.trust_checkpoint)
    print(f"wrote {len(weights)} tensors ({arch} trunk, {args.to} keys) to {args.out}; {loading_hint(arch, args.to)}")


def main(argv: list[str] | None = None) -> int:
    """Exit code 0, or 2 with one ``error:`` line."""
    return run_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
