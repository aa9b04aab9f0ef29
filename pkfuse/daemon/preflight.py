"""What must hold before a daemon is started: the checks, their errors, the exit statuses.

``preflight`` is called once per mount, by the command, before it forks or
serves: the foreground daemon and the forked one rely on it and do not check
again. Each refusal is a ``MountError``: one line and the status that
``pkfuse mount --help`` documents.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import threading
import time

from backing.errors import PkfuseError

from .mountinfo import mount_path, mounted_paths, unescape

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
  3  mountpoint missing, not a directory, or busy (already mounted; a dead mount
     a killed daemon left is cleared with `pkfuse umount MOUNTPOINT`)
  4  image in use by another pkfuse daemon (flock)
  5  /dev/fuse missing or the mount refused by the kernel
  6  the image is missing, not a regular file, or not a valid pkfuse image (fsck it)
  128+N  signal N (Ctrl-C, SIGTERM, SIGHUP) while waiting: the daemon was stopped"""

DEV_FUSE = "/dev/fuse"


class MountError(PkfuseError):
    """A refused mount: a one-line message and the exit status to give."""

    def __init__(self, message: str, status: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.status = status



#: seconds a busy FUSE mountpoint's ``statfs`` may take before its daemon counts as silent
#: (generous: a live daemon on a busy machine can be slow to answer)
PROBE_TIMEOUT = 5.0


def check_mountpoint(mnt: str) -> None:
    # the mount check first: a dead FUSE mount (daemon killed) fails stat, so exists() says False
    if mount_path(mnt) in mounted_paths():
        raise MountError(_busy(mnt), EXIT_MOUNTPOINT)
    if not os.path.exists(mnt):
        raise MountError(f"mountpoint {mnt} does not exist", EXIT_MOUNTPOINT)
    if not os.path.isdir(mnt):
        raise MountError(f"mountpoint {mnt} is not a directory", EXIT_MOUNTPOINT)


def _busy(mnt: str) -> str:
    """Why ``mnt``, a mountpoint already, cannot be mounted on, and what to run about it.

    Three cases need different advice: the dead mount a killed FUSE daemon
    leaves (its requests fail with ENOTCONN; ``pkfuse umount`` clears it), a
    pkfuse daemon still serving there (``pkfuse umount`` first, on purpose),
    and someone else's mount (not ours to remove). The probe is ``statfs``,
    not ``stat``: the kernel answers a ``stat`` of the root from its cache
    for up to the attribute timeout after the daemon died, but sends every
    ``statfs``. Only a FUSE mount is probed, in a thread given
    ``PROBE_TIMEOUT``: a stopped daemon would never answer, and a hung
    network filesystem is not ours to wait for.
    """
    fstype, source = _mount_entry(mnt)
    if fstype == "fuse" or fstype.startswith(("fuse.", "fuseblk")):
        answer = _statfs_errno(mnt)
        if answer == errno.ENOTCONN:
            return (f"mountpoint {mnt} is busy with a dead FUSE mount (its daemon is gone, killed?): "
                    f"run `pkfuse umount {mnt}` to clear it, then mount again")
        if fstype == "fuse.pkfuse":
            silent = ", and its daemon does not answer" if answer is None else ""
            return (f"mountpoint {mnt} is busy: pkfuse already serves {source} there{silent} "
                    f"(`pkfuse umount {mnt}` first)")
    return f"mountpoint {mnt} is busy: {source} ({fstype}) is mounted there; choose another mountpoint"


def _mount_entry(mnt: str) -> tuple[str, str]:
    """(fstype, source) of the mount on top at ``mnt``, from mountinfo (the last one listed there)."""
    target = os.fsencode(mount_path(mnt))
    found = ("unknown", "something")
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            left, _, right = line.partition(b" - ")
            fields, tail = left.split(), right.split()
            if len(fields) > 4 and len(tail) > 1 and unescape(fields[4]) == target:
                found = (os.fsdecode(tail[0]), os.fsdecode(unescape(tail[1])))
    return found


def _statfs_errno(path: str) -> int | None:
    """0 if ``statfs(path)`` answers, its errno if it fails, None if no answer within ``PROBE_TIMEOUT``."""
    result: list[int] = []

    def probe() -> None:
        try:
            os.statvfs(path)
            result.append(0)
        except OSError as exc:
            result.append(exc.errno or 0)

    thread = threading.Thread(target=probe, daemon=True)  # left behind if it hangs: it ends with us
    thread.start()
    thread.join(PROBE_TIMEOUT)
    return result[0] if result else None


def check_fuse() -> None:
    if not os.path.exists(DEV_FUSE):
        raise MountError(f"{DEV_FUSE} is missing: load the fuse module (modprobe fuse) or "
                         "give the container the device", EXIT_NO_FUSE)


def check_image(image: str) -> None:
    """The image must be a regular file (``Store.open`` refuses anything else).

    Checked here, before a daemon starts, so that a refused image leaves
    nothing behind: the daemon's default log ``IMAGE.log`` would otherwise be
    made beside ``/dev/null`` or a FIFO.
    """
    try:
        st = os.stat(image)
    except FileNotFoundError:
        raise MountError(f"image {image} does not exist (make one with `pkfuse mkfs`)", EXIT_BAD_IMAGE) from None
    except OSError as exc:
        raise MountError(f"cannot look at image {image}: {exc.strerror}", EXIT_BAD_IMAGE) from None
    if stat.S_ISDIR(st.st_mode):
        raise MountError(f"image {image} is a directory", EXIT_BAD_IMAGE)
    if not stat.S_ISREG(st.st_mode):
        raise MountError(f"image {image} is not a regular file", EXIT_BAD_IMAGE)



#: seconds between looks while ``--wait`` waits for the image's lock and the mountpoint
WAIT_POLL = 0.001


def image_locked(image: str) -> bool:
    """Whether some process holds an flock on ``image`` (tried with a non-blocking exclusive lock of
    our own on a separate open, released at once)."""
    fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # releases the lock if we took it
    return False


def wait_ready(image: str, mnt: str, seconds: float) -> None:
    """``pkfuse mount --wait``: wait until ``mnt`` is no mount and nobody holds ``image``'s lock.

    What a successor started before a restart waits through, in order: the
    old daemon serving ``mnt`` (a mount, the image locked), its death (the
    lock is released with its last descriptor; the dead FUSE mount stays
    until someone clears it) and the clear (``mnt`` a plain directory again).
    The mount table is read, never the mountpoint: a dead or frozen mount is
    not touched. Anything else ``preflight`` refuses (no image, no
    directory) is refused at once. After ``seconds`` the refusal is the one
    without ``--wait``, saying how long it waited.
    """
    deadline = time.monotonic() + seconds
    target = mount_path(mnt)
    check_image(image)
    while True:
        busy = target in mounted_paths()
        locked = not busy and image_locked(image)
        if not busy and not locked:
            return
        if time.monotonic() >= deadline:
            if busy:
                raise MountError(f"{_busy(mnt)} (waited {seconds:g} s)", EXIT_MOUNTPOINT)
            raise MountError(f"image {image} is in use by another pkfuse process (waited {seconds:g} s for "
                             "its lock)", EXIT_IMAGE_BUSY)
        time.sleep(WAIT_POLL)


def preflight(image: str, mnt: str, *, wait: float | None = None) -> tuple[str, str]:
    """Check image, mountpoint and ``/dev/fuse`` in that order; return both as absolute paths.

    ``wait`` (seconds): first wait for the mountpoint to be free and the
    image's lock released (``wait_ready``) instead of refusing at once.
    """
    image = os.path.abspath(image)
    mnt = os.path.abspath(mnt)
    if wait is not None:
        wait_ready(image, mnt, wait)
    check_image(image)
    check_mountpoint(mnt)
    check_fuse()
    return image, mnt
