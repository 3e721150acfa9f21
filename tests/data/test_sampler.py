import signal
import time

import pytest
import torch

from w2ssl.data.sampler import Loader, ResumableSampler, make_loader


def test_sampler_resumes_mid_epoch_with_the_same_order():
    full = ResumableSampler(30, batch_size=4, seed=3)
    full.set_epoch(2)
    order = full.indices()
    assert len(order) == 28 and len(set(order)) == 28     # drop_last: 7 batches of 4
    part = ResumableSampler(30, batch_size=4, seed=3)
    part.set_epoch(2, start_batch=5)
    assert part.indices() == order[20:] and len(part) == 8
    assert list(part)[0] == (order[20], 2)
    other = ResumableSampler(30, batch_size=4, seed=3)
    other.set_epoch(3)
    assert other.indices() != order


def test_sampler_streams_epochs_one_after_another():
    s = ResumableSampler(30, batch_size=4, seed=3)
    s.set_epoch(2, start_batch=5, until=4)
    stream = list(s)                      # epochs 2 (from batch 5) and 3
    assert len(stream) == len(s) == 8 + 28
    assert stream[:8] == [(i, 2) for i in s.epoch_indices(2)[20:]]
    assert stream[8:] == [(i, 3) for i in s.epoch_indices(3)] and s.epoch_indices(3) != s.epoch_indices(2)


class SlowItems(torch.utils.data.Dataset):
    """``(index, epoch) -> index`` after ``delay`` seconds, like an image decode."""

    def __init__(self, n: int, delay: float):
        self.n, self.delay = n, delay

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, key: tuple[int, int]) -> int:
        time.sleep(self.delay)
        return key[0]


@pytest.mark.slow  # starts worker processes
def test_loader_prefetches_the_next_epoch_while_this_one_trains():
    sampler = ResumableSampler(8, batch_size=4, seed=0)
    sampler.set_epoch(0, until=2)
    batches = iter(make_loader(SlowItems(8, 0.1), sampler, workers=2, pin_memory=False))
    for _ in range(2):                    # epoch 0
        next(batches)
        time.sleep(1.0)                   # a training step, during which the workers fill their queue
    start = time.perf_counter()
    first = next(batches)                 # epoch 1's first batch: already made (a fresh start takes 0.4 s)
    assert time.perf_counter() - start < 0.2
    assert first.tolist() == sampler.epoch_indices(1)[:4]


def test_sampler_shards_are_slices_of_the_one_process_batches():
    """Rank r takes the r-th slice of each global batch: the global batch, in order, does not depend on
    the number of processes (10 images, global batch 6: one whole batch per epoch)."""
    single = ResumableSampler(10, batch_size=6, seed=0)
    shards = [ResumableSampler(10, batch_size=2, num_replicas=3, rank=r, seed=0) for r in range(3)]
    for epoch in (0, 1):
        whole = single.epoch_indices(epoch)
        assert len(whole) == 6 and len(set(whole)) == 6
        assert [i for s in shards for i in s.epoch_indices(epoch)] == whole
    assert all(s.batches_per_epoch == 1 for s in shards)


class SignalState(torch.utils.data.Dataset):
    """Each item: whether this worker ignores SIGTERM, and whether it still blocks it."""

    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> torch.Tensor:
        blocked = signal.SIGTERM in signal.pthread_sigmask(signal.SIG_BLOCK, [])
        return torch.tensor([signal.getsignal(signal.SIGTERM) == signal.SIG_IGN, blocked])


@pytest.mark.slow  # starts a worker process
def test_workers_start_with_stop_signals_blocked_then_ignore_them(monkeypatch):
    """A group SIGTERM while a loader starts its workers (a probe's first validation) must not kill one before
    it ignores the signal: they are started with it blocked, and ignore (and unblock) it from their init."""
    masks = []
    start = torch.utils.data.DataLoader._get_iterator

    def recording(self):
        masks.append(signal.SIGTERM in signal.pthread_sigmask(signal.SIG_BLOCK, []))
        return start(self)

    monkeypatch.setattr(torch.utils.data.DataLoader, "_get_iterator", recording)
    loader = Loader(SignalState(), batch_size=2, num_workers=1)
    assert next(iter(loader)).tolist() == [[True, False], [True, False]]  # ignored, no longer blocked
    assert masks == [True] and signal.SIGTERM not in signal.pthread_sigmask(signal.SIG_BLOCK, [])
