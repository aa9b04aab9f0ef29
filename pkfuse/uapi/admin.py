"""pkfuse's own ``/dev/iommu`` calls: the kernel-owned domains of ``pkfuse iommu``, on a live daemon.

``IommuAdmin`` is an open ``/dev/iommu`` (a connection of its own, made with
the helpers of ``pkfuse.uapi.client``) with one method per ``PKFUSE_DOMAIN_*``
call of ``pkfuse.uapi.wire``, named after it. Domains are named by DID and
belong to the kernel, not to this connection: closing it releases none of
them.

A refused call raises ``OSError(errno, reason)``: ``reason`` is the daemon's
one-line account of which check refused (``PKFUSE_LAST_ERROR``, asked right
after the refusal on the same connection), or ``os.strerror(errno)`` when it
left none (a struct the daemon could not read, a daemon that keeps no
messages). Values too wide for their fields are ``OverflowError`` before
anything is sent, as in ``client``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
from types import TracebackType
from typing import Any

from pkfuse.uapi import wire
from pkfuse.uapi.client import ConnectionClosed, _Connection, _open_device, parse_rid
from pkfuse.uapi.transport import MAX_MESSAGE

__all__ = ["IommuAdmin"]

RELEASE_TIMEOUT = 5.0  #: seconds ``release`` waits for the daemon to close its end


class IommuAdmin(_Connection):
    """An open ``/dev/iommu`` used for pkfuse's domain calls.

    ``mountpoint_or_socket``: a pkfuse mountpoint (its status file names the
    control socket) or the control socket itself. DIDs are ``iommu/dom-<DID>``'s;
    IOVAs, addresses, offsets and lengths are bytes. ``with`` ends in
    ``release``: the daemon has dropped the connection's (empty) iommufd
    context when the block is left.
    """

    def __init__(self, mountpoint_or_socket: str | os.PathLike[str]) -> None:
        super().__init__(_open_device(mountpoint_or_socket))
        self._open(wire.DEV_IOMMU)

    def __enter__(self) -> IommuAdmin:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.release()

    def release(self, timeout: float = RELEASE_TIMEOUT) -> None:
        """Close the file and wait (up to ``timeout`` seconds) until the daemon has released it.

        ``close`` returns before the daemon reads the end of the connection;
        here our end is shut for writing first and we read until the daemon
        closes its own, which it does after releasing what the file held.
        So a ``.pkernfs/iommu`` read afterwards no longer lists this
        connection's context. Idempotent.
        """
        if self.closed:
            return
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_WR)
            self._sock.settimeout(timeout)
            while self._sock.recv(MAX_MESSAGE):
                pass  # the daemon sends nothing unasked; b"" is its close
        self.close()

    # ---------------------------------------------------------------- calls

    def _admin(self, cmd: int, request: Any) -> Any:
        try:
            out, _, _ = self._call(cmd, request)
        except ConnectionClosed:
            raise
        except OSError as exc:
            if exc.errno in (None, errno.EPROTO):  # the reply broke the protocol: no reason to ask for
                raise
            reason = self._reason(cmd, exc.errno)
            if reason is None:
                raise
            raise OSError(exc.errno, reason) from None
        return out

    def _reason(self, cmd: int, err: int) -> str | None:
        """The daemon's message for the refusal of ``cmd`` with ``err`` just now, if it left one."""
        try:
            got = self.last_error()
        except ConnectionClosed:
            raise
        except OSError:
            return None
        if got is None or got[0] != cmd or got[1] != err:
            return None
        return got[2]

    def last_error(self) -> tuple[int, int, str] | None:
        """PKFUSE_LAST_ERROR: ``(cmd, errno, message)`` of the last refused domain call, read once; or None."""
        try:
            out, _, _ = self._call(wire.PKFUSE_LAST_ERROR, wire.new(wire.pkfuse_last_error))
        except OSError as exc:
            if exc.errno == errno.ENODATA and not isinstance(exc, ConnectionClosed):
                return None
            raise
        return out.out_cmd, out.out_errno, wire.cstring(out.out_message).decode(errors="replace")

    def domain_create(self, domain_id: int = 0) -> int:
        """PKFUSE_DOMAIN_CREATE: an empty domain; ``domain_id`` 0 takes the smallest free DID. Returns the DID."""
        out = self._admin(wire.PKFUSE_DOMAIN_CREATE, wire.new(wire.pkfuse_domain_create, domain_id=domain_id))
        return out.domain_id

    def domain_destroy(self, domain_id: int) -> None:
        """PKFUSE_DOMAIN_DESTROY: free a detached domain (returns after its grace period)."""
        self._admin(wire.PKFUSE_DOMAIN_DESTROY, wire.new(wire.pkfuse_domain_destroy, domain_id=domain_id))

    def domain_copy(self, src_domain_id: int, domain_id: int = 0) -> int:
        """PKFUSE_DOMAIN_COPY: a new domain translating as ``src_domain_id``; returns the copy's DID."""
        out = self._admin(wire.PKFUSE_DOMAIN_COPY, wire.new(wire.pkfuse_domain_copy, src_domain_id=src_domain_id,
                                                            domain_id=domain_id))
        return out.domain_id

    @staticmethod
    def _map_flags(writeable: bool) -> int:
        return int(wire.pkfuse_domain_map_flags.PKFUSE_DOMAIN_MAP_WRITEABLE) if writeable else 0

    def domain_map(self, domain_id: int, iova: int, phys_addr: int, length: int, *, writeable: bool = True) -> None:
        """PKFUSE_DOMAIN_MAP: map ``[iova, iova + length)`` to physical ``phys_addr`` (guest RAM only)."""
        self._admin(wire.PKFUSE_DOMAIN_MAP, wire.new(wire.pkfuse_domain_map, flags=self._map_flags(writeable),
                                                     domain_id=domain_id, iova=iova, phys_addr=phys_addr,
                                                     length=length))

    def domain_map_file(self, domain_id: int, path: str | bytes, offset: int, length: int, iova: int, *,
                        writeable: bool = True) -> None:
        """PKFUSE_DOMAIN_MAP_FILE: map ``length`` bytes of the guest file at ``path`` (relative to the
        image's root) from byte ``offset``, at ``iova``. A path of 1024 bytes or more is ``ValueError``."""
        raw = os.fsencode(path)
        if b"\0" in raw:
            raise ValueError("a path cannot contain NUL")
        self._admin(wire.PKFUSE_DOMAIN_MAP_FILE, wire.new(wire.pkfuse_domain_map_file, flags=self._map_flags(writeable),
                                                          domain_id=domain_id, iova=iova, offset=offset,
                                                          length=length, path=raw))

    def domain_unmap(self, domain_id: int, iova: int, length: int) -> int:
        """PKFUSE_DOMAIN_UNMAP: unmap ``[iova, iova + length)``; returns the bytes that were mapped."""
        out = self._admin(wire.PKFUSE_DOMAIN_UNMAP, wire.new(wire.pkfuse_domain_unmap, domain_id=domain_id,
                                                             iova=iova, length=length))
        return out.length

    def domain_attach(self, domain_id: int, rid: str | int, *, replace: bool = False) -> None:
        """PKFUSE_DOMAIN_ATTACH: point requester ``rid`` ('bb:dd.f' or int) at the domain."""
        flags = int(wire.pkfuse_domain_attach_flags.PKFUSE_DOMAIN_ATTACH_REPLACE) if replace else 0
        self._admin(wire.PKFUSE_DOMAIN_ATTACH, wire.new(wire.pkfuse_domain_attach, flags=flags, domain_id=domain_id,
                                                        rid=parse_rid(rid)))

    def domain_detach(self, domain_id: int, rid: str | int) -> None:
        """PKFUSE_DOMAIN_DETACH: clear requester ``rid``'s context entry (it must be attached to the domain)."""
        self._admin(wire.PKFUSE_DOMAIN_DETACH, wire.new(wire.pkfuse_domain_detach, domain_id=domain_id,
                                                        rid=parse_rid(rid)))
