"""The exception types that the entry scripts turn into a one-line message and an exit code."""


class UserError(ValueError):
    """Bad input from the user: the message names the problem and the fix."""


class TrainingStopped(Exception):
    """Training stopped on purpose (signal, non-finite loss): print the message, exit with ``code``."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


class StoppedByPeer(TrainingStopped):
    """Another process stopped with an error and printed it: exit with ``code``, print nothing."""
