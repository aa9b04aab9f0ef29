"""This mount namespace's mounts, read from ``/proc/self/mountinfo`` without touching them.

Nothing here ``stat``s a mountpoint: a FUSE mount whose daemon is hung or
stopped would block that call until the daemon is killed.
"""

from __future__ import annotations

import os
import re


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
                out.add(os.fsdecode(unescape(left[4])))
    return out


def mount_device(mnt: str) -> int | None:
    """``st_dev`` of the files on the mount at ``mnt`` (mountinfo's ``major:minor``), or None.

    Of mounts stacked on one path the last listed is the one on top.
    """
    target = os.fsencode(mount_path(mnt))
    dev = None
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields = line.partition(b" - ")[0].split()
            if len(fields) > 4 and unescape(fields[4]) == target:
                major, _, minor = fields[2].partition(b":")
                dev = os.makedev(int(major), int(minor))
    return dev


def abort_connection(mnt: str) -> bool:
    """Abort the FUSE connection of the mount at ``mnt`` (``/sys/fs/fuse/connections/N/abort``,
    fusectl mounted first if it is not, as root): every request waiting on it fails with ENOTCONN.

    What frees a daemon that SIGKILL cannot end: a thread of it waiting, uninterruptibly, for an
    answer only the daemon could give (a FLUSH of a file on its own mount, closed on its way out,
    holds the image's lock for as long). True if the abort was written.
    """
    import subprocess
    from pathlib import Path

    dev = mount_device(mnt)
    if dev is None:
        return False
    ctl = Path("/sys/fs/fuse/connections")
    try:
        if os.geteuid() == 0 and ctl.is_dir() and not any(ctl.iterdir()):
            subprocess.run(["mount", "-t", "fusectl", "fusectl", str(ctl)], capture_output=True, check=False)
        (ctl / str(os.minor(dev) if os.major(dev) == 0 else dev) / "abort").write_text("1")
    except OSError:
        return False
    return True


def mount_source(mnt: str) -> str | None:
    """The source (fsname) of the fuse.pkfuse mount at ``mnt``, from mountinfo."""
    target = os.fsencode(mount_path(mnt))
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            left, _, right = line.partition(b" - ")
            fields, tail = left.split(), right.split()
            if len(fields) > 4 and len(tail) > 1 and unescape(fields[4]) == target and tail[0] == b"fuse.pkfuse":
                return os.fsdecode(unescape(tail[1]))
    return None


def unescape(field: bytes) -> bytes:
    """A mountinfo field as the kernel had it (it escapes space, tab, newline and ``\\`` as octal)."""
    return re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m[1], 8)]), field)


def pkfuse_mounts() -> list[tuple[str, str]]:
    """``(mountpoint, source)`` of every fuse.pkfuse mount, in mountinfo's order (the source is
    the image path the daemon was given, unless ``-o fsname`` renamed it)."""
    out = []
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            left, _, right = line.partition(b" - ")
            fields, tail = left.split(), right.split()
            if len(fields) > 4 and len(tail) > 1 and tail[0] == b"fuse.pkfuse":
                out.append((os.fsdecode(unescape(fields[4])), os.fsdecode(unescape(tail[1]))))
    return out
