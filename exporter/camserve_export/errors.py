"""The two failures the CLI reports as one line instead of a traceback."""


class UserError(Exception):
    """Bad input from the user: unknown arch, missing layer, unwritable path... Exit code 2."""


class CheckFailed(Exception):
    """The exported file does not match PyTorch (or lost its symbolic dims). Nothing was written. Exit code 3."""
