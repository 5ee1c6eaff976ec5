"""Errors a user can cause, and how the command line reports them.

A ``UserError`` is a mistake in what the user asked for (an unknown method, a
missing file, a malformed record): the command line prints its one-line message
and exits non-zero, without a traceback. Anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import functools
import sys
from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable[..., int | None])


class UserError(ValueError):
    """A mistake in the user's input; the message is one line that says what to do."""


def cli_entry(main: F) -> F:
    """Wrap a ``main(argv) -> exit code`` so that a ``UserError`` becomes one line on stderr and exit 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2

    return wrapper  # type: ignore[return-value]
