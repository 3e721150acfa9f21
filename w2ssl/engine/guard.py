"""Stop conditions checked once per step without stalling the GPU: non-finite losses, signals and
errors seen by one process only.

Each step's flags stay on the device and are read one step later, when the GPU has long finished
them, so the check costs no pipeline bubble. With a process group they are max-reduced first, so every
process stops at the same step for the same reason (no process is left waiting in a collective).
:meth:`Guard.flush` reads the newest flags at once (before any checkpoint is written).

Stop signals are agreed on sooner, at every step boundary (:meth:`Guard.poll_signal`): the signal is a host
value, so one process reads its own flag and a process group max-reduces it over a host (gloo) group,
without waiting for the device. A run stops after the step during which the signal came (reading the
device flags one step later stopped it one or two steps after that).
"""
from __future__ import annotations

import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from w2ssl.dist import distributed as D
from w2ssl.errors import StoppedByPeer, TrainingStopped, UserError
from w2ssl.system.stopsignals import STOP_SIGNALS


@dataclass
class StepRecord:
    epoch: int
    iteration: int
    step: int
    flags: Tensor  # [3]: non-finite loss, signal number (0: none), error (0/1)
    parts: dict[str, Tensor] = field(default_factory=dict)


class Guard:
    """Counts non-finite losses, catches stop signals and carries one process's error to all.

    ``max_nonfinite``: consecutive non-finite losses tolerated (fp16, where GradScaler skips those
    steps); ``0`` stops at the first one (bf16, fp32). Signal handlers are installed only inside
    ``with guard:`` (and the previous ones restored on leaving), so building a trainer changes nothing.
    """

    def __init__(self, max_nonfinite: int):
        self.max_nonfinite = max_nonfinite
        self.consecutive = 0
        self.signal: int | None = None  # received here; after a check, the one every process agreed on
        self.stop = False  # every process agreed to stop after the checked step
        self._error: UserError | None = None
        self._pending: StepRecord | None = None
        self._previous: dict[int, object] = {}
        self._host_group: object | None = None

    def __enter__(self) -> Guard:
        if threading.current_thread() is threading.main_thread():  # Python allows handlers only there
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _on_signal(self, signum: int, frame: object) -> None:
        self.signal = self.signal or signum

    def fail(self, error: UserError) -> None:
        """Report ``error`` (seen by this process only) at the next check instead of raising it now:
        every process then stops at the same step, this one with ``error``, the others quietly."""
        self._error = self._error or error

    def _flags(self, loss: Tensor) -> Tensor:
        # new_full fills on the device: no host-to-device copy, which would wait for the GPU.
        flags = torch.stack([(~torch.isfinite(loss.detach())).float(), loss.new_full((), float(self.signal or 0)),
                             loss.new_full((), float(self._error is not None))]).float()
        return D.all_reduce_max(flags) if D.is_dist() else flags

    def push(self, epoch: int, iteration: int, step: int, parts: dict[str, Tensor]) -> None:
        """Record this step's loss parts; check the previous step's."""
        previous, self._pending = self._pending, StepRecord(epoch, iteration, step, self._flags(parts["loss"]), parts)
        if previous is not None:
            self._check(previous)

    def flush(self) -> None:
        """Check the newest step now."""
        if self._pending is not None:
            record, self._pending = self._pending, None
            self._check(record)

    def poll_signal(self) -> bool:
        """At a step boundary: agree now with every process on a stop signal received so far (sets
        :attr:`stop` and :attr:`signal`); every process must call it at the same boundaries."""
        signum = self.signal or 0
        if D.is_dist():
            if self._host_group is None:
                self._host_group = D.host_group()
            signum = D.host_max(signum, self._host_group)
        if signum:
            self.stop, self.signal = True, signum
        return self.stop

    def stopped(self, saved: Path, epoch: int, iteration: int) -> TrainingStopped:
        """The one line every process exits with (rank 0 prints it) after agreeing on :attr:`signal`."""
        return TrainingStopped(
            f"{signal.Signals(self.signal).name} received: saved {saved} at epoch {epoch} iteration {iteration}; "
            f"continue with the same command and --resume auto", code=128 + self.signal)

    def check_now(self, device: torch.device) -> None:
        """Flush, then agree at once on signals and errors received since (at a safe point, e.g. after
        an epoch's checkpoint: one small all-reduce and a host sync)."""
        self.flush()
        self._check(StepRecord(-1, -1, -1, self._flags(torch.zeros((), device=device))))

    def _check(self, record: StepRecord) -> None:
        nonfinite, signum, error = record.flags.tolist()
        if error:
            if self._error is not None:
                raise self._error
            raise StoppedByPeer("another process stopped with an error", code=2)
        if record.parts:
            self._count_nonfinite(record, bool(nonfinite))
        if signum:
            self.stop = True
            self.signal = int(signum)  # the same on every process, whichever was signalled

    def _count_nonfinite(self, record: StepRecord, nonfinite: bool) -> None:
        if not nonfinite:
            self.consecutive = 0
            return
        self.consecutive += 1
        if self.consecutive > self.max_nonfinite:
            parts = ", ".join(f"{k}={v.item():.4g}" for k, v in record.parts.items())
            raise TrainingStopped(
                f"non-finite loss at epoch {record.epoch} iteration {record.iteration} (global step "
                f"{record.step}): {parts}; {self.consecutive} in a row. Stopped without writing a "
                f"checkpoint: the newest one is unchanged. Lower --lr or use --precision fp32, then "
                f"--resume auto", code=3)
