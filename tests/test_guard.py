import os
import signal

import pytest
import torch

from w2ssl.errors import TrainingStopped
from w2ssl.guard import Guard


def parts(value: float) -> dict[str, torch.Tensor]:
    return {"loss": torch.tensor(value), "loss_what": torch.tensor(value), "loss_where": torch.tensor(0.7)}


def test_non_finite_is_read_one_step_late_and_names_the_step():
    guard = Guard(max_nonfinite=0, install_signals=False)
    guard.push(0, 0, 0, parts(1.0))
    guard.push(0, 1, 1, parts(float("nan")))   # not read yet: no sync on this step
    with pytest.raises(TrainingStopped, match=r"epoch 0 iteration 1 \(global step 1\).*loss=nan") as e:
        guard.push(0, 2, 2, parts(1.0))
    assert e.value.code == 3


def test_flush_reads_the_newest_step():
    guard = Guard(max_nonfinite=0, install_signals=False)
    guard.push(1, 5, 20, parts(float("inf")))
    with pytest.raises(TrainingStopped, match="global step 20"):
        guard.flush()


def test_fp16_tolerates_a_few_consecutive_non_finite_losses():
    guard = Guard(max_nonfinite=2, install_signals=False)
    for step, value in enumerate([float("nan"), float("nan"), 1.0, float("nan"), float("nan")]):
        guard.push(0, step, step, parts(value))
    guard.flush()  # never 3 in a row
    guard.push(0, 5, 5, parts(float("nan")))
    with pytest.raises(TrainingStopped, match="3 in a row"):
        guard.flush()


def test_sigterm_sets_stop_after_the_step_is_checked():
    guard = Guard(max_nonfinite=0, install_signals=True)
    try:
        guard.push(0, 0, 0, parts(1.0))
        os.kill(os.getpid(), signal.SIGTERM)
        assert guard.signal == signal.SIGTERM and not guard.stop
        guard.push(0, 1, 1, parts(1.0))   # records the request with step 1
        guard.flush()
        assert guard.stop
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
