"""Test-only launcher: ``main_moco.py`` with one fault injected from outside the production code.

    python -m tests.fault_run kill STEP MAIN_MOCO_ARGS...   SIGKILL as global step STEP starts (a hard crash)
    python -m tests.fault_run nan STEP MAIN_MOCO_ARGS...    global step STEP's loss is multiplied by NaN
    python -m tests.fault_run raise STEP MAIN_MOCO_ARGS...  global step STEP raises RuntimeError (a bug)
    python -m tests.fault_run slow MS MAIN_MOCO_ARGS...     every step takes MS milliseconds longer

Steps count from 0 over the whole run (a resumed run continues the count). One process only: the
patch lives in this interpreter.
"""
from __future__ import annotations

import os
import signal
import sys
import time

import main_moco
from w2ssl.cli import with_error_boundary
from w2ssl.train.pretrain import Pretrainer


def inject(kind: str, at_step: int) -> None:
    """Wrap ``Pretrainer._step`` so that global step ``at_step`` dies (``kill``) or is poisoned (``nan``)."""
    step = Pretrainer._step

    def faulty(self: Pretrainer, *args, **kwargs):  # noqa: ANN202 - mirrors Pretrainer._step
        if kind == "slow":
            time.sleep(at_step / 1000)
            return step(self, *args, **kwargs)
        if self.step != at_step:
            return step(self, *args, **kwargs)
        if kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if kind == "raise":
            raise RuntimeError(f"injected failure at global step {at_step}")
        net = self.net

        def poisoned(*a, **kw) -> dict:
            out = net(*a, **kw)
            return {**out, "loss": out["loss"] * float("nan")}

        self.net = poisoned
        try:
            return step(self, *args, **kwargs)
        finally:
            self.net = net

    Pretrainer._step = faulty


if __name__ == "__main__":
    kind, at = sys.argv[1], int(sys.argv[2])
    if kind not in ("kill", "nan", "raise", "slow"):
        raise SystemExit(f"usage: {sys.argv[0]} kill|nan|raise|slow STEP MAIN_MOCO_ARGS...")
    inject(kind, at)
    sys.argv = [sys.argv[0], *sys.argv[3:]]
    with_error_boundary(main_moco.main)()
