"""Stop conditions checked once per step without stalling the GPU: non-finite losses and signals.

Each step's flags stay on the device and are read one step later, when the GPU has long finished
them, so the check costs no pipeline bubble. :meth:`Guard.flush` reads the newest flags at once
(before any checkpoint is written).
"""
from __future__ import annotations

import signal
from dataclasses import dataclass

import torch
from torch import Tensor

from . import distributed as D
from .errors import TrainingStopped


@dataclass
class StepRecord:
    epoch: int
    iteration: int
    step: int
    flags: Tensor
    parts: dict[str, Tensor]


class Guard:
    """Counts non-finite losses and catches SIGTERM/SIGINT.

    ``max_nonfinite``: consecutive non-finite losses tolerated (fp16, where GradScaler skips those
    steps); ``0`` stops at the first one (bf16, fp32).
    """

    def __init__(self, max_nonfinite: int, install_signals: bool = True):
        self.max_nonfinite = max_nonfinite
        self.consecutive = 0
        self.signal: int | None = None
        self.stop = False  # every process agreed to stop after the checked step
        self._pending: StepRecord | None = None
        if install_signals:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):  # USR1: SLURM --signal, submit.py
                signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: object) -> None:
        self.signal = signum

    def push(self, epoch: int, iteration: int, step: int, parts: dict[str, Tensor]) -> None:
        """Record this step's loss parts; check the previous step's."""
        loss = parts["loss"]
        # new_full fills on the device: no host-to-device copy, which would wait for the GPU.
        flags = torch.stack([(~torch.isfinite(loss)).float(), loss.new_full((), float(self.signal is not None))])
        if D.is_dist():
            # Every rank must agree to stop at the same step.
            flags = D.all_reduce_max(flags)
        previous, self._pending = self._pending, StepRecord(epoch, iteration, step, flags, parts)
        if previous is not None:
            self._check(previous)

    def flush(self) -> None:
        """Check the newest step now."""
        if self._pending is not None:
            record, self._pending = self._pending, None
            self._check(record)

    def _check(self, record: StepRecord) -> None:
        nonfinite, stop = record.flags.tolist()
        if nonfinite:
            self.consecutive += 1
            if self.consecutive > self.max_nonfinite:
                parts = ", ".join(f"{k}={v.item():.4g}" for k, v in record.parts.items())
                raise TrainingStopped(
                    f"non-finite loss at epoch {record.epoch} iteration {record.iteration} (global step "
                    f"{record.step}): {parts}; {self.consecutive} in a row. Stopped without writing a "
                    f"checkpoint: the newest one is unchanged. Lower --lr or use --precision fp32, then "
                    f"--resume auto", code=3)
        else:
            self.consecutive = 0
        if stop:
            self.stop = True
            self.signal = self.signal or signal.SIGTERM  # another process was signalled
