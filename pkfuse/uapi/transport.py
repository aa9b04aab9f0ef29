"""Framing on a connected ``SOCK_SEQPACKET`` socket, shared by the daemon's server and the client.

One datagram is one message; at most ``MAX_MESSAGE`` bytes and
``MAX_FDS`` descriptors (SCM_RIGHTS) each.

- request: ``u32 cmd`` (the ioctl number), then the struct's bytes;
- reply: ``s32 errno`` (0 for success, a positive errno otherwise), then the
  struct as the kernel copies it back (empty on error, except where the
  kernel copies back before failing, see ``pkfuse.uapi.wire``), then any
  trailing array.

Both ends use the same parsing: ``parse_request`` and ``parse_reply`` take
what ``recvmsg`` returned (the blocking ``socket`` one or ``trio.socket``'s,
called with ``RECV_BUFSIZE``, ``RECV_ANCBUFSIZE`` and ``RECV_FLAGS``), and
``pack_request``, ``pack_reply`` and ``scm_rights`` make what ``sendmsg``
takes. The blocking ``send_*``/``recv_*`` wrap them for the client.

Invariants:

- a received descriptor is never leaked: on every error path of a parse
  every descriptor that arrived is closed before the error is raised; on
  success they are the caller's;
- a malformed datagram is a ``WireError`` (an ``OSError`` whose errno the
  reply carries), never the end of the connection; the end of the
  connection is ``ConnectionClosed`` and nothing else.

End of file: on ``SOCK_SEQPACKET`` both a peer's close and an empty datagram
read as zero bytes. ``at_eof`` tells them apart by the socket's RDHUP state,
which the peer's close sets.
"""

from __future__ import annotations

import array
import errno
import os
import select
import socket
import struct
from collections.abc import Iterable, Sequence
from typing import Protocol

from pkfuse.uapi.wire import WireError

MAX_MESSAGE = 4096  #: bytes of one datagram, header included
MAX_FDS = 4  #: descriptors one datagram may carry

_HEADER = struct.Struct("<I")  # request: the ioctl number
_REPLY_HEADER = struct.Struct("<i")  # reply: the errno
_FD_SIZE = array.array("i").itemsize

RECV_BUFSIZE = MAX_MESSAGE  #: recvmsg's bufsize: a longer datagram comes back with MSG_TRUNC
RECV_ANCBUFSIZE = socket.CMSG_SPACE(MAX_FDS * _FD_SIZE)  #: room for MAX_FDS descriptors; more sets MSG_CTRUNC
RECV_FLAGS = socket.MSG_CMSG_CLOEXEC  #: received descriptors are close-on-exec
SEND_FLAGS = socket.MSG_NOSIGNAL  #: a closed peer is EPIPE, never SIGPIPE

Ancdata = list[tuple[int, int, bytes]]


class ConnectionClosed(ConnectionError):
    """The peer closed the connection (end of file), as distinct from any malformed datagram."""


class _HasFileno(Protocol):
    def fileno(self) -> int: ...


# --------------------------------------------------------------------------
# Pure helpers: what the trio server and the blocking client share
# --------------------------------------------------------------------------


def scm_rights(fds: Sequence[int]) -> Ancdata:
    """The ``sendmsg`` ancillary data passing ``fds`` (none: an empty list)."""
    if not fds:
        return []
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]


def _check_outgoing(data: bytes, fds: Sequence[int]) -> None:
    # Refuse locally with the errno the receiver would answer, so a caller
    # sees the same error whichever end found it.
    if len(data) > MAX_MESSAGE:
        raise WireError(errno.EMSGSIZE, f"{len(data)} bytes > {MAX_MESSAGE}")
    if len(fds) > MAX_FDS:
        raise WireError(errno.EBADF, f"{len(fds)} descriptors > {MAX_FDS}")


def pack_request(cmd: int, payload: bytes) -> bytes:
    """A request datagram: ``u32 cmd`` then the struct. ``WireError(EMSGSIZE)`` if over ``MAX_MESSAGE``."""
    data = _HEADER.pack(cmd) + payload
    _check_outgoing(data, ())
    return data


def pack_reply(err: int, payload: bytes = b"") -> bytes:
    """A reply datagram: ``s32 errno`` (0 = success) then the struct and any array."""
    data = _REPLY_HEADER.pack(err) + payload
    _check_outgoing(data, ())
    return data


def close_fds(fds: Iterable[int]) -> None:
    """Close every descriptor in ``fds``, each once, ignoring ones already closed."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _take_fds(ancdata: Ancdata) -> list[int]:
    """Every descriptor SCM_RIGHTS delivered, including those of a truncated control message."""
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            # A truncated message may end mid-descriptor: keep the whole ones
            # (the kernel installed exactly those).
            whole = len(data) - len(data) % _FD_SIZE
            fds.extend(array.array("i", data[:whole]))
    return fds


def _parse(data: bytes, ancdata: Ancdata, msg_flags: int, header: struct.Struct) -> tuple[int, bytes, list[int]]:
    fds = _take_fds(ancdata)
    try:
        if msg_flags & socket.MSG_TRUNC:
            raise WireError(errno.EMSGSIZE, f"datagram larger than {MAX_MESSAGE} bytes")
        if msg_flags & socket.MSG_CTRUNC or len(fds) > MAX_FDS:
            raise WireError(errno.EBADF, f"more than {MAX_FDS} descriptors")
        if len(data) < header.size:
            raise WireError(errno.EINVAL, f"{len(data)} bytes, shorter than a header")
    except WireError:
        close_fds(fds)
        raise
    (word,) = header.unpack_from(data)
    return word, bytes(data[header.size :]), fds


def parse_request(data: bytes, ancdata: Ancdata, msg_flags: int) -> tuple[int, bytes, list[int]]:
    """``(cmd, payload, fds)`` from what ``recvmsg`` returned; the fds become the caller's.

    ``WireError``: EMSGSIZE for a datagram over ``MAX_MESSAGE`` (MSG_TRUNC),
    EBADF for more than ``MAX_FDS`` descriptors (MSG_CTRUNC), EINVAL for
    fewer than 4 bytes; every descriptor that arrived is closed first. Call
    ``at_eof`` before this: end of file is not a datagram.
    """
    return _parse(data, ancdata, msg_flags, _HEADER)


def parse_reply(data: bytes, ancdata: Ancdata, msg_flags: int) -> tuple[int, bytes, list[int]]:
    """``(errno, payload, fds)`` from what ``recvmsg`` returned, with ``parse_request``'s errors."""
    return _parse(data, ancdata, msg_flags, _REPLY_HEADER)


def peer_closed(sock: _HasFileno) -> bool:
    """Whether the peer has closed its end (POLLRDHUP/POLLHUP); never blocks."""
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN | select.POLLRDHUP)
    return any(events & (select.POLLRDHUP | select.POLLHUP) for _, events in poller.poll(0))


def at_eof(sock: _HasFileno, data: bytes, ancdata: Ancdata) -> bool:
    """Whether a ``recvmsg`` result is the end of the connection rather than an (empty) datagram."""
    return not data and not ancdata and peer_closed(sock)


# --------------------------------------------------------------------------
# Blocking socket functions (the client's)
# --------------------------------------------------------------------------


def _send(sock: socket.socket, data: bytes, fds: Sequence[int]) -> None:
    _check_outgoing(data, fds)
    try:
        sock.sendmsg([data], scm_rights(fds), SEND_FLAGS)
    except (BrokenPipeError, ConnectionResetError) as e:
        raise ConnectionClosed(e.errno, "peer closed the connection") from e


def _recv(sock: socket.socket) -> tuple[bytes, Ancdata, int]:
    try:
        data, ancdata, msg_flags, _ = sock.recvmsg(RECV_BUFSIZE, RECV_ANCBUFSIZE, RECV_FLAGS)
    except ConnectionResetError as e:
        raise ConnectionClosed(e.errno, "peer closed the connection") from e
    if at_eof(sock, data, ancdata):
        raise ConnectionClosed("peer closed the connection")
    return data, ancdata, msg_flags


def send_request(sock: socket.socket, cmd: int, payload: bytes, fds: Sequence[int] = ()) -> None:
    """Send one request; ``fds`` stay the caller's (the peer gets duplicates)."""
    _send(sock, pack_request(cmd, payload), fds)


def recv_request(sock: socket.socket) -> tuple[int, bytes, list[int]]:
    """Receive one request: ``(cmd, payload, fds)``; ``WireError`` as ``parse_request``, or ``ConnectionClosed``."""
    return parse_request(*_recv(sock))


def send_reply(sock: socket.socket, err: int, payload: bytes = b"", fds: Sequence[int] = ()) -> None:
    """Send one reply; ``fds`` stay the caller's (the peer gets duplicates)."""
    _send(sock, pack_reply(err, payload), fds)


def recv_reply(sock: socket.socket) -> tuple[int, bytes, list[int]]:
    """Receive one reply: ``(errno, payload, fds)``; ``WireError`` as ``parse_reply``, or ``ConnectionClosed``."""
    return parse_reply(*_recv(sock))
