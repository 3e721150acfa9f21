#!/usr/bin/env python
"""Linear classification on frozen pre-trained features (MoCo v3's protocol): parse, check, launch.

Also ``--cached`` (train ``fc`` on features extracted once) and ``--knn`` (weighted kNN accuracy).
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from w2ssl import cli
from w2ssl.checkpoint import check_resume_path, file_sha256
from w2ssl.dist.distributed import launch
from w2ssl.errors import UserError
from w2ssl.eval.lincls import worker
from w2ssl.eval.probe_folder import check_probe_folder, load_probe, no_weights_message, resume_path
from w2ssl.eval.probe_model import load_pretrained
from w2ssl.trunk_weights import DEFAULT_ARCH
from w2ssl.trunks import trunk_spec
from w2ssl.trunks.vit import FEATURES

JOINED_FLAG = "--multiprocessing-distributed"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Linear classification on frozen W2SSL / MoCo v3 features")
    cli.add_common(parser, batch_size=256, lr=0.1, wd=0.0, epochs=100, print_freq=10, save_dir="outputs/lincls",
                   arch=None, resume="auto")
    probe = parser.add_argument_group("linear probe")
    probe.add_argument("--pretrained", default="", metavar="CKPT",
                       help="pre-training checkpoint (ours, the authors' W2SSL or MoCo v3's) whose trunk is probed")
    probe.add_argument("-e", "--evaluate", action="store_true",
                       help="only evaluate on DATA/val (the model of --resume, or --pretrained with a fresh fc)")
    probe.add_argument("--input-size", default=224, type=cli.positive_int, metavar="PX",
                       help="crop side: RandomResizedCrop(PX) for training, Resize(PX*256/224)+CenterCrop(PX) for val")
    mode = probe.add_mutually_exclusive_group()
    mode.add_argument("--cached", action="store_true",
                      help="extract frozen features once, then train fc on them (fast; no per-epoch augmentation)")
    mode.add_argument("--knn", action="store_true",
                      help="weighted kNN accuracy (k=20 and 200, T=0.07) of the --pretrained trunk instead of a probe")
    probe.add_argument("--vit-feature", default="avg", choices=FEATURES,
                       help="a ViT's vector for the probe and --knn: avg, the mean of the patch tokens (default: the "
                            "tokens W2SSL's losses train; its tile read-out never uses the class token, which "
                            "stays near its initialisation), or cls, the class token (MoCo v3's probe; for MoCo v3 "
                            "checkpoints); ResNets use the global average of their last map")
    probe.add_argument("--strict-data", action="store_true",
                       help="stop at the first unreadable image instead of skipping it (and counting it)")
    probe.add_argument("--cached-aug", default=0, type=cli.nonneg_int, metavar="K",
                       help="with --cached: also cache K augmented passes over DATA/train, one drawn per image "
                            "and epoch")
    return parser


def split_joined_dist_url(args: argparse.Namespace) -> str | None:
    """Undo a missing space before ``--multiprocessing-distributed``; return a warning if there was one.

    The published command has ``--dist-url 'tcp://localhost:10016'--multiprocessing-distributed``, which
    a shell passes as the single URL ``tcp://localhost:10016--multiprocessing-distributed``. The authors'
    script then ran DataParallel over all GPUs; with the trunk frozen in eval mode that computes the same
    as the intended DistributedDataParallel run, so the flag is restored.
    """
    url = args.dist_url
    if not url.endswith(JOINED_FLAG) or url == JOINED_FLAG:
        return None
    args.dist_url, args.multiprocessing_distributed = url[: -len(JOINED_FLAG)], True
    return (f"--dist-url {url!r} has {JOINED_FLAG} joined to it (a missing space, as in the published command): "
            f"read as --dist-url {args.dist_url} {JOINED_FLAG}")


def check(args: argparse.Namespace, world_size: int) -> None:
    """Checks that can fail before any process starts."""
    if not args.data:
        raise UserError("no dataset given: pass DATA with DATA/train and DATA/val class sub-folders")
    cli.check_folder(args.data, "DATA")
    cli.check_folder(args.save_dir, "--save-dir", output=True)
    cli.check_file(args.pretrained, "--pretrained")
    cli.check_file(args.config, "--config")
    needed = ("val",) if args.evaluate else ("train", "val")
    for split in needed:
        if not (Path(args.data) / split).is_dir():
            raise UserError(f"{Path(args.data) / split} does not exist: DATA must hold train/ and val/ folders "
                            f"of class sub-folders (ImageNet layout)")
    if args.batch_size <= 0 or args.batch_size % world_size:
        raise UserError(f"--batch-size {args.batch_size} must be a positive multiple of the {world_size} processes")
    if args.cached_aug and not args.cached:
        raise UserError(f"--cached-aug {args.cached_aug} needs --cached")
    if args.evaluate and (args.cached or args.knn):
        raise UserError("-e/--evaluate evaluates the full model: drop --cached/--knn")
    if args.knn and not args.pretrained:
        raise UserError("--knn needs --pretrained CKPT (the trunk to evaluate)")
    check_resume_path(args.resume)
    resume = None if args.knn else resume_path(args)
    if args.pretrained:  # a clear error before any process starts, and the checkpoint's own --arch
        _, args.arch = load_pretrained(args.pretrained, args.arch, args.trust_checkpoint)
        args.pretrained_sha256 = file_sha256(args.pretrained)
        if not (args.knn or args.evaluate):
            check_probe_folder(args)
    elif resume is None:
        raise UserError(no_weights_message(args))
    else:
        args.arch = args.arch or load_probe(resume, args.trust_checkpoint).get("arch") or DEFAULT_ARCH
    if args.vit_feature != "avg" and trunk_spec(args.arch).family != "vit":
        raise UserError(f"--vit-feature {args.vit_feature} reads a ViT's class token; --arch {args.arch} has none: "
                        f"drop --vit-feature")


def main(argv: Sequence[str] | None = None) -> None:
    args = cli.parse(build_parser(), argv)
    warning = split_joined_dist_url(args)
    if warning:
        print(f"WARNING: {warning}", file=sys.stderr, flush=True)
    check(args, cli.expected_world_size(args))
    launch(worker, args)


if __name__ == "__main__":
    cli.with_error_boundary(main)()
