"""User-facing errors.

A `TunesmithError` is bad input, not a bug: the CLI prints its message on one line per problem
and exits with code 2, without a traceback. Messages say what was expected, what was found and
how to fix it, naming the file, row and field.
"""

from __future__ import annotations

import unicodedata

EXIT_USER_ERROR = 2


def shown(value) -> str:
    """A value from the user's files (a label, a column name, a path) as it can sit in a one-line message:
    line breaks and other control characters escaped (`a\\nb`), everything else as written."""
    return "".join(
        c.encode("unicode_escape").decode("ascii") if unicodedata.category(c) in ("Cc", "Zl", "Zp") else c for c in str(value)
    )


class TunesmithError(Exception):
    """An error caused by the user's input (config, data, paths); exit code 2."""

    def __init__(self, message: str | list[str]):
        self.problems = [message] if isinstance(message, str) else list(message)
        super().__init__("\n".join(self.problems))


class ConfigError(TunesmithError):
    """The run config is invalid."""


class DataError(TunesmithError):
    """A data file is missing, unreadable or fails preflight validation."""


class ResourceError(TunesmithError):
    """The run cannot fit this machine (memory preflight); exit code 2, with what would make it fit."""


MAX_LISTED = 10  # problems listed one per line before the rest are summarised


def summarise(problems: list[str], limit: int = MAX_LISTED) -> list[str]:
    """Each problem once (splits carved from one file repeat its file-level problems), the first `limit`
    of them, then one line counting the rest."""
    problems = list(dict.fromkeys(problems))
    if len(problems) <= limit:
        return problems
    return problems[:limit] + [f"... and {len(problems) - limit} more problems like these"]
