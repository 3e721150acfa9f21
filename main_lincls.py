#!/usr/bin/env python
"""Linear classification on frozen pre-trained features (MoCo v3's protocol): parse, check, launch.

Also ``--cached`` (train ``fc`` on features extracted once) and ``--knn`` (weighted kNN accuracy).
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from w2ssl import cli
from w2ssl.data.sources import load_subset
from w2ssl.dist.distributed import launch
from w2ssl.errors import UserError
from w2ssl.eval.lincls import worker
from w2ssl.eval.run_checks import check_classifier_run

JOINED_FLAG = "--multiprocessing-distributed"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Linear classification on frozen W2SSL / MoCo v3 features")
    cli.add_common(parser, batch_size=256, lr=0.1, wd=0.0, epochs=100, print_freq=10, save_dir="outputs/lincls",
                   arch=None, resume="auto")
    probe = parser.add_argument_group("linear probe")
    cli.add_classifier(probe, "probed")
    mode = probe.add_mutually_exclusive_group()
    mode.add_argument("--cached", action="store_true",
                      help="extract frozen features once, then train fc on them (fast; no per-epoch augmentation)")
    mode.add_argument("--knn", action="store_true",
                      help="weighted kNN accuracy (k=20 and 200, T=0.07) of the --pretrained trunk instead of a probe")
    probe.add_argument("--cached-aug", default=0, type=cli.nonneg_int, metavar="K",
                       help="with --cached: also cache K augmented passes over DATA/train, one drawn per image "
                            "and epoch")
    cli.add_label_subset(parser)
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
    if args.cached_aug and not args.cached:
        raise UserError(f"--cached-aug {args.cached_aug} needs --cached")
    if args.evaluate and (args.cached or args.knn):
        raise UserError("-e/--evaluate evaluates the full model: drop --cached/--knn")
    if args.knn and not args.pretrained:
        raise UserError("--knn needs --pretrained CKPT (the trunk to evaluate)")
    if args.knn and (args.label_fraction or args.label_file):
        raise UserError("--knn scores val against every training image: drop --label-fraction/--label-file (they "
                        "subset the labels a probe trains on)")
    load_subset(args.subset)
    check_classifier_run(args, world_size, resumes=not args.knn)


def main(argv: Sequence[str] | None = None) -> None:
    args = cli.parse(build_parser(), argv)
    warning = split_joined_dist_url(args)
    if warning:
        print(f"WARNING: {warning}", file=sys.stderr, flush=True)
    check(args, cli.expected_world_size(args))
    launch(worker, args)


if __name__ == "__main__":
    cli.with_error_boundary(main)()
