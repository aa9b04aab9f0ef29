"""The client library of pkfuse's control socket: one method per uAPI call, named after it.

``Iommufd`` is an open ``/dev/iommu`` (with the VFIO cdev device calls, made
on the iommufd connection because a pkfuse device is a requester id, not an
fd); ``LiveUpdate`` is the open ``/dev/liveupdate``; ``Session`` a live-update
session fd. ``guest_mmap`` (``mmap(2)`` of a guest file) is a call of every
one of them: the file stays pinned while that connection is open. Each is one SEQPACKET connection to the daemon, and closing it is
closing the file. A call either returns its result or raises
``OSError(errno, os.strerror(errno))`` with the errno the daemon (the
kernel) answered; a reply that breaks the protocol is ``OSError(EPROTO)``,
the daemon gone is ``ConnectionClosed``.

Calls on one object are serialized (a lock pairs each request with its
reply), so an object may be shared by threads; nothing here is async.

As in the kernel, struct fields are checked by the daemon, not here, except
what the C types themselves would refuse: a value too wide for its field is
``OverflowError``, a name too long for its array ``ValueError``, before
anything is sent.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import fcntl
import os
import socket
import stat
import threading
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Protocol, TypeVar

from pkfuse.uapi import transport, wire
from pkfuse.uapi.transport import ConnectionClosed

__all__ = ["ConnectionClosed", "GuestMapping", "Iommufd", "LiveUpdate", "Session", "find_control_socket",
           "parse_rid"]

_S = TypeVar("_S", bound=ctypes.Structure)

STATUS_FILE = ".pkernfs/status"  #: relative to the mountpoint
STATUS_KEY = "control_socket"  #: the status line naming the socket

# IOVA_RANGES: the capacity of the first request. QEMU asks with 0 first and
# then again with the count; a small guess saves that round trip for the
# usual one or two ranges, and the EMSGSIZE retry covers the rest.
_IOVA_RANGES_GUESS = 4


class HasFileno(Protocol):
    def fileno(self) -> int: ...


FileLike = int | HasFileno


def _fileno(f: FileLike) -> int:
    return f if isinstance(f, int) else f.fileno()


def parse_rid(device: str | int) -> int:
    """A requester id from ``'bb:dd.f'`` (hex, as lspci prints it) or an int already packed."""
    if isinstance(device, int):
        if not 0 <= device <= 0xFFFF:
            raise ValueError(f"requester id {device:#x} is not 16 bits")
        return device
    try:
        bus, rest = device.split(":")
        dev, fn = rest.split(".")
        return wire.rid(int(bus, 16), int(dev, 16), int(fn, 16))
    except ValueError:
        raise ValueError(f"not a requester id 'bb:dd.f': {device!r}") from None


def find_control_socket(mountpoint_or_socket: str | os.PathLike[str]) -> str:
    """The control socket's path: the argument if it is a socket, else the mount's status line.

    Reads ``MOUNTPOINT/.pkernfs/status`` for ``control_socket: PATH``; no
    such line is ``FileNotFoundError`` (ENOENT).
    """
    path = os.fspath(mountpoint_or_socket)
    try:
        if stat.S_ISSOCK(os.stat(path).st_mode):
            return path
    except FileNotFoundError:
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path) from None
    status = Path(path, STATUS_FILE)
    for line in status.read_text().splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == STATUS_KEY and value.strip():
            return value.strip()
    raise FileNotFoundError(errno.ENOENT, f"no {STATUS_KEY!r} line in {status}", str(status))


def _connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        sock.connect(path)
    except BaseException:
        sock.close()
        raise
    return sock


def _protocol_error(detail: str) -> OSError:
    return OSError(errno.EPROTO, f"{os.strerror(errno.EPROTO)}: {detail}")


@dataclasses.dataclass
class GuestMapping:
    """PKFUSE_GUEST_MMAP's answer: what a shared mapping of the guest file is made of.

    Map ``length`` bytes of ``image_fd`` at ``image_offset`` for each extent
    ``(file_offset, image_offset, length)`` (sorted, tiling the file's pages;
    ``pkfuse.vmm.memory.GuestMemory.map_file`` does it) and close
    ``image_fd``: the caller owns it. ``phys_base`` is the physical address
    of image offset 0; ``length`` the file's size in bytes.
    """

    image_fd: int
    extents: list[tuple[int, int, int]]
    length: int
    phys_base: int

    def close(self) -> None:
        """Close ``image_fd`` (mappings made from it stay). Idempotent."""
        if self.image_fd >= 0:
            os.close(self.image_fd)
            self.image_fd = -1


_EXTENT_SEALS = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL


def _read_extent_table(fd: int, count: int) -> list[tuple[int, int, int]]:
    """The sealed memfd's ``pkfuse_guest_extent`` array: exactly ``count`` entries, sealed, else EPROTO."""
    if fcntl.fcntl(fd, fcntl.F_GET_SEALS) & _EXTENT_SEALS != _EXTENT_SEALS:
        raise _protocol_error("the extent table is not sealed")
    width = ctypes.sizeof(wire.pkfuse_guest_extent)
    size = os.fstat(fd).st_size
    if size != count * width:
        raise _protocol_error(f"extent table of {size} bytes, out_num_extents says {count}")
    data = bytearray()
    while len(data) < size:
        chunk = os.pread(fd, size - len(data), len(data))
        if not chunk:
            raise _protocol_error("extent table ended early")
        data += chunk
    return wire.decode_guest_extents(bytes(data))


class _FailedWithStruct(OSError):
    """An error reply that still carried the out struct (IOVA_RANGES's EMSGSIZE): ``out`` is it."""

    def __init__(self, err: int, out: ctypes.Structure) -> None:
        super().__init__(err, os.strerror(err))
        self.out = out


class _Connection:
    """One open file of the daemon: a connected SEQPACKET socket and the request/reply exchange on it."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._lock = threading.Lock()

    def fileno(self) -> int:
        """The connection's descriptor: what another call sends to name this file."""
        return self._sock.fileno()

    def close(self) -> None:
        """Close the file; the daemon releases what it held (but what a session preserved). Idempotent."""
        self._sock.close()

    @property
    def closed(self) -> bool:
        return self._sock.fileno() < 0

    def __enter__(self) -> _Connection:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def _call(self, cmd: int, request: _S, fds: Sequence[int] = (), *, want_fds: int = 0,
              array: bool = False, error_struct: frozenset[int] = frozenset()) -> tuple[_S, bytes, list[int]]:
        """Send ``request`` as ``cmd`` and return ``(out struct, trailing bytes, received fds)``.

        ``want_fds``: how many descriptors a success carries (exactly those,
        else EPROTO). ``array``: bytes after the struct are allowed.
        ``error_struct``: errnos whose reply still carries the struct; the
        raised OSError is then a ``_FailedWithStruct``. The fds become the
        caller's; on every error path they are closed.
        """
        with self._lock:
            transport.send_request(self._sock, cmd, wire.encode(request), fds)
            try:
                err, payload, rfds = transport.recv_reply(self._sock)
            except wire.WireError as e:
                # A malformed reply is the daemon's fault, not an errno of the call.
                raise _protocol_error(str(e)) from e
        try:
            if err < 0:
                raise _protocol_error(f"negative errno {err}")
            if err and err not in error_struct:
                raise OSError(err, os.strerror(err))
            out, tail = self._decode(type(request), payload, array)
            if err:
                raise _FailedWithStruct(err, out)
            if len(rfds) != want_fds:
                raise _protocol_error(f"{len(rfds)} descriptors in the reply, {want_fds} expected")
        except BaseException:
            transport.close_fds(rfds)
            raise
        return out, tail, rfds

    @staticmethod
    def _decode(struct_type: type[_S], payload: bytes, array: bool) -> tuple[_S, bytes]:
        # We always send sizeof, so the kernel copies back sizeof bytes.
        ksize = ctypes.sizeof(struct_type)
        if len(payload) < ksize or (len(payload) > ksize and not array):
            raise _protocol_error(f"{struct_type.__name__} reply of {len(payload)} bytes, {ksize} expected")
        return struct_type.from_buffer_copy(payload[:ksize]), payload[ksize:]

    # ---- a system call on a file, on every connection ----------------------

    def guest_mmap(self, fd: FileLike) -> GuestMapping:
        """PKFUSE_GUEST_MMAP, standing for ``mmap(MAP_SHARED, PROT_READ | PROT_WRITE)`` of the guest file.

        ``fd``: the file opened O_RDWR on the mount (EACCES otherwise; EBADF
        if it is not a file on the mount, EINVAL if not guest RAM or empty).
        The file is pinned (its size fixed, unlink EBUSY) until this
        connection closes. The caller owns the returned ``image_fd``.
        """
        n = _fileno(fd)
        out, _, fds = self._call(wire.PKFUSE_GUEST_MMAP, wire.new(wire.pkfuse_guest_mmap), [n], want_fds=2)
        image, table = fds
        try:
            extents = _read_extent_table(table, out.out_num_extents)
        except BaseException:
            os.close(image)
            raise
        finally:
            os.close(table)
        return GuestMapping(image, extents, out.out_length, out.out_phys_base)

    def _open(self, path: bytes) -> None:
        try:
            self._call(wire.PKFUSE_OPEN, wire.new(wire.pkfuse_open, path=path))
        except BaseException:
            self.close()
            raise


def _open_device(mountpoint_or_socket: str | os.PathLike[str]) -> socket.socket:
    return _connect(find_control_socket(mountpoint_or_socket))


class Iommufd(_Connection):
    """An open ``/dev/iommu``: an iommufd context, with the VFIO cdev device calls made on it.

    ``mountpoint_or_socket``: a pkfuse mountpoint (its status file names the
    control socket) or the control socket itself. Ids are the daemon's u32
    object ids; IOVAs, starts and lengths are bytes.
    """

    def __init__(self, mountpoint_or_socket: str | os.PathLike[str]) -> None:
        super().__init__(_open_device(mountpoint_or_socket))
        self._open(wire.DEV_IOMMU)

    def __enter__(self) -> Iommufd:
        return self

    # ---- iommufd.h ----------------------------------------------------------

    def destroy(self, id: int) -> None:
        """IOMMU_DESTROY: destroy any object; EBUSY while it is in use."""
        self._call(wire.IOMMU_DESTROY, wire.new(wire.iommu_destroy, id=id))

    def ioas_alloc(self) -> int:
        """IOMMU_IOAS_ALLOC: a new IO address space; returns its id."""
        out, _, _ = self._call(wire.IOMMU_IOAS_ALLOC, wire.new(wire.iommu_ioas_alloc))
        return out.out_ioas_id

    def ioas_map_file(self, ioas_id: int, fd: FileLike, start: int, length: int, iova: int | None = None, *,
                      readable: bool = True, writeable: bool = True) -> int:
        """IOMMU_IOAS_MAP_FILE: map ``length`` bytes of the file from byte ``start``; returns the IOVA.

        With ``iova`` the map is placed there (FIXED_IOVA; the range must be
        unused), else the daemon picks it. The file travels as the request's
        one SCM_RIGHTS descriptor; the struct's ``fd`` field carries our
        number for it.
        """
        f = wire.iommufd_ioas_map_flags
        flags = f(0)
        if iova is not None:
            flags |= f.IOMMU_IOAS_MAP_FIXED_IOVA
        if readable:
            flags |= f.IOMMU_IOAS_MAP_READABLE
        if writeable:
            flags |= f.IOMMU_IOAS_MAP_WRITEABLE
        n = _fileno(fd)
        req = wire.new(wire.iommu_ioas_map_file, flags=int(flags), ioas_id=ioas_id, fd=n, start=start,
                       length=length, iova=0 if iova is None else iova)
        out, _, _ = self._call(wire.IOMMU_IOAS_MAP_FILE, req, [n])
        return out.iova

    def ioas_unmap(self, ioas_id: int, iova: int, length: int) -> int:
        """IOMMU_IOAS_UNMAP: unmap whole earlier maps inside [iova, iova + length); returns the bytes unmapped."""
        out, _, _ = self._call(wire.IOMMU_IOAS_UNMAP,
                               wire.new(wire.iommu_ioas_unmap, ioas_id=ioas_id, iova=iova, length=length))
        return out.length

    def ioas_iova_ranges(self, ioas_id: int) -> tuple[list[tuple[int, int]], int]:
        """IOMMU_IOAS_IOVA_RANGES: ``([(start, last), ...], alignment)``, ``last`` inclusive.

        The request's ``num_iovas`` is our capacity; when it is too small the
        daemon answers EMSGSIZE with the count needed, and we ask once more
        with that count, as a real caller does. A second EMSGSIZE (the
        ranges changed in between) is raised.
        """
        capacity = _IOVA_RANGES_GUESS
        for attempt in range(2):
            req = wire.new(wire.iommu_ioas_iova_ranges, ioas_id=ioas_id, num_iovas=capacity)
            try:
                out, tail, _ = self._call(wire.IOMMU_IOAS_IOVA_RANGES, req, array=True,
                                          error_struct=frozenset({errno.EMSGSIZE}))
            except _FailedWithStruct as e:
                if attempt:
                    raise
                capacity = e.out.num_iovas
                continue
            ranges = wire.decode_iova_ranges(tail)
            if len(ranges) != out.num_iovas:
                raise _protocol_error(f"{len(ranges)} ranges sent, num_iovas says {out.num_iovas}")
            return ranges, out.out_iova_alignment
        raise AssertionError("unreachable")  # the loop returns or raises

    def option(self, option_id: int, op: int, object_id: int = 0, val64: int = 0) -> int:
        """IOMMU_OPTION: set (``op`` SET, ``val64``) or get (``op`` GET) an option; returns its value.

        ``option_id``: ``wire.iommufd_option``; e.g. ``IOMMU_OPTION_HUGE_PAGES``
        0 on a new IOAS (``object_id``), before its first map into a HWPT, for
        4 KiB leaves only.
        """
        out, _, _ = self._call(wire.IOMMU_OPTION, wire.new(wire.iommu_option, option_id=int(option_id), op=int(op),
                                                            object_id=object_id, val64=val64))
        return out.val64

    def hwpt_alloc(self, dev_id: int, pt_id: int, flags: int = 0) -> int:
        """IOMMU_HWPT_ALLOC: a HWPT (an iommu_domain) for the device from IOAS ``pt_id``; returns its id.

        ``flags``: ``wire.iommufd_hwpt_alloc_flags``; the data type is NONE (a
        kernel-managed page table).
        """
        out, _, _ = self._call(wire.IOMMU_HWPT_ALLOC,
                               wire.new(wire.iommu_hwpt_alloc, flags=int(flags), dev_id=dev_id, pt_id=pt_id))
        return out.out_hwpt_id

    def hwpt_lu_set_preserve(self, hwpt_id: int, token: int, session: Session) -> None:
        """IOMMU_HWPT_LU_SET_PRESERVE (unmerged series): preserve the HWPT in ``session`` as ``token``.

        ``token`` is the series' ``__u32 hwpt_token``. The session's fd
        travels as the request's one SCM_RIGHTS descriptor: pkfuse's way to
        say which session preserves the HWPT (the series' struct names none).
        """
        req = wire.new(wire.iommu_hwpt_lu_set_preserve, hwpt_id=hwpt_id, hwpt_token=token)
        self._call(wire.IOMMU_HWPT_LU_SET_PRESERVE, req, [session.fileno()])

    # ---- VFIO cdev device calls, naming the device --------------------------

    def device_bind(self, rid: str | int) -> int:
        """VFIO_DEVICE_BIND_IOMMUFD for the device at requester id ``rid`` ('bb:dd.f' or int); returns dev_id."""
        out, _, _ = self._call(wire.VFIO_DEVICE_BIND_IOMMUFD,
                               wire.new(wire.pkfuse_device_bind_iommufd, rid=parse_rid(rid)))
        return out.out_devid

    def device_attach(self, dev_id: int, pt_id: int) -> int:
        """VFIO_DEVICE_ATTACH_IOMMUFD_PT: attach to an IOAS or HWPT (replacing any); returns the HWPT id."""
        out, _, _ = self._call(wire.VFIO_DEVICE_ATTACH_IOMMUFD_PT,
                               wire.new(wire.pkfuse_device_attach_iommufd_pt, pt_id=pt_id, dev_id=dev_id))
        return out.pt_id

    def device_detach(self, dev_id: int) -> None:
        """VFIO_DEVICE_DETACH_IOMMUFD_PT: detach the device; its DMA is then blocked."""
        self._call(wire.VFIO_DEVICE_DETACH_IOMMUFD_PT, wire.new(wire.pkfuse_device_detach_iommufd_pt, dev_id=dev_id))


def _session_name(name: str | bytes) -> bytes:
    raw = name.encode() if isinstance(name, str) else name
    if b"\0" in raw:
        raise ValueError("a session name cannot contain NUL")
    return raw


class LiveUpdate(_Connection):
    """The open ``/dev/liveupdate`` (at most one at a time: a second open is EBUSY)."""

    def __init__(self, mountpoint_or_socket: str | os.PathLike[str]) -> None:
        super().__init__(_open_device(mountpoint_or_socket))
        self._open(wire.DEV_LIVEUPDATE)

    def __enter__(self) -> LiveUpdate:
        return self

    def _session(self, cmd: int, struct_type: type[ctypes.Structure], name: str | bytes) -> Session:
        _, _, fds = self._call(cmd, wire.new(struct_type, name=_session_name(name)), want_fds=1)
        return Session(socket.socket(fileno=fds[0]))

    def create_session(self, name: str | bytes) -> Session:
        """LIVEUPDATE_IOCTL_CREATE_SESSION: a new outgoing session (a duplicate name is EEXIST)."""
        return self._session(wire.LIVEUPDATE_IOCTL_CREATE_SESSION, wire.liveupdate_ioctl_create_session, name)

    def retrieve_session(self, name: str | bytes) -> Session:
        """LIVEUPDATE_IOCTL_RETRIEVE_SESSION: a session the previous kernel preserved (unknown: ENOENT)."""
        return self._session(wire.LIVEUPDATE_IOCTL_RETRIEVE_SESSION, wire.liveupdate_ioctl_retrieve_session, name)

    def reboot(self) -> None:
        """PKFUSE_REBOOT, standing for reboot(LINUX_REBOOT_CMD_KEXEC): freeze every session and restart.

        A failure is EAGAIN, and everything is unfrozen.
        """
        self._call(wire.PKFUSE_REBOOT, wire.new(wire.pkfuse_reboot))


class Session(_Connection):
    """A live-update session fd: its own connection to the daemon. Closing an outgoing one unpreserves all."""

    def __enter__(self) -> Session:
        return self

    def preserve_fd(self, fd: FileLike, token: int) -> None:
        """LIVEUPDATE_SESSION_PRESERVE_FD: preserve the file as ``token`` (u64; a duplicate is EEXIST)."""
        n = _fileno(fd)
        self._call(wire.LIVEUPDATE_SESSION_PRESERVE_FD, wire.new(wire.liveupdate_session_preserve_fd, fd=n,
                                                                 token=token), [n])

    def retrieve_fd(self, token: int) -> int:
        """LIVEUPDATE_SESSION_RETRIEVE_FD: the preserved file as a new descriptor, which the caller owns."""
        _, _, fds = self._call(wire.LIVEUPDATE_SESSION_RETRIEVE_FD,
                               wire.new(wire.liveupdate_session_retrieve_fd, token=token), want_fds=1)
        return fds[0]

    def finish(self) -> None:
        """LIVEUPDATE_SESSION_FINISH: all or nothing; EBUSY while any file cannot finish yet."""
        self._call(wire.LIVEUPDATE_SESSION_FINISH, wire.new(wire.liveupdate_session_finish))
