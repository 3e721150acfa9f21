"""The signals that stop a run, in one place: the guard catches them, everyone else leaves them alone."""
from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager

# SIGTERM: preemption, scancel, torchrun's forward; SIGINT: Ctrl-C; SIGUSR1: SLURM's --signal=USR1@T
# before the time limit.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


def ignore() -> None:
    """This process ignores the stop signals from now on (loader workers, a process that is exiting), and
    no longer blocks them (one pending is discarded)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


@contextmanager
def blocked() -> Iterator[None]:
    """Hold the stop signals back from this thread while inside (one sent to it waits, and is handled on
    leaving): the processes it starts inside inherit the mask, so a group signal cannot kill them before they
    :func:`ignore` it."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
