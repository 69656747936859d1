"""User-facing errors. Every error a user can cause is an `EveError` subclass whose message names the
file, row, key or value at fault and says what to do about it."""

WORKER_TRACEBACK = "\nOriginal Traceback"


class EveError(Exception):
    """Base class of all errors caused by user input or configuration."""


class ConfigError(EveError, ValueError):
    """A configuration value is unknown, out of range or inconsistent with another."""


class ImageTokenMismatchError(EveError, ValueError):
    """The number of images does not match the number of `<image>` placeholders in the text."""


class ImageSizeError(EveError, ValueError):
    """`pixel_values` do not have the size the vision tower was configured for."""


class CheckpointError(EveError, RuntimeError):
    """A checkpoint does not match the model config (missing or unexpected weights)."""


class DataError(EveError, ValueError):
    """A data file or row is malformed: bad JSON, a missing or corrupt image, a conversation that does not
    render or does not fit."""


class AssetError(EveError, RuntimeError):
    """A pretrained part or data set cannot be prepared (a source package is missing or its contents are not
    what the converter expects), or `eve prepare` has not been run."""


class MissingDependencyError(EveError, ImportError):
    """An optional extra the command needs is not installed; the message names the extra."""


def user_message(err: EveError) -> str:
    """The message of `err` as the user should see it. An error raised in a `DataLoader` worker process is
    raised again in the main process with torch's "Caught ... Original Traceback ..." text as its message;
    for such an error this is the original message only."""
    text = str(err)
    marker = f"{type(err).__module__}.{type(err).__qualname__}: "
    if WORKER_TRACEBACK in text and marker in text:
        return text.rsplit(marker, 1)[1].strip()
    return text
