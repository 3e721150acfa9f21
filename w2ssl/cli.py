"""Argument groups shared by both entry scripts, YAML config merging, and the error boundary."""
from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

import yaml

from w2ssl.argtypes import (  # noqa: F401  (the flag types every entry point uses, as cli.<type>)
    Ranged,
    below_one,
    fraction,
    nonneg_float,
    nonneg_int,
    positive_float,
    positive_int,
    unit_interval,
)
from w2ssl.engine.step import PRECISIONS
from w2ssl.errors import UserError
from w2ssl.trunks import readout_names, trunk_names


def check_values(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """Raise :class:`UserError` for the first value of a :class:`Ranged` flag out of its range."""
    for action in parser._actions:
        if isinstance(action.type, Ranged):
            value = getattr(args, action.dest, None)
            for v in value if isinstance(value, list) else [value]:
                if v is not None and not action.type.accepts(v):
                    flag = next((o for o in action.option_strings if o.startswith("--")), action.dest)
                    raise UserError(f"{flag} {v} {action.type.rule}: pass a value in that range")
    return args


def check_folder(path: str | Path | None, flag: str, output: bool = False) -> None:
    """``path`` (given as ``flag``) names a folder: refuse a file there, and for an ``output`` folder (made
    if missing) a file in place of a parent; a missing input folder is left to the caller's own message."""
    if path is None or path == "":
        return
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path} is a file, not a folder: pass a folder (or move the file away)")
    if output:
        _check_parents(path, flag)


def check_file(path: str | Path | None, flag: str, output: bool = False) -> None:
    """``path`` (given as ``flag``) names a file: refuse a folder there, and for an ``output`` file a file in
    place of a parent folder; a missing input file is left to the caller's own message."""
    if path is None or path == "":
        return
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder, not a file: pass the path of a file")
    if output:
        _check_parents(path, flag)


def _check_parents(path: Path, flag: str) -> None:
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"{flag} {path}: {parent} is a file, not a folder: pass a path under a folder")
            return


def default_workers() -> int:
    """The authors' 32, capped by the CPUs this process may use."""
    return min(32, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def add_common(parser: argparse.ArgumentParser, *, batch_size: int, lr: float, wd: float, epochs: int,
               print_freq: int, save_dir: str, arch: str | None = "resnet50", resume: str = "") -> None:
    """Data, model, schedule, checkpoint and launch flags, as in the authors' and MoCo v3's parsers.

    ``arch=None``: ``--arch`` defaults to the architecture of the checkpoint read (the linear probe).
    """
    parser.add_argument("data", metavar="DIR", nargs="?", help="dataset root with train/ (and val/) folders")
    parser.add_argument("--config", metavar="FILE", help="YAML file of flag values; the command line overrides it")
    parser.add_argument("--subset", metavar="FILE",
                        help="keep only the classes (one name a line, e.g. configs/subsets/imagenet100.txt) or "
                             "the images (one path a line, relative to FILE) it lists")
    parser.add_argument("-a", "--arch", default=arch, choices=trunk_names(),
                        help="trunk architecture" if arch else
                        "trunk architecture (default: the checkpoint's own, read from its weights)")
    parser.add_argument("-j", "--workers", default=default_workers(), type=nonneg_int, metavar="N",
                        help="data-loading workers per node (split over its processes)")
    parser.add_argument("--epochs", default=epochs, type=positive_int, metavar="N")
    parser.add_argument("--start-epoch", default=0, type=nonneg_int, metavar="N",
                        help="epoch to start at (a resumed checkpoint overrides it)")
    parser.add_argument("-b", "--batch-size", default=batch_size, type=positive_int, metavar="N",
                        help="global batch size, summed over all processes")
    parser.add_argument("--lr", "--learning-rate", default=lr, type=positive_float, metavar="LR", dest="lr",
                        help="base learning rate, scaled by batch-size/256")
    parser.add_argument("--momentum", default=0.9, type=below_one, metavar="M", help="optimizer momentum")
    parser.add_argument("--wd", "--weight-decay", default=wd, type=nonneg_float, metavar="W", dest="weight_decay")
    parser.add_argument("-p", "--print-freq", default=print_freq, type=positive_int, metavar="N",
                        help="log every N iterations")
    parser.add_argument("--resume", default=resume, metavar="PATH",
                        help="checkpoint to resume from, 'auto' (the newest loadable one in --save-dir) or 'none' "
                             "(default: %(default)s)")
    parser.add_argument("--save-dir", default=save_dir, metavar="PATH", help="checkpoints, log.txt and tb/ go here")
    parser.add_argument("--seed", default=None, type=int, help="seed for initialisation and augmentation")
    add_precision(parser, "pre-training default: bf16 on GPUs that support it, else fp16 on GPU, fp32 on CPU; "
                          "the linear probe defaults to fp32")
    add_trust_checkpoint(parser)
    dist = parser.add_argument_group("distributed")
    dist.add_argument("--world-size", default=-1, type=int, help="number of nodes (with --multiprocessing-distributed)")
    dist.add_argument("--rank", default=-1, type=int, help="node rank (with --multiprocessing-distributed)")
    dist.add_argument("--dist-url", default="env://", type=str, help="rendezvous URL, e.g. tcp://localhost:10001")
    dist.add_argument("--dist-backend", default="nccl", type=str, help="nccl on GPUs; gloo is used on CPU")
    dist.add_argument("--gpu", default=None, type=nonneg_int, help="GPU id for a one-process run")
    dist.add_argument("--multiprocessing-distributed", action="store_true",
                      help="spawn one process per GPU of this node (the authors' launch); torchrun works too")


def add_classifier(group: argparse._ArgumentGroup, verb: str) -> None:
    """The flags of a classifier trained on labels over a pre-trained trunk (the probe, fine-tuning):
    ``--pretrained``, ``-e``, ``--input-size``, ``--vit-feature``, ``--strict-data``."""
    group.add_argument("--pretrained", default="", metavar="CKPT",
                       help=f"pre-training checkpoint (ours, the authors' W2SSL or MoCo v3's) whose trunk is {verb}")
    group.add_argument("-e", "--evaluate", action="store_true",
                       help="only evaluate on DATA/val (the model of --resume, or --pretrained with a fresh fc)")
    group.add_argument("--input-size", default=224, type=positive_int, metavar="PX",
                       help="crop side: RandomResizedCrop(PX) for training, Resize(PX*256/224)+CenterCrop(PX) for val")
    group.add_argument("--vit-feature", default="avg", choices=readout_names(),
                       help="a ViT's vector for the classifier (and --knn): avg, the mean of the patch tokens "
                            "(default: the tokens W2SSL's losses train; its tile read-out never uses the class "
                            "token, which stays near its initialisation), or cls, the class token (MoCo v3's "
                            "probe; for MoCo v3 checkpoints); ResNets use the global average of their last map")
    group.add_argument("--strict-data", action="store_true",
                       help="stop at the first unreadable image instead of skipping it (and counting it)")


def add_label_subset(parser: argparse.ArgumentParser) -> None:
    """The semi-supervised protocol's flags: train on a class-balanced, seeded fraction of DATA/train's labels
    (:mod:`w2ssl.data.label_subset`), or on the images a file lists."""
    group = parser.add_argument_group("labelled subset (semi-supervised protocol)")
    which = group.add_mutually_exclusive_group()
    which.add_argument("--label-fraction", default=None, type=float, metavar="F",
                       help="train on a fraction F of DATA/train's labelled images (e.g. 0.01 or 0.1): per class "
                            "max(1, round(F x its images)), drawn with --label-seed; the list goes to "
                            "--save-dir/labels_kept.txt")
    which.add_argument("--label-file", default="", metavar="FILE",
                       help="train on the images FILE lists, one per line, relative to DATA/train (class/name.jpg) "
                            "or bare file names (SimCLR's 1%%/10%% ImageNet lists); # comments")
    group.add_argument("--label-seed", default=0, type=int, metavar="N",
                       help="seed of the --label-fraction draw (default 0: the same subset for every run and "
                            "every --seed)")


def add_precision(parser: argparse.ArgumentParser | argparse._ArgumentGroup, help: str,
                  default: str | None = None) -> None:
    """``--precision`` with the names of :data:`w2ssl.engine.step.PRECISIONS`."""
    parser.add_argument("--precision", choices=tuple(PRECISIONS), default=default, help=help)


def add_trust_checkpoint(parser: argparse.ArgumentParser) -> None:
    """``--trust-checkpoint``: the one opt-out of safe (weights-only) checkpoint loading, for every CLI."""
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="allow checkpoints that need full unpickling (can run code: trusted files only)")


def _dest_map(parser: argparse.ArgumentParser) -> dict[str, str]:
    names = {}
    for action in parser._actions:
        names[action.dest] = action.dest
        for opt in action.option_strings:
            if opt.startswith("--"):
                names[opt[2:]] = action.dest
                names[opt[2:].replace("-", "_")] = action.dest
    return names


def parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse ``argv``; values from ``--config FILE`` become defaults that the command line overrides."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    if known.config:
        parser.set_defaults(**load_config(known.config, parser))
    return check_values(parser, parser.parse_args(argv))


def load_config(path: str | Path, parser: argparse.ArgumentParser) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} does not exist: check the --config path")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"config file {path} is not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(values, dict):
        raise UserError(f"config file {path} must be a mapping of flag names to values")
    names = _dest_map(parser)
    unknown = sorted(k for k in values if k not in names)
    if unknown:
        raise UserError(f"config file {path} has unknown keys {unknown}: use the flag names of --help")
    return {names[k]: v for k, v in values.items()}


def run_main(main: Callable[[Sequence[str] | None], None], argv: Sequence[str] | None = None) -> int:
    """Call ``main``; a :class:`UserError` becomes ``error: …`` on stderr and exit code 2.

    Under torchrun every process checks the same arguments: only the first of each node prints.
    """
    try:
        main(argv)
    except UserError as e:
        _say(f"error: {e}")
        return 2
    return 0


def warn(message: str) -> None:
    """``WARNING: message`` on stdout before a run starts, where the run's own warnings go (stderr is for the
    one ``error:`` line); under torchrun once per node."""
    _say(f"WARNING: {message}", sys.stdout)


def _say(line: str, stream: TextIO | None = None) -> None:
    if os.environ.get("LOCAL_RANK", "0") == "0":
        print(line, file=stream or sys.stderr, flush=True)


def with_error_boundary(main: Callable[[Sequence[str] | None], None]) -> Callable[[], None]:
    @functools.wraps(main)
    def entry() -> None:
        sys.exit(run_main(main))
    return entry


def expected_world_size(args: argparse.Namespace) -> int:
    """The number of processes the launch will create (to check the batch before starting them)."""
    if "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    if args.multiprocessing_distributed:
        import torch
        return max(torch.cuda.device_count(), 1) * max(args.world_size, 1)
    return max(args.world_size, 1)
