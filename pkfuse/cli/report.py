"""User-facing errors: every refusal is one line ``PROG: error: ...`` and an exit status.

A traceback means a bug in pkfuse, never bad input.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from backing.errors import PkfuseError
from pkfuse.daemon.preflight import MountError


def one_line(exc: BaseException) -> str:
    """``exc`` as one line: an OSError's ``file: strerror``, else the first line of its text."""
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    text = str(exc)
    return text.splitlines()[0] if text else type(exc).__name__


def error(prog: str, message: str) -> None:
    print(f"{prog}: error: {message}", file=sys.stderr)


def reported(prog: str, fn: Callable[[], int]) -> int:
    """``fn()``, with every user error as one ``PROG: error:`` line and its exit status."""
    try:
        return fn()
    except BrokenPipeError:
        # the reader went away (`pkfuse info | head`): not an error worth a line
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except MountError as exc:  # serve turns ImageBusy into one, with its own status
        error(prog, str(exc))
        return exc.status
    except (PkfuseError, OSError, ValueError) as exc:
        error(prog, one_line(exc))
        return 1
    except KeyboardInterrupt:
        _forget_unhandled_interrupt()
        error(prog, "interrupted")
        return 130


def _forget_unhandled_interrupt() -> None:
    """Clear CPython's "a KeyboardInterrupt went unhandled" flag: we handled it.

    CPython sets that flag whenever a KeyboardInterrupt leaves code run by
    ``exec()`` or ``eval()`` of a string, caught later or not, and at exit
    then kills itself with SIGINT instead of returning our status. A Ctrl-C
    or SIGTERM that lands while a dataclass is being made (its methods are
    ``exec``'d source: a module imported lazily during teardown) did just
    that, one interrupt in ~10 (status -2, not 130). Each string ``exec``
    resets the flag when it starts.
    """
    exec("")  # noqa: S102 -- a constant: the reset is the point
