"""Cached-feature linear probe (``--cached``): the frozen trunk runs once, then ``fc`` trains on stored features.

The full protocol draws a fresh RandomResizedCrop + flip of every training image each epoch. Here every
image has a fixed bank of views, its center crop plus ``--cached-aug K`` augmented crops, and each epoch
draws one of them per image. It trades per-epoch augmentation for speed: its accuracy approximates the
published protocol's rather than reproducing it. Validation uses the same center crops as the full probe.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from w2ssl.data.datasets import sample_seed

STORE = torch.float16  # halves the bank; pooled post-ReLU features are far inside float16's range


@torch.no_grad()
def extract_into(featurize: Callable[[Tensor], Tensor], loader: Iterable, out: Tensor) -> Tensor:
    """Fill the first ``m`` rows of ``out [n, C]`` with ``featurize`` of ``loader``'s ``(images, labels, ...)``
    batches, in order; return their labels ``[m]``.

    ``n`` is the number of samples the loader reads (``len(loader.sampler)``); ``m < n`` when it left
    unreadable images out.
    """
    labels = torch.empty(len(out), dtype=torch.long, device=out.device)
    row = 0
    for images, target, *_ in loader:
        feats = featurize(images)
        out[row:row + len(feats)] = feats.to(out.dtype)
        labels[row:row + len(feats)] = torch.as_tensor(target).to(out.device)
        row += len(feats)
    return labels[:row]


class FeatureCache:
    """Frozen features of this process's training shard (several views) and validation shard."""

    def __init__(self, train: Tensor, train_labels: Tensor, val: Tensor, val_labels: Tensor):
        """``train [V, n, C]``, ``train_labels [n]``, ``val [m, C]``, ``val_labels [m]``, on one device."""
        self.train, self.train_labels, self.val, self.val_labels = train, train_labels, val, val_labels

    @classmethod
    def extract(cls, featurize: Callable[[Tensor], Tensor], train_views: Sequence[DataLoader], val_loader: DataLoader,
                dim: int, device: torch.device) -> FeatureCache:
        """One trunk pass per loader: ``train_views`` are unshuffled loaders over the same images (one per view),
        which replace unreadable images (so every process holds as many as the others); ``val_loader`` may
        leave them out."""
        n = len(train_views[0].sampler)
        train = torch.empty(len(train_views), n, dim, dtype=STORE, device=device)
        train_labels = extract_into(featurize, train_views[0], train[0])
        for v, loader in enumerate(train_views[1:], start=1):
            if not torch.equal(extract_into(featurize, loader, train[v]), train_labels):
                raise RuntimeError("training views came in different orders: their loaders must not shuffle")
        if len(train_labels) != n:
            raise RuntimeError(f"the training loader yielded {len(train_labels)} samples, expected {n}")
        val = torch.empty(len(val_loader.sampler), dim, dtype=STORE, device=device)
        val_labels = extract_into(featurize, val_loader, val)
        return cls(train, train_labels, val[:len(val_labels)], val_labels)

    def describe(self) -> str:
        views, n, dim = self.train.shape
        mib = (self.train.numel() + self.val.numel()) * self.train.element_size() / 2**20
        return (f"{dim}-d features of {n} training images x {views} view(s) and {len(self.val)} val images "
                f"on this process ({mib:.1f} MiB, {str(self.train.dtype).removeprefix('torch.')})")

    def train_batches(self, batch: int, seed: int, epoch: int, rank: int = 0) -> tuple[Iterator[tuple[Tensor, Tensor]],
                                                                                       int]:
        """An epoch of ``(features [b, C], labels [b])``: shuffled images, one random view each.

        The order and the views depend only on ``(seed, epoch, rank)``. Every process holds an equally
        long (padded) shard, so all take the same number of steps.
        """
        views, n, _ = self.train.shape
        g = torch.Generator().manual_seed(sample_seed(seed, epoch, rank))
        order = torch.randperm(n, generator=g).to(self.train.device)
        view = torch.randint(views, (n,), generator=g).to(self.train.device)
        batches = ((self.train[view[idx], idx], self.train_labels[idx]) for idx in order.split(batch))
        return batches, math.ceil(n / batch)

    def val_batches(self, batch: int) -> tuple[Iterator[tuple[Tensor, Tensor]], int]:
        """``(features [b, C], labels [b])`` in the validation loader's order."""
        return zip(self.val.split(batch), self.val_labels.split(batch)), math.ceil(len(self.val) / batch)
