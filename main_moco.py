#!/usr/bin/env python
"""Self-supervised pre-training (W2SSL, or the MoCo v3 baseline): parse, check, launch (see README.md)."""
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
from w2ssl.methods.registry import build_model, method_names, method_spec
from w2ssl.system import disk
from w2ssl.train.pretrain import train
from w2ssl.trunks import trunk_names, trunk_spec

# MoCo v3's ViT recipe: the defaults of these flags when --arch is a ViT and neither the command line nor
# --config sets them (--lr is scaled by batch/256 as for ResNets).
FAMILY_DEFAULTS = {"vit": {"optimizer": "adamw", "lr": 1.5e-4, "weight_decay": 0.1, "warmup_epochs": 40,
                           "epochs": 300, "moco_m_cos": True, "moco_m": 0.99}}
EPILOG = ("ViT trunks (-a vit_*) default to MoCo v3's ViT recipe for the flags not given: --optimizer adamw "
          "--lr 1.5e-4 --wd 0.1 --warmup-epochs 40 --epochs 300 --moco-m-cos --moco-m 0.99.")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="W2SSL ImageNet pre-training", epilog=EPILOG)
    cli.add_common(parser, batch_size=512, lr=0.6, wd=1e-6, epochs=200, print_freq=100, save_dir="outputs")
    parser.add_argument("--method", default="w2ssl", choices=method_names(),
                        help="w2ssl (the default), or mocov3: MoCo v3's two views at 2 x --tile-size px, the baseline")
    parser.add_argument("--stop-grad-conv1", action="store_true",
                        help="ViTs with a patch projection (vit_small, vit_base): keep it random and frozen (MoCo v3)")
    w2 = parser.add_argument_group("W2SSL")
    w2.add_argument("--tile-size", default=112, type=int,
                    help="side of each crop; montages (and MoCo v3's views) are twice as large")
    w2.add_argument("--crop-min", default=0.2, type=cli.fraction, help="minimum RandomResizedCrop scale")
    w2.add_argument("--cross", default=0.3, type=float,
                    help="overlap of the left and right crops, a fraction of the width (0.3 as published; 0: none)")
    w2.add_argument("--flip-p", default=0.5, type=cli.unit_interval,
                    help="horizontal flip probability of each tile (0.5 as published; for diagnostics)")
    w2.add_argument("--crop_proj_dim", default=256, type=cli.positive_int, help="projector/predictor output dimension")
    w2.add_argument("--moco-mlp-dim", default=4096, type=cli.positive_int, help="hidden dimension of the MLP heads")
    w2.add_argument("--loss_t", default=0.3, type=cli.positive_float, help="temperature of the 'what' (SupCon) loss")
    w2.add_argument("--loss_loc", default=1.0, type=cli.nonneg_float, help="weight of the 'where' loss")
    w2.add_argument("--loss_crop", default=1.0, type=cli.nonneg_float, help="weight of the 'what' loss")
    w2.add_argument("--moco-m", default=0.99, type=cli.unit_interval, help="momentum of the EMA encoder")
    w2.add_argument("--moco-m-cos", action=argparse.BooleanOptionalAction, default=False,
                    help="raise the momentum to 1 on a half-cosine")
    w2.add_argument("--moco-dim", default=256, type=cli.positive_int,
                    help="--method mocov3: projector/predictor output dimension (unused by W2SSL, as in the "
                         "authors' code)")
    w2.add_argument("--moco-t", default=1.0, type=cli.positive_float,
                    help="--method mocov3: InfoNCE temperature (unused by W2SSL, as in the authors' code)")
    w2.add_argument("--loss_clu", default=1.0, type=float, help="authors' flag, unused by their released model")
    w2.add_argument("--optimizer", default="lars", choices=("lars", "adamw"))
    w2.add_argument("--warmup-epochs", default=10, type=cli.nonneg_int, metavar="N")
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
    return parser


def parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """:func:`w2ssl.cli.parse` with :data:`FAMILY_DEFAULTS` of the ``--arch`` given (command line, else
    ``--config``) under the config's values and the command line's."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("-a", "--arch")
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    arch = known.arch or (cli.load_config(known.config, parser).get("arch") if known.config else None)
    if arch in trunk_names():
        parser.set_defaults(**FAMILY_DEFAULTS.get(trunk_spec(arch).family, {}))
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
    if not 0 <= args.cross < 0.5 or not 0 <= args.flip_p <= 1:
        raise UserError(f"--cross must be in [0, 0.5) and --flip-p in [0, 1]; got {args.cross} and {args.flip_p}")
    if args.stop_grad_conv1 and (trunk_spec(args.arch).family != "vit" or args.arch.startswith("vit_conv")):
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
