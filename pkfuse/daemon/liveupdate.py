"""The ``/dev/liveupdate`` calls and session fds of the control socket (the LUO's uAPI).

The kernel logic is ``backing.liveupdate``; this module decodes the calls,
makes and recognises session fds, and opens retrieved files.

A session fd is one end of a ``socketpair``: the daemon serves the other end
as a connection of its own (device ``session``), so the session's calls
(PRESERVE_FD, RETRIEVE_FD, FINISH) are requests on it and closing every
copy of it is closing the session -- an outgoing session is cancelled, a
retrieved one finished if it can be. IOMMU_HWPT_LU_SET_PRESERVE names its
session by sending that fd back; the daemon knows it by the device and inode
number of the client's end (taken with ``fstat`` before it was sent), and
only a socket qualifies: a file elsewhere with the same inode number names
no session. The ``fstat`` of what a client sends runs in a worker thread, as
every descriptor a client passes is resolved (``control.FileResolver``): a
file on our own mount would make it a FUSE request to this very thread.

A retrieved file is opened by the daemon on its own mount (in a worker
thread: the open is a FUSE request to this very daemon), once per session
and token; a second RETRIEVE_FD sends the same open file again.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
from typing import TYPE_CHECKING, Any

import trio

from backing.errors import StoreError
from backing.liveupdate import IncomingSession, LiveUpdate, OutgoingSession
from pkfuse.uapi import wire

if TYPE_CHECKING:
    from .control import Connection, ControlServer, Reply

DEV_SESSION = b"session"  #: the device of a session fd's connection (no PKFUSE_OPEN: it is born open)


class LiveUpdateCalls:
    """The handlers, bound to one server and its ``LiveUpdate``."""

    def __init__(self, server: ControlServer, lu: LiveUpdate) -> None:
        self.server = server
        self.lu = lu
        #: the client end's (st_dev, st_ino) -> its session
        self._by_ino: dict[tuple[int, int], OutgoingSession | IncomingSession] = {}
        self._files: dict[tuple[int, int], int] = {}  #: (id(session), token) -> the daemon's open fd

    def handlers(self) -> dict[bytes, dict[int, tuple[type, Any]]]:
        return {
            wire.DEV_LIVEUPDATE: {
                wire.LIVEUPDATE_IOCTL_CREATE_SESSION: (wire.liveupdate_ioctl_create_session, self._create),
                wire.LIVEUPDATE_IOCTL_RETRIEVE_SESSION: (wire.liveupdate_ioctl_retrieve_session, self._retrieve),
                wire.PKFUSE_REBOOT: (wire.pkfuse_reboot, self._reboot),
            },
            DEV_SESSION: {
                wire.LIVEUPDATE_SESSION_PRESERVE_FD: (wire.liveupdate_session_preserve_fd, self._preserve_fd),
                wire.LIVEUPDATE_SESSION_RETRIEVE_FD: (wire.liveupdate_session_retrieve_fd, self._retrieve_fd),
                wire.LIVEUPDATE_SESSION_FINISH: (wire.liveupdate_session_finish, self._finish),
            },
        }

    def iommu_handlers(self) -> dict[int, tuple[type, Any]]:
        return {wire.IOMMU_HWPT_LU_SET_PRESERVE: (wire.iommu_hwpt_lu_set_preserve, self._hwpt_preserve)}

    # ------------------------------------------------------ session fds

    def _session_fd(self, session: OutgoingSession | IncomingSession) -> int:
        """A new session fd for the client; the daemon serves the other end."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.setblocking(False)
        st = os.fstat(theirs.fileno())  # a socket: no FUSE request
        key = (st.st_dev, st.st_ino)
        self._by_ino[key] = session
        self.server.serve_connection(ours, DEV_SESSION, session=session, on_close=lambda: self._closed(key))
        return theirs.detach()  # sent with the reply, then closed: the client holds the only copy

    async def _closed(self, key: tuple[int, int]) -> None:
        session = self._by_ino.pop(key, None)
        if session is None:
            return
        self.lu.close_session(session)
        if isinstance(session, IncomingSession) and self.lu.incoming.get(session.name) is not session:
            await self._drop_files(session)

    async def _drop_files(self, session: IncomingSession) -> None:
        keys = [k for k in self._files if k[0] == id(session)]
        fds = [self._files.pop(k) for k in keys]
        if fds:  # files on our own mount: closing sends FLUSH, answered by the trio thread
            await trio.to_thread.run_sync(lambda: [os.close(fd) for fd in fds])

    async def _session_of(self, fds: list[int]) -> OutgoingSession | IncomingSession:
        if len(fds) != 1:
            raise StoreError(errno.EBADF, "send the session fd with the call")
        try:  # off the trio thread: the descriptor may be a file on our own mount
            st = await trio.to_thread.run_sync(os.fstat, fds[0])
        except OSError as exc:
            raise StoreError(errno.EBADF, str(exc)) from None
        s = self._by_ino.get((st.st_dev, st.st_ino)) if stat.S_ISSOCK(st.st_mode) else None
        if s is None:
            raise StoreError(errno.EBADF, "the descriptor is not a live-update session")
        return s

    # ------------------------------------------------- /dev/liveupdate

    async def _create(self, conn: Connection, arg: Any, fds: list[int]) -> Reply:
        s = self.lu.create_session(wire.cstring(arg.name))
        fd = self._session_fd(s)
        arg.fd = fd
        return 0, wire.respond(arg), [fd]

    async def _retrieve(self, conn: Connection, arg: Any, fds: list[int]) -> Reply:
        s = self.lu.retrieve_session(wire.cstring(arg.name))
        fd = self._session_fd(s)
        arg.fd = fd
        return 0, wire.respond(arg), [fd]

    async def _reboot(self, conn: Connection, arg: Any, fds: list[int]) -> Reply:
        if arg.flags:
            return errno.EOPNOTSUPP, b"", []
        self.lu.reboot()
        return 0, wire.respond(arg), []

    # ------------------------------------------------------ session fd

    @staticmethod
    def _session(conn: Connection) -> OutgoingSession | IncomingSession:
        assert conn.session is not None
        return conn.session

    async def _preserve_fd(self, conn: Connection, arg: Any, fds: list[int]) -> Reply:
        s = self._session(conn)
        if len(fds) != 1:
            return errno.EBADF, b"", []
        if not isinstance(s, OutgoingSession):
            return errno.EINVAL, b"", []  # a retrieved session preserves nothing more
        ino, _ = await self.server.resolver.inode(fds[0])
        self.lu.preserve_file(s, ino, arg.token)
        return 0, wire.respond(arg), []

    async def _retrieve_fd(self, conn: Connection, arg: Any, fds: list[int]) -> Reply:
        s = self._session(conn)
        if not isinstance(s, IncomingSession):
            return errno.ENOENT, b"", []
        f = self.lu.retrieve_file(s, arg.token)
        key = (id(s), arg.token)
        fd = self._files.get(key)
        if fd is None:
            fd = await self.server.resolver.open_inode(f.ino)
            self._files[key] = fd
        out = os.dup(fd)  # the reply's copy is closed after sending; ours stays: the same file next time
        arg.fd = out
        return 0, wire.respond(arg), [out]

    async def _finish(self, conn: Connection, arg: Any, fds: list[int]) -> Reply:
        s = self._session(conn)
        if not isinstance(s, IncomingSession):
            return errno.EINVAL, b"", []  # an outgoing session finishes after the reboot
        self.lu.finish(s)
        await self._drop_files(s)
        return 0, wire.respond(arg), []

    # ------------------------------------------------------ /dev/iommu

    async def _hwpt_preserve(self, conn: Connection, arg: Any, fds: list[int]) -> Reply:
        s = await self._session_of(fds)
        if not isinstance(s, OutgoingSession):
            return errno.EINVAL, b"", []
        assert conn.ctx is not None
        self.lu.preserve_hwpt(s, conn.ctx, arg.hwpt_id, arg.hwpt_token)
        return 0, wire.respond(arg), []
