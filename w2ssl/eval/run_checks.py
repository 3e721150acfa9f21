"""Checks of a classifier run (the linear probe, fine-tuning) that can fail before any process starts."""
from __future__ import annotations

from argparse import Namespace
from pathlib import Path

from w2ssl.checkpoint import check_resume_path, file_sha256
from w2ssl.errors import UserError
from w2ssl.eval.probe_folder import check_probe_folder, load_probe, no_weights_message, resume_path
from w2ssl.eval.probe_model import load_pretrained
from w2ssl.trunk_weights import DEFAULT_ARCH
from w2ssl.trunks import trunk_spec


def check_classifier_run(args: Namespace, world_size: int, resumes: bool = True) -> None:
    """DATA's folders, batch, sizes, label subset, ``--resume`` and ``--pretrained`` (``args.arch`` becomes the
    checkpoint's own when not given). ``resumes``: the run continues a checkpoint of ``--save-dir``."""
    if not args.data:
        raise UserError("no dataset given: pass DATA with DATA/train and DATA/val class sub-folders")
    needed = ("val",) if args.evaluate else ("train", "val")
    for split in needed:
        if not (Path(args.data) / split).is_dir():
            raise UserError(f"{Path(args.data) / split} does not exist: DATA must hold train/ and val/ folders "
                            f"of class sub-folders (ImageNet layout)")
    if args.batch_size <= 0 or args.batch_size % world_size:
        raise UserError(f"--batch-size {args.batch_size} must be a positive multiple of the {world_size} processes")
    if args.input_size <= 0 or (args.epochs is not None and args.epochs <= 0):  # None: fine-tuning's recipe
        raise UserError("--input-size and --epochs must be positive")
    check_label_subset(args)
    check_resume_path(args.resume)
    resume = resume_path(args) if resumes else None
    if args.pretrained:  # a clear error before any process starts, and the checkpoint's own --arch
        _, args.arch = load_pretrained(args.pretrained, args.arch, args.trust_checkpoint)
        args.pretrained_sha256 = file_sha256(args.pretrained)
        if resumes and not args.evaluate:
            check_probe_folder(args)
    elif resume is None:
        raise UserError(no_weights_message(args))
    else:
        args.arch = args.arch or load_probe(resume, args.trust_checkpoint).get("arch") or DEFAULT_ARCH
    if args.vit_feature not in trunk_spec(args.arch).family.readouts:
        raise UserError(f"--vit-feature {args.vit_feature} reads a ViT's class token; --arch {args.arch} has none: "
                        f"drop --vit-feature")


def check_label_subset(args: Namespace) -> None:
    """``--label-fraction`` in (0, 1], ``--label-file`` a file, neither with ``-e`` (nothing trains)."""
    fraction, file = args.label_fraction, args.label_file
    if fraction is not None and file:  # the command line keeps them apart; a --config may bring one
        raise UserError(f"--label-fraction {fraction:g} and --label-file {file} both given (one may come from "
                        f"--config): pass one")
    if (fraction is not None or file) and args.evaluate:
        raise UserError("-e/--evaluate trains nothing: drop --label-fraction/--label-file")
    if fraction is not None and not 0 < fraction <= 1:
        raise UserError(f"--label-fraction {fraction:g} must be in (0, 1], e.g. 0.01 or 0.1 (1 keeps every label)")
    if file and not Path(file).is_file():
        raise UserError(f"--label-file {file} does not exist: pass a text file of DATA/train images, one per line")
