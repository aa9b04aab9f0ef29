"""The control socket: the kernel's system calls for iommufd and live update, served on trio.

A Unix ``SOCK_SEQPACKET`` socket, mode 0600, served from the daemon's trio
loop beside FUSE (the protocol is stated in ``pkfuse.uapi.wire``). Each
accepted connection is an open file of the kernel: its first message opens
``/dev/iommu`` (a ``backing.iommufd.Context``) or ``/dev/liveupdate``. This
module only decodes requests, checks the extensibility rules and flags the
kernel checks at its ioctl entry, and turns ``StoreError`` into the errno of
the reply; the kernel logic is ``backing.iommufd``. ``PKFUSE_GUEST_MMAP``
(``mmap(2)`` of a guest file) is served on every connection, whatever it
opened; its logic and pins are ``backing.guestmmap``, and closing the
connection drops the pins it took.

Calls run on the trio thread, holding ``store.lock`` for their length (a map
of 1 GiB in 4 KiB leaves holds it ~20 ms): FUSE requests wait that long. The
one thing that must not run there is touching a file on our own mount --
``fstat`` of a descriptor a client passed can become a FUSE request to this
very thread, and so can ``close`` (FLUSH) -- so descriptors are resolved and
closed in a worker thread.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import socket
import stat
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from backing.errors import PkfuseError, StoreError
from backing.guestmmap import GuestMaps
from backing.iommufd import Context, Iommufd
from backing.liveupdate import IncomingSession, LiveUpdate, OutgoingSession
from pkfuse.uapi import transport, wire

from . import admin
from .liveupdate import LiveUpdateCalls
from .preflight import EXIT_ERROR, MountError

log = logging.getLogger(__name__)

DEV_IOMMU = wire.DEV_IOMMU
DEV_LIVEUPDATE = wire.DEV_LIVEUPDATE


def default_path(uuid: bytes) -> str:
    """Where the socket of the image with superblock ``uuid`` goes unless ``--control`` says.

    Short (a socket path has 107 bytes at most) and per image: root's under
    ``/run/pkfuse``, another user's under ``$XDG_RUNTIME_DIR/pkfuse`` or
    ``/tmp/pkfuse-UID``.
    """
    if os.geteuid() == 0:
        base = "/run/pkfuse"
    else:
        base = os.path.join(os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/pkfuse-{os.geteuid()}", "pkfuse")
    return os.path.join(base, uuid.hex() + ".sock")


def bind_socket(path: str, owner: int | None = None) -> socket.socket:
    """A listening SEQPACKET socket at ``path``, mode 0600 from the start, owned by ``owner``.

    ``owner``: the image's owner, who may connect besides root (the daemon,
    running as root, hands the socket to that uid; the directory it makes is
    0711, searchable but not listable). A stale socket file (nobody accepts
    on it: a killed daemon's) is replaced; a live one, or anything that is not
    a socket, is refused.
    """
    if len(os.fsencode(path)) > 107:
        raise MountError(f"control socket path {path} is longer than a socket address allows (107 bytes)",
                         EXIT_ERROR)
    parent = os.path.dirname(path) or "."
    if not os.path.isdir(parent):
        os.makedirs(parent, mode=0o711, exist_ok=True)
        os.chmod(parent, 0o711)  # makedirs' mode went through the umask
    with contextlib.suppress(FileNotFoundError):
        st = os.lstat(path)
        if not stat.S_ISSOCK(st.st_mode):
            raise MountError(f"control socket path {path} exists and is not a socket", EXIT_ERROR)
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            probe.connect(path)
            raise MountError(f"control socket {path} is served by another daemon", EXIT_ERROR)
        except ConnectionRefusedError:
            os.unlink(path)  # a dead daemon's
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    old = os.umask(0o177)
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    if owner is not None and owner != os.geteuid():
        os.chown(path, owner, -1)  # mode 0600: the owner and root may connect, nobody else
    sock.listen(64)
    return sock


class FileResolver:
    """Which image inode a descriptor passed by a client names, and how it was opened.

    Only files on our own mount (``st_dev`` of the mount) qualify. The
    ``fstat`` runs in a worker thread: on the trio thread it could wait on a
    FUSE request that only the trio thread can answer.
    """

    def __init__(self, mount_dev: int | None, mountpoint: str | None = None,
                 path_of: Callable[[int], bytes] | None = None) -> None:
        self.mount_dev = mount_dev
        self.mountpoint = mountpoint
        self.path_of = path_of  #: ino -> path in the image (Store.path_of), to open a retrieved file

    async def inode(self, fd: int) -> tuple[int, int]:
        """``(ino, O_ACCMODE flags)`` of ``fd``; EBADF if it is not a file on this mount."""
        st = await trio.to_thread.run_sync(os.fstat, fd)
        if self.mount_dev is None or st.st_dev != self.mount_dev or not stat.S_ISREG(st.st_mode):
            raise StoreError(errno.EBADF, "the descriptor is not a file on this pkfuse mount")
        return st.st_ino, _accmode(fd)

    async def open_inode(self, ino: int) -> int:
        """A read-write descriptor of image inode ``ino`` opened on the mount (RETRIEVE_FD)."""
        if self.mountpoint is None or self.path_of is None:
            raise StoreError(errno.ENODEV, "the daemon does not know its mountpoint")
        path = os.fsencode(self.mountpoint) + self.path_of(ino)

        def _open() -> int:
            try:  # an error here is the caller's errno, never the daemon's end
                fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            except OSError as exc:
                raise StoreError(exc.errno or errno.EIO, f"{os.fsdecode(path)}: {exc.strerror}") from None
            st = os.fstat(fd)
            if st.st_dev != self.mount_dev or st.st_ino != ino:  # renamed over, or not (yet) our mount there
                os.close(fd)
                raise StoreError(errno.EIO, f"{os.fsdecode(path)} is no longer inode {ino} of this mount")
            return fd

        return await trio.to_thread.run_sync(_open)


async def _close(fds: list[int]) -> None:
    """Close descriptors a client passed (or we pass back) off the trio thread: closing a
    file on our own mount sends FUSE a FLUSH, which only the trio thread can answer."""
    if fds:
        await trio.to_thread.run_sync(transport.close_fds, fds)


def _accmode(fd: int) -> int:
    """``O_ACCMODE`` bits of ``fd``, from ``/proc/self/fdinfo`` (no request to any filesystem)."""
    with open(f"/proc/self/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("flags:"):
                return int(line.split()[1], 8) & os.O_ACCMODE
    return os.O_RDONLY


def may_connect(uid: int, owner: int | None) -> bool:
    """Whether a peer with ``uid`` may use the control socket: root and the image's owner."""
    return uid == 0 or uid == owner or (owner is None and uid == os.geteuid())


class Connection:
    """One accepted connection: what it opened, and the kernel object behind it."""

    def __init__(self, sock: trio.socket.SocketType, peer: tuple[int, int, int], device: bytes | None = None,
                 session: OutgoingSession | IncomingSession | None = None,
                 on_close: Callable[[], Awaitable[None]] | None = None) -> None:
        self.sock = sock
        self.pid, self.uid, self.gid = peer
        self.device: bytes | None = device
        self.ctx: Context | None = None
        self.session = session  #: a session fd's connection: its session
        self.on_close = on_close

    def close(self) -> None:
        if self.ctx is not None:
            self.ctx.close()
            self.ctx = None
        self.sock.close()


Reply = tuple[int, bytes, list[int]]
Handler = Callable[[Connection, Any, list[int]], Awaitable[Reply]]


class ControlServer:
    """Serves the control socket for one daemon; ``run`` until cancelled.

    ``statistics()`` counts connections by what they opened and requests by errno.
    """

    def __init__(self, path: str, iommufd: Iommufd, resolver: FileResolver, lu: LiveUpdate | None = None,
                 owner: int | None = None) -> None:
        self.path = path
        self.owner = owner  #: the image's owner's uid: with root, the only peers served (None: our euid)
        self.iommufd = iommufd
        self.resolver = resolver
        self.lu = lu
        self._nursery: trio.Nursery | None = None
        self.connections: set[Connection] = set()
        self.requests = 0
        self.refused: dict[int, int] = {}  #: errno -> count
        self._listener: socket.socket | None = None
        self.guest_maps = GuestMaps(iommufd.store)  #: PKFUSE_GUEST_MMAP's pins, by connection
        self._handlers: dict[bytes, dict[int, tuple[type, Handler]]] = {
            DEV_IOMMU: {
                wire.IOMMU_DESTROY: (wire.iommu_destroy, self._destroy),
                wire.IOMMU_IOAS_ALLOC: (wire.iommu_ioas_alloc, self._ioas_alloc),
                wire.IOMMU_IOAS_MAP_FILE: (wire.iommu_ioas_map_file, self._ioas_map_file),
                wire.IOMMU_IOAS_UNMAP: (wire.iommu_ioas_unmap, self._ioas_unmap),
                wire.IOMMU_IOAS_IOVA_RANGES: (wire.iommu_ioas_iova_ranges, self._ioas_iova_ranges),
                wire.IOMMU_OPTION: (wire.iommu_option, self._option),
                wire.IOMMU_HWPT_ALLOC: (wire.iommu_hwpt_alloc, self._hwpt_alloc),
                wire.VFIO_DEVICE_BIND_IOMMUFD: (wire.pkfuse_device_bind_iommufd, self._device_bind),
                wire.VFIO_DEVICE_ATTACH_IOMMUFD_PT: (wire.pkfuse_device_attach_iommufd_pt, self._device_attach),
                wire.VFIO_DEVICE_DETACH_IOMMUFD_PT: (wire.pkfuse_device_detach_iommufd_pt, self._device_detach),
                **admin.handlers(self),
            },
            DEV_LIVEUPDATE: {},  # without live update (no LiveUpdate given): every call ENOTTY
        }
        if lu is not None:
            calls = LiveUpdateCalls(self, lu)
            self._handlers.update(calls.handlers())
            self._handlers[DEV_IOMMU].update(calls.iommu_handlers())
        for table in self._handlers.values():  # a system call on a file: served whatever was opened
            table[wire.PKFUSE_GUEST_MMAP] = (wire.pkfuse_guest_mmap, self._guest_mmap)

    def statistics(self) -> dict[str, Any]:
        opened = [(c.device or b"(none)").decode() for c in self.connections]
        return {"connections": {d: opened.count(d) for d in set(opened)}, "requests": self.requests,
                "refused": dict(self.refused)}

    def listen(self) -> None:
        """Bind the socket (before the mount is announced, so a client never finds it missing)."""
        self._listener = bind_socket(self.path, self.owner)

    async def run(self) -> None:
        assert self._listener is not None, "listen() first"
        listener = trio.socket.from_stdlib_socket(self._listener)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._reap)
                while True:
                    sock, _ = await listener.accept()
                    nursery.start_soon(self._serve, sock)
        finally:
            listener.close()
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            for conn in list(self.connections):
                conn.close()
                self.guest_maps.release(conn)

    async def _reap(self) -> None:
        """Free destroyed domains once their grace period has passed (the IOTLB-flush stand-in)."""
        while True:
            wait = self.iommufd.reap() if self.iommufd.dying else 0.0
            await trio.sleep(wait if wait > 0 else 0.25)

    def serve_connection(self, sock: socket.socket, device: bytes, *,
                         session: OutgoingSession | IncomingSession | None = None,
                         on_close: Callable[[], Awaitable[None]] | None = None) -> None:
        """Serve a connection the daemon made itself (a session fd's other end), born open."""
        assert self._nursery is not None, "run() first"
        self._nursery.start_soon(self._serve, trio.socket.from_stdlib_socket(sock), device, session, on_close)

    async def _serve(self, sock: trio.socket.SocketType, device: bytes | None = None,
                     session: OutgoingSession | IncomingSession | None = None,
                     on_close: Callable[[], Awaitable[None]] | None = None) -> None:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
        peer = tuple(int.from_bytes(creds[i:i + 4], "little") for i in (0, 4, 8))
        conn = Connection(sock, peer, device, session, on_close)  # type: ignore[arg-type]
        # a session fd's other end is the daemon's own socketpair: whoever holds the fd may use it,
        # as a kernel file descriptor passed along; an accepted connection is checked
        refused = device is None and not may_connect(conn.uid, self.owner)
        if refused:
            log.warning("pid %d (uid %d) refused: only root and the image's owner (uid %s) may use the control "
                        "socket", conn.pid, conn.uid, self.owner if self.owner is not None else os.geteuid())
        self.connections.add(conn)
        try:
            while True:
                data, anc, flags, _ = await sock.recvmsg(transport.RECV_BUFSIZE, transport.RECV_ANCBUFSIZE,
                                                         transport.RECV_FLAGS)
                if transport.at_eof(sock, data, anc):
                    return  # the peer closed: the file is released
                if refused:  # open(2) of a device node the caller may not open: EACCES, for every request
                    try:
                        _, _, fds = transport.parse_request(data, anc, flags)
                    except wire.WireError:  # its descriptors are closed already
                        fds = []
                    await _close(fds)
                    self.requests += 1
                    self.refused[errno.EACCES] = self.refused.get(errno.EACCES, 0) + 1
                    await sock.sendmsg([transport.pack_reply(errno.EACCES)], [], transport.SEND_FLAGS)
                    continue
                await self._one(conn, data, anc, flags)
        except (ConnectionResetError, BrokenPipeError):
            return
        finally:
            self.connections.discard(conn)
            conn.close()
            if not self.iommufd.halted:  # after reboot() nothing is released: the mappings outlive the kernel
                self.guest_maps.release(conn)  # the file's mappings are no longer this connection's
            if conn.on_close is not None:
                with trio.CancelScope(shield=True):
                    await conn.on_close()

    async def _one(self, conn: Connection, data: bytes, anc: list[Any], flags: int) -> None:
        self.requests += 1
        fds: list[int] = []
        code, out, out_fds = 0, b"", []
        try:
            cmd, payload, fds = transport.parse_request(data, anc, flags)
            code, out, out_fds = await self._dispatch(conn, cmd, payload, fds)
        except wire.WireError as exc:
            code = exc.errno
        except StoreError as exc:
            code = exc.errno
            log.debug("pid %d: %s", conn.pid, exc)
        except PkfuseError as exc:  # a structure in the image that fails validation
            code = errno.EIO
            log.error("pid %d: %s", conn.pid, exc)
        finally:
            await _close(fds)
        if code:
            self.refused[code] = self.refused.get(code, 0) + 1
        try:
            await conn.sock.sendmsg([transport.pack_reply(code, out)], transport.scm_rights(out_fds),
                                    transport.SEND_FLAGS)
        finally:
            await _close(out_fds)

    async def _dispatch(self, conn: Connection, cmd: int, payload: bytes, fds: list[int]) -> Reply:
        if self.lu is not None and self.lu.rebooted:
            return errno.ESHUTDOWN, b"", []  # reboot() went through: this kernel is gone
        if conn.device is None:
            if cmd != wire.PKFUSE_OPEN:
                return errno.EBADF, b"", []
            if fds:  # open(2) takes no descriptor
                return errno.EBADF, b"", []
            return await self._open(conn, wire.decode(wire.pkfuse_open, payload))
        if cmd == wire.PKFUSE_OPEN:
            return errno.EBUSY, b"", []
        entry = self._handlers[conn.device].get(cmd)
        if entry is None:
            return errno.ENOTTY, b"", []
        if fds and cmd not in wire.REQUEST_FDS:  # a call that takes no descriptor was sent some
            return errno.EBADF, b"", []
        struct_type, handler = entry
        arg = wire.decode(struct_type, payload)
        wire.check_reserved(arg)
        return await handler(conn, arg, fds)

    async def _open(self, conn: Connection, arg: Any) -> Reply:
        if arg.flags:
            return errno.EOPNOTSUPP, b"", []
        path = wire.cstring(arg.path)
        if path == DEV_IOMMU:
            conn.ctx = self.iommufd.open_context()
        elif path == DEV_LIVEUPDATE:
            if any(c.device == DEV_LIVEUPDATE for c in self.connections):
                return errno.EBUSY, b"", []
        else:
            return errno.ENOENT, b"", []
        conn.device = path
        return 0, wire.respond(arg), []

    # ---------------------------------------------------------- /dev/iommu

    @staticmethod
    def _ctx(conn: Connection) -> Context:
        assert conn.ctx is not None
        return conn.ctx

    async def _destroy(self, conn: Connection, arg: Any, fds: list[int]) -> Reply:
        self._ctx(conn).destroy(arg.id)
        return 0, wire.respond(arg), []

    async def _ioas_alloc(self, conn: Connection, arg: Any, fds: list[int]) -> Reply:
        if arg.flags:
            return errno.EOPNOTSUPP, b"", []
        arg.out_ioas_id = self._ctx(conn).ioas_alloc()
        return 0, wire.respond(arg), []

    async def _ioas_map_file(self, conn: Connection, arg: Any, fds: list[int]) -> Reply:
        F = wire.iommufd_ioas_map_flags
        known = F.IOMMU_IOAS_MAP_FIXED_IOVA | F.IOMMU_IOAS_MAP_WRITEABLE | F.IOMMU_IOAS_MAP_READABLE
        if arg.flags & ~int(known):  # int: ~ of an IntFlag keeps only the bits the enum defines
            return errno.EOPNOTSUPP, b"", []
        readable = bool(arg.flags & F.IOMMU_IOAS_MAP_READABLE)
        writeable = bool(arg.flags & F.IOMMU_IOAS_MAP_WRITEABLE)
        if not (readable or writeable):
            return errno.EINVAL, b"", []
        if writeable and not readable:  # VT-d can, pkfuse's tables cannot: every leaf is readable
            return errno.EOPNOTSUPP, b"", []
        if len(fds) != 1:
            return errno.EBADF, b"", []
        ino, accmode = await self.resolver.inode(fds[0])
        if writeable and accmode == os.O_RDONLY:
            return errno.EACCES, b"", []
        fixed = bool(arg.flags & F.IOMMU_IOAS_MAP_FIXED_IOVA)
        arg.iova = self._ctx(conn).ioas_map_file(arg.ioas_id, ino, arg.start, arg.length,
                                                 arg.iova if fixed else None, writeable=writeable)
        return 0, wire.respond(arg), []

    async def _ioas_unmap(self, conn: Connection, arg: Any, fds: list[int]) -> Reply:
        arg.length = self._ctx(conn).ioas_unmap(arg.ioas_id, arg.iova, arg.length)
        return 0, wire.respond(arg), []

    async def _ioas_iova_ranges(self, conn: Connection, arg: Any, fds: list[int]) -> Reply:
        ranges, align = self._ctx(conn).ioas_iova_ranges(arg.ioas_id)
        capacity = arg.num_iovas
        arg.num_iovas = len(ranges)
        arg.out_iova_alignment = align
        if capacity < len(ranges):  # the kernel copies the count back with EMSGSIZE
            return errno.EMSGSIZE, wire.respond(arg) + wire.encode_iova_ranges(ranges[:capacity]), []
        return 0, wire.respond(arg) + wire.encode_iova_ranges(ranges), []

    async def _option(self, conn: Connection, arg: Any, fds: list[int]) -> Reply:
        arg.val64 = self._ctx(conn).option(arg.option_id, arg.op, arg.object_id, arg.val64)
        return 0, wire.respond(arg), []

    async def _hwpt_alloc(self, conn: Connection, arg: Any, fds: list[int]) -> Reply:
        if arg.flags or arg.data_type:
            return errno.EOPNOTSUPP, b"", []
        if arg.data_len or arg.data_uptr or arg.fault_id:
            return errno.EINVAL, b"", []
        arg.out_hwpt_id = self._ctx(conn).hwpt_alloc(arg.dev_id, arg.pt_id)
        return 0, wire.respond(arg), []

    async def _device_bind(self, conn: Connection, arg: Any, fds: list[int]) -> Reply:
        if arg.flags:  # VFIO answers unknown flags with EINVAL
            return errno.EINVAL, b"", []
        arg.out_devid = self._ctx(conn).device_bind(arg.rid)
        return 0, wire.respond(arg), []

    async def _device_attach(self, conn: Connection, arg: Any, fds: list[int]) -> Reply:
        if arg.flags & ~int(wire.vfio_device_attach_flags.VFIO_DEVICE_ATTACH_PASID):
            return errno.EINVAL, b"", []
        if arg.flags:  # the simulated IOMMU has no PASID tables
            return errno.EOPNOTSUPP, b"", []
        arg.pt_id = self._ctx(conn).device_attach(arg.dev_id, arg.pt_id)
        return 0, wire.respond(arg), []

    async def _device_detach(self, conn: Connection, arg: Any, fds: list[int]) -> Reply:
        if arg.flags & ~int(wire.vfio_device_detach_flags.VFIO_DEVICE_DETACH_PASID):
            return errno.EINVAL, b"", []
        if arg.flags:
            return errno.EOPNOTSUPP, b"", []
        self._ctx(conn).device_detach(arg.dev_id)
        return 0, wire.respond(arg), []

    # ------------------------------------------------------ every connection

    async def _guest_mmap(self, conn: Connection, arg: Any, fds: list[int]) -> Reply:
        if arg.flags:
            return errno.EOPNOTSUPP, b"", []
        if len(fds) != 1:
            return errno.EBADF, b"", []
        ino, accmode = await self.resolver.inode(fds[0])
        mapping = self.guest_maps.mmap(conn, ino, accmode)
        try:
            image, table = _guest_mmap_fds(self.iommufd.store.fileno(), mapping.extents.tobytes())
        except BaseException:
            self.guest_maps.release_one(conn, ino)
            raise
        arg.out_num_extents = mapping.extents.size
        arg.out_length = mapping.length
        arg.out_phys_base = mapping.phys_base
        return 0, wire.respond(arg), [image, table]


_SEALS = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL


def _guest_mmap_fds(image_fd: int, table: bytes) -> tuple[int, int]:
    """GUEST_MMAP's reply descriptors: the image reopened O_RDWR (a file description of the
    caller's own, the same file even if its path changed) and a sealed memfd of ``table``.
    Neither is on our mount, so both are made on the trio thread."""
    image = os.open(f"/proc/self/fd/{image_fd}", os.O_RDWR | os.O_CLOEXEC)
    try:
        memfd = os.memfd_create(wire.PKFUSE_MMAP_EXTENTS_NAME.decode(), os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            view = memoryview(table)
            while view:
                view = view[os.write(memfd, view):]
            fcntl.fcntl(memfd, fcntl.F_ADD_SEALS, _SEALS)
        except BaseException:
            os.close(memfd)
            raise
    except BaseException:
        os.close(image)
        raise
    return image, memfd
