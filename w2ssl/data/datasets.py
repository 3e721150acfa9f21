"""Data: dataset checks, bad-image tolerance, deterministic per-sample augmentation and named random
streams, labelled loaders (the sampler of pre-training is in :mod:`w2ssl.data.sampler`).
"""
from __future__ import annotations

import hashlib
import random
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision import transforms
from torchvision.datasets import ImageFolder

from w2ssl.data.augment import MEAN, STD
from w2ssl.data.listing import Listing, Skipped
from w2ssl.data.sampler import Loader
from w2ssl.data.sources import labelled_listing
from w2ssl.data.subset import Subset
from w2ssl.dist import distributed as D
from w2ssl.errors import UserError, key_list


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed mixing ``seed``, ``epoch`` and ``index`` (SplitMix64-style constants)."""
    x = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) & (2**64 - 1)
    x ^= x >> 31
    return x & (2**63 - 1)


def stream_seed(seed: int, stream: str, epoch: int, index: int) -> int:
    """The seed of draw ``index`` of ``epoch`` in the random stream named ``stream`` (e.g. ``"tile_perm"``):
    :func:`sample_seed` of the run's seed mixed with a 64-bit hash of the name, so that streams never share
    draws with each other or with the per-sample augmentation seeds. Renaming a stream changes its draws."""
    name = int.from_bytes(hashlib.blake2b(stream.encode(), digest_size=8).digest(), "little")
    return sample_seed(seed ^ name, epoch, index)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _path_only(path: str) -> str:
    return path


def load_rgb(path: str) -> Image.Image:
    with open(path, "rb") as f:
        img = Image.open(f)
        return img.convert("RGB")


class ListedFolder(ImageFolder):
    """torchvision's ``ImageFolder`` over a :class:`w2ssl.data.listing.Listing` (no second scan)."""

    def __init__(self, listing: Listing, transform: Callable | None = None,
                 loader: Callable[[str], Any] = load_rgb):
        self.listing = listing
        super().__init__(listing.root, transform, loader=loader, allow_empty=True)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        return list(self.listing.classes), {name: i for i, name in enumerate(self.listing.classes)}

    def make_dataset(self, *_, **__) -> list[tuple[str, int]]:
        return self.listing.samples


def image_folder(root: str | Path, what: str = "training", transform: Callable | None = None,
                 warn: Callable[[str], None] | None = None, subset: Subset | None = None,
                 cache_dir: str | Path | None = None) -> ImageFolder:
    """An ``ImageFolder`` at ``root`` (listed by :mod:`w2ssl.data.listing`: each directory once, hidden
    entries skipped; cached in ``cache_dir``), restricted to ``subset``, checked with clear errors; without
    ``transform`` its items are file paths (the folder is only listed). Class folders without images and
    folders skipped as repeated (symlink loops) or unreadable are warned about (``warn``, default: a
    ``WARNING:`` line on stderr from the main process), not refused."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{what} folder {root} does not exist: pass DATA whose {root.name}/ holds one "
                        f"sub-folder of images per class (ImageNet layout)")
    listing = labelled_listing(root, subset, cache_dir, write=D.is_main())
    if not listing.classes:
        raise UserError(f"{what} folder {root} has no class sub-folders; expected {root}/<class>/<image>.jpg")
    folder = ListedFolder(listing, transform, loader=load_rgb if transform else _path_only)
    if not folder.samples:
        raise UserError(f"{what} folder {root} has no images in its {len(folder.classes)} class sub-folders; "
                        f"expected {root}/<class>/<image>.jpg")
    warn = warn or warn_main
    skipped = listing.skipped
    if skipped.repeated or skipped.unreadable:
        warn(f"{what} folder {root}: skipped {Skipped(Counter(), skipped.repeated, skipped.unreadable).describe()}")
    counts = Counter(folder.targets)
    empty = [name for i, name in enumerate(folder.classes) if counts[i] == 0]
    if empty:
        warn(f"{what} folder {root}: class folder(s) {key_list(empty)} hold no images; going on with "
             f"the {len(folder.samples)} images of the other {len(folder.classes) - len(empty)}")
    return folder


def warn_main(line: str) -> None:
    """A ``WARNING:`` line on stderr, from the main process only."""
    if D.is_main():
        print(f"WARNING: {line}", file=sys.stderr, flush=True)


def check_same_classes(train: list[str], val: list[str], root: str | Path) -> None:
    """Raise :class:`UserError` unless the train and val folders of ``root`` have the same class folders."""
    if train != val:
        only_train, only_val = sorted(set(train) - set(val)), sorted(set(val) - set(train))
        raise UserError(f"{root}/train and {root}/val need the same class sub-folders: only in train "
                        f"{key_list(only_train) or 'none'} ({len(train)} classes), only in val "
                        f"{key_list(only_val) or 'none'} ({len(val)} classes)")


class PretrainDataset(Dataset):
    """Images (the paths given, or those of the ``ImageFolder`` at ``images``) through ``transform``; items
    are requested as ``(index, epoch)``.

    Without ``transform`` an item is ``((loaded, index, epoch), bad)``, for augmentation in the main process.

    An unreadable file is replaced by the next readable one and reported in the item's ``bad``
    field (the main process counts them and, with ``strict``, stops).
    """

    def __init__(self, images: str | Path | list[str], transform: Callable[[Any], Any] | None, seed: int,
                 loader: Callable[[str], Any] = load_rgb):
        self.samples = images if isinstance(images, list) else [path for path, _ in image_folder(images).samples]
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


def eval_transform(size: int = 224) -> transforms.Compose:
    """Resize to ``size·256/224`` then center-crop ``size`` (the usual ImageNet evaluation)."""
    return transforms.Compose([transforms.Resize(size * 256 // 224), transforms.CenterCrop(size),
                               transforms.ToTensor(), transforms.Normalize(MEAN, STD)])


def train_transform(size: int = 224) -> transforms.Compose:
    """RandomResizedCrop + flip, as in the linear-probe protocol."""
    return transforms.Compose([transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(),
                               transforms.ToTensor(), transforms.Normalize(MEAN, STD)])


Select = Callable[[list[tuple[str, int]], list[str]], list[tuple[str, int]]]  # (samples, classes) -> kept samples


class LabelledFolder(Dataset):
    """An ImageFolder's images and labels, tolerant of unreadable files.

    Items are ``(image or None, class index, index, bad)``, ``bad`` the unreadable paths met ("\\n"-joined).
    With ``substitute`` (training) an unreadable image is replaced by the next readable one, with its own
    label, so that batches keep their size and processes their step count; without (evaluation) the
    image is None and :func:`collate_readable` drops the sample.
    """

    def __init__(self, root: str | Path, transform: Callable, what: str, substitute: bool,
                 warn: Callable[[str], None] | None = None, select: Select | None = None,
                 subset: Subset | None = None, cache_dir: str | Path | None = None):
        folder = image_folder(root, what, warn=warn, subset=subset, cache_dir=cache_dir)
        self.samples, self.classes = folder.samples, folder.classes
        if select is not None:  # e.g. the labelled subset of the semi-supervised protocol
            self.samples = select(self.samples, self.classes)
        self.transform, self.substitute = transform, substitute

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int, int, str]:
        bad = []
        for offset in range(len(self.samples) if self.substitute else 1):
            path, target = self.samples[(index + offset) % len(self.samples)]
            try:
                img = load_rgb(path)
            except (OSError, ValueError, SyntaxError):
                bad.append(path)
                continue
            return self.transform(img), target, index, "\n".join(bad)
        return None, self.samples[index][1], index, "\n".join(bad)


def collate_readable(items: list[tuple[Any, int, int, str]]) -> tuple[Tensor | None, Tensor, Tensor, list[str]]:
    """:class:`LabelledFolder` items -> ``(images [b, ...], targets [b], indices [b], unreadable paths)``,
    the unreadable samples dropped (``images`` is None when none is left)."""
    kept = [item for item in items if item[0] is not None]
    bad = [path for *_, joined in items if joined for path in joined.split("\n")]
    images = torch.stack([item[0] for item in kept]) if kept else None
    return (images, torch.tensor([item[1] for item in kept], dtype=torch.long),
            torch.tensor([item[2] for item in kept], dtype=torch.long), bad)


class BadImages:
    """Unreadable image files met by labelled loaders: counted, each warned about once; with ``strict``
    the first one stops the run (:class:`UserError`, exit 2), as pre-training's ``--strict-data``."""

    def __init__(self, strict: bool = False, warn: Callable[[str], None] | None = None):
        self.strict, self.warn, self.paths = strict, warn or _warn_stderr, set()

    def note(self, paths: Iterable[str]) -> None:
        for path in paths:
            if self.strict:
                raise UserError(f"unreadable image file {path}: remove or replace it (or drop --strict-data "
                                f"to skip bad files)")
            if path not in self.paths:
                self.paths.add(path)
                self.warn(f"unreadable image file {path} skipped ({len(self.paths)} so far)")


def _warn_stderr(line: str) -> None:
    print(f"WARNING: {line}", file=sys.stderr, flush=True)


class LabelledLoader:
    """Batches ``(images [b, 3, H, W], targets [b], dataset indices [b])`` of a :class:`LabelledFolder`.

    Unreadable files go to ``bad`` (:class:`BadImages`), never into a batch; a batch with no readable
    image is left out.
    """

    def __init__(self, loader: DataLoader, bad: BadImages):
        self.loader, self.bad = loader, bad

    @property
    def dataset(self) -> LabelledFolder:
        return self.loader.dataset

    @property
    def sampler(self) -> Any:
        return self.loader.sampler

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        for images, targets, indices, bad in self.loader:
            self.bad.note(bad)
            if images is not None:
                yield images, targets, indices


def labelled_loader(root: str | Path, transform: Callable, batch_size: int, workers: int, shuffle: bool,
                    what: str, training: bool | None = None, bad: BadImages | None = None,
                    warn: Callable[[str], None] | None = None, select: Select | None = None,
                    subset: Subset | None = None, cache_dir: str | Path | None = None) -> tuple[LabelledLoader, int]:
    """A loader over the ImageFolder at ``root`` (sharded when distributed) and its number of classes.

    ``training`` (default: ``shuffle``) substitutes unreadable images and pads the shards to equal length
    (every process takes the same steps); evaluation drops unreadable images and gives each image to
    exactly one process, unpadded. ``bad`` counts the unreadable files (default: warn, never stop).
    ``select`` keeps some of the folder's ``(path, class index)`` samples (it gets them and the class names).
    ``subset`` and ``cache_dir``: as for :func:`image_folder`.
    """
    training = shuffle if training is None else training
    dataset = LabelledFolder(root, transform, what, substitute=training, warn=warn, select=select, subset=subset,
                             cache_dir=cache_dir)
    if not D.is_dist():
        sampler = None
    elif training:
        sampler = DistributedSampler(dataset, shuffle=shuffle)
    else:
        sampler = range(D.rank(), len(dataset), D.world_size())
    loader = Loader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
                    num_workers=workers, pin_memory=torch.cuda.is_available(), drop_last=False,
                    persistent_workers=workers > 0, collate_fn=collate_readable)
    return LabelledLoader(loader, bad or BadImages(warn=warn)), len(dataset.classes)
