"""``main_lincls.py --knn``: weighted kNN accuracy (METHOD §7) of a pre-trained checkpoint's trunk."""
from __future__ import annotations

import math
import time
from argparse import Namespace

from w2ssl.data.datasets import BadImages
from w2ssl.data.sources import load_subset
from w2ssl.dist import distributed as D
from w2ssl.engine.monitor import Logger, format_duration
from w2ssl.engine.speed import prepare_model
from w2ssl.engine.step import PRECISIONS
from w2ssl.eval.knn import folder_loaders, format_knn, knn_eval, knn_scalars
from w2ssl.eval.probe_model import build_model


def knn_probe(ctx: D.Context, args: Namespace) -> None:
    """Weighted kNN (k = 20 and 200, T = 0.07) of the pre-trained trunk: train bank -> val accuracy."""
    logger = Logger(args.save_dir, ctx.is_main)
    try:
        batch, workers = args.batch_size // ctx.world_size, math.ceil(args.workers / ctx.local_world_size)
        train, val, classes = folder_loaders(args.data, args.input_size, batch, workers,
                                             BadImages(args.strict_data, logger.warn if ctx.is_main else None),
                                             subset=load_subset(args.subset), cache_dir=args.save_dir)
        model, _ = build_model(args.arch, classes, args.pretrained, args.trust_checkpoint, args.vit_feature)
        model.to(ctx.device)
        channels_last = ctx.device.type == "cuda"
        prepare_model(model, channels_last)
        start = time.perf_counter()
        result = knn_eval(model.trunk, train, val, ctx.device, classes, channels_last=channels_last,
                          autocast_dtype=PRECISIONS[args.precision or "fp32"], readout=model.readout)
        logger.info(f"=> {format_knn(result)} of {args.pretrained} in {format_duration(time.perf_counter() - start)}")
        logger.scalars(0, knn_scalars(result), prefix="eval/")
    finally:
        logger.close()
