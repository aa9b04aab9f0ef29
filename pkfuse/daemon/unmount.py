"""``pkfuse umount``: unmount and wait for the daemon, found without a request through the mount."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
import threading
import time

from .mountinfo import mount_path, mount_source, mounted_paths
from .preflight import EXIT_ERROR, EXIT_MOUNTPOINT, EXIT_NO_FUSE, EXIT_OK, MountError

STATUS_TIMEOUT = 2.0  #: seconds `pkfuse umount` waits for a daemon to tell its pid


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
    source = mount_source(mnt)
    try:
        st = os.stat(source) if source is not None else None
    except OSError:
        st = None
    holders = flock_holders(st) if st is not None else set()
    return holders.pop() if len(holders) == 1 else _status_pid(mnt)


def flock_holders(st: os.stat_result) -> set[int]:
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
