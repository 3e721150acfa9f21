"""The one exception type that the entry scripts turn into a one-line message and exit code 2."""


class UserError(ValueError):
    """Bad input from the user: the message names the problem and the fix."""
