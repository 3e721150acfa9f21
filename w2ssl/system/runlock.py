"""One run per ``--save-dir``: an exclusive lock on a file in the run folder, held while the run writes there.

``fcntl.lockf`` takes a POSIX record lock, which the kernel drops when its process ends in any way (SIGKILL
and crashes included), so a dead run never keeps its folder locked; on NFS, Linux forwards such locks to the
server (NLM for NFSv3, the protocol's own locks for v4) unless the share is mounted ``nolock``. POSIX locks
belong to the process (not to the open file), are not inherited by forked loader workers, and are released
when the process closes *any* descriptor of the file: the holder opens the file once only.

The file holds ``pid host start-time`` of the holder while it runs and is emptied when it ends cleanly; a
non-empty file whose lock can be taken is left by a run that died (SIGKILL, a lost node): that is said in
one warning line, and the new run goes on. The lock is taken before the run checks or writes anything; a
run that wrote nothing (it failed its checks) removes the lock file and the folders it made for it, so it
leaves no trace.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import IO, Protocol

from w2ssl.errors import UserError

LOCK_NAME = "w2ssl.lock"


def describe(holder: dict) -> str:
    return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, started {holder.get('started', '?')}"


class RunLock:
    """``with RunLock(folder, flag):`` holds ``folder/w2ssl.lock`` (``flag`` names the folder's option in
    messages), or raises :class:`UserError` naming the holder. :attr:`stale` is then the holder left by a
    dead run, if any (for the caller to warn about)."""

    def __init__(self, folder: str | Path, flag: str = "--save-dir"):
        self.path, self.flag = Path(folder) / LOCK_NAME, flag
        self.stale: dict | None = None
        self._file: IO[str] | None = None
        self._made: list[Path] = []  # what this holder created: the lock file, then new folders, innermost first

    def __enter__(self) -> RunLock:
        made = [d for d in (self.path.parent, *self.path.parent.parents) if not d.exists()]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        made = ([self.path] if not self.path.exists() else []) + made
        f = open(self.path, "a+")  # never truncates a holder's record before the lock is ours
        try:
            fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            holder = _read(self.path)
            raise UserError(f"{self.flag} {self.path.parent} is in use by another run ({describe(holder)}): wait "
                            f"for it to end or stop it, or pass another {self.flag}") from None
        f.seek(0)
        self.stale = _parse(f.read()) or None
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}) + "\n")
        f.flush()
        self._file, self._made = f, made
        return self

    def __exit__(self, *exc: object) -> None:
        if self._file is None:
            return
        self._file.seek(0)
        self._file.truncate()  # ended cleanly: nothing stale is left behind
        if self._made[:1] == [self.path] and [p.name for p in self.path.parent.iterdir()] == [LOCK_NAME]:
            self.path.unlink()  # the run wrote nothing: neither does the lock (unlinked while still held)
            for folder in self._made[1:]:
                if any(folder.iterdir()):
                    break
                folder.rmdir()
        self._file.close()  # releases the lock
        self._file = None

    def stale_message(self) -> str | None:
        if self.stale is None:
            return None
        return (f"{self.path} was left by a run that ended without releasing it ({describe(self.stale)}); "
                f"that run is gone (its lock was free): this run takes the folder over")


def _read(path: Path) -> dict:
    try:
        return _parse(path.read_text())
    except OSError:
        return {}


def _parse(text: str) -> dict:
    try:
        value = json.loads(text) if text.strip() else {}
    except ValueError:
        return {"pid": "?", "host": "?", "started": "?"}
    return value if isinstance(value, dict) else {}


class LockedRun(Protocol):
    """What :func:`run_locked` runs: ``guard`` catches stop signals while it trains; ``logger.warn`` says a line."""

    guard: AbstractContextManager
    logger: object

    def run(self) -> None: ...


def run_locked(holds_folder: bool, folder: str | Path, make: Callable[[], LockedRun]) -> None:
    """Build the run ``make()`` and train it; the process that writes the run (``holds_folder``: rank 0) holds
    ``folder`` before anything there is read or written, and warns about a holder a dead run left. Stop signals
    are caught while it trains and handed back after. Pre-training, the probe and fine-tuning all run so."""
    with RunLock(folder) if holds_folder else nullcontext() as lock:
        run = make()
        with run.guard:
            if lock is not None and (stale := lock.stale_message()):
                run.logger.warn(stale)
            run.run()
