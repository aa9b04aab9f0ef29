"""What must hold before a daemon is started: the checks, their errors, the exit statuses.

``preflight`` is called once per mount, by the command, before it forks or
serves: the foreground daemon and the forked one rely on it and do not check
again. Each refusal is a ``MountError``: one line and the status that
``pkfuse mount --help`` documents.
"""

from __future__ import annotations

import os
import stat

from backing.errors import PkfuseError

from .mountinfo import mount_path, mounted_paths

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
  6  the image is missing, not a regular file, or not a valid pkfuse image (fsck it)
  128+N  signal N (Ctrl-C, SIGTERM, SIGHUP) while waiting: the daemon was stopped"""

DEV_FUSE = "/dev/fuse"


class MountError(PkfuseError):
    """A refused mount: a one-line message and the exit status to give."""

    def __init__(self, message: str, status: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.status = status



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



def preflight(image: str, mnt: str) -> tuple[str, str]:
    """Check image, mountpoint and ``/dev/fuse`` in that order; return both as absolute paths."""
    image = os.path.abspath(image)
    mnt = os.path.abspath(mnt)
    check_image(image)
    check_mountpoint(mnt)
    check_fuse()
    return image, mnt
