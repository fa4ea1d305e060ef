"""Errors that the user is meant to read.

Every error raised for bad input or a bad environment derives from :class:`BusegError`;
the command line turns it into a one-paragraph message and a non-zero exit code, and the
worker turns it into an ``error`` event. An error about a file always names the file.
"""

from __future__ import annotations

from pathlib import Path


class BusegError(Exception):
    """Base class: a problem the user can fix, with a message meant for a person."""

    exit_code = 2

    def __init__(self, message: str, *, path: str | Path | None = None, hint: str | None = None):
        self.path = str(path) if path is not None else None
        self.hint = hint
        text = f"{self.path}: {message}" if self.path else message
        if hint:
            text += f"\n  hint: {hint}"
        super().__init__(text)
        self.message = message


class InputError(BusegError):
    """An input file, folder or manifest is missing, unreadable or inconsistent."""


class ConfigError(BusegError):
    """A configuration value is invalid or values contradict each other."""


class ModelFileError(BusegError):
    """A model file is unreadable, untrusted, of an unknown version or unsuited to the data."""


class OutputError(BusegError):
    """An output cannot be written (exists already, folder locked, unwritable, disk full)."""


class ResourceError(BusegError):
    """The job would not fit in memory (estimated before starting) or ran out of it."""

    exit_code = 3


class Cancelled(Exception):  # noqa: N818 - a state, not an error
    """Raised inside the training loop when a cancel was requested (SIGTERM/SIGINT)."""
