#!/usr/bin/env python
"""End-to-end fine-tuning of a pre-trained trunk on labelled images (all labels, a fraction, or another
folder for transfer): parse, check, launch. The recipe is in :mod:`w2ssl.eval.finetune`."""
from __future__ import annotations

import argparse
from collections.abc import Sequence

from w2ssl import cli
from w2ssl.dist.distributed import launch
from w2ssl.eval.finetune import apply_recipe, worker
from w2ssl.eval.run_checks import check_classifier_run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Fine-tune a pre-trained W2SSL / MoCo v3 trunk with labels")
    # lr, weight decay and epochs: None = the fine-tuning recipe of the trunk family (Family.finetune_recipe)
    cli.add_common(parser, batch_size=256, lr=None, wd=None, epochs=None, print_freq=10,
                   save_dir="outputs/finetune", arch=None, resume="auto")
    tune = parser.add_argument_group("fine-tuning (defaults: ResNets SimCLR's recipe, ViTs MAE's; see README)")
    cli.add_classifier(tune, "fine-tuned")
    tune.add_argument("--optimizer", choices=("sgd", "adamw"), default=None,
                      help="sgd (Nesterov, --momentum; ResNet default) or adamw (ViT default)")
    tune.add_argument("--warmup-epochs", default=None, type=float, metavar="N",
                      help="linear lr warm-up before the cosine (ResNet 0, ViT 5)")
    tune.add_argument("--layer-decay", default=None, type=float, metavar="D",
                      help="ViTs: block i's lr is D^(depth+1-layer) of the head's (default 0.65, MAE's ViT-B)")
    tune.add_argument("--drop-path", default=None, type=float, metavar="P",
                      help="ViTs: stochastic depth rate (default 0.1)")
    tune.add_argument("--smoothing", default=None, type=float, metavar="S",
                      help="label smoothing of the cross-entropy (ResNet 0, ViT 0.1)")
    tune.add_argument("--mixup", default=None, type=float, metavar="A",
                      help="mixup's Beta(A, A) (ResNet 0 = off, ViT 0.8; mixed with CutMix half of the batches)")
    tune.add_argument("--cutmix", default=None, type=float, metavar="A",
                      help="CutMix's Beta(A, A) (ResNet 0 = off, ViT 1.0)")
    tune.add_argument("--aa", default=None, metavar="POLICY",
                      help="timm's RandAugment policy, or none (ResNet none, ViT rand-m9-mstd0.5-inc1)")
    tune.add_argument("--reprob", default=None, type=float, metavar="P",
                      help="random erasing probability after normalisation (ResNet 0, ViT 0.25)")
    tune.add_argument("--head-init-std", default=None, type=float, metavar="S",
                      help="the new fc's weights start N(0, S) (ResNet SimCLR's 0.01, ViT MAE's 2e-5)")
    tune.add_argument("--max-nonfinite", default=20, type=int, metavar="N",
                      help="fp16: stop after N consecutive non-finite losses (bf16/fp32 stop at the first)")
    cli.add_label_subset(parser)
    parser.set_defaults(cached=False)  # the probe's loop asks: fine-tuning always trains on images
    return parser


def check(args: argparse.Namespace, world_size: int) -> None:
    """Checks that can fail before any process starts; the recipe's defaults filled in."""
    check_classifier_run(args, world_size)
    apply_recipe(args)


def main(argv: Sequence[str] | None = None) -> None:
    args = cli.parse(build_parser(), argv)
    check(args, cli.expected_world_size(args))
    launch(worker, args)


if __name__ == "__main__":
    cli.with_error_boundary(main)()
