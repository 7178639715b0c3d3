"""User-facing errors.

A `TunesmithError` is bad input, not a bug: the CLI prints its message on one line per problem
and exits with code 2, without a traceback. Messages say what was expected, what was found and
how to fix it, naming the file, row and field.
"""

from __future__ import annotations

EXIT_USER_ERROR = 2


class TunesmithError(Exception):
    """An error caused by the user's input (config, data, paths); exit code 2."""

    def __init__(self, message: str | list[str]):
        self.problems = [message] if isinstance(message, str) else list(message)
        super().__init__("\n".join(self.problems))


class ConfigError(TunesmithError):
    """The run config is invalid."""


class DataError(TunesmithError):
    """A data file is missing, unreadable or fails preflight validation."""
