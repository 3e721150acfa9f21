"""One process's failure ends the whole run within seconds, reported once.

Errors that a process meets inside a training step travel with the step's flags (:mod:`w2ssl.engine.guard`), so
every process stops at the same step. Any other failure (an error before the first step, in a save, a
crash) leaves the other processes waiting in a collective: with NCCL until its timeout. So a failing
process marks the run as failed in the process group's key-value store (which needs no collective), and
a watcher thread in every process ends it when the mark appears and it has not stopped on its own.
"""
from __future__ import annotations

import multiprocessing
import os
import sys
import threading

import torch.distributed as dist

from w2ssl.system import stopsignals

_COUNT, _CODE = "w2ssl/failed", "w2ssl/exit_code"


def _store() -> dist.Store:
    return dist.distributed_c10d._get_default_store()


def mark_failed(code: int) -> bool:
    """Record that this process fails with exit ``code``; True if it is the first of the run to do so
    (that one prints the message). True without a process group, or when the store is gone."""
    if not dist.is_initialized():
        return True
    try:
        first = _store().add(_COUNT, 1) == 1
        if first:
            _store().set(_CODE, str(code))
        return first
    except Exception:  # the store's host may be gone: better twice than never
        return True


def failed_before() -> int | None:
    """The exit code of a process that failed earlier in this run, if any."""
    if not dist.is_initialized():
        return None
    try:
        return int(_store().get(_CODE)) if _store().check([_CODE]) else None
    except Exception:
        return None


def ignore_stop_signals() -> None:
    """This launched process only reports and exits from here on: a launcher's SIGTERM to the processes
    still running (torchrun sends one as soon as the first exits) must not cut its message short or
    change its exit code. Only with a process group: then the process is the launcher's, not a caller's."""
    if dist.is_initialized():
        stopsignals.ignore()


class Watcher:
    """``with Watcher():`` a daemon thread polls the store every ``interval`` s; once another process has
    failed and this one is still running ``grace`` s later (stuck in a collective), it exits the process
    with that process's code, silently (the failed one said why)."""

    def __init__(self, interval: float = 1.0, grace: float = 5.0):
        self.interval, self.grace = interval, grace
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Watcher:
        if dist.is_initialized():
            self._thread = threading.Thread(target=self._watch, args=(_store(),), name="w2ssl-failfast",
                                            daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join()

    def _watch(self, store: dist.Store) -> None:
        try:
            while not self._done.wait(self.interval):
                if store.check([_CODE]):
                    code = int(store.get(_CODE))
                    break
            else:
                return
        except Exception:  # the store's host is gone: the run is ending anyway
            return
        if not self._done.wait(self.grace):
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)

def end_loader_workers() -> None:
    """Kill this process's loader workers now (a process leaving on an error). They ignore SIGTERM (above),
    and an error's traceback keeps their loader alive past ``multiprocessing``'s exit hook, which
    SIGTERMs its daemonic children and then waits for them: without this the process never exits."""
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()
            child.join()
