"""The signals that stop a run, in one place: the guard catches them, everyone else leaves them alone."""
from __future__ import annotations

import signal

# SIGTERM: preemption, scancel, torchrun's forward; SIGINT: Ctrl-C; SIGUSR1: SLURM's --signal=USR1@T
# before the time limit.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


def ignore() -> None:
    """This process ignores the stop signals from now on (loader workers, a process that is exiting)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
