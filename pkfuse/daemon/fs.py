"""The pyfuse3 Operations class: an open ``backing.Store`` served as a filesystem.

This module is only the request handlers; mounting, signals and the daemon
live in ``pkfuse/mount.py``, the text views and xattrs in ``pkfuse/views.py``.

Inodes
    FUSE inode numbers are the image's inode numbers (``ROOT_INO`` = 1 =
    ``pyfuse3.ROOT_INODE``); the generation is the record's ``igen``, so a
    reused record is a different inode to the kernel. The read-only
    ``/.pkernfs`` directory and its files use fixed numbers from
    ``VIEW_INO_BASE`` = 2**32 on: image inode numbers are 32-bit, so the two
    ranges never meet.

Lookup counts
    Every successful lookup, create, mkdir and readdirplus entry adds one to
    the inode's count; ``forget`` subtracts. A file unlinked (or renamed
    over) while the kernel still knows it or a handle is open becomes an
    orphan (``Store.unlink(keep_open=True)``) and stays readable and
    writable; it is freed when both its open handles and its lookup count
    reach zero (``Store.release_orphan``), or at the next open of the image
    after a restart.

Durability and coherence
    No writeback cache: a ``write`` stores into the image mapping before it
    returns, so it survives a SIGKILL of the daemon. Regular files are opened
    with ``direct_io`` (and ``keep_cache`` off): every ``read`` comes to the
    daemon and returns the image's current bytes, including bytes a VMM's
    physical mapping or a simulated DMA changed a moment ago.

    Consequence, measured (``/work/shared/FUSE-NOTES.md``): ``mmap`` of a file
    through the mount with ``MAP_SHARED`` fails with ENODEV (the kernel flag
    that would allow it cannot be requested through pyfuse3); ``MAP_PRIVATE``
    works and gives a private copy of the bytes at fault time. The zero-copy
    shared path is to map the image file itself at the file's physical
    extents (``user.pkernfs.extents``), which is what a VMM does.

Timeouts
    Sizes and names change only through this daemon, which the kernel sees
    reply by reply, so entry and attribute timeouts of ``ATTR_TIMEOUT``
    seconds are safe; what the daemon changes on its own (IOMMU files
    growing) is bounded by that timeout. Views are regenerated at every open
    and have timeout 0.

Concurrency
    Handlers run as trio tasks on one thread. Store calls are short and take
    the store's lock. Reads of one extent return a view of the image mapping
    (no copy in Python); writes inside a file are one bounded ``pwrite`` into
    the image. Truncates, and writes or multi-extent reads that carry or
    add to the file ``THREAD_MIN`` bytes or more, run in
    ``trio.to_thread.run_sync``, so one large request does not stall the
    others. The daemon never touches its own mountpoint.

IOMMU files (kinds ``KIND_IOMMU_ROOT``/``KIND_IOMMU_DOMAIN``) are read-only to
every user, root included: opening for writing, truncate, chmod, chown,
utimes, unlink and rename give EPERM. Only the daemon, playing the kernel,
writes them. The root directory and ``iommu/`` hold only what the daemon
makes: create and mkdir there give EPERM.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

import numpy as np
import pyfuse3
import trio

from backing import format as fmt
from backing.errors import PkfuseError, StoreError
from backing.store import InodeAttr, Store

from . import views

if TYPE_CHECKING:  # only the daemon's serve loads the IOMMU library, and hands it in
    from collections.abc import Collection

    from backing.guestmmap import GuestMaps
    from backing.iommu import Iommu
    from backing.iommufd import Context, Iommufd
    from backing.liveupdate import LiveUpdate

    from .control import Connection

log = logging.getLogger(__name__)

VIEW_INO_BASE = 1 << 32  #: first virtual inode; image inos are 32-bit
VIEW_DIR_INO = VIEW_INO_BASE
VIEW_DIR_NAME = b".pkernfs"
#: view file name -> inode; the order is the readdir order
VIEW_FILES = {b"status": VIEW_INO_BASE + 1, b"memmap": VIEW_INO_BASE + 2, b"iommu": VIEW_INO_BASE + 3,
              b"info": VIEW_INO_BASE + 4}
VIEW_NAMES = {ino: name for name, ino in VIEW_FILES.items()}

ATTR_TIMEOUT = 1.0  #: seconds the kernel may cache entries and attributes of image inodes
#: bytes (written, or added to the file) from which a Store.write, or a multi-extent read, runs in a thread
THREAD_MIN = 64 << 10
#: in-place writes move mtime (one journaled commit) at most this often: the
#: granularity of the kernel's coarse clock that local filesystems stamp with
MTIME_GRANULARITY_NS = 4_000_000
BLKSIZE = fmt.HUGE_PAGE  #: st_blksize: the extent alignment, a good I/O size

P = ParamSpec("P")
R = TypeVar("R")


def _errors(fn: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    """Turn StoreError into its errno; any other failure is logged and becomes EIO."""

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await fn(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except StoreError as exc:
            log.debug("%s: %s", fn.__name__, exc)
            code = exc.errno
        except PkfuseError as exc:
            log.error("%s: %s", fn.__name__, exc)
            code = errno.EIO
        except Exception:
            log.exception("%s failed", fn.__name__)
            code = errno.EIO
        # raised outside the except block: no __context__, so no traceback
        # keeps the failed call's frames (and their views of the image
        # mapping) alive until the store closes
        raise pyfuse3.FUSEError(code)

    return wrapper


async def _in_thread(fn: Callable[..., R], *args: Any) -> R:
    """``fn(*args)`` in a worker thread; a StoreError comes back as a fresh one.

    The fresh error carries no traceback: trio's idle worker thread would
    otherwise keep the failed call's frames -- and their views of the image
    mapping -- alive, and the store could not unmap the image at close.
    """

    def call() -> tuple[R | None, int, str]:
        try:
            return fn(*args), 0, ""
        except StoreError as exc:
            return None, exc.errno, exc.message

    result, code, message = await trio.to_thread.run_sync(call)
    if code:
        raise StoreError(code, message)
    return result  # type: ignore[return-value]


class Handle:
    """An open file: an image inode, or a view with its text fixed at open."""

    __slots__ = ("ino", "text", "writable")

    def __init__(self, ino: int, text: bytes | None = None, writable: bool = False) -> None:
        self.ino = ino
        self.text = text
        self.writable = writable


class Operations(pyfuse3.Operations):
    """Request handlers over an open ``store``.

    ``iommu`` (a ``backing.iommu.Iommu``) and ``regs_path`` feed the
    ``.pkernfs/iommu`` and ``status`` views; so do ``iommufd`` (the control
    socket's ``backing.iommufd.Iommufd``: its live objects) and
    ``connections`` (the control socket's open connections: whose pid each
    iommufd context is), which ``serve`` sets when there is a control
    socket. Call ``forget_all`` after the session ends (it also closes the
    image descriptor this object opened).
    """

    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, store: Store, *, iommu: Iommu | None = None, regs_path: str | None = None) -> None:
        super().__init__()
        self.store = store
        self.iommu = iommu  #: None: no IOMMU state (a read-only mount whose state did not load)
        self.regs_path = regs_path
        self.control_path: str | None = None  #: the control socket, shown in .pkernfs/status
        self.iommufd: Iommufd | None = None  #: the live iommufd objects, in .pkernfs/iommu and status
        self.connections: Collection[Connection] = ()  #: the control socket's, for each context's pid
        self.liveupdate: LiveUpdate | None = None  #: the sessions, in .pkernfs/iommu and status
        self.guest_maps: GuestMaps | None = None  #: PKFUSE_GUEST_MMAP's pins, in .pkernfs/status
        self.lookups: defaultdict[int, int] = defaultdict(int)  #: kernel lookup count per inode
        self.open_count: defaultdict[int, int] = defaultdict(int)  #: open handles per inode
        self.handles: dict[int, Handle] = {}
        self._next_fh = 1
        self.orphans: set[int] = set()  #: unlinked inodes still held by the kernel or a handle
        self._truncating = 0  #: truncates running in worker threads
        #: our own descriptor of the image for in-place writes (no flock: the store holds it)
        self._image_fd: int | None = None if store.read_only else os.open(store.path, os.O_WRONLY | os.O_CLOEXEC)

    # ------------------------------------------------------------ helpers

    def _entry(self, a: InodeAttr) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = a.ino
        e.generation = a.igen
        e.st_mode = a.mode
        e.st_nlink = a.nlink
        e.st_uid = a.uid
        e.st_gid = a.gid
        e.st_size = a.size
        e.st_blocks = a.npages * (fmt.PAGE_SIZE // 512)
        e.st_blksize = BLKSIZE
        e.st_atime_ns = a.atime_ns
        e.st_mtime_ns = a.mtime_ns
        e.st_ctime_ns = a.ctime_ns
        e.attr_timeout = ATTR_TIMEOUT
        e.entry_timeout = ATTR_TIMEOUT
        return e

    def _view_entry(self, ino: int) -> pyfuse3.EntryAttributes:
        root = self.store.getattr(fmt.ROOT_INO)
        e = pyfuse3.EntryAttributes()
        e.st_ino = ino
        e.generation = 0
        if ino == VIEW_DIR_INO:
            e.st_mode = stat.S_IFDIR | 0o555
            e.st_nlink = 2
        else:
            e.st_mode = stat.S_IFREG | 0o444
            e.st_nlink = 1
            e.st_size = len(self._render(ino))
        e.st_uid = root.uid
        e.st_gid = root.gid
        e.st_blksize = fmt.PAGE_SIZE
        e.st_atime_ns = e.st_mtime_ns = e.st_ctime_ns = root.mtime_ns
        e.attr_timeout = 0
        e.entry_timeout = 0
        return e

    def _render(self, ino: int) -> bytes:
        name = VIEW_NAMES[ino]
        if name == b"status":
            return views.render_status(self.store, iommu=self.iommu, regs_path=self.regs_path,
                                      control=self.control_path, iommufd=self.iommufd,
                                      liveupdate=self.liveupdate, guest_maps=self.guest_maps,
                                      connections=len(self.connections) if self.iommufd is not None else None).encode()
        if name == b"memmap":
            return views.render_memmap(self.store).encode()
        if name == b"info":  # what `pkfuse info MOUNTPOINT` prints: `pkfuse info IMAGE`'s text
            return views.render_info(self.store, self.iommu, regs_path=self.regs_path).encode()
        text = views.render_iommu(self.iommu)
        if self.iommufd is not None:
            text += views.render_iommufd(self.iommufd, self._context_pids())
        if self.liveupdate is not None:
            text += views.render_liveupdate(self.liveupdate)
        return text.encode()

    def _context_pids(self) -> dict[Context, int]:
        return {c.ctx: c.pid for c in self.connections if c.ctx is not None}

    def _kind(self, ino: int) -> int:
        return self.store.getattr(ino).kind

    def _check_new_entry(self, parent: int) -> None:
        """Only the daemon adds entries to the root and ``iommu/``."""
        if parent >= VIEW_INO_BASE or parent == fmt.ROOT_INO:
            raise StoreError(errno.EPERM, "the root directory holds only what pkfuse makes")
        if self.store.read_only:
            raise StoreError(errno.EROFS, "mounted read-only")
        top = dict(self.store.children(fmt.ROOT_INO))
        if parent == top.get(fmt.IOMMU_DIR_NAME):
            raise StoreError(errno.EPERM, "iommu/ holds only files pkfuse makes")

    def _keep(self, ino: int) -> bool:
        """Whether ``ino`` must outlive its name (the kernel or a handle still holds it)."""
        return self.lookups.get(ino, 0) > 0 or self.open_count.get(ino, 0) > 0

    def _maybe_free(self, ino: int) -> None:
        if ino in self.orphans and not self._keep(ino):
            self.orphans.discard(ino)
            try:
                self.store.release_orphan(ino)
            except StoreError as exc:
                log.warning("could not free orphan inode %d: %s", ino, exc)

    def _new_fh(self, handle: Handle) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self.handles[fh] = handle
        self.open_count[handle.ino] += 1
        return fh

    def _handle(self, fh: int) -> Handle:
        try:
            return self.handles[fh]
        except KeyError:
            raise StoreError(errno.EBADF, f"no open file handle {fh}") from None

    # ----------------------------------------------------- handlers: names

    @_errors
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> pyfuse3.EntryAttributes:
        if parent_inode == VIEW_DIR_INO:
            if name in VIEW_FILES:
                return self._view_entry(VIEW_FILES[name])
            if name == b".":
                return self._view_entry(VIEW_DIR_INO)
            if name == b"..":
                ino = fmt.ROOT_INO
            else:
                raise StoreError(errno.ENOENT, "no such view")
        elif parent_inode == fmt.ROOT_INO and name == VIEW_DIR_NAME:
            return self._view_entry(VIEW_DIR_INO)
        elif name == b".":
            ino = parent_inode
        elif name == b"..":
            ino = self.store.parent(parent_inode)  # ENOENT for a stale inode
        elif len(name) > fmt.NAME_MAX:  # statfs says f_namemax: no such name can exist, as ext4 says
            raise StoreError(errno.ENAMETOOLONG, f"name longer than {fmt.NAME_MAX} bytes")
        else:
            ino = self.store.lookup(parent_inode, name)
        entry = self._entry(self.store.getattr(ino))
        self.lookups[ino] += 1
        return entry

    async def forget(self, inode_list: list[tuple[int, int]]) -> None:
        for ino, n in inode_list:
            if ino >= VIEW_INO_BASE:
                continue
            left = self.lookups.get(ino, 0) - n
            if left > 0:
                self.lookups[ino] = left
            else:
                self.lookups.pop(ino, None)
                try:
                    self._maybe_free(ino)
                except Exception:  # forget must never raise
                    log.exception("forget of inode %d", ino)

    def forget_all(self) -> None:
        """After the session ends: drop every kernel reference, free orphans, close our fd."""
        self.lookups.clear()
        self.handles.clear()
        self.open_count.clear()
        for ino in sorted(self.orphans):
            self._maybe_free(ino)
        self.close()

    def close(self) -> None:
        if self._image_fd is not None:
            os.close(self._image_fd)
            self._image_fd = None

    @_errors
    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        if inode >= VIEW_INO_BASE:
            if inode != VIEW_DIR_INO and inode not in VIEW_NAMES:
                raise StoreError(errno.ENOENT, "no such view")
            return self._view_entry(inode)
        return self._entry(self.store.getattr(inode))

    @_errors
    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields,
                      fh: int | None, ctx: Any = None) -> pyfuse3.EntryAttributes:
        if inode >= VIEW_INO_BASE:
            raise StoreError(errno.EPERM, ".pkernfs is read-only")
        if self.store.read_only:
            raise StoreError(errno.EROFS, "mounted read-only")
        if self._kind(inode) in fmt.DAEMON_KINDS:
            raise StoreError(errno.EPERM, "IOMMU and live-update files are written only by pkfuse")
        if fields.update_size:
            self._truncating += 1  # zero-copy reads wait for it (see _image_view)
            try:
                await _in_thread(self.store.truncate, inode, attr.st_size)
            finally:
                self._truncating -= 1
        changes: dict[str, int] = {}
        if fields.update_mode:
            changes["mode"] = attr.st_mode
        if fields.update_uid:
            changes["uid"] = attr.st_uid
        if fields.update_gid:
            changes["gid"] = attr.st_gid
        if fields.update_atime:
            changes["atime_ns"] = attr.st_atime_ns
        if fields.update_mtime:
            changes["mtime_ns"] = attr.st_mtime_ns
        if changes:
            return self._entry(self.store.setattr(inode, **changes))
        return self._entry(self.store.getattr(inode))

    @_errors
    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: Any) -> pyfuse3.EntryAttributes:
        self._check_new_entry(parent_inode)
        ino = self.store.mkdir(parent_inode, name, mode, ctx.uid, ctx.gid)
        entry = self._entry(self.store.getattr(ino))
        self.lookups[ino] += 1
        return entry

    @_errors
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: Any) -> pyfuse3.EntryAttributes:
        if not stat.S_ISREG(mode):
            raise StoreError(errno.EPERM, "pkfuse holds only regular files and directories")
        self._check_new_entry(parent_inode)
        ino = self.store.create(parent_inode, name, mode, ctx.uid, ctx.gid)
        entry = self._entry(self.store.getattr(ino))
        self.lookups[ino] += 1
        return entry

    @_errors
    async def unlink(self, parent_inode: int, name: bytes, ctx: Any = None) -> None:
        if parent_inode >= VIEW_INO_BASE or (parent_inode == fmt.ROOT_INO and name == VIEW_DIR_NAME):
            raise StoreError(errno.EPERM, ".pkernfs is read-only")
        ino = self.store.lookup(parent_inode, name)
        keep = self._keep(ino)
        self.store.unlink(parent_inode, name, keep_open=keep)
        if keep:
            self.orphans.add(ino)

    @_errors
    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any = None) -> None:
        if parent_inode >= VIEW_INO_BASE or (parent_inode == fmt.ROOT_INO and name == VIEW_DIR_NAME):
            raise StoreError(errno.EPERM, ".pkernfs is read-only")
        self.store.rmdir(parent_inode, name)

    @_errors
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int, name_new: bytes,
                     flags: int, ctx: Any = None) -> None:
        if flags & pyfuse3.RENAME_EXCHANGE:
            raise StoreError(errno.EINVAL, "RENAME_EXCHANGE is not supported")
        for parent, name in ((parent_inode_old, name_old), (parent_inode_new, name_new)):
            if parent >= VIEW_INO_BASE or (parent == fmt.ROOT_INO and name == VIEW_DIR_NAME):
                raise StoreError(errno.EPERM, ".pkernfs is read-only")
        if parent_inode_new != parent_inode_old:
            self._check_new_entry(parent_inode_new)
        elif self.store.read_only:
            raise StoreError(errno.EROFS, "mounted read-only")
        replaced = self.store.rename(parent_inode_old, name_old, parent_inode_new, name_new,
                                     noreplace=bool(flags & pyfuse3.RENAME_NOREPLACE), keep_open=self._keep)
        if replaced is not None and self.store.is_orphan(replaced):
            self.orphans.add(replaced)  # kept as an orphan because keep_open said so

    @_errors
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: Any = None) -> pyfuse3.EntryAttributes:
        raise StoreError(errno.EPERM, "pkfuse files have exactly one name")

    @_errors
    async def symlink(self, parent_inode: int, name: bytes, target: bytes, ctx: Any = None) -> pyfuse3.EntryAttributes:
        raise StoreError(errno.EPERM, "pkfuse holds only regular files and directories")

    # ------------------------------------------------------ handlers: files

    @_errors
    async def open(self, inode: int, flags: int, ctx: Any = None) -> pyfuse3.FileInfo:
        writing = (flags & os.O_ACCMODE) != os.O_RDONLY or bool(flags & os.O_TRUNC)
        if inode >= VIEW_INO_BASE:
            if inode not in VIEW_NAMES:
                raise StoreError(errno.EISDIR if inode == VIEW_DIR_INO else errno.ENOENT, "not a view file")
            if writing:
                raise StoreError(errno.EACCES, ".pkernfs is read-only")
            fh = self._new_fh(Handle(inode, text=self._render(inode)))
            return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False)
        kind = self._kind(inode)
        if kind == fmt.KIND_DIR:
            raise StoreError(errno.EISDIR, "is a directory")
        if writing:
            if self.store.read_only:
                raise StoreError(errno.EROFS, "mounted read-only")
            if kind in fmt.DAEMON_KINDS:
                raise StoreError(errno.EPERM, "IOMMU and live-update files are written only by pkfuse")
        fh = self._new_fh(Handle(inode, writable=writing))
        return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False)

    @_errors
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: Any) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        self._check_new_entry(parent_inode)
        ino = self.store.create(parent_inode, name, mode, ctx.uid, ctx.gid)
        entry = self._entry(self.store.getattr(ino))
        self.lookups[ino] += 1
        fh = self._new_fh(Handle(ino, writable=True))
        return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False), entry

    @_errors
    async def read(self, fh: int, off: int, size: int) -> bytes | memoryview | np.ndarray:
        h = self._handle(fh)
        if h.text is not None:
            return h.text[off : off + size]
        view = self._image_view(h.ino, off, size)
        if view is not None:
            return view
        if size >= THREAD_MIN:
            return await _in_thread(self.store.read, h.ino, off, size)
        return self.store.read(h.ino, off, size)

    def _image_view(self, ino: int, off: int, size: int) -> np.ndarray | None:
        """Zero-copy read: the image bytes themselves when [off, off+size) is in one extent.

        pyfuse3 copies them straight from the image mapping into the reply,
        so a read costs no Python-side copy and no thread hop. None means
        "use Store.read" (several extents, or nothing to read).

        The view is copied after the store lock is released, so it is only
        given while no truncate runs in a worker thread (the one way pages
        are freed off this thread): freed pages could otherwise be handed
        to another file and written before the reply is copied. A new
        truncate cannot start before the reply: that needs this thread.
        """
        if self._truncating:
            return None
        st = self.store
        with st.lock:
            span = self._image_span(ino, off, size)
            if span is None:
                return None
            a, n = span
            return st.image[a : a + n]

    def _image_span(self, ino: int, off: int, size: int) -> tuple[int, int] | None:
        """``Store.image_span`` for guest files only; call with ``store.lock`` held.

        IOMMU files take the general path: their pages can be freed by the
        IOMMU code, which the ``_truncating`` guard of the zero-copy read does not see.
        """
        return self.store.image_span(ino, off, size, guest_only=True)

    def _write_in_place(self, ino: int, off: int, buf: bytes) -> int | None:
        """A write inside the file's size and one extent: ``pwrite`` into the image, then mtime.

        ``pwrite`` on the image file lands in the same page cache the mapping
        shows (so it is as durable as a store into the mapping) but takes no
        write fault per page, which a store into a page that writeback has
        cleaned would. mtime moves when it is ``MTIME_GRANULARITY_NS`` old.
        The store lock is held so a racing truncate cannot free the pages
        under the copy. Returns None when the write needs ``Store.write``
        (it extends the file or spans extents).

        It runs on the trio thread: one ``pwrite`` of at most ``max_write``
        (1 MiB) into the page cache is short and bounded, and a thread hop
        per request measured 40% slower on a 2-CPU machine (1.0 against
        1.7 GB/s with dd bs=1M).
        """
        st = self.store
        with st.lock:
            span = self._image_span(ino, off, len(buf)) if self._image_fd is not None else None
            if span is None or span[1] != len(buf):
                return None
            done = os.pwrite(self._image_fd, buf, span[0])  # type: ignore[arg-type]
            st.stamp_write(ino, time.time_ns(), granularity_ns=MTIME_GRANULARITY_NS)
            return done

    @_errors
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        h = self._handle(fh)
        if not h.writable:
            raise StoreError(errno.EBADF, "not open for writing")
        done = self._write_in_place(h.ino, off, buf)
        if done is not None:
            return done
        # the pages a write allocates and zeroes are its cost: a small write far past the end is large
        grows = off + len(buf) - self.store.getattr(h.ino).size
        if max(len(buf), grows) >= THREAD_MIN:
            return await _in_thread(self.store.write, h.ino, off, buf)
        return self.store.write(h.ino, off, buf)

    # No ``flush``: pyfuse3's default answers ENOSYS, after which the kernel sends no FLUSH on this
    # connection again (``fc->no_flush``). A FLUSH is sent *forced*: its wait cannot be killed. The
    # daemon holds files of its own mount (an incoming session's, handed to the successor); one
    # closed in a worker thread as the daemon is SIGKILLed would wait for an answer only the dead
    # trio thread could give, and the daemon -- and every process closing a file on the mount --
    # would hang in D state for good (found by ``restart-test --kill finish``). Writes are
    # synchronous: a flush has nothing to report. The ENOSYS is learnt at the first close of any
    # file on the mount; the daemon's own closes come after a client's (a successor reads
    # ``.pkernfs/status`` before it retrieves). A warm-up close by the daemon at start was tried:
    # a thread of its own is the hang itself, and a child process kept the mount busy when the
    # daemon was stopped at once (test_umount_of_a_stopped_daemon...).

    @_errors
    async def fsync(self, fh: int, datasync: bool) -> None:
        """Nothing to do: a returned write is already in the image's page cache.

        The image models memory kept across a kexec; a daemon kill cannot lose
        it. Power loss is outside that model, so fsync does not msync.
        """
        self._handle(fh)

    @_errors
    async def release(self, fh: int) -> None:
        h = self.handles.pop(fh, None)
        if h is None:
            return
        left = self.open_count[h.ino] - 1
        if left > 0:
            self.open_count[h.ino] = left
        else:
            self.open_count.pop(h.ino, None)
            self._maybe_free(h.ino)

    # ------------------------------------------------- handlers: directories

    @_errors
    async def opendir(self, inode: int, ctx: Any = None) -> int:
        if inode >= VIEW_INO_BASE:
            if inode != VIEW_DIR_INO:
                raise StoreError(errno.ENOTDIR, "not a directory")
            return inode
        if self._kind(inode) != fmt.KIND_DIR:
            raise StoreError(errno.ENOTDIR, "not a directory")
        return inode

    def dir_entries(self, ino: int, start_id: int) -> Iterator[tuple[bytes, pyfuse3.EntryAttributes, int, bool]]:
        """``(name, attrs, next_id, counted)`` for entries with ino >= ``start_id``.

        Offsets are "next inode number": entries are listed in ino order, so
        a create or unlink between two readdir calls never makes one repeat
        or vanish. ``counted`` entries add a lookup when the kernel takes them.
        """
        if ino == VIEW_DIR_INO:
            for name, vino in VIEW_FILES.items():
                if vino >= start_id:
                    yield name, self._view_entry(vino), vino + 1, False
            return
        for name, child in self.store.children(ino):
            if child < start_id:
                continue
            try:
                attrs = self._entry(self.store.getattr(child))
            except StoreError:
                continue  # removed since the listing was taken
            yield name, attrs, child + 1, True
        if ino == fmt.ROOT_INO and VIEW_DIR_INO >= start_id:
            yield VIEW_DIR_NAME, self._view_entry(VIEW_DIR_INO), VIEW_DIR_INO + 1, False

    @_errors
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        for name, attrs, next_id, counted in self.dir_entries(fh, start_id):
            if not pyfuse3.readdir_reply(token, name, attrs, next_id):
                break
            if counted:
                self.lookups[attrs.st_ino] += 1

    @_errors
    async def releasedir(self, fh: int) -> None:
        return None

    @_errors
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        return None

    # ----------------------------------------------------- handlers: misc

    @_errors
    async def statfs(self, ctx: Any = None) -> pyfuse3.StatvfsData:
        s = self.store.statfs()
        out = pyfuse3.StatvfsData()
        out.f_bsize = s.page_size
        out.f_frsize = s.page_size
        out.f_blocks = s.total_pages
        out.f_bfree = s.free_pages
        out.f_bavail = s.free_pages
        out.f_files = s.inode_count
        out.f_ffree = s.free_inodes
        out.f_favail = s.free_inodes
        out.f_namemax = fmt.NAME_MAX
        return out

    @_errors
    async def getxattr(self, inode: int, name: bytes, ctx: Any = None) -> bytes:
        if not name.startswith(b"user."):
            # no security.*, system.* (ACLs) or trusted.* here. ENOTSUP, not
            # ENODATA: `ls -l` then stops asking for the rest of the directory
            # (one request per device instead of two per file)
            raise pyfuse3.FUSEError(errno.ENOTSUP)
        if inode >= VIEW_INO_BASE:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        value = views.xattrs(self.store, inode).get(name)
        if value is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return value

    @_errors
    async def listxattr(self, inode: int, ctx: Any = None) -> list[bytes]:
        if inode >= VIEW_INO_BASE:
            return []
        return list(views.xattrs(self.store, inode))

    @_errors
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: Any = None) -> None:
        raise StoreError(errno.ENOTSUP, "pkfuse attributes are computed, not stored")

    @_errors
    async def removexattr(self, inode: int, name: bytes, ctx: Any = None) -> None:
        raise StoreError(errno.ENOTSUP, "pkfuse attributes are computed, not stored")
