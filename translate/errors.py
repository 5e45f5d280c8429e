"""The project's errors. A ``UserError`` is a problem with what the user gave (a key, a file, a
checkpoint, a request, a missing optional package): its message says what is wrong and how to
fix it, and the command line prints it on one line and exits with status 2. ``TrainingError``
is a run that cannot go on (exit 1)."""

from __future__ import annotations


class UserError(ValueError):
    """Bad input from the user; the message names what is wrong and the fix."""


class ConfigError(UserError):
    """A configuration key or value is wrong; the message says which and what is allowed."""


class DataError(UserError):
    """Bad input data; the message names the file, the line and the fix."""


class TokenizerError(UserError):
    """A tokenizer cannot be trained or loaded; the message says why."""


class CheckpointError(UserError):
    """A checkpoint cannot be written or read; the message says why and what to do."""


class MissingExtraError(UserError):
    """An optional package that a feature needs is not installed; the message names the extra."""


class ServiceError(UserError):
    """A server cannot start (for example, its address is taken); the message says what to change."""


class RequestError(UserError):
    """A client's request to the server is wrong: the message is sent back with ``status``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class TrainingError(RuntimeError):
    """Training cannot go on; the message says why and what to do."""
