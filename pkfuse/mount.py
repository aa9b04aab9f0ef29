"""The daemon: open and lock the image, mount, serve on trio, shut down cleanly.

Lifecycle of ``pkfuse mount --foreground IMAGE MNT``:

1. check the mountpoint (a directory, not already a mount) and ``/dev/fuse``;
2. ``Store.open`` (flock: a second daemon on the image gets ``ImageBusy``;
   journal replay and validation: a bad image gives ``FormatError``);
3. ``pyfuse3.init`` mounts; ``pyfuse3.main`` serves in a trio nursery next
   to a task that turns SIGTERM/SIGINT/SIGHUP into ``pyfuse3.terminate``;
4. the loop ends on unmount (``fusermount3 -u``) or a signal; then the
   mount is removed (``pyfuse3.close``), orphans are freed, the store is
   closed (marked clean) and the process exits 0.

Without ``--foreground`` the command forks the daemon into a new session
and returns only once the mount answers; a daemon that fails before that
has its one-line error copied to the caller's stderr and its exit status
returned. The daemon's log goes to ``--log FILE``,
by default ``IMAGE.log`` next to the image (stderr in foreground mode).

Exit status (documented in ``pkfuse mount --help``): see ``EXIT_*``.
"""

from __future__ import annotations

import contextlib
import errno
import faulthandler
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from typing import Any, NoReturn

from backing.errors import FormatError, ImageBusy, PkfuseError

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_ERROR = 1  #: any other failure
EXIT_USAGE = 2  #: bad arguments or options
EXIT_MOUNTPOINT = 3  #: mountpoint missing, not a directory, or already a mount
EXIT_IMAGE_BUSY = 4  #: another pkfuse process holds the image
EXIT_NO_FUSE = 5  #: /dev/fuse missing or the kernel refused the mount
EXIT_BAD_IMAGE = 6  #: the image is not a valid pkfuse image

EXIT_DOC = """exit status:
  0  mounted (daemon mode) / unmounted cleanly (foreground)
  1  other error          2  bad arguments or -o options
  3  mountpoint missing, not a directory, or busy (already mounted)
  4  image in use by another pkfuse daemon (flock)
  5  /dev/fuse missing or the mount refused by the kernel
  6  the image is not a valid pkfuse image (fsck it)
  128+N  signal N (Ctrl-C, SIGTERM, SIGHUP) while waiting: the daemon was stopped"""

DEV_FUSE = "/dev/fuse"
#: what a terminal or the caller sends to ``pkfuse mount`` while it waits for its daemon
_CALLER_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT}
READY_TIMEOUT = 30.0  #: seconds a daemonizing `pkfuse mount` waits for the mount to answer
STATUS_TIMEOUT = 2.0  #: seconds `pkfuse umount` waits for a daemon to tell its pid

#: -o options passed through to libfuse/the kernel as given
PASSTHROUGH = {"allow_other", "allow_root", "auto_unmount", "default_permissions", "dev", "nodev", "suid",
               "nosuid", "exec", "noexec", "atime", "noatime", "sync", "async", "dirsync"}
#: (libfuse rejects relatime; max_read breaks pyfuse3's init: neither is offered)
PASSTHROUGH_VALUE = {"fsname", "subtype"}
#: pkfuse's own -o options
OWN_FLAGS = {"ro", "rw", "no_default_permissions", "nodefault_permissions"}
OWN_VALUE = {"log", "regs"}


class MountError(PkfuseError):
    """A refused mount: a one-line message and the exit status to give."""

    def __init__(self, message: str, status: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.status = status


def parse_options(opts: Iterable[str]) -> dict[str, Any]:
    """Split ``-o a,b=c`` strings into ``{"fuse": set, "read_only": bool, "log": ..., "regs": ...}``."""
    out: dict[str, Any] = {"fuse": set(), "read_only": False, "default_permissions": True,
                           "log": None, "regs": None}
    for group in opts:
        for opt in (o.strip() for o in group.split(",")):
            if not opt:
                continue
            key, eq, value = opt.partition("=")
            if eq and key in OWN_VALUE:
                out[key] = value
            elif not eq and key in OWN_FLAGS:
                if key in ("ro", "rw"):
                    out["read_only"] = key == "ro"
                else:
                    out["default_permissions"] = False
            elif (not eq and key in PASSTHROUGH) or (eq and key in PASSTHROUGH_VALUE):
                if not opt.isascii():
                    raise MountError(f"mount option {opt!r} is not ASCII (libfuse options must be)", EXIT_USAGE)
                out["fuse"].add(opt)
            else:
                raise MountError(f"unknown mount option {opt!r}", EXIT_USAGE)
    return out


def _escape(text: str) -> str:
    """``text`` as one libfuse option value: ASCII (pyfuse3 encodes options as ASCII), ``,`` and ``\\`` escaped."""
    return text.encode("ascii", "backslashreplace").decode().replace("\\", "\\\\").replace(",", "\\,")


def fuse_options(image: str, opts: dict[str, Any]) -> set[str]:
    """The option set for ``pyfuse3.init``: fsname/subtype, permissions, ro, the user's extras."""
    out = set(opts["fuse"])
    if not any(o.startswith("fsname=") for o in out):
        out.add(f"fsname={_escape(image)}")
    if not any(o.startswith("subtype=") for o in out):
        out.add("subtype=pkfuse")
    if opts["default_permissions"]:
        out.add("default_permissions")
    else:
        out.discard("default_permissions")
    if opts["read_only"]:
        out.add("ro")
    return out


def mount_path(mnt: str) -> str:
    """``mnt`` as mountinfo names it, resolving only its parent directory.

    ``realpath(mnt)`` would ``lstat`` the mountpoint itself: on a FUSE
    mount whose daemon is hung or stopped that waits forever (only SIGKILL
    ends it), as soon as the cached attributes of its root expire.
    """
    mnt = os.path.abspath(mnt)
    return os.path.join(os.path.realpath(os.path.dirname(mnt)), os.path.basename(mnt))


def mounted_paths() -> set[str]:
    """Mountpoints in this mount namespace (the kernel escapes space, tab, newline and ``\\`` as octal)."""
    out = set()
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            left = line.partition(b" - ")[0].split()
            if len(left) > 4:
                out.add(os.fsdecode(_unescape(left[4])))
    return out


def check_mountpoint(mnt: str) -> None:
    # the mount check first: a dead FUSE mount (daemon killed) fails stat, so exists() says False
    if mount_path(mnt) in mounted_paths():
        raise MountError(f"mountpoint {mnt} is busy: something is already mounted there", EXIT_MOUNTPOINT)
    if not os.path.exists(mnt):
        raise MountError(f"mountpoint {mnt} does not exist", EXIT_MOUNTPOINT)
    if not os.path.isdir(mnt):
        raise MountError(f"mountpoint {mnt} is not a directory", EXIT_MOUNTPOINT)


def check_fuse() -> None:
    if not os.path.exists(DEV_FUSE):
        raise MountError(f"{DEV_FUSE} is missing: load the fuse module (modprobe fuse) or "
                         "give the container the device", EXIT_NO_FUSE)


def check_image(image: str) -> None:
    if not os.path.exists(image):
        raise MountError(f"image {image} does not exist (make one with `pkfuse mkfs`)", EXIT_BAD_IMAGE)
    if os.path.isdir(image):
        raise MountError(f"image {image} is a directory", EXIT_BAD_IMAGE)


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


def default_log(image: str) -> str:
    return image + ".log"


def default_regs(image: str) -> str:
    return image + ".regs"


# ---------------------------------------------------------------- foreground


def serve(image: str, mnt: str, opts: dict[str, Any], *, daemonized: bool = False) -> int:
    """Mount ``image`` on ``mnt`` and serve until unmounted or signalled. Returns the exit status.

    Raises ``MountError`` (or PkfuseError/OSError) before the mount exists.
    ``daemonized``: once mounted, detach stdio (stderr to the log) so the
    parent waiting on our stderr sees EOF.
    """
    import pyfuse3
    import trio

    from backing.store import Store

    from .fs import Operations

    image = os.path.abspath(image)
    mnt = os.path.abspath(mnt)
    check_image(image)
    check_mountpoint(mnt)
    check_fuse()
    try:
        store = Store.open(image, read_only=opts["read_only"])
    except ImageBusy as exc:
        raise MountError(f"{exc} (unmount it first, or use `pkfuse info` to look)", EXIT_IMAGE_BUSY) from None
    except FormatError as exc:
        raise MountError(f"{image} is not a usable pkfuse image: {exc}", EXIT_BAD_IMAGE) from None
    except PermissionError as exc:
        raise MountError(f"cannot open {image}: {exc.strerror}", EXIT_ERROR) from None
    iommu: Any = None
    ops: Operations | None = None
    try:
        iommu, regs = _open_iommu(store, image, opts)
        ops = Operations(store, iommu=iommu, regs_path=regs)
        options = fuse_options(image, opts)
        log.info("mounting %s on %s (options %s, pid %d, generation %d)", image, mnt,
                 ",".join(sorted(options)), os.getpid(), store.generation)
        try:
            pyfuse3.init(ops, mnt, options)
        except RuntimeError as exc:
            if "fuse_session_new" in str(exc):
                raise MountError(f"libfuse rejected the mount options {','.join(sorted(options))}",
                                 EXIT_USAGE) from None
            raise MountError(f"the kernel refused to mount {mnt} ({exc}); is FUSE available?", EXIT_NO_FUSE) from None
        try:
            if daemonized:
                _detach_stdio()
            os.chdir("/")
            trio.run(_main, pyfuse3)
        finally:
            with contextlib.suppress(Exception):
                pyfuse3.close(unmount=True)
            ops.forget_all()  # the kernel's references are gone: free orphans
        log.info("unmounted %s; closing the image", mnt)
    finally:
        if ops is not None:
            ops.close()
        if iommu is not None:
            with contextlib.suppress(Exception):
                iommu.close()
        store.close()
    log.info("image %s closed cleanly", image)
    return EXIT_OK


def _open_iommu(store: Any, image: str, opts: dict[str, Any]) -> tuple[Any, str | None]:
    """Load the IOMMU driver state (``backing.iommu``) and its register block.

    The register block defaults to ``IMAGE.regs`` (made, reset, if missing;
    a read-only mount does not make one). Pins live in this state: without
    it nothing would stop a truncate or unlink of guest pages that a
    domain's tables still point at. So state that does not load refuses a
    read-write mount; a read-only mount serves the files and says why in
    the log and in ``.pkernfs/status``.
    """
    from backing import iommu as iommu_mod

    regs: str | None = os.path.abspath(opts.get("regs") or default_regs(image))
    if opts["read_only"] and regs and not os.path.exists(regs):
        regs = None
    try:
        return iommu_mod.Iommu.open(store, regs), regs
    except (PkfuseError, OSError) as exc:
        if not opts["read_only"]:
            raise MountError(f"the IOMMU state of {image} does not load ({exc}); guest files could not be "
                             "pinned, so only --read-only mounts are allowed", EXIT_BAD_IMAGE) from None
        log.error("IOMMU state not loaded (regs %s): %s", regs, exc)
    return None, regs


async def _main(pyfuse3: Any) -> None:
    import trio

    async with trio.open_nursery() as nursery:
        nursery.start_soon(_watch_signals, pyfuse3, nursery.cancel_scope)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


async def _watch_signals(pyfuse3: Any, scope: Any) -> None:
    import trio

    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("%s: unmounting", signal.Signals(signum).name)
            pyfuse3.terminate()
            return


def _detach_stdio() -> None:
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


# ------------------------------------------------------------------- daemon


def daemonize(image: str, mnt: str, log_file: str, child: Callable[[], int]) -> int:
    """Fork the daemon into a new session; return once the mount answers.

    The child runs ``child()`` -- the foreground mount, with the caller's
    error reporting -- and exits with its status; it never returns here.
    Forking, not re-executing, keeps one interpreter start and one import of
    pyfuse3, trio and numpy on the way to a mounted filesystem (~50 ms).
    The child's stderr is a pipe to us until it is mounted: an error before
    that reaches the caller's terminal as its one line.
    """
    image = os.path.abspath(image)
    mnt = os.path.abspath(mnt)
    check_image(image)
    check_mountpoint(mnt)
    check_fuse()
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


# ------------------------------------------------------------------ unmount


def daemon_pid(mnt: str) -> int | None:
    """The pid of the daemon serving ``mnt``, found without sending it a request if possible.

    A hung or stopped daemon would never answer a read under its mount, and
    ``pkfuse umount`` exists for exactly that case. The mount's source is the
    image (pkfuse's default fsname), and the daemon holds the image's flock,
    which ``/proc/locks`` lists with its pid. Only the inode number is
    compared there (on btrfs or overlayfs the lock's device is not the one
    ``stat`` gives), so a holder counts only if it has the image itself open.
    When that does not name exactly one process (a user's ``fsname=``, a
    non-ASCII path libfuse could not pass, two read-only daemons), the
    daemon's ``.pkernfs/status`` is asked, for at most ``STATUS_TIMEOUT``.
    """
    source = _mount_source(mnt)
    try:
        st = os.stat(source) if source is not None else None
    except OSError:
        st = None
    holders = _flock_holders(st) if st is not None else set()
    return holders.pop() if len(holders) == 1 else _status_pid(mnt)


def _flock_holders(st: os.stat_result) -> set[int]:
    """Pids holding an flock on the file ``st`` describes, and having it open."""
    candidates = set()
    with open("/proc/locks") as f:
        for line in f:
            fields = line.split()
            # "1: FLOCK  ADVISORY  WRITE 4242 fd:01:1234 0 EOF"; waiters have "->" after the id;
            # a holder in another pid namespace shows as pid 0 (or -1)
            if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5].rpartition(":")[2] == str(st.st_ino):
                with contextlib.suppress(ValueError):
                    if int(fields[4]) > 0:
                        candidates.add(int(fields[4]))
    out = set()
    for pid in candidates:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    if os.path.samestat(os.stat(f"/proc/{pid}/fd/{fd}"), st):
                        out.add(pid)
                        break
    return out


def _status_pid(mnt: str) -> int | None:
    """``daemon_pid`` from ``MNT/.pkernfs/status``, read in a thread we stop waiting for after a timeout."""
    found: list[int] = []

    def read() -> None:
        with contextlib.suppress(OSError, ValueError), open(os.path.join(mnt, ".pkernfs", "status")) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "daemon_pid":
                    found.append(int(value))

    reader = threading.Thread(target=read, daemon=True)  # a hung daemon never answers it
    reader.start()
    reader.join(STATUS_TIMEOUT)
    return found[0] if found else None


def _mount_source(mnt: str) -> str | None:
    """The source (fsname) of the fuse.pkfuse mount at ``mnt``, from mountinfo."""
    target = os.fsencode(mount_path(mnt))
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            left, _, right = line.partition(b" - ")
            fields, tail = left.split(), right.split()
            if len(fields) > 4 and len(tail) > 1 and _unescape(fields[4]) == target and tail[0] == b"fuse.pkfuse":
                return os.fsdecode(_unescape(tail[1]))
    return None


def _unescape(field: bytes) -> bytes:
    """A mountinfo field as the kernel had it (it escapes space, tab, newline and ``\\`` as octal)."""
    return re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m[1], 8)]), field)


def unmount(mnt: str, timeout: float = 10.0) -> int:
    """``fusermount3 -u MNT`` and wait for the daemon to exit; never waits on a request to the daemon."""
    mnt = os.path.abspath(mnt)
    if mount_path(mnt) not in mounted_paths():
        raise MountError(f"{mnt} is not mounted", EXIT_MOUNTPOINT)
    pid = daemon_pid(mnt)
    fusermount = shutil.which("fusermount3") or shutil.which("fusermount")
    if fusermount is None:
        raise MountError("fusermount3 not found (install the fuse3 package)", EXIT_NO_FUSE)
    res = subprocess.run([fusermount, "-u", mnt], capture_output=True, text=True)
    if res.returncode != 0:
        msg = res.stderr.strip().splitlines()[-1] if res.stderr.strip() else f"status {res.returncode}"
        if "busy" in msg.lower():
            hint = "" if pid is not None else "; if its daemon hangs, `fusermount3 -u -z` detaches it"
            raise MountError(f"{mnt} is busy (a process has a file or its cwd there): {msg}{hint}", EXIT_MOUNTPOINT)
        raise MountError(f"could not unmount {mnt}: {msg}", EXIT_ERROR)
    if pid is not None:
        deadline = time.monotonic() + timeout
        while process_alive(pid):
            if time.monotonic() > deadline:
                raise MountError(f"unmounted, but daemon {pid} did not exit within {timeout:g}s", EXIT_ERROR)
            time.sleep(0.01)
    return EXIT_OK


def process_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, exited but not reaped, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rpartition(")")[2].split()[0]
        return state not in ("Z", "X")
    except FileNotFoundError:
        return False
    except OSError as exc:
        return exc.errno != errno.ESRCH
