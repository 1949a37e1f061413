"""User-facing errors.

Anything a user can cause (bad input, missing files, offline hub) raises ``SaffronError``; the CLI prints its
message on one line and exits non-zero. Everything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class SaffronError(Exception):
    """An error whose message alone tells the user what went wrong and how to fix it."""

    exit_code = 2
