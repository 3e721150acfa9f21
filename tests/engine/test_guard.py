import os
import signal

import pytest
import torch

from w2ssl.engine.guard import Guard
from w2ssl.errors import TrainingStopped, UserError


def parts(value: float) -> dict[str, torch.Tensor]:
    return {"loss": torch.tensor(value), "loss_what": torch.tensor(value), "loss_where": torch.tensor(0.7)}


def test_non_finite_is_read_one_step_late_and_names_the_step():
    guard = Guard(max_nonfinite=0)
    guard.push(0, 0, 0, parts(1.0))
    guard.push(0, 1, 1, parts(float("nan")))   # not read yet: no sync on this step
    with pytest.raises(TrainingStopped, match=r"epoch 0 iteration 1 \(global step 1\).*loss=nan") as e:
        guard.push(0, 2, 2, parts(1.0))
    assert e.value.code == 3


def test_flush_reads_the_newest_step():
    guard = Guard(max_nonfinite=0)
    guard.push(1, 5, 20, parts(float("inf")))
    with pytest.raises(TrainingStopped, match="global step 20"):
        guard.flush()


def test_fp16_tolerates_a_few_consecutive_non_finite_losses():
    guard = Guard(max_nonfinite=2)
    for step, value in enumerate([float("nan"), float("nan"), 1.0, float("nan"), float("nan")]):
        guard.push(0, step, step, parts(value))
    guard.flush()  # never 3 in a row
    guard.push(0, 5, 5, parts(float("nan")))
    with pytest.raises(TrainingStopped, match="3 in a row"):
        guard.flush()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1])
def test_a_stop_signal_sets_stop_after_the_step_is_checked(sig):
    with Guard(max_nonfinite=0) as guard:
        guard.push(0, 0, 0, parts(1.0))
        os.kill(os.getpid(), sig)
        assert guard.signal == sig and not guard.stop
        guard.push(0, 1, 1, parts(1.0))   # records the request with step 1
        guard.flush()
        assert guard.stop and guard.signal == sig


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_poll_signal_stops_at_the_step_boundary_after_the_signal(sig):
    with Guard(max_nonfinite=0) as guard:
        guard.push(0, 0, 0, parts(1.0))
        assert not guard.poll_signal()
        os.kill(os.getpid(), sig)  # during step 1
        guard.push(0, 1, 1, parts(1.0))
        assert guard.poll_signal() and guard.stop and guard.signal == sig  # at once, no device flags read


def test_handlers_are_installed_only_inside_with_and_restored_after():
    def mine(signum, frame):
        pass

    previous = signal.signal(signal.SIGUSR1, mine)
    try:
        before = [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)]
        guard = Guard(max_nonfinite=0)
        assert [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)] == before
        with guard:
            assert signal.getsignal(signal.SIGINT) == guard._on_signal
        assert [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)] == before
        assert before[2] is mine
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_a_failure_is_raised_at_the_check_not_at_once():
    guard = Guard(max_nonfinite=0)
    guard.push(0, 0, 0, parts(1.0))
    guard.fail(UserError("unreadable image file x.jpg"))  # this step still runs (the others may be in it)
    guard.push(0, 1, 1, parts(1.0))  # step 1 carries the flag; step 0 is checked
    with pytest.raises(UserError, match="x.jpg"):
        guard.push(0, 2, 2, parts(1.0))
