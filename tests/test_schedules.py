"""The schedules a method declares: DINO's cosine, the standard warm-up + cosine, what the monitor logs."""
from __future__ import annotations

import math
from argparse import Namespace

import pytest

from w2ssl import schedules
from w2ssl.methods.base import momentum_schedules
from w2ssl.schedules import Schedules, cosine, lr_at, momentum_at


@pytest.mark.parametrize("epoch, expected", [
    (0.0, 0.0),
    (2.5, 1.2 * 0.25),                       # warm-up: linear from 0 over 10 epochs
    (10.0, 1.2),                             # peak
    (105.0, 1.2 * 0.5),                      # middle of the cosine: cos(π/2) = 0
    (200.0, 0.0),
    (55.0, 1.2 * 0.5 * (1 + math.cos(math.pi * 45 / 190))),
])
def test_lr_schedule(epoch, expected):
    assert lr_at(epoch, 1.2, 10, 200) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("epoch, expected", [
    (0.0, 0.99), (100.0, 0.995), (200.0, 1.0), (50.0, 1 - 0.5 * (1 + math.cos(math.pi / 4)) * 0.01)])
def test_momentum_cosine(epoch, expected):
    assert momentum_at(epoch, 200, 0.99, cosine=True) == pytest.approx(expected, abs=1e-12)
    assert momentum_at(epoch, 200, 0.99, cosine=False) == 0.99


def test_cosine_runs_from_start_to_end():
    wd = cosine(0.04, 0.4, 100)
    assert wd(0) == pytest.approx(0.04) and wd(100) == pytest.approx(0.4)
    assert wd(50) == pytest.approx(0.22)  # halfway: the mean
    assert wd(25) == pytest.approx(0.4 + 0.5 * (0.04 - 0.4) * (1 + math.cos(math.pi / 4)))


def test_standard_and_momentum_schedules_are_the_trainers_formulas():
    args = Namespace(warmup_epochs=10, epochs=200, moco_m=0.99, moco_m_cos=True)
    standard = schedules.standard(args, 2.4)
    assert standard.weight_decay is None and standard.inputs(3.5) == {}
    assert standard.lr(3.5) == lr_at(3.5, 2.4, 10, 200) == pytest.approx(2.4 * 0.35)
    ema = momentum_schedules(args, 2.4)
    assert ema.lr(150.0) == standard.lr(150.0)
    assert ema.inputs(100.0) == {"m": pytest.approx(1 - 0.5 * 0.01)}  # halfway up the half-cosine from 0.99 to 1
    assert ema.logged(0.5, None, ema.inputs(0.0)) == {"lr": 0.5, "momentum": pytest.approx(0.99)}


def test_logged_names_the_weight_decay_only_when_scheduled():
    s = Schedules(lr=lambda t: 1.0, weight_decay=cosine(0.1, 0.2, 1), forward={"temperature": lambda t: 0.04 + t})
    assert s.logged(1.0, 0.15, s.inputs(0.5)) == {"lr": 1.0, "weight_decay": 0.15, "temperature": pytest.approx(0.54)}
