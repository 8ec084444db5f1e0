"""Errors a user can cause. The CLIs print them as one line and exit with code 2.

Anything else is an internal bug and keeps its traceback.
"""


class UserError(Exception):
    """A mistake in something the user gave us: a file, a key, a path, a value."""


class ConfigError(UserError):
    """A config or search-space file, or an override, is wrong."""


class DataError(UserError):
    """The dataset is missing or a label file is malformed."""


class CheckpointError(UserError):
    """A checkpoint is missing or unreadable."""


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the message names the step and the loss terms."""
