"""Where the daemon's log and its stdio go."""

from __future__ import annotations

import logging
import os
import sys


def setup_logging(log_file: str | None, level: int = logging.INFO) -> None:
    """Log to ``log_file`` (appending) or to stderr, journald-style (no timestamps on stderr)."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    if log_file:
        handler: logging.Handler = logging.FileHandler(log_file)
        handler.setFormatter(logging.Formatter("%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("<%(levelno)s>%(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(level)



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
