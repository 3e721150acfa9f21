"""The job side of ``python -m w2ssl.submit``: run an entry script's ``main(argv)`` in each submitit task.

One task per GPU. :class:`MainJob` turns submitit's :class:`~submitit.JobEnvironment` into the
torchrun variables that :func:`w2ssl.dist.distributed.launch` reads, so a job runs exactly the code
path of ``torchrun main_moco.py …``. The trainer handles the time-limit signal
(:data:`TIME_LIMIT_SIGNAL`: every rank finishes its step, rank 0 saves ``checkpoint_last``, every
process exits ``128 + signal``); only then does the job requeue itself through submitit's
checkpointing protocol, with ``--resume auto``. SIGTERM (``scancel``, or a preemption that SLURM
requeues on its own) saves and stops without a requeue; a job that ends normally is not requeued.
"""
from __future__ import annotations

import importlib
import os
import re
import signal
import sys
from dataclasses import dataclass
from typing import Any

from w2ssl import cli

# SLURM sends it ``--signal-delay`` seconds before the time limit (and at a preemption where the
# cluster sets PreemptParameters=send_user_signal); submitit reads the name from this variable.
TIME_LIMIT_SIGNAL = signal.SIGUSR1
SIGNAL_ENV = "SUBMITIT_PREEMPT_SIGNAL"
RESUME_AUTO = ["--resume", "auto"]


def with_resume_auto(argv: list[str]) -> list[str]:
    """``argv`` ending in ``--resume auto`` (the last ``--resume`` wins in argparse)."""
    return list(argv) if argv[-2:] == RESUME_AUTO else [*argv, *RESUME_AUTO]


def master_port(job_id: str) -> int:
    """A rendezvous port derived from the job id, so jobs sharing a node do not collide."""
    return 20000 + int(re.sub(r"\D", "", job_id) or 0) % 20000


def torchrun_env(env: Any) -> dict[str, str]:
    """torchrun's variables for this task, from a ``submitit.JobEnvironment``."""
    return {"RANK": str(env.global_rank), "LOCAL_RANK": str(env.local_rank),
            "WORLD_SIZE": str(env.num_tasks), "LOCAL_WORLD_SIZE": str(env.num_tasks // env.num_nodes),
            "MASTER_ADDR": env.hostnames[0] if env.num_nodes > 1 else "127.0.0.1",
            "MASTER_PORT": str(master_port(env.job_id))}


@dataclass
class MainJob:
    """``script.main(argv)`` in one task of a submitit job; requeued after the time-limit signal."""

    script: str  # module name of the entry script: "main_moco" or "main_lincls"
    argv: list[str]

    def __call__(self) -> int:
        import submitit

        env = submitit.JobEnvironment()
        # submitit installed this (checkpoint, requeue, exit) handler before calling us; the trainer
        # replaces it while it trains, and we call it ourselves once the trainer has saved.
        requeue = signal.getsignal(getattr(signal, "SIG" + env.USR_SIG))
        os.environ.update(torchrun_env(env))
        try:
            code = cli.run_main(importlib.import_module(self.script).main, self.argv)
        except SystemExit as e:  # the trainer's 128 + signal, or a worker's exit code
            code = e.code if isinstance(e.code, int) else 1
        if code == 128 + TIME_LIMIT_SIGNAL and callable(requeue):
            # Rank 0: self.checkpoint() becomes the job's next run, then requeue and exit; other ranks return.
            requeue(TIME_LIMIT_SIGNAL, None)
        if code:
            sys.exit(code)
        return 0

    def checkpoint(self) -> Any:
        """The requeued run: the same call, continuing from the newest checkpoint of ``--save-dir``."""
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(MainJob(self.script, with_resume_auto(self.argv)))
