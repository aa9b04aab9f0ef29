"""Where the daemon's log and its stdio go."""

from __future__ import annotations

import logging
import os
import sys

from .preflight import MountError


def setup_logging(log_file: str | None, level: int = logging.INFO) -> None:
    """Log to ``log_file`` (appending) or to stderr, journald-style (no timestamps on stderr).

    ``log_file`` is opened (made, if missing) only by the first record: a
    mount refused before then -- an image that is busy or not a pkfuse image
    -- leaves no empty log behind. serve's first record is its "mounting"
    line, after the image opened and before ``pyfuse3.init``, so the log is
    opened by name before the mount exists (a log under the mountpoint must
    be). A log that clearly cannot be made is refused here, in one line;
    one that fails at that first record raises its ``OSError`` from the
    logging call.
    """
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    if log_file:
        check_log(log_file)
        handler: logging.Handler = logging.FileHandler(log_file, delay=True)
        handler.setFormatter(logging.Formatter("%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("<%(levelno)s>%(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(level)



def check_log(log_file: str) -> None:
    """Refuse ``log_file`` if it could not be opened for appending, without making it.

    A missing log needs a directory we may write in; an existing one must be
    writable and not a directory. Nothing is opened: a FIFO as log blocks
    only when the daemon logs, as it always has.
    """
    if os.path.isdir(log_file):
        raise MountError(f"log {log_file} is a directory")
    if os.path.exists(log_file):
        if not os.access(log_file, os.W_OK):
            raise MountError(f"cannot write the log {log_file}: permission denied")
        return
    parent = os.path.dirname(os.path.abspath(log_file))
    if not os.path.isdir(parent):
        raise MountError(f"cannot make the log {log_file}: no directory {parent}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise MountError(f"cannot make the log {log_file}: permission denied in {parent}")


def detach_stdio() -> None:
    """Point stdin at /dev/null and stdout/stderr at the log (or /dev/null).

    The log's descriptor is duplicated, not reopened by name: this runs once
    mounted, and a log path under the mountpoint would be opened through our
    own, not yet served, mount and hang.
    """
    null = os.open(os.devnull, os.O_RDWR)
    out = null
    for h in logging.getLogger().handlers:
        if isinstance(h, logging.FileHandler) and h.stream is not None:
            out = os.dup(h.stream.fileno())
    os.dup2(null, 0)
    os.dup2(out, 1)
    os.dup2(out, 2)
    for fd in {null, out}:
        os.close(fd)
