"""Pre-training data: dataset checks, bad-image tolerance, deterministic per-sample augmentation,
a resumable sampler and the loader.

Augmentation randomness is a function of ``(seed, epoch, sample index)`` only, so a run gives the
same batches whatever the number of workers, and a resumed run continues with the very batches the
uninterrupted run would have seen.
"""
from __future__ import annotations

import random
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from torchvision import transforms
from torchvision.datasets import ImageFolder

from . import distributed as D
from .augment import MEAN, STD
from .errors import UserError


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed mixing ``seed``, ``epoch`` and ``index`` (SplitMix64-style constants)."""
    x = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) & (2**64 - 1)
    x ^= x >> 31
    return x & (2**63 - 1)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def image_folder(root: str | Path, what: str = "training", transform: Callable | None = None) -> ImageFolder:
    """An ``ImageFolder`` at ``root``, checked with clear errors; without ``transform`` its items are
    file paths (the folder is only listed)."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{what} folder {root} does not exist: pass DATA whose {root.name}/ holds one "
                        f"sub-folder of images per class (ImageNet layout)")
    try:
        folder = ImageFolder(str(root), transform) if transform else ImageFolder(str(root), loader=_path_only)
    except FileNotFoundError as e:
        raise UserError(f"{what} folder {root} has no images ({e}); expected {root}/<class>/<image>.jpg") from None
    return folder


def _path_only(path: str) -> str:
    return path


def load_rgb(path: str) -> Image.Image:
    with open(path, "rb") as f:
        img = Image.open(f)
        return img.convert("RGB")


class PretrainDataset(Dataset):
    """Images of an ``ImageFolder`` through ``transform``; items are requested as ``(index, epoch)``.

    Without ``transform`` an item is ``((loaded, index, epoch), bad)``, for augmentation in the main process.

    An unreadable file is replaced by the next readable one and reported in the item's ``bad``
    field (the main process counts them and, with ``strict``, stops).
    """

    def __init__(self, root: str | Path, transform: Callable[[Any], Any] | None, seed: int,
                 loader: Callable[[str], Any] = load_rgb):
        self.samples = [path for path, _ in image_folder(root).samples]
        self.transform, self.seed, self.loader = transform, seed, loader

    def __len__(self) -> int:
        return len(self.samples)

    def check_readable(self) -> None:
        """Fail at start when not a single image can be read."""
        for path in self.samples:
            try:
                load_rgb(path)
                return
            except (OSError, ValueError, SyntaxError):
                continue
        raise UserError(f"none of the {len(self.samples)} image files under the training folder can be "
                        f"read (first: {self.samples[0]}): check the dataset")

    def __getitem__(self, key: tuple[int, int]) -> tuple[Any, str]:
        index, epoch = key
        bad = []
        for offset in range(len(self.samples)):
            path = self.samples[(index + offset) % len(self.samples)]
            try:
                img = self.loader(path)
                break
            except (OSError, ValueError, SyntaxError):
                bad.append(path)
        else:
            raise RuntimeError("no readable image left in the dataset")
        if self.transform is None:  # --gpu-aug: augmented on the device, keyed by (index, epoch)
            return (img, index, epoch), "\n".join(bad)
        s = sample_seed(self.seed, epoch, index)
        random.seed(s)
        torch.manual_seed(s)
        return self.transform(img), "\n".join(bad)


class ResumableSampler(Sampler):
    """Distributed shuffling sampler over a span of epochs that can start part-way through one.

    Yields ``(index, epoch)`` for this rank: each epoch's permutation (seeded by ``seed + epoch``) is
    cut into whole global batches of ``batch_size x num_replicas`` and rank ``r`` takes the ``r``-th
    slice of each, so the global batch, in order, is the same whatever the number of processes (the
    montages and hence the whole run are world-size invariant, METHOD §9); the first
    ``start_batch`` batches of the first epoch are skipped, and the epochs up to ``until`` follow one
    another in one stream. One loader iterator then spans the run, so its workers keep prefetching
    across epoch boundaries instead of starting each epoch's first batches from nothing.
    """

    def __init__(self, size: int, batch_size: int, num_replicas: int = 1, rank: int = 0, seed: int = 0):
        self.size, self.batch_size = size, batch_size
        self.num_replicas, self.rank, self.seed = num_replicas, rank, seed
        self.epoch, self.start_batch, self.until = 0, 0, 1

    @property
    def batches_per_epoch(self) -> int:
        return self.size // (self.batch_size * self.num_replicas)

    def set_epoch(self, epoch: int, start_batch: int = 0, until: int | None = None) -> None:
        """Start at batch ``start_batch`` of ``epoch``; end with epoch ``until - 1`` (default: ``epoch``)."""
        self.epoch, self.start_batch = epoch, start_batch
        self.until = epoch + 1 if until is None else until

    def epoch_indices(self, epoch: int) -> list[int]:
        """This rank's indices of a whole ``epoch``: whole batches, the same on every call."""
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + epoch))
        b, world = self.batch_size, self.num_replicas
        batches = order[: self.batches_per_epoch * b * world].view(-1, world, b)  # [batch, rank, b]
        return batches[:, self.rank].reshape(-1).tolist()

    def indices(self) -> list[int]:
        """The first epoch's indices after its ``start_batch`` skipped batches."""
        return self.epoch_indices(self.epoch)[self.start_batch * self.batch_size:]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for epoch in range(self.epoch, self.until):
            yield from ((i, epoch) for i in (self.indices() if epoch == self.epoch else self.epoch_indices(epoch)))

    def __len__(self) -> int:
        return ((self.until - self.epoch) * self.batches_per_epoch - self.start_batch) * self.batch_size


def leave_stop_signals_to_main(worker_id: int) -> None:
    """``worker_init_fn`` of every loader: workers ignore SIGTERM, SIGINT and SIGUSR1.

    SLURM and a terminal's Ctrl-C signal the whole process group; a worker killed by them would make
    the main process's next batch fail before it could save. The main process decides when to stop
    and then shuts its workers down (they also exit on their own once it is gone).
    """
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


def make_loader(dataset: Dataset, sampler: ResumableSampler, workers: int, pin_memory: bool,
                collate_fn: Callable | None = None) -> DataLoader:
    """Batches of ``sampler.batch_size``; workers persist across iterators and prefetch 4 batches each."""
    return DataLoader(dataset, batch_size=sampler.batch_size, sampler=sampler, num_workers=workers,
                      pin_memory=pin_memory, drop_last=True, persistent_workers=workers > 0,
                      prefetch_factor=4 if workers > 0 else None, collate_fn=collate_fn,
                      worker_init_fn=leave_stop_signals_to_main)


def eval_transform(size: int = 224) -> transforms.Compose:
    """Resize to ``size·256/224`` then center-crop ``size`` (the usual ImageNet evaluation)."""
    return transforms.Compose([transforms.Resize(size * 256 // 224), transforms.CenterCrop(size),
                               transforms.ToTensor(), transforms.Normalize(MEAN, STD)])


def train_transform(size: int = 224) -> transforms.Compose:
    """RandomResizedCrop + flip, as in the linear-probe protocol."""
    return transforms.Compose([transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(),
                               transforms.ToTensor(), transforms.Normalize(MEAN, STD)])


def labelled_loader(root: str | Path, transform: Callable, batch_size: int, workers: int, shuffle: bool,
                    what: str) -> tuple[DataLoader, int]:
    """A loader over the ImageFolder at ``root`` (sharded when distributed) and its number of classes."""
    dataset = image_folder(root, what, transform)
    sampler = DistributedSampler(dataset, shuffle=shuffle) if D.is_dist() else None
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
                        num_workers=workers, pin_memory=torch.cuda.is_available(), drop_last=False,
                        persistent_workers=workers > 0, worker_init_fn=leave_stop_signals_to_main)
    return loader, len(dataset.classes)
