"""The exception types that the entry scripts turn into a one-line message and an exit code, and the
formatting those one-line messages share."""
from __future__ import annotations

from collections.abc import Iterable


class UserError(ValueError):
    """Bad input from the user: the message names the problem and the fix."""


class TrainingStopped(Exception):
    """Training stopped on purpose (signal, non-finite loss): print the message, exit with ``code``."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


class StoppedByPeer(TrainingStopped):
    """Another process stopped with an error and printed it: exit with ``code``, print nothing."""


def key_list(keys: Iterable[str], shown: int = 3) -> str:
    """``'a', 'b', 'c' and 120 more``: a few names of a long key list, for one-line messages."""
    keys = list(keys)
    text = ", ".join(repr(k) for k in keys[:shown])
    return f"{text} and {len(keys) - shown} more" if len(keys) > shown else text
