"""The pre-training data of one process: the image list, the method's augmentation on the chosen path
(``--gpu-aug``, ``--cpu-aug fast`` or the PIL reference), the resumable sampler and the loader."""
from __future__ import annotations

import math
from argparse import Namespace
from dataclasses import dataclass

from torch import nn
from torch.utils.data import DataLoader

from w2ssl.data.augment import load_splittable
from w2ssl.data.datasets import PretrainDataset
from w2ssl.data.fast_augment import FastCollate, load_uint8
from w2ssl.data.gpu_augment import collate_pretrain, encoded_with_path
from w2ssl.data.sampler import ResumableSampler, make_loader
from w2ssl.data.sources import load_subset, pretrain_images
from w2ssl.dist import distributed as D
from w2ssl.engine.monitor import Logger
from w2ssl.errors import UserError
from w2ssl.methods.registry import Method


@dataclass
class PretrainData:
    """``gpu_crop``: the device transform of ``--gpu-aug`` (None: the loader gives the views themselves);
    ``workers``: this process's loader workers."""

    dataset: PretrainDataset
    sampler: ResumableSampler
    loader: DataLoader
    gpu_crop: nn.Module | None
    workers: int


def pretrain_data(ctx: D.Context, args: Namespace, method: Method, seed: int, logger: Logger) -> PretrainData:
    """This process's share of ``args.data`` for ``method``, every draw from ``seed``; rank 0 checks that
    the files can be read and says what the listing found."""
    listing, how = pretrain_images(args.data, load_subset(args.subset), args.save_dir, write=ctx.is_main,
                                   batch_size=args.batch_size)
    skipped = listing.skipped
    (logger.warn if skipped.repeated or skipped.unreadable else logger.info)(
        f"=> data: {listing.describe()}; {how}; labels unused")
    images = [path for path, _ in listing.samples]
    gpu_crop, collate = None, None
    if args.gpu_aug:
        # Workers only read bytes; decoding and the crops run batched on the device.
        dataset = PretrainDataset(images, None, seed, loader=encoded_with_path)
        gpu_crop, collate = method.gpu_transform(args), collate_pretrain
    elif args.cpu_aug == "fast" and method.fast_transform is not None:
        # Workers decode with PIL and augment whole batches (w2ssl.data.fast_augment).
        dataset = PretrainDataset(images, None, seed, loader=load_uint8)
        collate = FastCollate(method.fast_transform(args), seed)
    else:
        dataset = PretrainDataset(images, method.transform(args), seed, loader=load_splittable)
    if ctx.is_main:
        dataset.check_readable()
    sampler = ResumableSampler(len(dataset), args.batch_size // ctx.world_size, ctx.world_size, ctx.rank, seed)
    if sampler.batches_per_epoch == 0:
        raise UserError(f"the training folder has {len(dataset)} images, fewer than one batch of "
                        f"{args.batch_size}: lower --batch-size")
    workers = math.ceil(args.workers / ctx.local_world_size)
    loader = make_loader(dataset, sampler, workers, pin_memory=ctx.device.type == "cuda", collate_fn=collate)
    return PretrainData(dataset, sampler, loader, gpu_crop, workers)
