"""The one exception type that the entry scripts turn into a one-line message and exit code 2."""


class UserError(ValueError):
    """Bad input from the user: the message names the problem and the fix."""


class TrainingStopped(Exception):
    """Training stopped on purpose (signal, non-finite loss): print the message, exit with ``code``."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code
