"""pkfuse's own calls on ``/dev/iommu``: the offline ``pkfuse iommu`` commands, served live.

``PKFUSE_DOMAIN_*`` (``pkfuse.uapi.wire``, whose section states the protocol)
program the daemon's live ``Iommu`` (``backing.iommu``) exactly as
``pkfuse iommu create|destroy|copy|map|unmap|attach|detach`` program an
unmounted image: the same library calls in the same order, so the same checks,
errnos and messages. Those domains are the kernel's, named by DID; the
connection that made them holds nothing.

What the live kernel adds is the claims of its other users: a domain a HWPT
uses, a destroyed HWPT's domain waiting out its grace period, or a domain
live update restored and no HWPT reclaimed yet (``LiveUpdate.holds``) is
EBUSY for everything that would change it or its requesters (copy only reads
it); attach is EBUSY for a requester an iommufd context has bound or one
attached to such a domain. The owners are found by walking
``iommufd.contexts`` and their objects, read-only.

A refusal's one-line reason is kept per connection until the next domain
call or until ``PKFUSE_LAST_ERROR`` reads it, and logged at INFO with the
caller's pid; so is each change made (an audit trail of who changed the
kernel's domains). Calls run on the trio thread under ``store.lock``, as
control.py's do; destroy sleeps out the grace period with ``trio.sleep``,
never holding the lock.
"""

from __future__ import annotations

import errno
import logging
import weakref
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import trio

from backing import format as fmt
from backing.errors import PkfuseError, StoreError
from backing.iommufd import Hwpt
from pkfuse.uapi import wire

if TYPE_CHECKING:
    from backing.iommu import Domain, Iommu
    from backing.iommufd import Context
    from backing.store import Store

    from .control import Connection, ControlServer

log = logging.getLogger(__name__)

Reply = tuple[int, bytes, list[int]]
Handler = Callable[["Connection", Any, list[int]], Awaitable[Reply]]

_NAMES = {  # the pkfuse iommu command each call stands for, for the log
    wire.PKFUSE_DOMAIN_CREATE: "create", wire.PKFUSE_DOMAIN_DESTROY: "destroy", wire.PKFUSE_DOMAIN_COPY: "copy",
    wire.PKFUSE_DOMAIN_MAP: "map", wire.PKFUSE_DOMAIN_MAP_FILE: "map --file", wire.PKFUSE_DOMAIN_UNMAP: "unmap",
    wire.PKFUSE_DOMAIN_ATTACH: "attach", wire.PKFUSE_DOMAIN_DETACH: "detach",
}
# plain ints: ~ of an IntFlag member inverts only within the enum's own bits (~1 is 0 here), which
# would let every unknown bit through the flags check
_MAP_WRITE = int(wire.pkfuse_domain_map_flags.PKFUSE_DOMAIN_MAP_WRITEABLE)
_ATTACH_REPLACE = int(wire.pkfuse_domain_attach_flags.PKFUSE_DOMAIN_ATTACH_REPLACE)


def handlers(server: ControlServer) -> dict[int, tuple[type, Any]]:
    """The (struct, handler) of each pkfuse-specific command number on ``/dev/iommu``."""
    calls = DomainCalls(server)
    table: dict[int, tuple[type, Handler]] = {
        wire.PKFUSE_DOMAIN_CREATE: (wire.pkfuse_domain_create, calls.create),
        wire.PKFUSE_DOMAIN_DESTROY: (wire.pkfuse_domain_destroy, calls.destroy),
        wire.PKFUSE_DOMAIN_COPY: (wire.pkfuse_domain_copy, calls.copy),
        wire.PKFUSE_DOMAIN_MAP: (wire.pkfuse_domain_map, calls.map),
        wire.PKFUSE_DOMAIN_MAP_FILE: (wire.pkfuse_domain_map_file, calls.map_file),
        wire.PKFUSE_DOMAIN_UNMAP: (wire.pkfuse_domain_unmap, calls.unmap),
        wire.PKFUSE_DOMAIN_ATTACH: (wire.pkfuse_domain_attach, calls.attach),
        wire.PKFUSE_DOMAIN_DETACH: (wire.pkfuse_domain_detach, calls.detach),
    }
    out: dict[int, tuple[type, Any]] = {cmd: (st, calls.recorded(cmd, h)) for cmd, (st, h) in table.items()}
    out[wire.PKFUSE_LAST_ERROR] = (wire.pkfuse_last_error, calls.last_error)
    assert set(out) == set(wire.PKFUSE_DOMAIN_REQUESTS)
    return out


def lookup_path(store: Store, path: bytes) -> int:
    """The inode of ``path`` relative to the image's root: the walk ``pkfuse iommu map --file`` makes."""
    ino = fmt.ROOT_INO
    for part in path.strip(b"/").split(b"/"):
        if part:
            ino = store.lookup(ino, part)
    return ino


def _message(exc: PkfuseError) -> tuple[int, str]:
    """The errno a refusal's reply carries (control.py's rule) and its reason, one line."""
    if isinstance(exc, StoreError):
        return exc.errno, exc.message.splitlines()[0] if exc.message else ""
    text = str(exc)
    return errno.EIO, text.splitlines()[0] if text else type(exc).__name__


def _fits(message: str) -> bytes:
    """``message`` in at most 255 bytes of UTF-8, cut at a character boundary."""
    raw = message.encode()[: wire.PKFUSE_ERROR_MESSAGE_LENGTH - 1]
    return raw.decode(errors="ignore").encode()


class DomainCalls:
    """The handlers, and the last refusal's reason of each connection."""

    def __init__(self, server: ControlServer) -> None:
        self.server = server
        self._errors: weakref.WeakKeyDictionary[Connection, tuple[int, int, str]] = weakref.WeakKeyDictionary()

    @property
    def iommu(self) -> Iommu:
        return self.server.iommufd.iommu

    def recorded(self, cmd: int, handler: Handler) -> Handler:
        """``handler`` keeping its refusal's reason for PKFUSE_LAST_ERROR (and the log)."""

        async def call(conn: Connection, arg: Any, fds: list[int]) -> Reply:
            self._errors.pop(conn, None)
            try:
                return await handler(conn, arg, fds)
            except PkfuseError as exc:
                code, reason = _message(exc)
                self._errors[conn] = (cmd, code, reason)
                log.info("pid %d: pkfuse iommu %s refused: %s: %s", conn.pid, _NAMES[cmd],
                         errno.errorcode.get(code, code), reason)
                raise

        return call

    async def last_error(self, conn: Connection, arg: Any, fds: list[int]) -> Reply:
        if arg.flags:
            return errno.EOPNOTSUPP, b"", []
        got = self._errors.pop(conn, None)
        if got is None:
            return errno.ENODATA, b"", []
        arg.out_cmd, arg.out_errno = got[0], got[1]
        raw = _fits(got[2])
        arg.out_message[: len(raw)] = raw
        return 0, wire.respond(arg), []

    # ------------------------------------------------------------- owners

    def _pids(self) -> dict[Context, int]:
        return {c.ctx: c.pid for c in self.server.connections if c.ctx is not None}

    def _whose(self, ctx: Context) -> str:
        pid = self._pids().get(ctx)
        if pid is not None:
            return f"pid {pid}"
        return "a closed file (kept by live update)" if ctx.closed else "an unknown pid"

    def _owner(self, domain: Domain) -> str | None:
        """Who besides the kernel's own calls holds ``domain``, in words; None if nobody does."""
        fd = self.server.iommufd
        for ctx in fd.contexts:
            for obj in ctx.objects.values():
                if isinstance(obj, Hwpt) and obj.domain is domain:
                    return f"owned by iommufd HWPT {obj.id} of {self._whose(ctx)}"
        if any(d is domain for d in fd.dying):
            return "a destroyed iommufd HWPT's, freed once its grace period has passed"
        holds = getattr(fd.lu, "holds", None)  # backing.liveupdate.LiveUpdate, when served
        if holds is not None and holds(domain.domain_id):
            return "restored by live update and not reclaimed yet (its session is not finished)"
        return None

    def _unowned(self, domain: Domain) -> None:
        """EBUSY if iommufd (a HWPT, a dying HWPT's domain) or live update holds ``domain``."""
        owner = self._owner(domain)
        if owner is not None:
            raise StoreError(errno.EBUSY, f"domain {domain.domain_id} is {owner}")

    def _unbound(self, rid: int) -> None:
        """EBUSY if an iommufd context has bound requester ``rid`` (its DMA is that context's to program),
        or if its current domain is held (``_owner``)."""
        cur = self.iommu.domains.get(self.iommu.attached.get(rid, 0))
        owner = self._owner(cur) if cur is not None else None
        if owner is not None:  # a --replace would take it from under its owner
            raise StoreError(errno.EBUSY, f"requester {fmt.requester_name(rid)} is attached to domain "
                                          f"{cur.domain_id}, which is {owner}")
        ctx = self.server.iommufd.bound.get(rid)
        if ctx is None:
            return
        dev = next((o.id for o in ctx.objects.values() if getattr(o, "rid", None) == rid), "?")
        raise StoreError(errno.EBUSY, f"requester {fmt.requester_name(rid)} is bound to iommufd (device {dev} of "
                                      f"{self._whose(ctx)})")

    def _domain(self, domain_id: int, *, owned_ok: bool = False) -> Domain:
        d = self.iommu.domain(domain_id)  # ENOENT "no IOMMU domain N", as offline
        if not owned_ok:
            self._unowned(d)
        return d

    @staticmethod
    def _flags(arg: Any, known: int = 0) -> None:
        known = int(known)
        if arg.flags & ~known:
            raise StoreError(errno.EOPNOTSUPP, f"{type(arg).__name__}: unknown flags {arg.flags & ~known:#x}")

    @staticmethod
    def _bdf(rid: int) -> tuple[int, int, int]:
        if rid > 0xFFFF:
            raise StoreError(errno.EINVAL, f"requester id {rid:#x} is not 16 bits")
        return rid >> 8, (rid >> 3) & 0x1F, rid & 7

    # ------------------------------------------------------------ handlers
    # Each makes the library calls of its offline command (pkfuse/cli/iommu.py), in its order.

    async def create(self, conn: Connection, arg: Any, fds: list[int]) -> Reply:
        self._flags(arg)
        d = self.iommu.create_domain(arg.domain_id or None)
        arg.domain_id = d.domain_id
        log.info("pid %d: pkfuse iommu create: %s", conn.pid, d.path)
        return 0, wire.respond(arg), []

    async def destroy(self, conn: Connection, arg: Any, fds: list[int]) -> Reply:
        self._flags(arg)
        io = self.iommu
        d = self._domain(arg.domain_id)
        # Iommu.destroy_domain, with the grace period slept on trio: other calls go on meanwhile,
        # and each try re-checks the domain (EBUSY attached again, ENOENT destroyed meanwhile)
        while (wait := io.try_destroy_domain(d)) > 0:
            await trio.sleep(wait)
            self._unowned(d)
        log.info("pid %d: pkfuse iommu destroy: %s", conn.pid, d.path)
        return 0, wire.respond(arg), []

    async def copy(self, conn: Connection, arg: Any, fds: list[int]) -> Reply:
        self._flags(arg)
        io = self.iommu
        dst = io.copy_domain(self._domain(arg.src_domain_id, owned_ok=True), arg.domain_id or None)
        arg.domain_id = dst.domain_id
        log.info("pid %d: pkfuse iommu copy: %s from dom-%d", conn.pid, dst.path, arg.src_domain_id)
        return 0, wire.respond(arg), []

    async def map(self, conn: Connection, arg: Any, fds: list[int]) -> Reply:
        self._flags(arg, _MAP_WRITE)
        d = self._domain(arg.domain_id)
        d.map(arg.iova, arg.phys_addr, arg.length, write=bool(arg.flags & _MAP_WRITE))
        log.info("pid %d: pkfuse iommu map: %s %#x+%#x -> %#x", conn.pid, d.path, arg.iova, arg.length,
                 arg.phys_addr)
        return 0, wire.respond(arg), []

    async def map_file(self, conn: Connection, arg: Any, fds: list[int]) -> Reply:
        self._flags(arg, _MAP_WRITE)
        d = self._domain(arg.domain_id)
        path = wire.cstring(arg.path)
        ino = lookup_path(self.iommu.store, path)
        d.map_file(ino, arg.offset, arg.length, arg.iova, write=bool(arg.flags & _MAP_WRITE))
        log.info("pid %d: pkfuse iommu map: %s %#x+%#x -> %s+%#x", conn.pid, d.path, arg.iova, arg.length,
                 path.decode(errors="backslashreplace"), arg.offset)
        return 0, wire.respond(arg), []

    async def unmap(self, conn: Connection, arg: Any, fds: list[int]) -> Reply:
        self._flags(arg)
        d = self._domain(arg.domain_id)
        arg.length = d.unmap(arg.iova, arg.length)
        log.info("pid %d: pkfuse iommu unmap: %s %#x, %#x bytes", conn.pid, d.path, arg.iova, arg.length)
        return 0, wire.respond(arg), []

    async def attach(self, conn: Connection, arg: Any, fds: list[int]) -> Reply:
        self._flags(arg, _ATTACH_REPLACE)
        bus, dev, fn = self._bdf(arg.rid)
        d = self._domain(arg.domain_id)
        self._unbound(arg.rid)
        d.attach(bus, dev, fn, replace=bool(arg.flags & _ATTACH_REPLACE))
        log.info("pid %d: pkfuse iommu attach: %s %s", conn.pid, d.path, fmt.requester_name(arg.rid))
        return 0, wire.respond(arg), []

    async def detach(self, conn: Connection, arg: Any, fds: list[int]) -> Reply:
        self._flags(arg)
        bus, dev, fn = self._bdf(arg.rid)
        d = self._domain(arg.domain_id)
        d.detach(bus, dev, fn)
        log.info("pid %d: pkfuse iommu detach: %s %s", conn.pid, d.path, fmt.requester_name(arg.rid))
        return 0, wire.respond(arg), []
