"""Errors a user can cause, and how the command line reports them.

A ``UserError`` is a mistake in what the user asked for (an unknown method, a
missing file, a malformed record): the command line prints its one-line message
and exits non-zero, without a traceback. Anything else is a bug and keeps its
traceback.

SIGTERM (``kill``, a batch scheduler's pre-emption, ``docker stop``, torchrun stopping the
other ranks) is handled like Ctrl-C: the commands' clean-up runs (MLflow runs end KILLED,
no half-written results folder stays, a running Optuna trial is queued again) and the exit
code is 143, the shell's code for a process ended by SIGTERM. What is recorded and printed names
the signal (:func:`interruption`), so a pre-empted job is not mistaken for a Ctrl-C. A second
Ctrl-C during that clean-up ends the command with one line, not a traceback (what the clean-up did
not finish, the next start reconciles: see :func:`harness.tracking.reconcile_stale_runs`).
"""

from __future__ import annotations

import errno
import functools
import re
import signal
import sys
import threading
from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable[..., int | None])


class UserError(ValueError):
    """A mistake in the user's input; the message is one line that says what to do."""


class DiskFull(UserError):
    """The file system (results folder, tracking store, cache) ran out of space: the run stops, saying what it kept."""


DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
# what the libraries that wrap the OSError say (SQLite through SQLAlchemy and MLflow, for one)
DISK_FULL_TEXTS = ("no space left on device", "database or disk is full", "disk quota exceeded")


def _chain(err: BaseException | None):
    """``err``, then the errors it was raised from or while handling, each once."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def disk_full(err: BaseException | None) -> bool:
    """Whether ``err``, or an error it was raised from or while handling, says the disk is full."""
    return any((isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS)
               or any(text in str(e).lower() for text in DISK_FULL_TEXTS) for e in _chain(err))


def full_disk_path(err: BaseException | None) -> str | None:
    """The file a disk-full ``OSError`` in ``err``'s chain was writing, when it says."""
    for e in _chain(err):
        if isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS and (e.filename2 or e.filename):
            return str(e.filename2 or e.filename)  # a copy names its source first, the file written second
    return None


class Terminated(KeyboardInterrupt):
    """Raised in the main thread when the process receives SIGTERM, so Ctrl-C's clean-up runs for it too."""


QUOTE_LIMIT = 200  # characters of a user's input that an error line repeats


def quote(value: object, limit: int = QUOTE_LIMIT) -> str:
    """``repr`` of a user's input for an error line, cut to about ``limit`` characters.

    A 100,000-character method spec must not come back as 200 KB on stderr; the start is enough to
    recognise it, and the length says it was cut.
    """
    shown = repr(value)
    if len(shown) <= limit:
        return shown
    return f"{shown[:limit]}... ({len(shown):,} characters)"


def shorten_long_words(message: str, limit: int = QUOTE_LIMIT) -> str:
    """Cut every run of more than ``limit`` non-space characters: the last guard, in :func:`cli_entry`, for
    a message that repeats a user's input whole (the modules use :func:`quote`)."""
    return re.sub(r"\S{%d,}" % (limit + 1), lambda m: f"{m.group()[:limit]}... ({len(m.group()):,} characters)",
                  message)


def interruption(err: BaseException | None = None) -> str:
    """What stopped the process, in words: ``"terminated (SIGTERM)"`` or ``"interrupted (Ctrl-C)"``."""
    if isinstance(err, Terminated) or (err is None and _received):
        return "terminated (SIGTERM)"
    return "interrupted (Ctrl-C)"


EXIT_INTERRUPTED = 130  # 128 + SIGINT, what the commands return after Ctrl-C
EXIT_SIGTERM = 128 + signal.SIGTERM
_received: list[int] = []


def _raise_terminated(signum, frame):
    _received.append(signum)
    raise Terminated(f"received {signal.Signals(signum).name}")


def cli_entry(main: F) -> F:
    """Wrap a ``main(argv) -> exit code``: a ``UserError`` or a full disk becomes one line on stderr and exit 2;
    SIGTERM raises :class:`Terminated` (a ``KeyboardInterrupt``) and ends with exit 143."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        in_main_thread = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, _raise_terminated) if in_main_thread else None
        _received.clear()
        try:
            code = main(*args, **kwargs)
            # the command's own Ctrl-C handling ran for a SIGTERM: report it as such
            return EXIT_SIGTERM if _received and code == EXIT_INTERRUPTED else code
        except UserError as err:
            print(f"error: {shorten_long_words(str(err))}", file=sys.stderr)
            return 2
        except Exception as err:
            if not disk_full(err):
                raise
            where = full_disk_path(err)
            print(f"error: the disk is full{f' (writing {where})' if where else ''}: free some space and run "
                  "the command again", file=sys.stderr)
            return 2
        except Terminated:  # outside the command's own handling (e.g. while the model loads)
            print("\nterminated (SIGTERM)", file=sys.stderr)
            return EXIT_SIGTERM
        except KeyboardInterrupt:  # e.g. a second Ctrl-C, during the command's own clean-up
            print(f"\n{interruption()}; MLflow runs left RUNNING are marked KILLED by the next run",
                  file=sys.stderr)
            return EXIT_SIGTERM if _received else EXIT_INTERRUPTED
        finally:
            if in_main_thread and previous is not None:  # None: a handler installed outside Python
                signal.signal(signal.SIGTERM, previous)

    return wrapper  # type: ignore[return-value]
