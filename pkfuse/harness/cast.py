"""The cast of a restart test: the image, the daemon (the kernel), the VMM, the device; and their cleanup.

``Cast`` starts every process through the ``pkfuse`` command line, as a
user would, each in its own session (a Ctrl-C at the terminal reaches the
harness alone, which then tears down in order) and with ``PR_SET_PDEATHSIG``
(a harness killed outright takes its direct children along). It remembers
every pid it started -- the commands it ran, and each daemon ``pkfuse
mount`` forked, read from ``.pkernfs/status`` ``daemon_pid`` -- and the one
mountpoint it mounts on. ``close()`` works from any state (mounted, dead
mount, a daemon waiting for the lock, a VMM frozen, nothing started): it
ends the processes it started, by those pids only, and clears its own
mountpoint; it never looks for processes by name.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from backing.errors import PkfuseError
from pkfuse.daemon.mountinfo import abort_connection, mount_path, mounted_paths
from pkfuse.daemon.preflight import EXIT_IMAGE_BUSY
from pkfuse.vmm import monitor as vmm_monitor

PKFUSE = [sys.executable, "-m", "pkfuse"]
FUSERMOUNT = shutil.which("fusermount3") or "fusermount3"
RID = "00:03.0"  #: the VMM's device (``pkfuse vmm run --device``'s default)
GUEST = "vm0"  #: the guest file and the live-update session's name
BYSTANDER = "bystander"  #: a guest file no process maps: its pages must never change
log = logging.getLogger(__name__)
MiB = 1 << 20
STOP_TIMEOUT = 10.0  #: seconds a process gets to end on SIGTERM before SIGKILL
ABORT_AFTER = 1.0  #: seconds after SIGKILL before a daemon still there has its FUSE connection aborted
PR_SET_PDEATHSIG = 1


class HarnessError(PkfuseError):
    """Something in the cast did not start, answer or stop as it must, in one line."""


def realtime_ns() -> int:
    """The timestamps of the harness: CLOCK_REALTIME, comparable with the VMM's ``saved_ns``."""
    return time.clock_gettime_ns(time.CLOCK_REALTIME)


def _die_with_parent() -> None:  # runs in the child between fork and exec
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def image_size(guest_size: int) -> int:
    """The image for a ``guest_size`` guest: the guest, its handover file, metadata, the IOMMU's tables
    (a saved copy of a 4 KiB-leaf domain is 1/512 of what it maps) and room: guest + 1/8 + 64 MiB."""
    size = guest_size + guest_size // 8 + 64 * MiB
    return -(-size // (2 * MiB)) * (2 * MiB)


@dataclass
class Proc:
    """A process the cast started: the command's ``Popen``, or a daemon known by pid."""

    name: str
    popen: subprocess.Popen[bytes] | None = None
    pid: int = 0
    log: Path | None = None
    start: int = 0  #: a pid-known process's start time (``/proc/PID/stat``): which process the pid is

    def alive(self) -> bool:
        if self.popen is not None:
            return self.popen.poll() is None
        return pid_alive(self.pid, self.start)


def _stat(pid: int) -> list[str] | None:
    """The fields of ``/proc/PID/stat`` after the command's name (state first), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()
    except OSError:
        return None


def start_time(pid: int) -> int:
    """When ``pid`` started (clock ticks since boot), 0 if there is no such process."""
    fields = _stat(pid)
    return int(fields[19]) if fields else 0


def pid_alive(pid: int, start: int = 0) -> bool:
    """Whether ``pid`` is a live process (a zombie counts as gone) -- and, given ``start``, still the
    one that started then. A process on its way out, its memory gone (an empty command line) but its
    descriptors not yet closed, is alive: it still holds its locks."""
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z" and (not start or int(fields[19]) == start)


@dataclass
class Cast:
    """Everything one restart test runs, in ``workdir``: ``image``, ``mnt`` and the processes."""

    workdir: Path
    domains: str = "persistent"
    guest_size: int = 64 * MiB
    vcpus: int = 1
    engine: str = "auto"
    device: bool = True
    device_rate: float = 2000.0
    iommu_pgsize: str = "2M"  #: ``pkfuse vmm run --iommu-pgsize`` of the VMM and of every successor
    dirty_share: float | None = None  #: ``pkfuse vmm run --dirty-share`` (None: the VMM's default)
    procs: list[Proc] = field(default_factory=list)
    daemon: Proc | None = None  #: the daemon serving ``mnt`` now (or last)
    vmm: Proc | None = None  #: the running VMM
    vmm_monitor: Path | None = None
    dev: Proc | None = None
    extents: list[tuple[int, int, int]] = field(default_factory=list)  #: the guest file's (offset, phys, len)
    bystander: list[tuple[int, int]] = field(default_factory=list)  #: (image offset, length) of its pages
    bystander_digest: str = ""
    base_phys: int = 0
    closed: bool = False
    _view: Any = None  #: the GuestMemory behind guest_view()

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir).absolute()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.image = self.workdir / "host.img"
        self.mnt = self.workdir / "mnt"
        self.control = self.workdir / "control.sock"
        self.daemon_log = self.workdir / "daemon.log"
        self.device_log = self.workdir / "device.dmalog"
        self.device_json = self.workdir / "device.json"

    # ------------------------------------------------------------ processes

    def spawn(self, name: str, args: list[str], log_name: str | None = None) -> Proc:
        """``pkfuse ARGS`` in its own session, stdout and stderr to ``workdir/LOG_NAME``."""
        log = self.workdir / (log_name or f"{name}.log")
        out: IO[bytes]
        with open(log, "ab") as out:
            popen = subprocess.Popen([*PKFUSE, *args], stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                     start_new_session=True, preexec_fn=_die_with_parent, cwd=self.workdir)
        p = Proc(name, popen, popen.pid, log)
        self.procs.append(p)
        return p

    def tail(self, p: Proc, lines: int = 1) -> str:
        """The last lines of a process's log, for a one-line error."""
        try:
            text = p.log.read_text(errors="replace").strip().splitlines() if p.log else []
        except OSError:
            return ""
        return " | ".join(text[-lines:])

    def wait_exit(self, p: Proc, timeout: float, what: str) -> int:
        assert p.popen is not None
        try:
            return p.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise HarnessError(f"{what} did not end within {timeout:g} s") from None

    def kill(self, p: Proc) -> None:
        """SIGKILL ``p`` by its pid (if it still runs) and wait until it is gone."""
        if p.popen is not None:
            if p.popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.popen.send_signal(signal.SIGKILL)
            p.popen.wait()
            return
        if pid_alive(p.pid, p.start) and self._is_ours(p.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGKILL)
        # not our child: init (or a subreaper) reaps it; gone only once its descriptors (the image's
        # lock among them) are closed, which its command line emptying does not say
        t0 = time.monotonic()
        aborted = False
        while self._still_there(p):
            if not aborted and time.monotonic() - t0 > ABORT_AFTER:
                aborted = True  # a thread waiting on its own mount: only an abort of the connection frees it
                if abort_connection(str(self.mnt)):
                    log.warning("%s %d still there %g s after SIGKILL: aborted the FUSE connection of %s",
                                p.name, p.pid, ABORT_AFTER, self.mnt)
            if time.monotonic() - t0 > STOP_TIMEOUT:
                raise HarnessError(f"{p.name} {p.pid} is still there {STOP_TIMEOUT:g} s after SIGKILL")
            time.sleep(0.0005)

    def _still_there(self, p: Proc) -> bool:
        """A pid-known process not yet gone: by its start time where known, else while its command
        line names our image (which a dying process's no longer does: the weaker test)."""
        return pid_alive(p.pid, p.start) if p.start else pid_alive(p.pid) and self._is_ours(p.pid)

    def _is_ours(self, pid: int) -> bool:
        """A daemon pid is only signalled while its command line still names our image."""
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                return os.fsencode(self.image) in f.read().split(b"\0")
        except OSError:
            return False

    def stop(self, p: Proc, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM, then SIGKILL after ``timeout``."""
        if not p.alive():
            if p.popen is not None:
                p.popen.wait()
            return
        if p.popen is not None:
            with contextlib.suppress(ProcessLookupError):
                p.popen.send_signal(signal.SIGTERM)
            try:
                p.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill(p)
            return
        if self._is_ours(p.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while pid_alive(p.pid, p.start) and time.monotonic() < deadline:
            time.sleep(0.005)
        self.kill(p)

    # ------------------------------------------------------------ the image and the daemon

    def mkfs(self) -> None:
        r = subprocess.run([*PKFUSE, "mkfs", str(self.image), "--size", str(image_size(self.guest_size))],
                           capture_output=True, text=True, timeout=60)
        if r.returncode:
            raise HarnessError(f"pkfuse mkfs failed: {r.stderr.strip()}")
        self.mnt.mkdir(exist_ok=True)

    def start_mount(self, *, wait: float | None = None) -> Proc:
        """``pkfuse mount IMAGE MNT --control SOCK --domains D`` (``--wait``: a successor waiting for the
        image's lock and the mountpoint); returns the command, which ends once the mount answers."""
        args = ["mount", str(self.image), str(self.mnt), "--control", str(self.control), "--domains",
                self.domains, "--log", str(self.daemon_log)]
        if wait is not None:
            args += ["--wait", f"{wait:g}"]
        return self.spawn("mount", args, "mount.log")

    def poll_mount(self, cmd: Proc) -> bool:
        """True once ``cmd`` (``start_mount``'s) mounted; its daemon is then ``self.daemon``."""
        assert cmd.popen is not None
        rc = cmd.popen.poll()
        if rc is None:
            return False
        if rc != 0:
            held = f" [{self.lock_holders()}]" if rc == EXIT_IMAGE_BUSY else ""
            raise HarnessError(f"pkfuse mount exited {rc}: {self.tail(cmd)}{held}")
        pid = int(self.status("daemon_pid"))
        self.daemon = Proc("daemon", None, pid, self.daemon_log, start_time(pid))
        self.procs.append(self.daemon)
        return True

    def lock_holders(self) -> str:
        """Who holds the image's flock, as a one-line clue: each holder's pid, state, kernel wait
        channel and command line (what to know when a mount found the image busy after a kill)."""
        from pkfuse.daemon.unmount import flock_holders

        try:
            pids = sorted(flock_holders(os.stat(self.image)))
        except OSError as exc:
            return f"lock holders unknown: {exc}"
        out = []
        for pid in pids:
            fields = _stat(pid)
            state = fields[0] if fields else "?"
            wchan = cmd = "?"
            with contextlib.suppress(OSError):
                wchan = Path(f"/proc/{pid}/wchan").read_text().strip() or "-"
            with contextlib.suppress(OSError):
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:120]
            out.append(f"pid {pid} state {state} wchan {wchan} cmd {cmd.strip() or '(none: exiting)'}")
        return "held by " + "; ".join(out) if out else "no process holds the image's lock now"

    def wait_mount(self, cmd: Proc, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.poll_mount(cmd):
            if time.monotonic() > deadline:
                raise HarnessError(f"pkfuse mount did not answer within {timeout:g} s")
            time.sleep(0.0005)

    def mounted(self) -> bool:
        return mount_path(str(self.mnt)) in mounted_paths()

    def clear_mount(self) -> None:
        """Unmount ``mnt`` whatever its daemon's state (a dead mount a SIGKILL left, a live one)."""
        for cmd in ([FUSERMOUNT, "-u", "-q", str(self.mnt)], [FUSERMOUNT, "-u", "-z", "-q", str(self.mnt)],
                    ["umount", "-l", str(self.mnt)]):
            if not self.mounted():
                return
            subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        if self.mounted():
            raise HarnessError(f"{self.mnt} is still mounted after fusermount3 -u, -u -z and umount -l")

    def unmount(self) -> None:
        """A clean unmount: the daemon exits, the image closed clean."""
        r = subprocess.run([*PKFUSE, "umount", str(self.mnt)], capture_output=True, text=True, timeout=60)
        if r.returncode:
            raise HarnessError(f"pkfuse umount failed: {r.stderr.strip()}")
        if self.daemon is not None:
            deadline = time.monotonic() + STOP_TIMEOUT
            while pid_alive(self.daemon.pid, self.daemon.start) and time.monotonic() < deadline:
                time.sleep(0.005)

    def status(self, key: str) -> str:
        """One line of ``MNT/.pkernfs/status``."""
        for line in (self.mnt / ".pkernfs" / "status").read_text().splitlines():
            k, _, v = line.partition(":")
            if k.strip() == key:
                return v.strip()
        raise HarnessError(f"{self.mnt}/.pkernfs/status has no {key!r} line")

    def iommu_text(self) -> str:
        return (self.mnt / ".pkernfs" / "iommu").read_text()

    # ------------------------------------------------------------ the VMM

    @property
    def guest(self) -> Path:
        return self.mnt / "guest_mem" / GUEST

    def start_vmm(self, monitor: Path, *, reboot: bool = False) -> Proc:
        """The first VMM: ``pkfuse vmm run MNT/guest_mem/vm0 --memory SIZE --vcpus N --engine E --monitor``;
        ``reboot``: after a crash, a cold boot of the same VM over its RAM (``--reboot``)."""
        p = self.spawn("vmm", ["vmm", "run", str(self.guest), "--memory", str(self.guest_size), "--vcpus",
                               str(self.vcpus), "--engine", self.engine, "--device", RID, "--monitor",
                               str(monitor), "--quiet", *self._vmm_options(first=True),
                               *(["--reboot"] if reboot else [])], "vmm.log")
        self.wait_monitor(p, monitor)
        self.vmm, self.vmm_monitor = p, monitor
        self.read_extents()
        return p

    def start_successor(self, monitor: Path, json_file: Path, timeout: float = 60.0) -> Proc:
        """``pkfuse vmm run --incoming vm0 MNT --json FILE --monitor SOCK2``: waits for a daemon offering vm0."""
        return self.spawn("successor", ["vmm", "run", "--incoming", GUEST, str(self.mnt), "--engine", self.engine,
                                        "--json", str(json_file), "--monitor", str(monitor), "--timeout",
                                        f"{timeout:g}", "--quiet", *self._vmm_options(first=False)], "vmm.log")

    def _vmm_options(self, *, first: bool) -> list[str]:
        """The options beyond the defaults: the IOMMU page size (the successors' too), the dirty share."""
        opts = ["--iommu-pgsize", self.iommu_pgsize] if self.iommu_pgsize != "2M" else []
        if first and self.dirty_share is not None:
            opts += ["--dirty-share", f"{self.dirty_share:g}"]
        return opts

    def wait_monitor(self, p: Proc, monitor: Path, timeout: float = 60.0) -> dict:
        """Wait until ``p`` serves its monitor; its ``status`` (``Vmm.describe()``)."""
        deadline = time.monotonic() + timeout
        while True:
            if not p.alive():
                raise HarnessError(f"the VMM exited {p.popen.returncode if p.popen else '?'} before its monitor "
                                   f"answered: {self.tail(p)}")
            if monitor.exists():
                with contextlib.suppress(OSError):
                    return self.monitor_status(monitor)
            if time.monotonic() > deadline:
                raise HarnessError(f"the VMM's monitor {monitor} did not answer within {timeout:g} s")
            time.sleep(0.001)

    def monitor(self, sock: Path, *words: str, timeout: float = 60.0) -> str:
        """One monitor command; its reply line (``ok ...``), or HarnessError with the ``error:`` line."""
        text = vmm_monitor.call(sock, words, timeout)
        if not text.startswith("ok"):
            raise HarnessError(f"monitor {' '.join(words)}: {text or 'no reply'}")
        return text

    def monitor_status(self, sock: Path) -> dict:
        return json.loads(self.monitor(sock, "status")[3:])

    # ------------------------------------------------------------ the device

    def start_device(self) -> Proc:
        """``pkfuse device IMAGE --rid 00:03.0 --rings N --records --log FILE --json FILE``: its own process,
        never talking to the daemon, running through every restart."""
        self.dev = self.spawn("device", ["device", str(self.image), "--rid", RID, "--rings", str(self.vcpus),
                                         "--records", "--rate", f"{self.device_rate:g}", "--log",
                                         str(self.device_log), "--json", str(self.device_json)], "device.log")
        deadline = time.monotonic() + 30
        while not self.device_log.exists() or self.device_log.stat().st_size == 0:
            if not self.dev.alive():
                raise HarnessError(f"pkfuse device exited: {self.tail(self.dev)}")
            if time.monotonic() > deadline:
                raise HarnessError("pkfuse device did not start its log within 30 s")
            time.sleep(0.005)
        return self.dev

    # ------------------------------------------------------------ guest RAM, from outside

    def read_extents(self) -> None:
        """The guest file's extents (``user.pkernfs.extents``): where its RAM is in the image, for reading
        it while no daemon serves the mount."""
        text = os.getxattr(self.guest, "user.pkernfs.extents").decode()
        self.extents = [tuple(int(x, 0) for x in line.split()) for line in text.splitlines() if line.strip()]
        self.base_phys = int(self.status("base_phys"), 0)

    def guest_view(self) -> np.ndarray:
        """Guest RAM in place: a read-only mapping of the image at the guest file's extents (no daemon
        asked, nothing copied; ``pkfuse.vmm.memory.GuestMemory`` with ``read_only``). Made once and kept
        for the cast's life: the guest file's extents never move (it is pinned while a VMM maps it, and
        its size is frozen while preserved), and the image is the same file across every restart. Its
        bytes are the guest's as they are now: read it with the vCPUs paused (the verifier copes with
        a device stamping meanwhile)."""
        if self._view is None:
            from pkfuse.vmm.memory import Extent, GuestMemory

            if not self.extents:
                raise HarnessError("the guest file's extents are not known yet (no VMM started)")
            fd = os.open(self.image, os.O_RDONLY | os.O_CLOEXEC)
            try:
                self._view = GuestMemory(fd, [Extent(off, phys - self.base_phys, length)
                                              for off, phys, length in self.extents], self.guest_size,
                                         read_only=True)
            finally:
                os.close(fd)  # the mappings hold the file
        return self._view.array

    def image_offset(self, gpa: int, n: int) -> int | None:
        """Where ``n`` bytes of guest RAM at ``gpa`` are in the image (None unless in one extent)."""
        for off, phys, length in self.extents:
            if off <= gpa and gpa + n <= off + length:
                return phys - self.base_phys + gpa - off
        return None

    def make_bystander(self, size: int = MiB) -> None:
        """``guest_mem/bystander``: a guest file no process maps, filled with a pattern, its pages and their
        digest noted. The VMM's image fd reaches every page of the image (the kernel would grant a VMA only
        its file's): after each cycle ``bystander_intact`` says whether a page outside the VM's files changed."""
        path = self.mnt / "guest_mem" / BYSTANDER
        pattern = hashlib.sha256(b"pkfuse bystander").digest() * (size // 32)
        path.write_bytes(pattern)
        base = int(self.status("base_phys"), 0)
        text = os.getxattr(path, "user.pkernfs.extents").decode()
        self.bystander = [(int(phys, 0) - base, int(n, 0)) for _, phys, n in
                          (line.split() for line in text.splitlines() if line.strip())]
        self.bystander_digest = self._bystander_digest()

    def _bystander_digest(self) -> str:
        h = hashlib.sha256()
        fd = os.open(self.image, os.O_RDONLY | os.O_CLOEXEC)
        try:
            for off, n in self.bystander:
                h.update(os.pread(fd, n, off))
        finally:
            os.close(fd)
        return h.hexdigest()

    def bystander_intact(self) -> bool:
        """The bystander's pages in the image (read from the file, no daemon asked) are as they were made."""
        return not self.bystander or self._bystander_digest() == self.bystander_digest

    def flip_byte(self, gpa: int) -> None:
        """Invert the byte of guest RAM at ``gpa`` in the image (a test's corruption)."""
        at = self.image_offset(gpa, 1)
        if at is None:
            raise HarnessError(f"guest-physical {gpa:#x} is not in guest RAM")
        fd = os.open(self.image, os.O_RDWR | os.O_CLOEXEC)
        try:
            os.pwrite(fd, bytes([os.pread(fd, 1, at)[0] ^ 0xFF]), at)
        finally:
            os.close(fd)

    def poke_guest(self, gpa: int, data: bytes) -> None:
        """Write ``data`` at guest-physical ``gpa``, straight into the image (a test's corruption)."""
        at = self.image_offset(gpa, len(data))
        if at is not None:
            fd = os.open(self.image, os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.pwrite(fd, data, at)
            finally:
                os.close(fd)
            return
        raise HarnessError(f"guest-physical {gpa:#x} is not in one extent of the guest file")

    # ------------------------------------------------------------ end

    def close(self) -> list[str]:
        """End every process started (by pid), clear the mountpoint; what went wrong, as lines."""
        if self.closed:
            return []
        self.closed = True
        problems: list[str] = []
        order = sorted(self.procs, key=lambda p: {"mount": 0, "successor": 1, "vmm": 2}.get(p.name, 3))
        for p in order:  # waiting mounts and VMMs first, then the device and the daemons
            if p.name == "daemon":
                continue
            try:
                self.stop(p)
            except Exception as exc:  # noqa: BLE001 -- teardown goes on
                problems.append(f"{p.name} {p.pid}: {exc}")
        try:
            if self.mounted():
                subprocess.run([FUSERMOUNT, "-u", "-q", str(self.mnt)], capture_output=True, check=False,
                               timeout=30)
        except (OSError, subprocess.SubprocessError) as exc:
            problems.append(f"unmount: {exc}")
        for p in self.procs:
            if p.name == "daemon":
                try:
                    self.stop(p)
                except Exception as exc:  # noqa: BLE001
                    problems.append(f"daemon {p.pid}: {exc}")
        try:
            self.clear_mount()
        except HarnessError as exc:
            problems.append(str(exc))
        if self._view is not None:
            self._view.close()
            self._view = None
        left = [f"{p.name} {p.pid}" for p in self.procs if p.alive()]
        if left:
            problems.append("still running: " + ", ".join(left))
        return problems

    def __enter__(self) -> Cast:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
