"""Fork the daemon into its own session and return once its mount answers.

Without ``--foreground``, ``pkfuse mount`` forks the daemon and returns only
once the mount answers; a daemon that fails before that has its one-line
error copied to the caller's stderr and its exit status returned. Ctrl-C,
SIGTERM or SIGHUP while waiting stop the daemon and leave no mount.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any, NoReturn

from .mountinfo import mount_path, mounted_paths
from .preflight import EXIT_ERROR, EXIT_OK, MountError

#: what a terminal or the caller sends to ``pkfuse mount`` while it waits for its daemon
_CALLER_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT}
READY_TIMEOUT = 30.0  #: seconds a daemonizing `pkfuse mount` waits for the mount to answer


def daemonize(image: str, mnt: str, log_file: str, child: Callable[[], int]) -> int:
    """Fork the daemon into a new session; return once the mount answers.

    The child runs ``child()`` -- the foreground mount, with the caller's
    error reporting -- and exits with its status; it never returns here.
    Forking, not re-executing, keeps one interpreter start and one import of
    pyfuse3, trio and numpy on the way to a mounted filesystem (~50 ms).
    The child's stderr is a pipe to us until it is mounted: an error before
    that reaches the caller's terminal as its one line. The caller ran
    ``preflight``.
    """
    mnt = os.path.abspath(mnt)
    _ensure_stdio()
    for stream in (sys.stdout, sys.stderr):  # the child must not write our buffered output a second time
        if stream is not None:
            stream.flush()
    # a Ctrl-C during fork() would restart it and could be lost; blocked, it waits for the try below
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    rfd, wfd = os.pipe()
    try:
        signal.pthread_sigmask(signal.SIG_BLOCK, _CALLER_SIGNALS)
        pid = os.fork()
    except BaseException:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        os.close(rfd)
        os.close(wfd)
        raise
    if pid == 0:
        os.close(rfd)
        _run_daemon(wfd, child, mask)
    os.close(wfd)
    daemon = _Child(pid)
    handlers: dict[int, Any] = {}
    try:
        if threading.current_thread() is threading.main_thread():  # only it may set handlers
            for sig in (signal.SIGTERM, signal.SIGHUP):  # as Ctrl-C: the mount is abandoned, not left half-made
                handlers[sig] = signal.signal(sig, _abandon)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        return _wait_ready(daemon, rfd, mnt, log_file)
    except BaseException:  # interrupted (Ctrl-C, SIGTERM, SIGHUP) or timed out: leave neither a daemon nor a mount
        signal.pthread_sigmask(signal.SIG_BLOCK, _CALLER_SIGNALS)  # a second Ctrl-C must not cut this short
        try:
            daemon.kill()
            if mount_path(mnt) in mounted_paths():
                subprocess.run([shutil.which("fusermount3") or "fusermount3", "-u", "-z", mnt],
                               capture_output=True, start_new_session=True)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        raise
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        os.close(rfd)


def _abandon(signum: int, frame: object) -> NoReturn:
    raise MountError(f"{signal.Signals(signum).name} while waiting for the mount: the daemon was stopped",
                     128 + signum)


class _Child:
    """The forked daemon, reaped at most once (its pid may be reused after that)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.status: int | None = None

    def exit_status(self) -> int | None:
        """Its exit status if it has ended (reaping it), else None."""
        if self.status is None:
            done, wstatus = os.waitpid(self.pid, os.WNOHANG)
            if done:
                code = os.waitstatus_to_exitcode(wstatus)
                self.status = code if code >= 0 else 128 - code  # killed by signal -code, as a shell says
        return self.status

    def kill(self) -> None:
        if self.status is None:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
            self.status = 128 + signal.SIGKILL


def _wait_ready(daemon: _Child, rfd: int, mnt: str, log_file: str) -> int:
    """Wait until ``daemon`` has mounted ``mnt`` and answers; its status if it exits first."""
    deadline = time.monotonic() + READY_TIMEOUT
    # the daemon closes its stderr once mounted (or exits): EOF either way
    err = _read_until_eof(rfd, deadline).decode(errors="replace")
    while True:
        rc = daemon.exit_status()
        if rc is not None:
            _say(err if err.strip() else f"pkfuse: error: daemon exited with status {rc}; see {log_file}\n")
            return rc or EXIT_ERROR
        if mount_path(mnt) in mounted_paths():
            break
        if time.monotonic() > deadline:
            raise MountError(f"the daemon did not mount {mnt} within {READY_TIMEOUT:g}s; see {log_file}")
        time.sleep(0.002)
    os.stat(mnt)  # answers: the root's getattr went through the daemon
    rc = daemon.exit_status()
    if rc is not None or mount_path(mnt) not in mounted_paths():  # it failed right after mounting
        _say(err if err.strip() else f"pkfuse: error: the daemon ended once mounted (status {rc}); see {log_file}\n")
        return rc or EXIT_ERROR
    if err.strip():
        _say(err)
    return EXIT_OK


def _run_daemon(err_fd: int, child: Callable[[], int], mask: set[signal.Signals]) -> NoReturn:
    """The forked child: new session, stdin/stdout on /dev/null, stderr on ``err_fd``, no other
    descriptor of the caller's; never returns.

    A fork keeps every descriptor the caller had, close-on-exec or not: a
    lock file or a pipe the caller's caller waits on would stay open for the
    life of the mount.
    """
    status = EXIT_ERROR
    try:
        os.setsid()  # out of the caller's session: its terminal's signals no longer reach us
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 0)
        os.dup2(null, 1)
        os.dup2(err_fd, 2)
        os.closerange(3, os.sysconf("SC_OPEN_MAX"))
        # the streams may have wrapped other descriptors (an in-process caller's
        # capture files): now closed, their numbers will be the image's
        sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115 - lives as long as the process
        sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
        if faulthandler.is_enabled():
            faulthandler.enable(sys.stderr)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        status = child()
    except BaseException:  # a bug: its traceback goes to the caller, never past this frame
        with contextlib.suppress(BaseException):
            traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(BaseException):
                if stream is not None:
                    stream.flush()
        os._exit(status)


def _ensure_stdio() -> None:
    """Open /dev/null on any of descriptors 0-2 that is closed, so that no pipe of ours lands there."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)  # the lowest free descriptor: ``fd`` itself
            if null != fd:
                os.dup2(null, fd)
                os.close(null)


def _say(text: str) -> None:
    """Write ``text`` to stderr, if there is one (a caller may have closed it)."""
    if sys.stderr is not None:
        sys.stderr.write(text)


def _read_until_eof(fd: int, deadline: float) -> bytes:
    import select

    chunks = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            break
        data = os.read(fd, 65536)
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks)
