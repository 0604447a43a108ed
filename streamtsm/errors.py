"""Errors that carry a message meant for the user.

The CLI prints ``str(error)`` as one line and exits with code 2 for any of these; everything else is a bug and
gets a traceback.
"""


class StreamTSMError(Exception):
    """Base of every user-facing error: bad input, missing files, unusable sources or endpoints."""


class ConfigError(StreamTSMError, ValueError):
    """A model name, option, config file or label file is not what was expected."""


class CheckpointError(StreamTSMError, ValueError):
    """A checkpoint cannot be read or does not fit the model."""


class SourceError(StreamTSMError):
    """A video source cannot be opened or decoded."""


class PublishError(StreamTSMError):
    """A ZeroMQ endpoint cannot be bound or connected."""


def first_line(error: BaseException) -> str:
    """The first line of an error's message (its type's name when empty), at most 300 characters: what a one-line
    user-facing message quotes of a library's error."""
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:300]
