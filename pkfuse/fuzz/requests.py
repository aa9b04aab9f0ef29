"""``pkfuse fuzz --target requests``: the control socket under hostile call sequences, against a model.

A real daemon (``pkfuse mount --foreground`` in a subprocess, known by pid)
serves a fresh 64 MiB image with four guest files (``a`` 5 MiB in two
extents, ``b`` 3 MiB, ``c`` 1 MiB, ``d`` empty). The fuzzer opens
connections to its control socket and sends call sequences, each step a
plain dict (``op`` and concrete arguments: JSON, so a sequence can be kept
and replayed -- ``tests/fuzz`` keeps a corpus). Every step's errno is
compared with the model's, which follows the daemon's order of checks
(``pkfuse.daemon.control``, ``backing.iommufd``, ``backing.liveupdate``,
``backing.guestmmap``), itself the kernel's errnos:

- iommufd calls with overlapping, unaligned, zero-length and overflowing
  maps, IOVAs at the top of the 48-bit space and of 64 bits, ids of other
  connections and of the wrong kind, automatic IOVAs (any the kernel may
  pick: non-zero, free, congruent to the file's physical address);
- descriptors of other files: a read-only guest file, an empty one, a
  directory, a ``.pkernfs`` view, an IOMMU file, a file off the mount,
  ``/dev/null``, a pipe, a session fd, an iommufd connection;
- live update: sessions (bad, long and duplicate names), preserve_fd,
  HWPT preservation (maps of files the session does not hold), a session's
  fd used as an iommufd and the other way round, ``reboot()`` and every
  call after it (ESHUTDOWN);
- the wire: empty, short, oversized datagrams, too many descriptors,
  descriptors on a call that takes none, a ``size`` that disagrees with the
  datagram or is below the minimum, non-zero bytes past the struct, reserved
  fields set, unknown commands, calls on a connection that opened nothing;
- concurrency: two connections binding one requester at once, a map racing
  a truncate of its file through the mount, two maps of one file at once,
  requests pipelined on one connection.

After every sequence (and at ``check`` steps): the daemon's own account of
its objects (``.pkernfs/iommu``: every context's IOAS with their areas,
HWPTs, devices; the sessions) and of its connections and mappings
(``.pkernfs/status``) equal the model's; every requester reaches exactly
what the model allows (``pkfuse.harness.tables.device_view``: the walk the
hardware makes over the image and the register block); a file the model
says is pinned refuses a truncate (EBUSY). Then every connection is
closed and, once the daemon has released them and its destroyed domains'
grace period has passed: nothing is attached or mapped, every file can be
truncated again, the free page count is the one the sequence started with,
and ``backing.fsck`` finds the image clean (read-only, private mapping: the
daemon is idle by then). A daemon that dies or logs a traceback is a crash,
a call not answered within ``CALL_TIMEOUT`` a hang; after either the
fuzzer starts a fresh daemon and goes on. A sequence that ends in
``reboot()`` is followed by a ``kill -9`` of the daemon and a fresh image.

Randomness comes from an ``Entropy``: Python's ``random`` with a seed
(``--engine random``, the default), or atheris's ``FuzzedDataProvider``
(``--engine atheris``), whose coverage feedback then sees this process --
the generator and the model, whose rules follow the daemon's checks one by
one, so a new branch of the model is a new check reached in the daemon --
and not the daemon's own code, which runs in its own process.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from backing import format as fmt
from backing.fsck import check_image
from backing.mkfs import mkfs
from pkfuse.daemon.mountinfo import abort_connection, mounted_paths
from pkfuse.harness.tables import device_view
from pkfuse.uapi import transport, wire

from .common import AtherisEntropy, Entropy, exit_past, write_json  # noqa: F401 - write_json: the CLI's, as before

log = logging.getLogger(__name__)

PS = fmt.PAGE_SIZE
MiB = 1 << 20
U64_MAX = (1 << 64) - 1
IOVA_LIMIT = 1 << fmt.VTD_IOVA_BITS
LEAVES = (1 << 30, 2 * MiB, PS)  #: what an automatic IOVA is aligned for, largest first
IMAGE_SIZE = 64 * MiB
RIDS = (0x18, 0x20, 0x21)  #: 00:03.0, 00:04.0, 00:04.1
BAD_RIDS = (0x10000, 0xFFFFFFFF)
CALL_TIMEOUT = 10.0  #: seconds a reply may take before the call is a hang
SETTLE_TIMEOUT = 5.0  #: seconds for the daemon to release a closed connection
GRACE_TIMEOUT = 6.0  #: seconds for destroyed domains to be freed (the grace period is 1 s)
MOUNT_TIMEOUT = 30.0
GUEST = {"a": 5 * MiB, "b": 3 * MiB, "c": MiB, "d": 0}  #: the guest files and their sizes
#: descriptors a call may be sent: guest files (``a_ro``: ``a`` opened read-only) and everything else
FD_KINDS = ("a", "b", "c", "d", "a_ro", "dir", "view", "iommu_file", "outside", "devnull", "pipe", "session",
            "iommufd")
NOT_ON_MOUNT = {"dir", "outside", "devnull", "pipe", "session", "iommufd"}  #: EBADF wherever a file is wanted
F = wire.iommufd_ioas_map_flags
FIXED, WRITE, READ = int(F.IOMMU_IOAS_MAP_FIXED_IOVA), int(F.IOMMU_IOAS_MAP_WRITEABLE), int(F.IOMMU_IOAS_MAP_READABLE)
MAX_SESSIONS = 64
LU_MAX_FILES = fmt.LU_MAX_FILES

#: which commands each kind of connection serves (the rest: ENOTTY); GUEST_MMAP on all of them
SERVED = {
    "iommu": set(wire.IOMMUFD_REQUESTS) | set(wire.PKFUSE_DOMAIN_REQUESTS) | {wire.PKFUSE_GUEST_MMAP},
    "lu": set(wire.LIVEUPDATE_REQUESTS) | {wire.PKFUSE_GUEST_MMAP},
    "session": set(wire.SESSION_REQUESTS) | {wire.PKFUSE_GUEST_MMAP},
}
#: the struct of each command the raw mutations use
STRUCTS = {**wire.IOMMUFD_REQUESTS, **wire.LIVEUPDATE_REQUESTS, **wire.SESSION_REQUESTS, **wire.FILE_REQUESTS,
           **wire.OPEN_REQUESTS}


class Finding(Exception):
    """What a step found: ``kind`` is ``violation``, ``crash`` or ``hang``."""

    kind = "violation"


class Violation(Finding):
    kind = "violation"


class Crash(Finding):
    kind = "crash"


class Hang(Finding):
    kind = "hang"


def ename(code: int | None) -> str:
    return "success" if not code else errno.errorcode.get(code, str(code))


# ------------------------------------------------------------------ entropy


# -------------------------------------------------------------------- model


@dataclasses.dataclass(frozen=True)
class MArea:
    iova: int
    length: int
    file: str
    offset: int
    write: bool


@dataclasses.dataclass
class MIoas:
    kind = "ioas"
    areas: dict[int, MArea] = dataclasses.field(default_factory=dict)
    hwpts: list[int] = dataclasses.field(default_factory=list)
    frozen: bool = False

    def overlapping(self, first: int, last: int) -> list[MArea]:
        return sorted((a for a in self.areas.values() if a.iova <= last and a.iova + a.length - 1 >= first),
                      key=lambda a: a.iova)


@dataclasses.dataclass
class MHwpt:
    kind = "hwpt"
    ioas: int
    auto: bool
    devices: set[int] = dataclasses.field(default_factory=set)


@dataclasses.dataclass
class MDev:
    kind = "device"
    rid: int
    hwpt: int | None = None


@dataclasses.dataclass
class MSession:
    name: str
    conn: MConn
    files: dict[int, str] = dataclasses.field(default_factory=dict)  #: token -> guest file
    hwpts: dict[int, tuple[MConn, int]] = dataclasses.field(default_factory=dict)  #: token -> (conn, hwpt id)

    def tokens(self) -> set[int]:
        return set(self.files) | set(self.hwpts)


@dataclasses.dataclass(eq=False)
class MConn:
    """One connection: its socket, what it opened, and the model's objects in it."""

    sock: socket.socket
    kind: str | None = None  #: None (nothing opened), "iommu", "lu", "session"
    objs: dict[int, MIoas | MHwpt | MDev] = dataclasses.field(default_factory=dict)
    next_id: int = 1
    mmaps: Counter[str] = dataclasses.field(default_factory=Counter)  #: GUEST_MMAP pins, by file
    session: MSession | None = None
    closed: bool = False
    ctx_gone: bool = False  #: its iommufd context has left the daemon's list
    last_error: tuple[int, int] | None = None  #: (cmd, errno) of its last refused domain call, for LAST_ERROR

    def new_id(self) -> int:
        self.next_id += 1
        return self.next_id - 1

    def get(self, obj_id: int, *kinds: str) -> Any:
        o = self.objs.get(obj_id)
        return o if o is not None and (not kinds or o.kind in kinds) else None


# ------------------------------------------------------------------- daemon


class Daemon:
    """A pkfuse daemon on a fresh image in ``workdir``, started by us, known by its pid."""

    def __init__(self, workdir: Path, extra: Sequence[str] = ()) -> None:
        self.workdir = workdir
        self.image = workdir / "fuzz.img"
        self.mnt = workdir / "mnt"
        self.ctl = workdir / "ctl.sock"
        self.log = workdir / "daemon.log"
        self.extra = tuple(extra)
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_pos = 0
        self.starts = 0

    def start(self) -> None:
        for p in (self.image, Path(str(self.image) + ".regs"), Path(str(self.image) + ".ephemeral")):
            p.unlink(missing_ok=True)
        mkfs(self.image, IMAGE_SIZE, force=True)
        self.mnt.mkdir(parents=True, exist_ok=True)
        self.starts += 1
        with open(self.log, "ab") as out:
            out.write(f"--- start {self.starts}\n".encode())
            out.flush()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pkfuse", "mount", "--foreground", "--log", str(self.log), "--control",
                 str(self.ctl), *self.extra, str(self.image), str(self.mnt)],
                stdout=out, stderr=out, stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + MOUNT_TIMEOUT
        while str(self.mnt) not in mounted_paths():
            if self.proc.poll() is not None:
                raise RuntimeError(f"the daemon exited with {self.proc.returncode} before mounting; see {self.log}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the mount did not answer within {MOUNT_TIMEOUT:.0f} s; see {self.log}")
            time.sleep(0.01)
        os.stat(self.mnt)
        self._log_pos = self.log.stat().st_size
        g = self.mnt / "guest_mem"
        for name in ("a", "b", "c", "d"):
            (g / name).write_bytes(b"")
        os.truncate(g / "a", 2 * MiB)
        os.truncate(g / "b", GUEST["b"])
        os.truncate(g / "a", GUEST["a"])  # after b: a second extent
        os.truncate(g / "c", GUEST["c"])

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, *, kill: bool = False) -> int | None:
        """Unmount and reap the daemon (``kill``: SIGKILL it first, as a restart does); clear the mount.

        A daemon stuck in a FUSE request to its own mount cannot die (its thread waits for an
        answer only it could give): after SIGKILL its FUSE connection is aborted through fusectl.
        """
        rc = None
        if self.proc is not None:
            if self.proc.poll() is None and not kill:
                subprocess.run(["fusermount3", "-u", "-q", str(self.mnt)], capture_output=True, check=False)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(10)
            if self.proc.poll() is None:
                os.kill(self.proc.pid, signal.SIGKILL)
                try:
                    self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    self.abort()
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        self.proc.wait(10)
            rc = self.proc.poll()
        for cmd in (["fusermount3", "-u", "-q", str(self.mnt)], ["fusermount3", "-u", "-z", "-q", str(self.mnt)]):
            if str(self.mnt) not in mounted_paths():
                break
            subprocess.run(cmd, capture_output=True, check=False)
        self.proc = None
        return rc

    def abort(self) -> None:
        """Abort our mount's FUSE connection (``mountinfo.abort_connection``)."""
        if abort_connection(str(self.mnt)):
            log.warning("aborted the FUSE connection of %s (a daemon that could not die)", self.mnt)

    def log_problems(self) -> list[str]:
        """Traceback and ERROR/CRITICAL lines the daemon logged since the last call."""
        try:
            with open(self.log, "rb") as f:
                f.seek(self._log_pos)
                new = f.read().decode(errors="replace")
                self._log_pos = f.tell()
        except FileNotFoundError:
            return []
        lines = new.splitlines()
        if any(line.startswith("Traceback (most recent call last)") for line in lines):
            return lines[-40:]
        return [line for line in lines if " ERROR " in line or " CRITICAL " in line]

    def status(self) -> dict[str, str]:
        text = (self.mnt / ".pkernfs" / "status").read_text()
        return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in text.splitlines())}

    def extents(self, name: str) -> list[tuple[int, int, int]]:
        text = os.getxattr(self.mnt / "guest_mem" / name, "user.pkernfs.extents").decode()
        return [tuple(int(x, 16) for x in line.split()) for line in text.splitlines()]  # type: ignore[misc]


# -------------------------------------------------------------------- stats


@dataclasses.dataclass
class Stats:
    cases: int = 0
    accepted: int = 0
    refused: Counter[str] = dataclasses.field(default_factory=Counter)
    crashes: int = 0
    hangs: int = 0
    violations: int = 0
    sequences: int = 0
    restarts: int = 0
    skipped: int = 0  #: steps naming a connection that is closed or was never made
    slowest: tuple[float, str] = (0.0, "")
    findings: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    ops: Counter[str] = dataclasses.field(default_factory=Counter)

    def record(self, what: str, code: int, seconds: float) -> None:
        self.cases += 1
        if code:
            self.refused[ename(code)] += 1
        else:
            self.accepted += 1
        if seconds > self.slowest[0]:
            self.slowest = (seconds, what)

    def report(self, **extra: Any) -> dict[str, Any]:
        return {"cases": self.cases, "accepted": self.accepted, "refused": sum(self.refused.values()),
                "refused_by_errno": dict(sorted(self.refused.items())), "crashes": self.crashes,
                "hangs": self.hangs, "violations": self.violations, "sequences": self.sequences,
                "daemon_restarts": self.restarts, "skipped_steps": self.skipped,
                "slowest_case": {"seconds": round(self.slowest[0], 6), "case": self.slowest[1]},
                "steps_by_op": dict(sorted(self.ops.items())), "findings": self.findings[:20], **extra}


def _msg(cmd: int, struct_type: type[ctypes.Structure], **fields: int) -> bytes:
    """A request datagram: the command and the struct (size = sizeof) with ``fields`` stored as given."""
    inst = struct_type()
    setattr(inst, wire.size_field(struct_type), ctypes.sizeof(struct_type))
    for k, v in fields.items():
        if k in ("name", "path"):
            raw = v if isinstance(v, bytes) else str(v).encode()
            ctypes.memmove(ctypes.addressof(inst) + getattr(struct_type, k).offset, raw, len(raw))
        else:
            setattr(inst, k, v)
    return cmd.to_bytes(4, "little") + bytes(inst)


# ------------------------------------------------------------------- fuzzer


class RequestFuzzer:
    """Runs sequences of steps against a daemon, keeping the model (see the module docstring)."""

    def __init__(self, workdir: Path, stats: Stats | None = None) -> None:
        self.workdir = workdir
        self.daemon = Daemon(workdir)
        self.stats = stats or Stats()
        self.conns: list[MConn] = []
        self.bound: dict[int, MConn] = {}
        self.sessions: dict[str, MSession] = {}
        self.rebooted = False
        self.boot = 0
        self.phys: dict[str, np.ndarray] = {}
        self.size = dict(GUEST)
        self.fds: dict[str, int] = {}
        self.steps: list[dict[str, Any]] = []
        self.free_pages = 0

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self.daemon.start()
        self.boot = 0
        self.rebooted = False

    def close(self) -> None:
        self._drop_conns()
        self._close_fds()
        self.daemon.stop()

    def restart(self) -> None:
        """A fresh daemon on a fresh image (after a crash, a hang, a violation or a reboot()): the old
        one killed first, so that closing our files on its mount cannot wait on it."""
        self.daemon.stop(kill=True)
        self._drop_conns()
        self._close_fds()
        self.stats.restarts += 1
        self.start()

    def _drop_conns(self) -> None:
        for c in self.conns:
            with contextlib.suppress(OSError):
                c.sock.close()
        self.conns, self.bound, self.sessions = [], {}, {}

    def _close_fds(self) -> None:
        """Close the descriptors (a close of a file on the mount is a FLUSH the daemon answers: if it
        does not within ``CALL_TIMEOUT``, the daemon is killed, which answers it)."""
        fds, self.fds = list(self.fds.values()), {}
        t = threading.Thread(target=transport.close_fds, args=(fds,), daemon=True)
        t.start()
        t.join(CALL_TIMEOUT)
        if t.is_alive():
            self.stats.hangs += 1
            self.stats.findings.append({"kind": "hang", "what": "closing files on the mount", "steps": []})
            self.daemon.stop(kill=True)
            t.join(CALL_TIMEOUT)

    def _open_fds(self) -> None:
        g = self.daemon.mnt / "guest_mem"
        for name in ("a", "b", "c", "d"):
            self.fds[name] = os.open(g / name, os.O_RDWR | os.O_CLOEXEC)
        self.fds["a_ro"] = os.open(g / "a", os.O_RDONLY | os.O_CLOEXEC)
        self.fds["dir"] = os.open(g, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.fds["view"] = os.open(self.daemon.mnt / ".pkernfs" / "status", os.O_RDONLY | os.O_CLOEXEC)
        self.fds["iommu_file"] = os.open(self.daemon.mnt / "iommu" / "root-pgtables", os.O_RDONLY | os.O_CLOEXEC)
        outside = self.workdir / "outside"
        outside.write_bytes(bytes(PS))
        self.fds["outside"] = os.open(outside, os.O_RDWR | os.O_CLOEXEC)
        self.fds["devnull"] = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        r, w = os.pipe2(os.O_CLOEXEC)
        self.fds["pipe"], self.fds["pipe_w"] = r, w

    def _refresh_extents(self) -> None:
        for name, size in self.size.items():
            pages = np.zeros(size // PS, np.int64)
            if size:
                for off, phys, n in self.daemon.extents(name):
                    pages[off // PS:(off + n) // PS] = phys // PS + np.arange(n // PS)
            self.phys[name] = pages

    def fd_of(self, kind: str) -> int:
        if kind == "session":
            s = next((c for c in self.conns if c.kind == "session" and not c.closed), None)
            return s.sock.fileno() if s is not None else self.fds["pipe"]
        if kind == "iommufd":
            s = next((c for c in self.conns if c.kind == "iommu" and not c.closed), None)
            return s.sock.fileno() if s is not None else self.fds["pipe"]
        return self.fds[kind]

    # ---------------------------------------------------------------- calls

    def _connect(self) -> MConn:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        s.settimeout(CALL_TIMEOUT)
        try:
            s.connect(str(self.daemon.ctl))
        except OSError as exc:
            s.close()
            raise Crash(f"connect to the control socket: {exc}") from exc
        c = MConn(s)
        self.conns.append(c)
        return c

    def _send(self, c: MConn, data: bytes, fds: Sequence[int], what: str) -> None:
        try:
            c.sock.sendmsg([data], transport.scm_rights(fds), transport.SEND_FLAGS)
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise Crash(f"{what}: the daemon closed the connection ({exc})") from exc

    def _recv(self, c: MConn, what: str, t0: float) -> tuple[int, bytes, list[int]]:
        try:
            data, anc, flags, _ = c.sock.recvmsg(transport.RECV_BUFSIZE, transport.RECV_ANCBUFSIZE,
                                                 transport.RECV_FLAGS)
        except TimeoutError as exc:
            raise Hang(f"{what}: no reply within {CALL_TIMEOUT:.0f} s") from exc
        except ConnectionResetError as exc:
            raise Crash(f"{what}: the daemon reset the connection") from exc
        if transport.at_eof(c.sock, data, anc):
            raise Crash(f"{what}: the daemon closed the connection")
        try:
            err, payload, rfds = transport.parse_reply(data, anc, flags)
        except wire.WireError as exc:
            raise Violation(f"{what}: malformed reply ({exc})") from exc
        self.stats.record(what, err, time.perf_counter() - t0)
        return err, payload, rfds

    def call(self, c: MConn, data: bytes, fds: Sequence[int], what: str) -> tuple[int, bytes, list[int]]:
        t0 = time.perf_counter()
        self._send(c, data, fds, what)
        return self._recv(c, what, t0)

    def expect(self, what: str, got: int, want: int | None | set[int | None]) -> None:
        ok = (got or None) in want if isinstance(want, set) else got == (want or 0)
        if not ok:
            shown = "/".join(ename(w) for w in want) if isinstance(want, set) else ename(want)
            raise Violation(f"{what}: {ename(got)}, the model says {shown}")

    def ask(self, c: MConn, data: bytes, fds: Sequence[int], what: str, want: int | None,
            nfds_ok: int = 0) -> tuple[bytes, list[int]]:
        """One call that must give ``want``; on success the reply must carry ``nfds_ok`` descriptors."""
        err, payload, rfds = self.call(c, data, fds, what)
        try:
            self.expect(what, err, want)
            if not err and len(rfds) != nfds_ok:
                raise Violation(f"{what}: {len(rfds)} descriptors in the reply, {nfds_ok} expected")
            if err and rfds:
                raise Violation(f"{what}: an error reply carried {len(rfds)} descriptors")
        except BaseException:
            transport.close_fds(rfds)
            raise
        return payload, rfds

    # ---------------------------------------------------------- model rules

    def dispatch_errno(self, c: MConn, cmd: int, nfds: int = 0) -> int | None:
        """What the daemon answers before a handler runs (control.ControlServer._dispatch)."""
        if self.rebooted:
            return errno.ESHUTDOWN
        if c.kind is None:
            return None if cmd == wire.PKFUSE_OPEN and not nfds else errno.EBADF
        if cmd == wire.PKFUSE_OPEN:
            return errno.EBUSY
        if cmd not in SERVED[c.kind]:
            return errno.ENOTTY
        if nfds and cmd not in wire.REQUEST_FDS:
            return errno.EBADF
        return None

    def file_of(self, kind: str) -> str | None:
        return "a" if kind == "a_ro" else kind if kind in GUEST else None

    def preserved(self) -> list[tuple[MConn, int]]:
        return [h for s in self.sessions.values() for h in s.hwpts.values()]

    def pinned(self, name: str) -> bool:
        for c in self.conns:
            if c.kind == "iommu" and not c.ctx_gone:
                for o in c.objs.values():
                    if isinstance(o, MIoas) and any(a.file == name for a in o.areas.values()):
                        return True
            if (not c.closed or self.rebooted) and c.mmaps.get(name):
                return True
        return any(name in s.files.values() for s in self.sessions.values())

    def _free_hwpt(self, c: MConn, hid: int) -> None:
        h = c.objs.pop(hid)
        assert isinstance(h, MHwpt)
        ioas = c.objs[h.ioas]
        assert isinstance(ioas, MIoas)
        ioas.hwpts.remove(hid)

    def _leave(self, c: MConn, dev_id: int) -> None:
        dev = c.objs[dev_id]
        assert isinstance(dev, MDev) and dev.hwpt is not None
        h = c.objs[dev.hwpt]
        assert isinstance(h, MHwpt)
        h.devices.discard(dev_id)
        old, dev.hwpt = dev.hwpt, None
        if h.auto and not h.devices:
            self._free_hwpt(c, old)

    def _release_ctx(self, c: MConn) -> None:
        """backing.iommufd.Context._release: all but what an outgoing session keeps."""
        keep_h = {hid for hc, hid in self.preserved() if hc is c}
        keep_i = {c.objs[hid].ioas for hid in keep_h}
        for dev_id in sorted(i for i, o in c.objs.items() if isinstance(o, MDev)):
            dev = c.objs[dev_id]
            if dev.hwpt in keep_h:
                continue
            if dev.hwpt is not None:
                self._leave(c, dev_id)
            del c.objs[dev_id]
            del self.bound[dev.rid]
        for hid in sorted(i for i, o in c.objs.items() if isinstance(o, MHwpt)):
            if hid not in keep_h and not c.objs[hid].devices:
                self._free_hwpt(c, hid)
        for iid in sorted(i for i, o in c.objs.items() if isinstance(o, MIoas)):
            if iid not in keep_i and not c.objs[iid].hwpts:
                del c.objs[iid]
        if not c.objs:
            c.ctx_gone = True

    def _closed(self, c: MConn) -> None:
        """The model of closing connection ``c`` (the daemon does it when it reads the end)."""
        c.closed = True
        if self.rebooted:
            return  # the kernel is gone: nothing is released any more
        c.mmaps.clear()
        if c.kind == "iommu":
            self._release_ctx(c)
        elif c.kind == "session" and c.session is not None:
            s = c.session
            del self.sessions[s.name]
            still = {(id(hc), hc.objs[hid].ioas) for hc, hid in self.preserved()}
            for hc, hid in s.hwpts.values():
                ioas = hc.objs[hc.objs[hid].ioas]
                if (id(hc), hc.objs[hid].ioas) not in still:
                    ioas.frozen = False
            for other in self.conns:  # Iommufd.collect: what closed contexts kept for it
                if other.kind == "iommu" and other.closed and not other.ctx_gone:
                    self._release_ctx(other)

    # ---------------------------------------------------------------- steps

    def run_step(self, step: dict[str, Any]) -> None:
        self.steps.append(step)
        op = step["op"]
        self.stats.ops[op] += 1
        if any(step.get(k, -1) != -1 and self.conn(step, k) is None for k in ("c", "c2")):
            self.stats.skipped += 1  # it names a connection closed (or never made): nothing to send it on
        getattr(self, "op_" + op)(step)

    def conn(self, step: dict[str, Any], key: str = "c") -> MConn | None:
        i = step.get(key, -1)
        if not 0 <= i < len(self.conns) or self.conns[i].closed:
            return None
        return self.conns[i]

    def op_open(self, step: dict[str, Any]) -> None:
        c = self.conn(step) if step.get("c", -1) >= 0 else self._connect()
        if c is None:
            return
        path = {"iommu": wire.DEV_IOMMU, "lu": wire.DEV_LIVEUPDATE, "bad": b"/dev/kvm",
                "long": b"/dev/iommu" + b"x" * (wire.PKFUSE_PATH_LENGTH - 10)}[step["path"]]
        flags = step.get("flags", 0)
        want = self.dispatch_errno(c, wire.PKFUSE_OPEN)
        if want is None:
            if flags:
                want = errno.EOPNOTSUPP
            elif step["path"] in ("bad", "long"):
                want = errno.ENOENT
            elif step["path"] == "lu" and any(x.kind == "lu" and not x.closed for x in self.conns):
                want = errno.EBUSY
        self.ask(c, _msg(wire.PKFUSE_OPEN, wire.pkfuse_open, flags=flags, path=path), [],
                 f"open({step['path']}, flags {flags:#x})", want)
        if want is None:
            c.kind = {"iommu": "iommu", "lu": "lu"}[step["path"]]

    def op_close(self, step: dict[str, Any]) -> None:
        c = self.conn(step)
        if c is None:
            return
        c.sock.close()
        self._closed(c)
        self.settle(f"close of a {c.kind or 'unopened'} connection")

    def op_ioas_alloc(self, step: dict[str, Any]) -> None:
        c = self.conn(step)
        if c is None:
            return
        flags = step.get("flags", 0)
        want = self.dispatch_errno(c, wire.IOMMU_IOAS_ALLOC) or (errno.EOPNOTSUPP if flags else None)
        payload, _ = self.ask(c, _msg(wire.IOMMU_IOAS_ALLOC, wire.iommu_ioas_alloc, flags=flags), [],
                              "ioas_alloc", want)
        if want is None:
            got = wire.iommu_ioas_alloc.from_buffer_copy(payload).out_ioas_id
            new = c.new_id()
            if got != new:
                raise Violation(f"ioas_alloc gave id {got}, the model says {new}")
            c.objs[new] = MIoas()

    def map_errno(self, c: MConn, step: dict[str, Any]) -> int | None:
        flags, kind, nfds = step["flags"], step["fd"], step.get("nfds", 1)
        want = self.dispatch_errno(c, wire.IOMMU_IOAS_MAP_FILE, nfds)
        if want is not None:
            return want
        if flags & ~(FIXED | WRITE | READ):
            return errno.EOPNOTSUPP
        if not flags & (READ | WRITE):
            return errno.EINVAL
        if flags & WRITE and not flags & READ:
            return errno.EOPNOTSUPP
        if nfds != 1:
            return errno.EBADF
        if kind in NOT_ON_MOUNT:
            return errno.EBADF
        if flags & WRITE and kind in ("a_ro", "view", "iommu_file"):
            return errno.EACCES
        start, length, iova = step["start"], step["length"], step["iova"] if flags & FIXED else None
        if length >= U64_MAX or (iova is not None and iova >= U64_MAX):
            return errno.EOVERFLOW
        ioas = c.get(step["ioas"], "ioas")
        if ioas is None:
            return errno.ENOENT
        if ioas.frozen:
            return errno.EBUSY
        if length == 0:
            return errno.EINVAL
        if start + length - 1 > U64_MAX or (iova is not None and iova + length - 1 > U64_MAX):
            return errno.EOVERFLOW
        if start % PS or length % PS or (iova is not None and iova % PS):
            return errno.EINVAL
        name = self.file_of(kind)
        if name is None:  # a view or an IOMMU file: no guest RAM
            return errno.EINVAL
        if start + length > self.size[name]:
            return errno.EINVAL
        if iova is None:
            return None
        if iova + length > IOVA_LIMIT:
            return errno.EINVAL
        if ioas.overlapping(iova, iova + length - 1):
            return errno.EEXIST
        return None

    def op_map_file(self, step: dict[str, Any]) -> None:
        c = self.conn(step)
        if c is None:
            return
        want = self.map_errno(c, step)
        fd = self.fd_of(step["fd"])
        flags = step["flags"]
        what = (f"ioas_map_file(ioas {step['ioas']}, {step['fd']}, {step['start']:#x}+{step['length']:#x}, "
                f"{hex(step['iova']) if flags & FIXED else 'auto'}, flags {flags:#x}, {step.get('nfds', 1)} fds)")
        data = _msg(wire.IOMMU_IOAS_MAP_FILE, wire.iommu_ioas_map_file, flags=flags, ioas_id=step["ioas"], fd=fd,
                    start=step["start"], length=step["length"], iova=step["iova"])
        payload, _ = self.ask(c, data, [fd] * step.get("nfds", 1), what, want)
        if want is not None:
            return
        self._mapped(c, step, wire.iommu_ioas_map_file.from_buffer_copy(payload).iova, what)

    def _mapped(self, c: MConn, step: dict[str, Any], got: int, what: str) -> None:
        """Record a map the daemon made; an automatic IOVA must be one the kernel may pick."""
        ioas = c.get(step["ioas"], "ioas")
        name = self.file_of(step["fd"])
        assert ioas is not None and name is not None
        start, length = step["start"], step["length"]
        if step["flags"] & FIXED:
            if got != step["iova"]:
                raise Violation(f"{what} returned IOVA {got:#x}")
        else:
            phys = int(self.phys[name][start // PS]) * PS
            align = next(s for s in LEAVES if s <= length)
            if not (got > 0 and got % PS == 0 and got % align == phys % align and got + length <= IOVA_LIMIT
                    and not ioas.overlapping(got, got + length - 1)):
                raise Violation(f"{what}: automatic IOVA {got:#x} is not one the kernel may pick")
        ioas.areas[got] = MArea(got, length, name, start, bool(step["flags"] & WRITE))

    def op_unmap(self, step: dict[str, Any]) -> None:
        c = self.conn(step)
        if c is None:
            return
        iova, length = step["iova"], step["length"]
        want = self.dispatch_errno(c, wire.IOMMU_IOAS_UNMAP)
        victims: list[MArea] = []
        ioas = c.get(step["ioas"], "ioas")
        if want is None:
            if ioas is None:
                want = errno.ENOENT
            elif ioas.frozen:
                want = errno.EBUSY
            elif iova == 0 and length == U64_MAX:
                victims = list(ioas.areas.values())
            elif iova >= U64_MAX or length >= U64_MAX:
                want = errno.EOVERFLOW
            elif length == 0:
                want = errno.EINVAL
            elif iova + length - 1 > U64_MAX:
                want = errno.EOVERFLOW
            else:
                victims = ioas.overlapping(iova, iova + length - 1)
                if not victims or any(a.iova < iova or a.iova + a.length > iova + length for a in victims):
                    want = errno.ENOENT
        what = f"ioas_unmap(ioas {step['ioas']}, {iova:#x}, {length:#x})"
        payload, _ = self.ask(c, _msg(wire.IOMMU_IOAS_UNMAP, wire.iommu_ioas_unmap, ioas_id=step["ioas"], iova=iova,
                                      length=length), [], what, want)
        if want is None:
            got = wire.iommu_ioas_unmap.from_buffer_copy(payload).length
            if got != sum(a.length for a in victims):
                raise Violation(f"{what} unmapped {got:#x} bytes, the model says {sum(a.length for a in victims):#x}")
            for a in victims:
                del ioas.areas[a.iova]

    def op_iova_ranges(self, step: dict[str, Any]) -> None:
        c = self.conn(step)
        if c is None:
            return
        want = self.dispatch_errno(c, wire.IOMMU_IOAS_IOVA_RANGES)
        if want is None:
            if step.get("reserved", 0):
                want = errno.EOPNOTSUPP
            elif c.get(step["ioas"], "ioas") is None:
                want = errno.ENOENT
            elif step["num"] < 1:
                want = errno.EMSGSIZE
        data = _msg(wire.IOMMU_IOAS_IOVA_RANGES, wire.iommu_ioas_iova_ranges, ioas_id=step["ioas"],
                    num_iovas=step["num"], **{"__reserved": step.get("reserved", 0)})
        err, payload, rfds = self.call(c, data, [], f"ioas_iova_ranges({step['ioas']}, {step['num']})")
        transport.close_fds(rfds)
        self.expect("ioas_iova_ranges", err, want)
        if want in (None, errno.EMSGSIZE):
            size = ctypes.sizeof(wire.iommu_ioas_iova_ranges)
            out = wire.iommu_ioas_iova_ranges.from_buffer_copy(payload[:size])
            ranges = wire.decode_iova_ranges(payload[size:])
            if out.num_iovas != 1 or out.out_iova_alignment != PS or ranges != [(0, IOVA_LIMIT - 1)][:step["num"]]:
                raise Violation(f"ioas_iova_ranges: {out.num_iovas} ranges {ranges}, "
                                f"alignment {out.out_iova_alignment}")

    def op_hwpt_alloc(self, step: dict[str, Any]) -> None:
        c = self.conn(step)
        if c is None:
            return
        odd = step.get("odd", {})
        want = self.dispatch_errno(c, wire.IOMMU_HWPT_ALLOC)
        pt = c.get(step["pt"])
        if want is None:
            if odd.get("__reserved") or odd.get("__reserved2"):
                want = errno.EOPNOTSUPP
            elif odd.get("flags") or odd.get("data_type"):
                want = errno.EOPNOTSUPP
            elif odd.get("data_len") or odd.get("data_uptr") or odd.get("fault_id"):
                want = errno.EINVAL
            elif c.get(step["dev"], "device") is None:
                want = errno.ENOENT
            elif pt is None or isinstance(pt, MDev):
                want = errno.EINVAL
            elif isinstance(pt, MHwpt):
                want = errno.EOPNOTSUPP
        what = f"hwpt_alloc(dev {step['dev']}, pt {step['pt']}, {odd})"
        payload, _ = self.ask(c, _msg(wire.IOMMU_HWPT_ALLOC, wire.iommu_hwpt_alloc, dev_id=step["dev"],
                                      pt_id=step["pt"], **odd), [], what, want)
        if want is None:
            got = wire.iommu_hwpt_alloc.from_buffer_copy(payload).out_hwpt_id
            hid = c.new_id()
            if got != hid:
                raise Violation(f"{what} gave id {got}, the model says {hid}")
            pt.hwpts.append(hid)
            c.objs[hid] = MHwpt(step["pt"], False)

    def bind_errno(self, c: MConn, rid: int, flags: int) -> int | None:
        want = self.dispatch_errno(c, wire.VFIO_DEVICE_BIND_IOMMUFD)
        if want is None:
            if flags or not 0 <= rid <= 0xFFFF:
                want = errno.EINVAL
            elif rid in self.bound:
                want = errno.EBUSY
        return want

    def _bound(self, c: MConn, rid: int, payload: bytes, what: str) -> None:
        got = wire.pkfuse_device_bind_iommufd.from_buffer_copy(payload).out_devid
        dev_id = c.new_id()
        if got != dev_id:
            raise Violation(f"{what} gave id {got}, the model says {dev_id}")
        c.objs[dev_id] = MDev(rid)
        self.bound[rid] = c

    def op_bind(self, step: dict[str, Any]) -> None:
        c = self.conn(step)
        if c is None:
            return
        rid, flags = step["rid"], step.get("flags", 0)
        want = self.bind_errno(c, rid, flags)
        what = f"device_bind({rid:#x}, flags {flags:#x})"
        payload, _ = self.ask(c, _msg(wire.VFIO_DEVICE_BIND_IOMMUFD, wire.pkfuse_device_bind_iommufd, rid=rid,
                                      flags=flags), [], what, want)
        if want is None:
            self._bound(c, rid, payload, what)

    def op_attach(self, step: dict[str, Any]) -> None:
        c = self.conn(step)
        if c is None:
            return
        flags, dev_id, pt_id = step.get("flags", 0), step["dev"], step["pt"]
        dev, pt = c.get(dev_id, "device"), c.get(pt_id)
        want = self.dispatch_errno(c, wire.VFIO_DEVICE_ATTACH_IOMMUFD_PT)
        target = None
        if want is None:
            if step.get("reserved", 0):
                want = errno.EOPNOTSUPP
            elif flags & ~1:
                want = errno.EINVAL
            elif flags:
                want = errno.EOPNOTSUPP
            elif dev is None or pt is None:
                want = errno.ENOENT
            elif isinstance(pt, MDev):
                want = errno.EINVAL
            elif isinstance(pt, MHwpt):
                target = pt_id
            else:
                target = next((h for h in pt.hwpts if c.objs[h].auto), None)
        what = f"device_attach(dev {dev_id}, pt {pt_id}, flags {flags:#x})"
        payload, _ = self.ask(c, _msg(wire.VFIO_DEVICE_ATTACH_IOMMUFD_PT, wire.pkfuse_device_attach_iommufd_pt,
                                      flags=flags, dev_id=dev_id, pt_id=pt_id,
                                      **{"__reserved": step.get("reserved", 0)}),
                              [], what, want)
        if want is not None:
            return
        if target is None:
            target = c.new_id()
            pt.hwpts.append(target)
            c.objs[target] = MHwpt(pt_id, True)
        got = wire.pkfuse_device_attach_iommufd_pt.from_buffer_copy(payload).pt_id
        if got != target:
            raise Violation(f"{what} gave HWPT {got}, the model says {target}")
        if dev.hwpt != target:
            if dev.hwpt is not None:
                self._leave(c, dev_id)
            dev.hwpt = target
            c.objs[target].devices.add(dev_id)

    def op_detach(self, step: dict[str, Any]) -> None:
        c = self.conn(step)
        if c is None:
            return
        flags, dev_id = step.get("flags", 0), step["dev"]
        dev = c.get(dev_id, "device")
        want = self.dispatch_errno(c, wire.VFIO_DEVICE_DETACH_IOMMUFD_PT)
        if want is None:
            want = errno.EINVAL if flags & ~1 else errno.EOPNOTSUPP if flags else errno.ENOENT if dev is None else None
        self.ask(c, _msg(wire.VFIO_DEVICE_DETACH_IOMMUFD_PT, wire.pkfuse_device_detach_iommufd_pt, flags=flags,
                         dev_id=dev_id), [], f"device_detach({dev_id}, flags {flags:#x})", want)
        if want is None and dev.hwpt is not None:
            self._leave(c, dev_id)

    def op_destroy(self, step: dict[str, Any]) -> None:
        c = self.conn(step)
        if c is None:
            return
        obj_id = step["id"]
        o = c.get(obj_id)
        want = self.dispatch_errno(c, wire.IOMMU_DESTROY)
        if want is None:
            if o is None:
                want = errno.ENOENT
            elif isinstance(o, MIoas) and (o.hwpts or o.frozen):
                want = errno.EBUSY
            elif isinstance(o, MHwpt) and (o.devices or (c, obj_id) in self.preserved()):
                want = errno.EBUSY  # attached, or preserved by a live-update session
            elif isinstance(o, MDev) and o.hwpt is not None:
                want = errno.EBUSY
        self.ask(c, _msg(wire.IOMMU_DESTROY, wire.iommu_destroy, id=obj_id), [], f"destroy({obj_id})", want)
        if want is not None:
            return
        if isinstance(o, MHwpt):
            self._free_hwpt(c, obj_id)
        else:
            del c.objs[obj_id]
            if isinstance(o, MDev):
                del self.bound[o.rid]

    def op_guest_mmap(self, step: dict[str, Any]) -> None:
        c = self.conn(step)
        if c is None:
            return
        kind, nfds, flags = step["fd"], step.get("nfds", 1), step.get("flags", 0)
        want = self.dispatch_errno(c, wire.PKFUSE_GUEST_MMAP, nfds)
        if want is None:
            if flags or step.get("reserved", 0):
                want = errno.EOPNOTSUPP
            elif nfds != 1 or kind in NOT_ON_MOUNT:
                want = errno.EBADF
            elif kind in ("a_ro", "view", "iommu_file"):
                want = errno.EACCES
            elif self.size.get(kind, 0) == 0:
                want = errno.EINVAL
        fd = self.fd_of(kind)
        what = f"guest_mmap({kind}, {nfds} fds, flags {flags:#x})"
        payload, rfds = self.ask(c, _msg(wire.PKFUSE_GUEST_MMAP, wire.pkfuse_guest_mmap, flags=flags,
                                         **{"__reserved": step.get("reserved", 0)}), [fd] * nfds, what, want,
                                 nfds_ok=2)
        if want is not None:
            return
        try:
            out = wire.pkfuse_guest_mmap.from_buffer_copy(payload)
            table = os.pread(rfds[1], 1 << 20, 0)
            extents = wire.decode_guest_extents(table)
            pages = np.concatenate([off // PS + np.arange(n // PS) for _, off, n in extents])
            want_pages = self.phys[kind] - out.out_phys_base // PS
            if out.out_length != self.size[kind] or not np.array_equal(pages, want_pages):
                raise Violation(f"{what}: {out.out_length} bytes in {len(extents)} extents, not the file's pages")
        finally:
            transport.close_fds(rfds)
        c.mmaps[kind] += 1

    # -------------------------------------------------------- live update

    def op_create_session(self, step: dict[str, Any]) -> None:
        c = self.conn(step)
        if c is None:
            return
        name = step["name"]
        want = self.dispatch_errno(c, wire.LIVEUPDATE_IOCTL_CREATE_SESSION)
        if want is None:
            if not name or len(name) > 63:
                want = errno.EINVAL
            elif name in self.sessions:
                want = errno.EEXIST
            elif len(self.sessions) >= MAX_SESSIONS:
                want = errno.ENOSPC
        _, rfds = self.ask(c, _msg(wire.LIVEUPDATE_IOCTL_CREATE_SESSION, wire.liveupdate_ioctl_create_session,
                                   name=name.encode()[:64]), [], f"create_session({name!r})", want, nfds_ok=1)
        if want is None:
            s = socket.socket(fileno=rfds[0])
            s.settimeout(CALL_TIMEOUT)
            sc = MConn(s, kind="session")
            sc.session = MSession(name, sc)
            self.conns.append(sc)
            self.sessions[name] = sc.session

    def op_preserve_fd(self, step: dict[str, Any]) -> None:
        c = self.conn(step)
        if c is None:
            return
        kind, token, nfds = step["fd"], step["token"], step.get("nfds", 1)
        want = self.dispatch_errno(c, wire.LIVEUPDATE_SESSION_PRESERVE_FD, nfds)
        s = c.session
        name = self.file_of(kind)
        if want is None:
            assert s is not None
            if nfds != 1 or kind in NOT_ON_MOUNT:
                want = errno.EBADF
            elif token in s.tokens():
                want = errno.EEXIST
            elif len(s.files) >= LU_MAX_FILES:
                want = errno.ENOSPC
            elif name is None:
                want = errno.ENOENT  # no live-update handler for a view or an IOMMU file
            elif any(name in x.files.values() for x in self.sessions.values()):
                want = errno.EEXIST
        fd = self.fd_of(kind)
        self.ask(c, _msg(wire.LIVEUPDATE_SESSION_PRESERVE_FD, wire.liveupdate_session_preserve_fd, fd=fd,
                         token=token), [fd] * nfds, f"preserve_fd({kind}, token {token:#x})", want)
        if want is None:
            s.files[token] = name

    def op_hwpt_preserve(self, step: dict[str, Any]) -> None:
        c = self.conn(step)
        if c is None:
            return
        hid, token, nfds = step["hwpt"], step["token"], step.get("nfds", 1)
        target = self.conn(step, "session") if step.get("session", -1) >= 0 else None
        s = target.session if target is not None and target.kind == "session" else None
        fd = target.sock.fileno() if target is not None else self.fd_of(step.get("fd", "pipe"))
        want = self.dispatch_errno(c, wire.IOMMU_HWPT_LU_SET_PRESERVE, nfds)
        if want is None:
            h = c.get(hid, "hwpt")
            if nfds != 1 or s is None:
                want = errno.EBADF
            elif h is None:
                want = errno.ENOENT
            elif token in s.tokens() or (c, hid) in self.preserved():
                want = errno.EEXIST
            elif any(a.file not in s.files.values() for a in c.objs[h.ioas].areas.values()):
                want = errno.EINVAL
        self.ask(c, _msg(wire.IOMMU_HWPT_LU_SET_PRESERVE, wire.iommu_hwpt_lu_set_preserve, hwpt_id=hid,
                         hwpt_token=token), [fd] * nfds,
                 f"hwpt_lu_set_preserve(hwpt {hid}, token {token}, {step.get('fd', 'session')})", want)
        if want is None:
            s.hwpts[token] = (c, hid)
            c.objs[c.objs[hid].ioas].frozen = True

    def op_session_call(self, step: dict[str, Any]) -> None:
        """FINISH or RETRIEVE_FD on an outgoing session, RETRIEVE_SESSION on /dev/liveupdate."""
        c = self.conn(step)
        if c is None:
            return
        call = step["call"]
        cmd, st = {"finish": (wire.LIVEUPDATE_SESSION_FINISH, wire.liveupdate_session_finish),
                   "retrieve_fd": (wire.LIVEUPDATE_SESSION_RETRIEVE_FD, wire.liveupdate_session_retrieve_fd),
                   "retrieve_session": (wire.LIVEUPDATE_IOCTL_RETRIEVE_SESSION,
                                        wire.liveupdate_ioctl_retrieve_session)}[call]
        want = self.dispatch_errno(c, cmd)
        if want is None:
            want = {"finish": errno.EINVAL, "retrieve_fd": errno.ENOENT, "retrieve_session": errno.ENOENT}[call]
        fields = {"name": b"vm0"} if call == "retrieve_session" else {"token": 1} if call == "retrieve_fd" else {}
        self.ask(c, _msg(cmd, st, **fields), [], f"{call} on an outgoing {c.kind}", want)

    def op_reboot(self, step: dict[str, Any]) -> None:
        c = self.conn(step)
        if c is None:
            return
        flags = step.get("flags", 0)
        want = self.dispatch_errno(c, wire.PKFUSE_REBOOT) or (errno.EOPNOTSUPP if flags else None)
        self.ask(c, _msg(wire.PKFUSE_REBOOT, wire.pkfuse_reboot, flags=flags), [], f"reboot(flags {flags:#x})",
                 want)
        if want is None:
            self.rebooted = True
            self.boot += 1

    # ------------------------------------------------- the kernel's domains

    DOMAIN_CALLS = {  # call -> (command, struct)
        "create": (wire.PKFUSE_DOMAIN_CREATE, wire.pkfuse_domain_create),
        "destroy": (wire.PKFUSE_DOMAIN_DESTROY, wire.pkfuse_domain_destroy),
        "copy": (wire.PKFUSE_DOMAIN_COPY, wire.pkfuse_domain_copy),
        "map": (wire.PKFUSE_DOMAIN_MAP, wire.pkfuse_domain_map),
        "map_file": (wire.PKFUSE_DOMAIN_MAP_FILE, wire.pkfuse_domain_map_file),
        "unmap": (wire.PKFUSE_DOMAIN_UNMAP, wire.pkfuse_domain_unmap),
        "attach": (wire.PKFUSE_DOMAIN_ATTACH, wire.pkfuse_domain_attach),
        "detach": (wire.PKFUSE_DOMAIN_DETACH, wire.pkfuse_domain_detach),
    }
    NO_DOMAIN = 4000  #: a DID no HWPT of a sequence reaches (HWPTs take the smallest free ones)

    def op_domain(self, step: dict[str, Any]) -> None:
        """A ``pkfuse iommu`` call served live, always refused (so that no kernel domain outlives the
        sequence): unknown flags, a reserved field set, a DID out of range or absent, a rid of 17 bits."""
        c = self.conn(step)
        if c is None:
            return
        call, how = step["call"], step["how"]
        cmd, st = self.DOMAIN_CALLS[call]
        fields: dict[str, Any] = {"domain_id": self.NO_DOMAIN}
        if call == "copy":
            fields = {"src_domain_id": self.NO_DOMAIN, "domain_id": 0}
        if call in ("map", "map_file", "unmap"):
            fields.update(iova=0, length=PS)
        if call == "map_file":
            fields["path"] = b"guest_mem/a"
        if call in ("attach", "detach"):
            fields["rid"] = 0x100
        want = self.dispatch_errno(c, cmd)
        recorded = want is None
        if how == "flags":
            fields["flags"] = 0x80
            code = errno.EOPNOTSUPP
        elif how == "reserved" and any(n == "__reserved" for n, _ in st._fields_):
            fields["__reserved"] = 1
            code, recorded = errno.EOPNOTSUPP, False  # refused by the struct rules: no message kept
        elif how == "rid" and call in ("attach", "detach"):
            fields["rid"] = 0x10000
            code = errno.EINVAL
        elif how == "range" and call == "create":
            fields["domain_id"] = 0x10000
            code = errno.EINVAL
        elif call == "create":  # a DID in use: the smallest, which HWPTs or nothing hold
            fields["flags"] = 0x80
            code = errno.EOPNOTSUPP
        else:
            code = errno.ENOENT
        want = want or code
        self.ask(c, _msg(cmd, st, **fields), [], f"pkfuse iommu {call} ({how})", want)
        if recorded:
            c.last_error = (cmd, want)

    def op_last_error(self, step: dict[str, Any]) -> None:
        c = self.conn(step)
        if c is None:
            return
        flags = step.get("flags", 0)
        want = self.dispatch_errno(c, wire.PKFUSE_LAST_ERROR)
        if want is None:
            want = errno.EOPNOTSUPP if flags else errno.ENODATA if c.last_error is None else None
        payload, _ = self.ask(c, _msg(wire.PKFUSE_LAST_ERROR, wire.pkfuse_last_error, flags=flags), [],
                              f"last_error(flags {flags:#x})", want)
        if want is None:
            out = wire.pkfuse_last_error.from_buffer_copy(payload)
            if (out.out_cmd, out.out_errno) != c.last_error or not wire.cstring(out.out_message):
                raise Violation(f"last_error: command {out.out_cmd:#x} errno {ename(out.out_errno)}, the model says "
                                f"{c.last_error[0]:#x} {ename(c.last_error[1])}, with a message")
            c.last_error = None

    # ------------------------------------------------------------- wire

    def op_raw(self, step: dict[str, Any]) -> None:
        """A datagram the wire rules refuse before any handler runs (or, ``tail_zero``, accept)."""
        c = self.conn(step)
        if c is None:
            return
        how, cmd = step["how"], step.get("cmd", wire.IOMMU_IOAS_ALLOC)
        st = STRUCTS.get(cmd, wire.iommu_ioas_alloc)
        body = bytearray(_msg(cmd, st)[4:])
        fds: list[int] = []
        want: int | None
        if how == "empty":
            data, want = b"", errno.EINVAL
        elif how == "short_header":
            data, want = b"\x85;"[: step.get("n", 1)], errno.EINVAL
        elif how == "oversized":
            data, want = cmd.to_bytes(4, "little") + bytes(transport.MAX_MESSAGE + step.get("n", 1)), errno.EMSGSIZE
        elif how == "many_fds":
            data, want = cmd.to_bytes(4, "little") + bytes(body), errno.EBADF
            fds = [self.fds["devnull"]] * (transport.MAX_FDS + 1)
        else:
            want = self.dispatch_errno(c, cmd, 1 if how == "extra_fds" else 0)
            if how == "extra_fds":
                fds = [self.fds["devnull"]]
                if want is None:  # a call that takes a descriptor: the generator never sends one here
                    raise ValueError("extra_fds on a call that takes a descriptor")
            elif how == "unknown_cmd":
                cmd = step.get("unknown", 0x3B7F)
                want = self.dispatch_errno(c, cmd) or errno.ENOTTY
            elif how == "size_mismatch":  # the size field says one thing, the datagram another
                n = step.get("n", 1)
                body = body[:-n] if n > 0 else body + bytes(-n)
                want = want or errno.EINVAL
            elif how == "size_small":  # a struct below the kernel's minimum
                body = body[:4]
                body[:4] = (4).to_bytes(4, "little")
                want = want or (errno.EINVAL if st.MIN_SIZE > 4 else None)
            elif how == "size_field":
                body[:4] = (step.get("size", 0) & 0xFFFFFFFF).to_bytes(4, "little")
                want = want or errno.EINVAL  # never the datagram's length: the generator's sizes are not
            elif how == "tail_nonzero":
                body = body + bytes(7) + b"\x01"
                body[:4] = len(body).to_bytes(4, "little")
                want = want or errno.E2BIG
            elif how == "reserved":
                field = next(n for n, _ in st._fields_ if n == "reserved" or n.startswith("__reserved"))
                off = getattr(st, field).offset
                body[off] = 1
                want = want or errno.EOPNOTSUPP
            elif how == "tail_zero":  # an older kernel's caller sending a larger struct of zeros: accepted
                assert cmd == wire.IOMMU_IOAS_ALLOC
                body = body + bytes(8)
                body[:4] = len(body).to_bytes(4, "little")
            else:
                raise ValueError(f"unknown raw mutation {how!r}")
            data = cmd.to_bytes(4, "little") + bytes(body)
        what = f"raw {how} (cmd {cmd:#x}, {len(data)} bytes, {len(fds)} fds)"
        payload, _ = self.ask(c, data, fds, what, want)
        if how == "tail_zero" and want is None:
            new = c.new_id()
            got = int.from_bytes(payload[8:12], "little")
            if got != new:
                raise Violation(f"{what} gave id {got}, the model says {new}")
            c.objs[new] = MIoas()

    def op_pipeline(self, step: dict[str, Any]) -> None:
        """``n`` IOAS_ALLOCs sent back to back on one connection, then the replies, in order."""
        c = self.conn(step)
        if c is None:
            return
        n = step["n"]
        want = self.dispatch_errno(c, wire.IOMMU_IOAS_ALLOC)
        t0 = time.perf_counter()
        for _ in range(n):
            self._send(c, _msg(wire.IOMMU_IOAS_ALLOC, wire.iommu_ioas_alloc), [], "pipelined ioas_alloc")
        for i in range(n):
            err, payload, rfds = self._recv(c, f"pipelined ioas_alloc {i + 1}/{n}", t0)
            transport.close_fds(rfds)
            self.expect("pipelined ioas_alloc", err, want)
            if want is None:
                new = c.new_id()
                got = wire.iommu_ioas_alloc.from_buffer_copy(payload).out_ioas_id
                if got != new:
                    raise Violation(f"pipelined ioas_alloc {i + 1}/{n} gave id {got}, the model says {new}")
                c.objs[new] = MIoas()

    # ------------------------------------------------------- concurrency

    def _together(self, *calls: Callable[[], Any]) -> list[Any]:
        """Run ``calls`` at the same instant in threads; each result, or the exception it raised."""
        barrier = threading.Barrier(len(calls))
        out: list[Any] = [None] * len(calls)

        def run(i: int) -> None:
            try:
                barrier.wait(5)
                out[i] = calls[i]()
            except BaseException as exc:  # noqa: BLE001 - handed back to the caller
                out[i] = exc

        threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(calls))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(CALL_TIMEOUT + 5)
        for r in out:
            if isinstance(r, Finding):
                raise r
        return out

    def op_race_bind(self, step: dict[str, Any]) -> None:
        """Two connections bind one requester at once: one wins, the other is EBUSY."""
        a, b, rid = self.conn(step, "c"), self.conn(step, "c2"), step["rid"]
        if a is None or b is None or a is b:
            return
        wa, wb = self.bind_errno(a, rid, 0), self.bind_errno(b, rid, 0)
        msg = _msg(wire.VFIO_DEVICE_BIND_IOMMUFD, wire.pkfuse_device_bind_iommufd, rid=rid)
        ra, rb = self._together(lambda: self.call(a, msg, [], f"racing bind({rid:#x}) A"),
                                lambda: self.call(b, msg, [], f"racing bind({rid:#x}) B"))
        ea, eb = ra[0], rb[0]
        if wa is not None or wb is not None:  # no race to win: each gets its own errno
            self.expect("racing bind A", ea, wa)
            self.expect("racing bind B", eb, wb)
            for conn, want, r in ((a, wa, ra), (b, wb, rb)):
                if want is None:
                    self._bound(conn, rid, r[1], "racing bind")
            return
        if sorted([ea, eb]) != [0, errno.EBUSY]:
            raise Violation(f"racing bind({rid:#x}): {ename(ea)} and {ename(eb)}, the model says one success "
                            "and one EBUSY")
        winner, r = (a, ra) if ea == 0 else (b, rb)
        self._bound(winner, rid, r[1], "racing bind")

    def op_race_map_truncate(self, step: dict[str, Any]) -> None:
        """A map of a whole file against a truncate of it through the mount: one of them wins."""
        c = self.conn(step)
        name = step["file"]
        if c is None or self.size[name] == 0:
            return
        size = self.size[name]
        mstep = {"op": "map_file", "c": step["c"], "ioas": step["ioas"], "fd": name, "flags": READ | WRITE | FIXED,
                 "start": 0, "length": size, "iova": step["iova"]}
        want = self.map_errno(c, mstep)
        pinned = self.pinned(name)
        path = self.daemon.mnt / "guest_mem" / name
        fd = self.fds[name]
        data = _msg(wire.IOMMU_IOAS_MAP_FILE, wire.iommu_ioas_map_file, flags=mstep["flags"], ioas_id=step["ioas"],
                    fd=fd, start=0, length=size, iova=step["iova"])

        def truncate() -> int:
            try:
                os.truncate(path, size - PS)
                return 0
            except OSError as exc:
                return exc.errno

        rm, rt = self._together(lambda: self.call(c, data, [fd], f"map_file({name}) racing a truncate"), truncate)
        em = rm[0]
        what = f"map_file({name}, 0+{size:#x}) racing truncate to {size - PS:#x}: map {ename(em)}, truncate {ename(rt)}"
        if pinned:  # no race: the file keeps its size, the map gets its own errno
            if rt != errno.EBUSY:
                raise Violation(f"{what}: a pinned file was truncated")
            self.expect(what, em, want)
        elif want is not None:  # refused anyway; a truncate that came first makes it the size's EINVAL
            self.expect(what, em, {want, errno.EINVAL} if rt == 0 else want)
            if rt not in (0, errno.EBUSY):  # EBUSY: a destroyed domain in its grace period may still map it
                raise Violation(f"{what}: the truncate failed")
        elif (em, rt) not in ((0, errno.EBUSY), (errno.EINVAL, 0)):
            raise Violation(f"{what}: one must win, the other refuse")
        if em == 0:
            self._mapped(c, mstep, step["iova"], what)
        if rt == 0:  # the truncate won: the file back to its size (new pages)
            os.truncate(path, size)
            self._refresh_extents()

    def op_race_maps(self, step: dict[str, Any]) -> None:
        """Two connections map one file into their own IOAS at the same instant: both succeed."""
        a, b = self.conn(step, "c"), self.conn(step, "c2")
        if a is None or b is None or a is b:
            return
        steps = [{"op": "map_file", "c": step["c"], "ioas": step["ioas"], "fd": step["file"], "flags": READ | WRITE,
                  "start": 0, "length": PS, "iova": 0},
                 {"op": "map_file", "c": step["c2"], "ioas": step["ioas2"], "fd": step["file"], "flags": READ,
                  "start": 0, "length": PS, "iova": 0}]
        wants = [self.map_errno(a, steps[0]), self.map_errno(b, steps[1])]
        fd = self.fds[step["file"]]
        msgs = [_msg(wire.IOMMU_IOAS_MAP_FILE, wire.iommu_ioas_map_file, flags=s["flags"], ioas_id=s["ioas"], fd=fd,
                     start=0, length=PS) for s in steps]
        rs = self._together(lambda: self.call(a, msgs[0], [fd], "racing map A"),
                            lambda: self.call(b, msgs[1], [fd], "racing map B"))
        for conn, s, want, r in zip((a, b), steps, wants, rs):
            self.expect("racing map", r[0], want)
            if want is None:
                self._mapped(conn, s, wire.iommu_ioas_map_file.from_buffer_copy(r[1]).iova, "racing map")

    # --------------------------------------------------------- invariants

    def op_check(self, step: dict[str, Any]) -> None:
        self.check_state("check")

    def expected_view(self) -> tuple[str, list[list[str]], list[str]]:
        """The iommufd summary, the context blocks (sorted) and the session lines of ``.pkernfs/iommu``."""
        counts = Counter()
        blocks = []
        for c in self.conns:
            if c.kind != "iommu" or c.ctx_gone:
                continue
            who = "a closed file (objects kept by live update)" if c.closed else "pid"
            lines = [f"context of {who}: {len(c.objs)} objects"]
            order = {"ioas": 0, "hwpt": 1, "device": 2}
            for i, o in sorted(c.objs.items(), key=lambda kv: (order[kv[1].kind], kv[0])):
                counts[o.kind] += 1
                if isinstance(o, MIoas):
                    hw = ", ".join(str(h) for h in o.hwpts) or "none"
                    lines.append(f"  ioas {i}: {len(o.areas)} areas, hwpts {hw}{', preserved' if o.frozen else ''}")
                    for a in sorted(o.areas.values(), key=lambda a: a.iova):
                        lines.append(f"    {a.iova:#014x}-{a.iova + a.length - 1:#014x} -> guest_mem/{a.file}"
                                     f"+{a.offset:#x} {'rw' if a.write else 'r-'}")
                elif isinstance(o, MHwpt):
                    devs = ", ".join(str(d) for d in sorted(o.devices)) or "none"
                    lines.append(f"  hwpt {i}: ioas {o.ioas}, DID *, {'auto' if o.auto else 'allocated'}, "
                                 f"devices {devs}")
                else:
                    att = f"hwpt {o.hwpt}" if o.hwpt is not None else "none"
                    lines.append(f"  device {i}: rid {fmt.requester_name(o.rid)}, attached {att}")
            blocks.append(lines)
        nctx = len(blocks)
        summary = (f"{nctx} contexts, {counts['ioas']} ioas, {counts['hwpt']} hwpts, {counts['device']} devices")
        state = "frozen" if self.rebooted else "outgoing"
        sessions = [f"  session {s.name}: {state}, {len(s.files)} files, {len(s.hwpts)} hwpts"
                    for s in self.sessions.values()]
        return summary, sorted(blocks), sessions

    def observed_view(self) -> tuple[str, list[list[str]], list[str], bool]:
        text = (self.daemon.mnt / ".pkernfs" / "iommu").read_text()
        lines = text.splitlines()
        start = next(i for i, line in enumerate(lines) if line.startswith("iommufd: "))
        summary = lines[start].partition(": ")[2]
        blocks: list[list[str]] = []
        sessions: list[str] = []
        dying = False
        section = "iommufd"
        for line in lines[start + 1:]:
            if line.startswith("liveupdate: "):
                section = "lu"
                continue
            if section == "lu":
                if line.startswith("  session "):
                    sessions.append(line)
                continue
            if line.startswith("freeing domains"):
                dying = True
                continue
            if line.startswith("context of "):
                line = re.sub(r"^context of pid \d+:", "context of pid:", line)
                blocks.append([line])
            elif blocks:
                blocks[-1].append(re.sub(r"DID \d+", "DID *", line))
        return summary, sorted(blocks), sessions, dying

    def expected_status(self) -> dict[str, str]:
        open_ = [c for c in self.conns if not c.closed]
        mm = Counter()
        holders = 0
        for c in self.conns:
            if c.mmaps and (not c.closed or self.rebooted):
                mm.update(c.mmaps)
                holders += 1
        state = "frozen" if self.rebooted else "outgoing"
        names = ", ".join(f"{n} {state}" for n in self.sessions)
        return {"control_connections": str(len(open_)),
                "guest_mmaps": f"{len(mm)} files mapped, {sum(mm.values())} mappings, {holders} connections",
                "liveupdate": f"boot {self.boot}, domains persistent, {len(self.sessions)} sessions"
                              + (f": {names}" if names else "")}

    def _differences(self) -> tuple[list[str], bool]:
        want_s = self.expected_status()
        have = self.daemon.status()
        diffs = [f"status {k}: {have.get(k)!r}, the model says {v!r}" for k, v in want_s.items() if have.get(k) != v]
        summary, blocks, sessions = self.expected_view()
        osum, oblocks, osessions, dying = self.observed_view()
        if osum != summary:
            diffs.append(f"iommufd: {osum!r}, the model says {summary!r}")
        if oblocks != blocks:
            diffs.append(f"contexts differ: daemon {oblocks}, model {blocks}")
        if osessions != sessions:
            diffs.append(f"sessions differ: daemon {osessions}, model {sessions}")
        return diffs, dying

    def settle(self, what: str, *, quiet: bool = False) -> None:
        """Wait until the daemon's account equals the model's (it releases a closed connection a moment
        after the close); ``quiet``: also until no destroyed domain waits out its grace period."""
        deadline = time.monotonic() + (GRACE_TIMEOUT if quiet else SETTLE_TIMEOUT)
        while True:
            self._alive(what)
            diffs, dying = self._differences()
            if not diffs and not (quiet and dying):
                return
            if time.monotonic() > deadline:
                raise Violation(f"after {what}: " + ("; ".join(diffs) or "destroyed domains never freed"))
            time.sleep(0.02)

    def _alive(self, what: str) -> None:
        if not self.daemon.alive():
            rc = self.daemon.proc.returncode if self.daemon.proc else "?"
            raise Crash(f"after {what}: the daemon exited with {rc}")
        bad = self.daemon.log_problems()
        if bad:
            raise Crash(f"after {what}: the daemon logged: " + " | ".join(bad[-6:]))

    def check_translations(self, what: str) -> None:
        """Every requester reaches exactly what the model allows, walked as the hardware walks."""
        areas = [a for c in self.conns if c.kind == "iommu" and not c.ctx_gone for o in c.objs.values()
                 if isinstance(o, MIoas) for a in o.areas.values()]
        probes = set()
        for a in areas:
            probes.update({a.iova, a.iova + (a.length // 2) // PS * PS, a.iova + a.length - PS})
            if a.iova + a.length < IOVA_LIMIT:
                probes.add(a.iova + a.length)
        probes.update({0, PS, IOVA_LIMIT - PS})
        iovas = np.array(sorted(probes), np.uint64)
        for rid in RIDS:
            owner = self.bound.get(rid)
            mine: list[MArea] = []
            if owner is not None:
                dev = next(o for o in owner.objs.values() if isinstance(o, MDev) and o.rid == rid)
                if dev.hwpt is not None:
                    mine = list(owner.objs[owner.objs[dev.hwpt].ioas].areas.values())
            want = np.full(iovas.size, -1, np.int64)
            ro = np.zeros(iovas.size, bool)
            for a in mine:
                inside = (iovas >= a.iova) & (iovas < a.iova + a.length)
                idx = (iovas[inside].astype(np.int64) - a.iova + a.offset) // PS
                want[inside] = self.phys[a.file][idx] * PS
                ro[inside] = not a.write
            phys, faults = device_view(self.daemon.image, rid, iovas, write=False)
            got = np.where(faults == 0, phys.astype(np.int64), -1)
            bad = np.flatnonzero(got != want)
            if bad.size:
                i = int(bad[0])
                raise Violation(f"{what}: requester {fmt.requester_name(rid)} reads IOVA {int(iovas[i]):#x} "
                                f"{'as ' + hex(int(got[i])) if got[i] >= 0 else 'as a fault'}, the model says "
                                f"{hex(int(want[i])) if want[i] >= 0 else 'a fault'}")
            if ro.any():
                _, wfaults = device_view(self.daemon.image, rid, iovas[ro], write=True)
                if (wfaults == 0).any():
                    i = int(np.flatnonzero(wfaults == 0)[0])
                    raise Violation(f"{what}: requester {fmt.requester_name(rid)} may write IOVA "
                                    f"{int(iovas[ro][i]):#x} of a read-only map")

    def check_pins(self, what: str, *, all_free: bool = False) -> None:
        """A file the model says is pinned refuses a truncate; ``all_free``: every file takes one."""
        for name, size in self.size.items():
            if not size:
                continue
            path = self.daemon.mnt / "guest_mem" / name
            pinned = self.pinned(name)
            if not pinned and not all_free:
                continue
            try:
                os.truncate(path, size - PS)
            except OSError as exc:
                if pinned and exc.errno == errno.EBUSY:
                    continue
                raise Violation(f"{what}: truncate of {name}: {ename(exc.errno)}, the model says "
                                f"{'EBUSY' if pinned else 'success'}") from exc
            os.truncate(path, size)
            if pinned:
                raise Violation(f"{what}: {name} is mapped, pinned or preserved, and a truncate went through")
        if all_free:
            self._refresh_extents()

    def check_state(self, what: str) -> None:
        self._alive(what)
        diffs, _ = self._differences()
        if diffs:
            raise Violation(f"{what}: " + "; ".join(diffs))
        self.check_translations(what)
        self.check_pins(what)

    def end_sequence(self) -> None:
        """The invariants after a sequence, then everything closed and checked released."""
        self.check_state("end of sequence")
        for c in self.conns:
            if not c.closed:
                c.sock.close()
                self._closed(c)
        if self.rebooted:
            self.settle("reboot() and closing every connection")
            self.check_translations("after reboot()")
            status, findings = check_image(self.daemon.image)
            if status:
                raise Violation("fsck after reboot(): " + "; ".join(str(f) for f in findings[:5]))
            return
        self.settle("closing every connection", quiet=True)
        self.check_translations("every connection closed")
        st = self.daemon.status()
        if not st.get("iommu", "").startswith("0 domains, 0 requesters attached"):
            raise Violation(f"every connection closed: the IOMMU still has {st.get('iommu')}")
        self.check_pins("every connection closed", all_free=True)
        free = int(self.daemon.status()["pages_free"])
        if free != self.free_pages:
            raise Violation(f"every connection closed: {free} free pages, {self.free_pages} before the sequence")
        status, findings = check_image(self.daemon.image)
        if status:
            raise Violation("fsck: " + "; ".join(str(f) for f in findings[:5]))

    # ------------------------------------------------------------- driving

    def begin_sequence(self) -> None:
        if not self.daemon.alive():
            self.start()
        self.conns, self.bound, self.sessions, self.steps = [], {}, {}, []
        if not self.fds:
            self._open_fds()
        self._refresh_extents()
        self.free_pages = int(self.daemon.status()["pages_free"])

    def run_sequence(self, steps: Sequence[dict[str, Any]] | None = None, entropy: Entropy | None = None,
                     length: int = 40, lu: bool = False) -> Finding | None:
        """One sequence (``steps`` given, or ``length`` generated from ``entropy``), then its checks.

        Returns the finding (also counted and kept), or None. A finding, or a reboot(), leaves a fresh
        daemon for the next sequence.
        """
        self.stats.sequences += 1
        finding: Finding | None = None
        try:
            self.begin_sequence()
            if steps is not None:
                for step in steps:
                    self.run_step(step)
            else:
                assert entropy is not None
                gen = Generator(self, entropy, lu=lu)
                for step in gen.opening():
                    self.run_step(step)
                for _ in range(length):
                    self.run_step(gen.step())
            self.end_sequence()
        except Finding as exc:
            finding = exc
        except OSError as exc:
            finding = Crash(f"{type(exc).__name__}: {exc}")
        if finding is not None:
            if isinstance(finding, Violation):
                self.stats.violations += 1
            elif isinstance(finding, Hang):
                self.stats.hangs += 1
            else:
                self.stats.crashes += 1
            self.stats.findings.append({"kind": finding.kind, "what": str(finding), "steps": list(self.steps)})
            log.warning("%s: %s", finding.kind, finding)
        if finding is not None or self.rebooted:
            self.restart()
        return finding


# ---------------------------------------------------------------- generator


class Generator:
    """Steps drawn from an ``Entropy``, aimed by the model's state (ids it holds, maps it made)."""

    def __init__(self, fz: RequestFuzzer, e: Entropy, *, lu: bool) -> None:
        self.fz = fz
        self.e = e
        self.lu = lu
        self.names = 0

    def opening(self) -> list[dict[str, Any]]:
        """Two /dev/iommu connections, each with an IOAS and a bound device (ids 1 and 2)."""
        out = []
        for i in range(2):
            out += [{"op": "open", "c": -1, "path": "iommu"}, {"op": "ioas_alloc", "c": i},
                    {"op": "bind", "c": i, "rid": RIDS[i]}]
        if self.lu:
            out.append({"op": "open", "c": -1, "path": "lu"})
        return out

    def live(self, kind: str | None) -> list[int]:
        return [i for i, c in enumerate(self.fz.conns) if not c.closed and c.kind == kind]

    def any_conn(self) -> int | None:
        live = [i for i, c in enumerate(self.fz.conns) if not c.closed]
        return self.e.choice(live) if live else None

    def iommu(self) -> int | None:
        live = self.live("iommu")
        if live and self.e.chance(0.93):
            return self.e.choice(live)
        return self.any_conn()  # a session or /dev/liveupdate used as an iommufd, or an unopened one

    def pick(self, c: int, *kinds: str) -> int:
        """An id for connection ``c``: mostly its own of the kinds wanted, else an odd one."""
        mc = self.fz.conns[c]
        own = sorted(i for i, o in mc.objs.items() if o.kind in kinds)
        if own and self.e.chance(0.85):
            return self.e.choice(own)
        pool = {0, mc.next_id, mc.next_id + 7, 0xFFFFFFFF}
        pool |= set(mc.objs)
        for other in self.fz.conns:
            pool |= set(other.objs)  # ids of other connections
        return self.e.choice(sorted(pool))

    def pages(self, lo: int, hi: int) -> int:
        return self.e.int(lo // PS, hi // PS) * PS

    def step(self) -> dict[str, Any]:
        table: list[tuple[str, int]] = [
            ("ioas_alloc", 4), ("map_file", 16), ("unmap", 8), ("iova_ranges", 2), ("hwpt_alloc", 4), ("bind", 3),
            ("attach", 8), ("detach", 3), ("destroy", 6), ("guest_mmap", 3), ("open", 3), ("close", 2),
            ("raw", 9), ("pipeline", 1), ("race_bind", 1), ("race_map_truncate", 1), ("race_maps", 1), ("check", 2),
            ("domain", 3), ("last_error", 2),
        ]
        if self.lu:
            table += [("create_session", 3), ("preserve_fd", 5), ("hwpt_preserve", 4), ("session_call", 1),
                      ("close_session", 1), ("reboot", 1)]
        op = self.e.weighted(table)
        return getattr(self, "gen_" + op)()

    def gen_ioas_alloc(self) -> dict[str, Any]:
        c = self.iommu()
        if c is None:
            return self.gen_open()
        return {"op": "ioas_alloc", "c": c, "flags": 0 if self.e.chance(0.9) else self.e.choice([1, 0x80000000])}

    def gen_open(self) -> dict[str, Any]:
        reuse = [i for i, c in enumerate(self.fz.conns) if not c.closed] if self.e.chance(0.2) else []
        return {"op": "open", "c": self.e.choice(reuse) if reuse else -1,
                "path": self.e.weighted([("iommu", 6), ("lu", 2), ("bad", 1), ("long", 1)]),
                "flags": 0 if self.e.chance(0.9) else 2}

    def gen_close(self) -> dict[str, Any]:
        c = self.any_conn()
        return {"op": "close", "c": c if c is not None else -1}

    def gen_map_file(self) -> dict[str, Any]:
        c = self.iommu()
        if c is None:
            return self.gen_open()
        kind = self.e.weighted([("a", 6), ("b", 5), ("c", 4), ("d", 1), ("a_ro", 2)] +
                               [(k, 1) for k in FD_KINDS[5:]])
        name = self.fz.file_of(kind) or "a"
        size = max(self.fz.size[name], PS)
        fault = self.e.weighted([("none", 10), ("start", 1), ("length", 1), ("iova", 1), ("flags", 1), ("fds", 1)])
        start = self.e.choice([0, 2 * MiB % size, size - PS, self.pages(0, size - PS)])
        room = max(size - start, PS)
        length = self.e.choice([room, PS, min(2 * MiB, room), self.pages(PS, room)])
        if fault == "start":
            start = self.e.choice([size, size + PS, start + self.e.int(1, PS - 1), U64_MAX, U64_MAX - PS + 1, 1 << 63])
        if fault == "length":
            length = self.e.choice([0, room + PS, 2 * room, length + self.e.int(1, PS - 1), U64_MAX,
                                    U64_MAX - PS + 1, 1 << 63])
        ioas = self.pick(c, "ioas")
        areas = list(self.fz.conns[c].objs[ioas].areas.values()) if self.fz.conns[c].get(ioas, "ioas") else []
        near = [0] + [x for a in areas for x in (a.iova, a.iova + a.length, a.iova - length, a.iova + PS)
                      if 0 <= x < 1 << 64]
        iova = self.e.choice([self.e.choice(near), self.pages(0, 24 * MiB), self.e.int(0, 16) * 2 * MiB,
                              IOVA_LIMIT - 2 * MiB, max(IOVA_LIMIT - length, 0) // PS * PS])
        if fault == "iova":
            iova = self.e.choice([iova + self.e.int(1, PS - 1), IOVA_LIMIT, IOVA_LIMIT - length + PS, U64_MAX,
                                  U64_MAX - PS + 1, 1 << 63])
        iova = min(max(iova, 0), U64_MAX)
        flags = READ | (WRITE if self.e.chance(0.7) else 0) | (FIXED if self.e.chance(0.6) else 0)
        if fault == "flags":
            flags = self.e.choice([0, WRITE, WRITE | FIXED, flags | 8, flags | 0x80000000])
        nfds = self.e.choice([0, 2]) if fault == "fds" else 1
        return {"op": "map_file", "c": c, "ioas": ioas, "fd": kind, "flags": flags, "start": start,
                "length": length, "iova": iova, "nfds": nfds}

    def gen_unmap(self) -> dict[str, Any]:
        c = self.iommu()
        if c is None:
            return self.gen_open()
        ioas = self.pick(c, "ioas")
        mc = self.fz.conns[c]
        areas = sorted(mc.objs[ioas].areas.values(), key=lambda a: a.iova) if mc.get(ioas, "ioas") else []
        if areas and self.e.chance(0.6):
            i = self.e.int(0, len(areas) - 1)
            j = self.e.int(i, min(i + 2, len(areas) - 1))
            lo, hi = areas[i].iova, areas[j].iova + areas[j].length
            before, after = self.e.choice([0, 0, PS, 2 * MiB]), self.e.choice([0, 0, PS, 2 * MiB])
            iova = max(lo - before, 0)
            return {"op": "unmap", "c": c, "ioas": ioas, "iova": iova, "length": hi + after - iova}
        choices = [(0, U64_MAX), (1, U64_MAX), (U64_MAX, 1), (0, 0), (PS, 0), (U64_MAX - PS + 1, 2 * PS),
                   (1 << 63, 1 << 63), (0, IOVA_LIMIT), (IOVA_LIMIT, PS), (20 * MiB, 4 * MiB)]
        for a in areas:
            choices += [(a.iova + 1, a.length), (a.iova, a.length + 1), (a.iova, PS), (a.iova + PS, a.length - PS)]
        iova, length = self.e.choice(choices)
        return {"op": "unmap", "c": c, "ioas": ioas, "iova": iova, "length": max(length, 0)}

    def gen_iova_ranges(self) -> dict[str, Any]:
        c = self.iommu()
        if c is None:
            return self.gen_open()
        return {"op": "iova_ranges", "c": c, "ioas": self.pick(c, "ioas"), "num": self.e.choice([0, 1, 4]),
                "reserved": 0 if self.e.chance(0.9) else 1}

    def gen_hwpt_alloc(self) -> dict[str, Any]:
        c = self.iommu()
        if c is None:
            return self.gen_open()
        odd: dict[str, int] = {}
        if self.e.chance(0.15):
            odd = {self.e.choice(["flags", "data_type", "data_len", "data_uptr", "fault_id", "__reserved",
                                  "__reserved2"]): self.e.choice([1, 4, 0x80000000])}
        return {"op": "hwpt_alloc", "c": c, "dev": self.pick(c, "device"), "pt": self.pick(c, "ioas"), "odd": odd}

    def gen_bind(self) -> dict[str, Any]:
        c = self.iommu()
        if c is None:
            return self.gen_open()
        return {"op": "bind", "c": c, "rid": self.e.choice(RIDS + BAD_RIDS if self.e.chance(0.2) else RIDS),
                "flags": 0 if self.e.chance(0.95) else 1}

    def gen_attach(self) -> dict[str, Any]:
        c = self.iommu()
        if c is None:
            return self.gen_open()
        flags = 0 if self.e.chance(0.92) else self.e.choice([1, 2, 0x100])
        return {"op": "attach", "c": c, "dev": self.pick(c, "device"),
                "pt": self.pick(c, self.e.choice(["ioas", "hwpt"])), "flags": flags,
                "reserved": 0 if self.e.chance(0.95) else 1}

    def gen_detach(self) -> dict[str, Any]:
        c = self.iommu()
        if c is None:
            return self.gen_open()
        return {"op": "detach", "c": c, "dev": self.pick(c, "device"), "flags": 0 if self.e.chance(0.92) else 2}

    def gen_destroy(self) -> dict[str, Any]:
        c = self.iommu()
        if c is None:
            return self.gen_open()
        return {"op": "destroy", "c": c, "id": self.pick(c, self.e.choice(["ioas", "hwpt", "device"]))}

    def gen_guest_mmap(self) -> dict[str, Any]:
        c = self.any_conn()
        if c is None:
            return self.gen_open()
        return {"op": "guest_mmap", "c": c, "fd": self.e.weighted([("a", 3), ("b", 2), ("c", 2), ("d", 1)] +
                                                                   [(k, 1) for k in FD_KINDS[4:]]),
                "nfds": 1 if self.e.chance(0.9) else self.e.choice([0, 2]),
                "flags": 0 if self.e.chance(0.95) else 1, "reserved": 0 if self.e.chance(0.95) else 1}

    def gen_raw(self) -> dict[str, Any]:
        c = self.any_conn()
        if c is None:
            return self.gen_open()
        how = self.e.choice(["empty", "short_header", "oversized", "many_fds", "extra_fds", "unknown_cmd",
                             "size_mismatch", "size_small", "size_field", "tail_nonzero", "reserved", "tail_zero"])
        cmds = sorted(STRUCTS)
        cmd = self.e.choice(cmds)
        step: dict[str, Any] = {"op": "raw", "c": c, "how": how, "cmd": cmd}
        if how == "extra_fds" and cmd in wire.REQUEST_FDS:
            step["cmd"] = wire.IOMMU_IOAS_ALLOC
        elif how == "reserved":
            with_reserved = [k for k, st in STRUCTS.items()
                             if any(n == "reserved" or n.startswith("__reserved") for n, _ in st._fields_)]
            step["cmd"] = self.e.choice(sorted(with_reserved))
        elif how == "tail_zero":
            step["cmd"] = wire.IOMMU_IOAS_ALLOC
            if self.fz.conns[c].kind != "iommu":
                step["how"] = "size_mismatch"
        elif how in ("size_mismatch",):
            step["n"] = self.e.choice([1, 3, -1, -8])
        elif how == "size_field":
            step["size"] = self.e.choice([0, 3, 0xFFFFFFFF, 1 << 31, 4095])
        elif how == "short_header":
            step["n"] = self.e.int(1, 3)
        elif how == "oversized":
            step["n"] = self.e.choice([1, 100, 4096])
        elif how == "unknown_cmd":
            step["unknown"] = self.e.choice([0x3B7F, 0x3B8E, 0xBA43, 0x5003, 0x5019, 0])
        return step

    def gen_pipeline(self) -> dict[str, Any]:
        c = self.iommu()
        if c is None:
            return self.gen_open()
        return {"op": "pipeline", "c": c, "n": self.e.int(2, 8)}

    def two(self) -> tuple[int, int] | None:
        live = self.live("iommu")
        if len(live) < 2:
            return None
        a = self.e.choice(live)
        b = self.e.choice([i for i in live if i != a])
        return a, b

    def gen_race_bind(self) -> dict[str, Any]:
        pair = self.two()
        if pair is None:
            return self.gen_open()
        free = [r for r in RIDS if r not in self.fz.bound] or list(RIDS)
        return {"op": "race_bind", "c": pair[0], "c2": pair[1], "rid": self.e.choice(free)}

    def gen_race_map_truncate(self) -> dict[str, Any]:
        c = self.iommu()
        if c is None or self.fz.conns[c].kind != "iommu":
            return self.gen_open()
        return {"op": "race_map_truncate", "c": c, "ioas": self.pick(c, "ioas"),
                "file": self.e.choice(["a", "b", "c"]), "iova": self.e.int(32, 64) * 2 * MiB}

    def gen_race_maps(self) -> dict[str, Any]:
        pair = self.two()
        if pair is None:
            return self.gen_open()
        return {"op": "race_maps", "c": pair[0], "c2": pair[1], "ioas": self.pick(pair[0], "ioas"),
                "ioas2": self.pick(pair[1], "ioas"), "file": self.e.choice(["a", "b", "c"])}

    def gen_domain(self) -> dict[str, Any]:
        c = self.iommu()
        if c is None:
            return self.gen_open()
        return {"op": "domain", "c": c, "call": self.e.choice(sorted(RequestFuzzer.DOMAIN_CALLS)),
                "how": self.e.choice(["flags", "reserved", "rid", "range", "absent"])}

    def gen_last_error(self) -> dict[str, Any]:
        c = self.iommu()
        if c is None:
            return self.gen_open()
        return {"op": "last_error", "c": c, "flags": 0 if self.e.chance(0.9) else 1}

    def gen_check(self) -> dict[str, Any]:
        return {"op": "check"}

    # -------------------------------------------------------- live update

    def lu_conn(self) -> int | None:
        live = self.live("lu")
        return live[0] if live and self.e.chance(0.95) else self.any_conn()

    def session(self) -> int | None:
        live = self.live("session")
        return self.e.choice(live) if live and self.e.chance(0.92) else self.any_conn()

    def gen_create_session(self) -> dict[str, Any]:
        c = self.lu_conn()
        if c is None:
            return self.gen_open()
        self.names += 1
        existing = list(self.fz.sessions)
        name = self.e.weighted([(f"vm{self.names}", 8), ("", 1), ("x" * 64, 1), ("y" * 63, 1),
                                (self.e.choice(existing) if existing else "vm0", 2)])
        return {"op": "create_session", "c": c, "name": name}

    def gen_preserve_fd(self) -> dict[str, Any]:
        c = self.session()
        if c is None:
            return self.gen_open()
        s = self.fz.conns[c].session
        tokens = sorted(s.tokens()) if s else []
        token = self.e.choice(tokens) if tokens and self.e.chance(0.2) else self.e.choice([1, 2, 3, 7, U64_MAX])
        return {"op": "preserve_fd", "c": c, "token": token, "nfds": 1 if self.e.chance(0.92) else 0,
                "fd": self.e.weighted([("a", 4), ("b", 4), ("c", 4), ("d", 1), ("a_ro", 1)] +
                                      [(k, 1) for k in FD_KINDS[5:]])}

    def gen_hwpt_preserve(self) -> dict[str, Any]:
        c = self.iommu()
        if c is None:
            return self.gen_open()
        sessions = self.live("session")
        step: dict[str, Any] = {"op": "hwpt_preserve", "c": c, "hwpt": self.pick(c, "hwpt"),
                                "token": self.e.choice([1, 2, 9, 0xFFFFFFFF]), "nfds": 1 if self.e.chance(0.95) else 0}
        if sessions and self.e.chance(0.85):
            step["session"] = self.e.choice(sessions)
        else:
            step["fd"] = self.e.choice(["a", "view", "pipe", "iommufd", "devnull", "dir"])
        return step

    def gen_session_call(self) -> dict[str, Any]:
        call = self.e.choice(["finish", "retrieve_fd", "retrieve_session"])
        c = self.lu_conn() if call == "retrieve_session" else self.session()
        if c is None:
            return self.gen_open()
        return {"op": "session_call", "c": c, "call": call}

    def gen_close_session(self) -> dict[str, Any]:
        live = self.live("session")
        return {"op": "close", "c": self.e.choice(live)} if live else self.gen_check()

    def gen_reboot(self) -> dict[str, Any]:
        c = self.lu_conn()
        if c is None:
            return self.gen_open()
        return {"op": "reboot", "c": c, "flags": 0 if self.e.chance(0.8) else 1}


# -------------------------------------------------------------------- runs


def replay(steps_of: Sequence[Sequence[dict[str, Any]]], workdir: Path | None = None) -> dict[str, Any]:
    """Run each sequence of concrete steps (a corpus) on one daemon; the report."""
    own = workdir is None
    wd = Path(tempfile.mkdtemp(prefix="pkfuse-fuzz-")) if own else workdir
    fz = RequestFuzzer(wd)
    t0 = time.monotonic()
    try:
        fz.start()
        for steps in steps_of:
            fz.run_sequence(list(steps))
    finally:
        fz.close()
        if own:
            shutil.rmtree(wd, ignore_errors=True)
    return fz.stats.report(seconds=round(time.monotonic() - t0, 3), engine="replay")


def run(seconds: float, *, seed: int | None = None, engine: str = "random", workdir: Path | None = None,
        length: int = 40, on_report: Callable[[dict[str, Any]], int] | None = None) -> dict[str, Any]:
    """Fuzz for ``seconds``; the report (see ``Stats.report``).

    With ``engine="atheris"`` libFuzzer's loop never returns: when the time is up the daemon is
    stopped, ``on_report`` gets the report and the process exits with what it returns.
    """
    if seed is None:
        seed = int.from_bytes(os.urandom(4), "little")
    own = workdir is None
    wd = Path(tempfile.mkdtemp(prefix="pkfuse-fuzz-")) if own else workdir
    fz = RequestFuzzer(wd)
    t0 = time.monotonic()

    def finish() -> dict[str, Any]:
        fz.close()
        if own:
            shutil.rmtree(wd, ignore_errors=True)
        return fz.stats.report(seconds=round(time.monotonic() - t0, 3), engine=engine, seed=seed)

    try:
        fz.start()
        if engine == "atheris":
            _run_atheris(fz, t0 + seconds, seed, length, wd, lambda: (on_report or (lambda r: 0))(finish()))
        e = Entropy(seed)
        while time.monotonic() - t0 < seconds:
            fz.run_sequence(entropy=e, length=length, lu=e.chance(0.4))
    except BaseException:
        finish()
        raise
    return finish()


def _run_atheris(fz: RequestFuzzer, deadline: float, seed: int, length: int, workdir: Path,
                 done: Callable[[], int]) -> None:
    """libFuzzer's loop (atheris) feeding the generator, one sequence per input, until ``deadline``;
    then ``done()`` and exit with its status (libFuzzer's loop has no other way out)."""
    import atheris

    def one(data: bytes) -> None:
        exit_past(deadline, done)
        fdp = atheris.FuzzedDataProvider(data)
        fz.run_sequence(entropy=AtherisEntropy(fdp, data), length=length, lu=fdp.ConsumeBool())

    atheris.instrument_all()  # this process's code: the generator and the model, whose rules mirror the daemon's
    atheris.Setup([sys.argv[0], f"-seed={seed % (1 << 31) or 1}", "-max_len=4096",
                   f"-artifact_prefix={workdir}/"], one)
    atheris.Fuzz()
