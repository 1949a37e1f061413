"""User-facing errors, one type per kind of problem.

Anything a user can cause (bad input, missing files, offline hub) raises a ``SaffronError``; the CLI prints its
message on one line and exits with the type's ``exit_code``, and the server answers with the type's
``http_status`` and ``api_code``. Callers classify an error by its type, never by its message. Everything else
is a bug and keeps its traceback.

A plain ``SaffronError`` is bad input (the most common kind); raise a subclass where the kind matters to a
caller. ``except SaffronError`` catches them all.
"""

from __future__ import annotations

from typing import ClassVar


class SaffronError(Exception):
    """An error whose message alone tells the user what went wrong and how to fix it."""

    exit_code: ClassVar[int] = 2  # the convention for usage errors (click's, argparse's)
    http_status: ClassVar[int] = 400
    api_code: ClassVar[str | None] = None  # the ``code`` of an OpenAI-style error body


class InputError(SaffronError):
    """Bad user input: an option, a request field, a value out of range, a malformed file line.

    ``option``: the method option at fault, when there is one (the server names it as the error's ``param``)."""

    def __init__(self, message: str, *, option: str | None = None) -> None:
        super().__init__(message)
        self.option = option


class ContextLengthError(InputError):
    """A sequence longer than the model's context (OpenAI's ``context_length_exceeded``)."""

    api_code = "context_length_exceeded"


class NotFoundError(SaffronError):
    """A named file, folder, model or dataset that does not exist."""

    exit_code = 3
    http_status = 404
    api_code = "not_found"


class IncompatibleError(SaffronError):
    """Things that exist but do not fit together: an MRM for another tokenizer, a folder of another run."""

    exit_code = 4
    http_status = 422
    api_code = "incompatible"


class UnavailableError(SaffronError):
    """Something needed is out of reach: the hub offline, an optional extra not installed."""

    exit_code = 5
    http_status = 503
    api_code = "unavailable"


class BusyError(SaffronError):
    """Capacity is used up for now (a full queue); the same request later may succeed."""

    exit_code = 6
    http_status = 503
    api_code = "server_busy"


class BudgetError(SaffronError):
    """A computation needs more KV cache than its budget allows (ask for less: width, tokens)."""

    exit_code = 7
    http_status = 400
    api_code = "kv_budget_exceeded"


ERROR_TYPES: tuple[type[SaffronError], ...] = (SaffronError, InputError, ContextLengthError, NotFoundError,
                                               IncompatibleError, UnavailableError, BusyError, BudgetError)
