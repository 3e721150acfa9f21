"""Weighted k-nearest-neighbour evaluation on frozen trunk features (InstDisc / DINO protocol).

Features are a read-out of the trunk's family (the global average of its feature map; a ViT: its
patch-token average or its class token), L2-normalised. A test image's
class scores sum ``exp(sim / T)`` over its ``k`` most similar training images per label.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data.distributed import DistributedSampler

from w2ssl.data.datasets import BadImages, LabelledLoader, check_same_classes, eval_transform, labelled_loader
from w2ssl.data.subset import Subset
from w2ssl.dist import distributed as D
from w2ssl.trunks import Readout, average_map

KS = (20, 200)
TEMPERATURE = 0.07
CHUNK = 256


def pooled_features(trunk: nn.Module, x: Tensor, readout: Readout = average_map) -> Tensor:
    """``[B, 3, H, W] -> [B, C]``: one vector per image from a registered trunk (METHOD §7, §11), by one of its
    family's read-outs (``trunk_spec(arch).family.readout(mode)``; by default the mean of its feature map)."""
    return readout(getattr(trunk, "module", trunk), x)  # DistributedDataParallel's module


def _shard_indices(loader: Iterable) -> Tensor | None:
    """Dataset indices of this process's samples, in loader order, when a DistributedSampler shards them."""
    sampler = getattr(loader, "sampler", None)
    if not isinstance(sampler, DistributedSampler):
        return None
    return torch.tensor(list(sampler), dtype=torch.long)


def _merge_shards(idx: Tensor, feats: Tensor, labels: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """Every process's ``(idx [n_r], feats [n_r, C], labels [n_r])`` -> dataset-ordered ``[m, C]``, ``[m]``.

    Each process broadcasts its shard in turn, so the peak extra memory is one shard, not the world's.
    DistributedSampler's padding repeats indices: they land on the same row. Indices no process saw
    (``drop_last``) are left out, so ``m <= size``.
    """
    device = feats.device
    counts = D.gather(torch.tensor([len(idx)], device=device)).tolist()
    out = torch.zeros(size, feats.shape[1], dtype=feats.dtype, device=device)
    out_labels = torch.zeros(size, dtype=torch.long, device=device)
    seen = torch.zeros(size, dtype=torch.bool, device=device)
    for src, count in enumerate(counts):
        mine = src == D.rank()
        ids = D.broadcast(torch.stack([idx.to(device), labels]) if mine
                          else torch.empty(2, count, dtype=torch.long, device=device), src)
        part = D.broadcast(feats if mine else torch.empty(count, feats.shape[1], dtype=feats.dtype, device=device),
                           src)
        out[ids[0]] = part
        out_labels[ids[0]] = ids[1]
        seen[ids[0]] = True
    if bool(seen.all()):
        return out, out_labels
    return out[seen], out_labels[seen]


@torch.no_grad()
def extract_features(trunk: nn.Module, loader: Iterable, device: torch.device | str, channels_last: bool = False,
                     autocast_dtype: torch.dtype | None = None,
                     readout: Readout = average_map) -> tuple[Tensor, Tensor]:
    """Features ``[n, C]`` (float32, unit L2 norm) and labels ``[n]`` (int64) of every ``(images, labels)``
    or ``(images, labels, dataset indices)`` batch (:func:`pooled_features`).

    Runs ``trunk`` in eval mode and restores each submodule's train/eval flag afterwards. Under
    torch.distributed, the shards of all processes are merged in dataset order (the indices come with
    the batches, or from a DistributedSampler, whose padding duplicates are dropped), so every process
    returns the whole set; images no process read (unreadable, ``drop_last``) are left out.
    """
    device = torch.device(device)
    modes = [(m, m.training) for m in trunk.modules()]
    trunk.eval()
    amp = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else nullcontext()
    fmt = torch.channels_last if channels_last else torch.preserve_format
    feats, labels, indices = [], [], []
    try:
        for images, target, *index in loader:
            indices += index
            images = images.to(device, non_blocking=True, memory_format=fmt)
            with amp:
                f = pooled_features(trunk, images, readout)
            feats.append(F.normalize(f.float(), dim=1))
            labels.append(torch.as_tensor(target).to(device, torch.long))
    finally:
        for module, mode in modes:
            module.training = mode
    if not feats:
        raise ValueError("extract_features got an empty loader")
    feats_t, labels_t = torch.cat(feats), torch.cat(labels)
    if not D.is_dist():
        return feats_t, labels_t
    idx = torch.cat(indices) if indices else _shard_indices(loader)
    if idx is None:
        raise ValueError("a distributed kNN needs dataset indices: batches of (images, labels, indices) or "
                         "a DistributedSampler")
    # DataLoader(drop_last=True) ends early; batches follow the sampler's order, so truncate.
    return _merge_shards(idx[: len(feats_t)], feats_t, labels_t, len(loader.dataset))


def _neighbours(train_feats: Tensor, train_labels: Tensor, test_feats: Tensor, k: int,
                chunk: int) -> Iterator[tuple[slice, Tensor, Tensor]]:
    """Per chunk of test rows: ``(rows, sims [c, k], labels [c, k])`` of the ``k`` nearest training rows.

    ``train_feats [N, C]`` and ``test_feats [M, C]`` are unit-norm, so similarity is the dot product;
    neighbours come most similar first.
    """
    for start in range(0, len(test_feats), chunk):
        rows = slice(start, start + chunk)
        sims, nn_idx = (test_feats[rows] @ train_feats.T).topk(k, dim=1)
        yield rows, sims, train_labels[nn_idx]


def _vote(sims: Tensor, labels: Tensor, num_classes: int, temperature: float) -> Tensor:
    """``sims, labels [c, k] -> scores [c, num_classes]``: sum of ``exp(sim / T)`` per neighbour label."""
    scores = torch.zeros(len(sims), num_classes, dtype=sims.dtype, device=sims.device)
    return scores.scatter_add_(1, labels, (sims / temperature).exp())


def _check(train_feats: Tensor, train_labels: Tensor, test_feats: Tensor) -> None:
    if len(train_feats) == 0 or len(train_feats) != len(train_labels):
        raise ValueError(f"need a non-empty bank with one label per row, got {len(train_feats)} features "
                         f"and {len(train_labels)} labels")
    if train_feats.shape[1:] != test_feats.shape[1:]:
        raise ValueError(f"feature sizes differ: train {tuple(train_feats.shape)}, test {tuple(test_feats.shape)}")


@torch.no_grad()
def knn_predict(train_feats: Tensor, train_labels: Tensor, test_feats: Tensor, num_classes: int, k: int = 20,
                temperature: float = TEMPERATURE, chunk: int = CHUNK) -> Tensor:
    """Class scores ``[M, num_classes]`` of ``test_feats [M, C]`` against the bank ``train_feats [N, C]``.

    ``k`` is clipped to ``N``. Test rows go ``chunk`` at a time, bounding memory to ``chunk x N``
    similarities (256 x 1.28M float32 = 1.3 GB for ImageNet).
    """
    _check(train_feats, train_labels, test_feats)
    k = min(k, len(train_feats))
    scores = [_vote(s, lab, num_classes, temperature)
              for _, s, lab in _neighbours(train_feats, train_labels, test_feats, k, chunk)]
    return torch.cat(scores) if scores else test_feats.new_zeros(0, num_classes)


@torch.no_grad()
def knn_accuracy(train_feats: Tensor, train_labels: Tensor, test_feats: Tensor, test_labels: Tensor,
                 num_classes: int, ks: Iterable[int] = KS, temperature: float = TEMPERATURE,
                 chunk: int = CHUNK) -> dict[int, tuple[float, float | None]]:
    """``{k: (top-1 %, top-5 %)}`` for each requested ``k`` (clipped to the bank size), one similarity pass.

    Top-5 is None with fewer than 5 classes (it would always be 100 %) and counts only classes with
    votes (with small ``k`` fewer than five classes may have any). Neighbours for a smaller ``k`` are
    the first ``k`` of the largest.
    """
    _check(train_feats, train_labels, test_feats)
    ks = list(ks)
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive neighbour counts, got {ks}")
    if len(test_feats) == 0 or len(test_feats) != len(test_labels):
        raise ValueError(f"need a non-empty test set with one label per row, got {len(test_feats)} features "
                         f"and {len(test_labels)} labels")
    used = {k: min(k, len(train_feats)) for k in ks}
    top = min(5, num_classes)
    correct = {k: torch.zeros(2, dtype=torch.long, device=test_feats.device) for k in ks}
    test_labels = test_labels.to(test_feats.device)
    for rows, sims, labels in _neighbours(train_feats, train_labels, test_feats, max(used.values()), chunk):
        target = test_labels[rows, None]
        for k in ks:
            best = _vote(sims[:, :used[k]], labels[:, :used[k]], num_classes, temperature).topk(top, dim=1)
            hits = (best.indices == target) & (best.values > 0)  # a class without votes is no guess
            correct[k] += torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum()])
    n = len(test_feats)
    return {k: (100.0 * c[0].item() / n, 100.0 * c[1].item() / n if num_classes >= 5 else None)
            for k, c in correct.items()}


@dataclass
class KnnResult:
    """Accuracy per requested ``k`` (top-5 None below 5 classes) and the images it is over."""

    accuracy: dict[int, tuple[float, float | None]]
    bank: int  # training images in the bank
    queries: int  # val images classified
    unreadable: int = 0  # images of both folders left out as unreadable


def knn_eval(trunk: nn.Module, train_loader: Iterable, test_loader: Iterable, device: torch.device | str,
             num_classes: int, ks: Iterable[int] = KS, temperature: float = TEMPERATURE, channels_last: bool = False,
             autocast_dtype: torch.dtype | None = None, readout: Readout = average_map) -> KnnResult:
    """Extract both sets with :func:`extract_features` and return :func:`knn_accuracy` with its counts."""
    train = extract_features(trunk, train_loader, device, channels_last, autocast_dtype, readout)
    test = extract_features(trunk, test_loader, device, channels_last, autocast_dtype, readout)
    accuracy = knn_accuracy(train[0], train[1], test[0], test[1], num_classes, ks, temperature)
    sizes = [len(loader.dataset) for loader in (train_loader, test_loader) if hasattr(loader, "dataset")]
    unreadable = sum(sizes) - len(train[0]) - len(test[0]) if len(sizes) == 2 else 0
    return KnnResult(accuracy, len(train[0]), len(test[0]), unreadable)


def format_knn(result: KnnResult) -> str:
    """One log line, e.g. ``kNN k=20 acc1 61.20 acc5 83.05 | k=200 acc1 59.90 acc5 84.11 (5000 train, 1000 val
    images)``; a ``k`` above the bank size says it was clamped, and top-5 is left out below 5 classes."""
    parts = []
    for k, (acc1, acc5) in sorted(result.accuracy.items()):
        clamped = f" (clamped to the {result.bank} training images)" if k > result.bank else ""
        parts.append(f"k={k}{clamped} acc1 {acc1:.2f}" + (f" acc5 {acc5:.2f}" if acc5 is not None else ""))
    skipped = f"; {result.unreadable} unreadable skipped" if result.unreadable else ""
    return f"kNN {' | '.join(parts)} ({result.bank} train, {result.queries} val images{skipped})"


def folder_loaders(root: str | Path, size: int, batch_size: int, workers: int, bad: BadImages | None = None,
                   subset: Subset | None = None, cache_dir: str | Path | None = None
                   ) -> tuple[LabelledLoader, LabelledLoader, int]:
    """Unshuffled center-crop loaders of ``root/train`` (the bank) and ``root/val``, and the class count.

    Both must have the same class folders; unreadable images are left out and noted in ``bad``.
    ``subset`` (``--subset``) and ``cache_dir`` (of the listings): as for ``labelled_loader``.
    """
    root = Path(root)
    bad = bad or BadImages()
    train, classes = labelled_loader(root / "train", eval_transform(size), batch_size, workers, False, "kNN train",
                                     bad=bad, subset=subset, cache_dir=cache_dir)
    val, _ = labelled_loader(root / "val", eval_transform(size), batch_size, workers, False, "kNN val", bad=bad,
                             subset=subset, cache_dir=cache_dir)
    check_same_classes(train.dataset.classes, val.dataset.classes, root)
    return train, val, classes


def knn_scalars(result: KnnResult) -> dict[str, float]:
    """TensorBoard scalars of a :func:`knn_eval` result: top-1 per k."""
    return {f"knn_top1_k{k}": acc1 for k, (acc1, _) in result.accuracy.items()}
