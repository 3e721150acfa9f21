#!/usr/bin/env python
"""Self-supervised pre-training (W2SSL, or the MoCo v3 and BYOL baselines): parse, check, launch (see README.md)."""
from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from w2ssl import cli, demo
from w2ssl.checkpoint import check_resume_path
from w2ssl.data.listing import detect_layout
from w2ssl.data.sources import load_subset
from w2ssl.dist.distributed import launch
from w2ssl.errors import UserError
from w2ssl.methods.registry import build_model, method_arguments, method_names, method_spec
from w2ssl.system import disk
from w2ssl.train.pretrain import train
from w2ssl.trunks import trunk_names, trunk_spec


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="W2SSL ImageNet pre-training")
    cli.add_common(parser, batch_size=512, lr=0.6, wd=1e-6, epochs=200, print_freq=100, save_dir="outputs")
    parser.add_argument("--method", default="w2ssl", choices=method_names(),
                        help="w2ssl (the default); mocov3 or byol: two views at 2 x --tile-size px, the baselines")
    parser.add_argument("--stop-grad-conv1", action="store_true",
                        help="ViTs with a patch projection (vit_small, vit_base): keep it random and frozen (MoCo v3)")
    aug = parser.add_argument_group("augmentation")
    aug.add_argument("--tile-size", default=112, type=int,  # 0 and below: check_tile_size says what fits
                     help="side of each crop; montages (and the two-view methods' views) are twice as large")
    aug.add_argument("--crop-min", default=0.2, type=cli.fraction, help="minimum RandomResizedCrop scale")
    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--optimizer", default="lars", choices=("lars", "adamw"))
    opt.add_argument("--warmup-epochs", default=10, type=cli.nonneg_int, metavar="N")
    opt.add_argument("--clip-grad", default=0.0, type=cli.nonneg_float, metavar="NORM",
                     help="clip the gradients' global L2 norm to NORM before each step (0: off, as published)")
    for arguments in method_arguments():
        arguments.add(parser.add_argument_group(arguments.title))
    run = parser.add_argument_group("running")
    run.add_argument("--save-freq-iters", default=0, type=cli.nonneg_int, metavar="N",
                     help="also write checkpoint_last every N iterations (0: only at epoch ends)")
    run.add_argument("--keep", default=0, type=cli.nonneg_int, metavar="N",
                     help="keep the N newest epoch checkpoints (0: all)")
    run.add_argument("--strict-data", action="store_true",
                     help="stop at the first unreadable image instead of skipping it")
    run.add_argument("--max-nonfinite", default=20, type=cli.nonneg_int, metavar="N",
                     help="fp16: stop after N consecutive non-finite losses (bf16/fp32 stop at the first)")
    run.add_argument("--max-iters", default=0, type=cli.nonneg_int, metavar="N",
                     help="stop after N global steps without a checkpoint and print img/s (benchmarks)")
    run.add_argument("--cpu-aug", default="fast", choices=("fast", "pil"),
                     help="the loader workers' augmentation: 'fast' (default) batches the METHOD §1 ops of "
                          "whole batches in compiled loops; 'pil' is the reference pipeline, op by op in PIL")
    run.add_argument("--gpu-aug", action="store_true",
                     help="decode JPEGs and augment on the GPU instead (workers only read bytes)")
    run.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                     help="NHWC activations (default: on for GPUs)")
    run.add_argument("--compile", action="store_true", help="torch.compile the trunks")
    run.add_argument("--fused-views", action=argparse.BooleanOptionalAction, default=False,
                     help="run both views through each encoder and head in one call, every BatchNorm still "
                          "normalising each view on its own: same math, half the calls (faster for small "
                          "montages on CPUs, slower for large ones; see BENCHMARKS.md)")
    run.add_argument("--knn-every", default=0, type=cli.nonneg_int, metavar="E",
                     help="kNN-evaluate every E epochs (0: never)")
    run.add_argument("--knn-data", metavar="DIR", help="labelled ImageFolder root with train/ and val/ for --knn-every")
    run.add_argument("--knn-size", default=224, type=cli.positive_int, help="center-crop size for --knn-every")
    run.add_argument("--demo", action="store_true",
                     help="pre-train on a small embedded photo set with CPU-sized settings, then compare kNN "
                          "accuracy with a random trunk")
    parser.set_defaults(resume="auto")  # like DINO: a restarted run continues from its newest checkpoint
    parser.epilog = defaults_epilog(parser)
    return parser


def defaults_epilog(parser: argparse.ArgumentParser) -> str:
    """``--help``'s last paragraph: the order of the defaults, and the recipes the registries declare."""
    def flags(values: dict) -> str:
        option = {a.dest: next(o for o in a.option_strings if o.startswith("--")) for a in parser._actions
                  if any(o.startswith("--") for o in a.option_strings)}

        def one(dest: str, v: object) -> str:
            if isinstance(v, bool):
                return option[dest] if v else f"--no-{option[dest][2:]}"
            return f"{option[dest]} {v:g}" if isinstance(v, float) else f"{option[dest]} {v}"
        return " ".join(one(dest, v) for dest, v in values.items())

    methods = [f"--method {name}: {flags(dict(method_spec(name).defaults))}" for name in method_names()
               if method_spec(name).defaults]
    families = {}
    for name in trunk_names():
        family = trunk_spec(name).family
        if family.pretrain_recipe:
            families.setdefault(family.name, (family, []))[1].append(name)
    recipes = [f"-a {', '.join(names)}: {flags(dict(family.pretrain_recipe))}" for family, names in families.values()]
    return ("Defaults, lowest first: the published W2SSL run's; the method's recipe (" + "; ".join(methods) +
            "); the trunk family's (" + "; ".join(recipes) + "); --config; the command line.")


def parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """:func:`w2ssl.cli.parse` with the defaults of the ``--method`` and ``--arch`` given (command line, else
    ``--config``): the method's recipe, then the trunk family's, under the config's values and the command line's."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--method")
    pre.add_argument("-a", "--arch")
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    config = cli.load_config(known.config, parser) if known.config else {}
    method, arch = known.method or config.get("method"), known.arch or config.get("arch")
    if method in method_names():
        parser.set_defaults(**method_spec(method).defaults)
    if arch in trunk_names():
        parser.set_defaults(**trunk_spec(arch).family.pretrain_recipe)
    return cli.parse(parser, argv)


def check(args: argparse.Namespace, world_size: int) -> None:
    """Checks that can fail before any process starts."""
    if not args.data:
        raise UserError("no dataset given: pass DATA (a folder of images, DATA/train/<class>/<image> as ImageNet, "
                        "or a text file listing image paths), or --demo")
    detect_layout(args.data)
    load_subset(args.subset)
    cli.check_folder(args.save_dir, "--save-dir", output=True)
    cli.check_folder(args.knn_data, "--knn-data")
    cli.check_file(args.config, "--config")
    method = method_spec(args.method)
    method.check_batch(args.batch_size, world_size)
    if args.gpu_aug and method.gpu_transform is None:
        raise UserError(f"--gpu-aug has no device augmentation for --method {args.method}: drop --gpu-aug")
    if args.stop_grad_conv1 and "stop_grad_conv1" not in trunk_spec(args.arch).switches:
        raise UserError(f"--stop-grad-conv1 freezes a ViT's linear patch projection, which {args.arch} does "
                        f"not have: drop --stop-grad-conv1")
    with torch.device("meta"):  # shapes and sizes only: nothing is allocated
        model = build_model(args)
    # eval: shapes only, no batch statistics
    side = check_tile_size(args.tile_size, args.arch, method.input_size, model.base_encoder.eval())
    if side < method.min_map:
        cli.warn(f"--tile-size {args.tile_size} leaves {args.arch} a {side}x{side} feature map per input, and "
                 f"{args.method} needs {method.min_map}x{method.min_map} (one cell per tile) to learn: pass "
                 f"--tile-size {args.tile_size * method.min_map // side} or more (112 as published)")
    if not args.max_iters:  # --max-iters writes no checkpoint
        disk.refuse_if_too_small(args.save_dir, disk.checkpoint_bytes(model, args.optimizer))
    if args.demo and args.max_iters:
        raise UserError("--demo compares kNN accuracy on the saved checkpoint, and --max-iters stops without "
                        "one: drop --max-iters (or run python -m bench.e2e for throughput)")
    if args.knn_every and not (args.knn_data and (Path(args.knn_data) / "val").is_dir()):
        raise UserError("--knn-every needs --knn-data DIR with DIR/train and DIR/val labelled image folders")
    check_resume_path(args.resume)


def check_tile_size(tile: int, arch: str, input_size: Callable[[int], int], trunk: nn.Module) -> int:
    """The trunk's input for ``tile`` (``input_size(tile)`` px: a montage, or MoCo v3's view) must leave
    ``trunk`` (on the meta device) a feature map of at least 1x1 (ViTs: a side that is a multiple of 16).
    Returns the map's smaller side."""
    def map_side(t: int) -> int:
        side = input_size(t)
        try:
            return min(trunk(torch.empty(2, 3, side, side, device="meta")).shape[-2:])
        except (RuntimeError, ValueError):  # a kernel larger than its padded input; a side ViTs cannot patch
            return 0

    def fits(t: int) -> bool:
        return map_side(t) >= 1

    side = map_side(tile) if tile >= 1 else 0
    if side < 1:
        fitting = next(t for t in range(max(tile, 1), 4096) if fits(t))
        if any(fits(t) for t in range(1, tile)):  # a ViT: the input's side must be a multiple of 16
            raise UserError(f"--tile-size {tile} does not fit {arch} (an input of {input_size(tile)} px is not a "
                            f"whole number of patches): pass --tile-size {fitting} (112 as published)")
        raise UserError(f"--tile-size {tile} is too small for {arch} (its input must leave the last layer a "
                        f"feature map): pass --tile-size {fitting} or more (112 as published)")
    return side


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parse(parser, argv)
    if args.demo:
        args = demo.prepare(parser, argv)
    check(args, cli.expected_world_size(args))
    if args.demo and (note := demo.previous_run(args)):
        print(note, flush=True)
    launch(train, args)
    if args.demo:
        demo.report(args)


if __name__ == "__main__":
    cli.with_error_boundary(main)()
