"""Pre-training's sampler and loader: a resumable, world-size invariant order of ``(index, epoch)`` samples.

Augmentation randomness is a function of ``(seed, epoch, sample index)`` only
(:func:`w2ssl.data.datasets.sample_seed`), so a run gives the same batches whatever the number of workers,
and a resumed run continues with the very batches the uninterrupted run would have seen.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from w2ssl.system import stopsignals


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
    stopsignals.ignore()


class Loader(DataLoader):
    """A DataLoader whose workers leave the stop signals to the main process, from their first instruction:
    they start with the signals blocked (a group signal during their start, e.g. when a probe's validation
    loader first starts, waits instead of killing them) and ignore them once started."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, worker_init_fn=leave_stop_signals_to_main, **kwargs)

    def _get_iterator(self):  # noqa: ANN202 - torch's; where the workers are started
        with stopsignals.blocked():
            return super()._get_iterator()



def make_loader(dataset: Dataset, sampler: ResumableSampler, workers: int, pin_memory: bool,
                collate_fn: Callable | None = None) -> DataLoader:
    """Batches of ``sampler.batch_size``; workers persist across iterators and prefetch 4 batches each."""
    return Loader(dataset, batch_size=sampler.batch_size, sampler=sampler, num_workers=workers,
                  pin_memory=pin_memory, drop_last=True, persistent_workers=workers > 0,
                  prefetch_factor=4 if workers > 0 else None, collate_fn=collate_fn)
