"""The store: namespace and file operations over an open image.

Every metadata change is one journal transaction (``backing/journal.py``):
an operation validates everything first, stages the new records, commits,
and only then updates the in-memory indexes derived from the image
(children per directory, extents per file, the allocator's page map). So a
refused operation changes nothing, and a killed one is wholly there or
wholly absent after ``Store.open`` replays the journal.

File data is never journaled -- the image's pages are the guest's memory.
Data stores are ordered so that they are invisible until the commit that
makes them part of a file: new pages are zeroed and written while still
free, and bytes past the end of a file are zeroed before a commit moves the
end over them.

Guest-RAM files are fully allocated (no holes): ``truncate`` up allocates
every page at once, and a file's physical layout never moves while it
exists, because a VMM maps those pages and devices DMA into them.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import logging
import mmap
import os
import stat
import threading
import time
from collections.abc import Callable

import numpy as np

from . import format as fmt
from . import fsck
from .allocator import Allocator, Run, expand_runs
from .errors import Finding, FormatError, ImageBusy, StoreError
from .fsckctx import owner_of, record_table
from .journal import Journal, Transaction
from .mkfs import mkfs, parse_addr, parse_size

__all__ = ["Store", "InodeAttr", "Extent", "StatFs", "mkfs", "parse_size", "parse_addr"]

log = logging.getLogger(__name__)

PS = fmt.PAGE_SIZE
# the superblock's dynamic words, each changed by one aligned 8-byte store
_SB_GENERATION_WORD = fmt.SUPERBLOCK_DTYPE.fields["generation"][1] // 8
_SB_CLEAN_WORD = fmt.SUPERBLOCK_DTYPE.fields["clean"][1] // 8


@dataclasses.dataclass(frozen=True)
class InodeAttr:
    ino: int
    kind: int
    mode: int
    uid: int
    gid: int
    size: int  #: bytes
    npages: int  #: pages allocated
    nlink: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    igen: int


@dataclasses.dataclass(frozen=True)
class Extent:
    """A physically contiguous piece of a file; lengths and offsets in bytes."""

    file_offset: int
    phys_addr: int
    length: int
    page: int  #: first image page


@dataclasses.dataclass(frozen=True)
class StatFs:
    page_size: int
    total_pages: int
    free_pages: int
    metadata_pages: int  #: pages before data_page: superblock, journal, tables
    file_pages: int  #: pages of guest-RAM files
    table_pages: int  #: pages of IOMMU files
    inode_count: int
    free_inodes: int


@dataclasses.dataclass
class _FileMap:
    """A file's extents sorted by file page (derived from the extent table)."""

    records: np.ndarray  #: extent-table indices
    file_pages: np.ndarray
    pages: np.ndarray
    counts: np.ndarray


# Journal bytes that freeing one extent may take: its zeroed extent record
# (JREC header + 32 bytes) and, in the worst case, a bitmap record of its
# own (JREC header + up to 7 bytes of padding; the bitmap bytes themselves
# are bounded by the whole bitmap, counted once).
_JOURNAL_BYTES_PER_EXTENT = 2 * fmt.JREC_DTYPE.itemsize + fmt.EXTENT_DTYPE.itemsize + 8
# Everything else one operation may stage: two dentries, four inodes, one
# shortened extent record, with their JREC headers (about 1 KiB); doubled.
_JOURNAL_FIXED_BYTES = 2048


def max_file_extents(g: fmt.Geometry) -> int:
    """Most extents one file may have so that unlinking or truncating it fits one transaction.

    Freeing a file stages a record per extent; a file fragmented past this
    bound could never be removed atomically (the journal body is sized for
    a third of the extent table). Never binding for default geometries of
    small images; about 15% of the extent table for large ones.
    """
    return max(1, (g.journal_body_bytes - g.bitmap_bytes - _JOURNAL_FIXED_BYTES) // _JOURNAL_BYTES_PER_EXTENT)


def _now() -> int:
    return time.time_ns()


def _check_name(name: bytes) -> None:
    if not name or name in (b".", b"..") or b"/" in name or b"\0" in name:
        raise StoreError(errno.EINVAL, f"invalid name {name!r}")
    if len(name) > fmt.NAME_MAX:
        raise StoreError(errno.ENAMETOOLONG, f"name longer than {fmt.NAME_MAX} bytes")


class Store:
    """An open image: the library API that the daemon and the VMM use.

    Every public method takes ``lock``; callers that need several calls to
    be atomic hold it themselves (it is reentrant).
    """

    pin_hook: Callable[[int], bool] | None  #: a domain or an IOAS maps the file: no page may go
    frozen_hook: Callable[[int], bool] | None  #: a live-update session preserves the file: size frozen
    map_hook: Callable[[int], bool] | None  #: a VMM maps the file (backing.guestmmap): size frozen, pages kept

    def __init__(self, path: str, fd: int, mm: mmap.mmap, read_only: bool, geometry: fmt.Geometry) -> None:
        self.path = path
        self.read_only = read_only
        self.lock = threading.RLock()
        self.pin_hook = None
        self.frozen_hook = None
        self.map_hook = None
        self._fd = fd
        self._mm = mm
        # the image is npages pages; bytes a longer file holds past them are no part of it
        self.image = np.frombuffer(mm, dtype=np.uint8, count=geometry.size)
        self.image_u64 = self.image.view("<u8")
        self._sb = self.image[: fmt.SUPERBLOCK_DTYPE.itemsize].view(fmt.SUPERBLOCK_DTYPE)
        self.geometry = geometry
        g = self.geometry
        self.inodes = self._table(g.inode_page, g.inode_count, fmt.INODE_DTYPE)
        self.dentries = self._table(g.dentry_page, g.inode_count, fmt.DENTRY_DTYPE)
        self.extents_table = self._table(g.extent_page, g.extent_count, fmt.EXTENT_DTYPE)
        self.bitmap = self.image[g.bitmap_page * PS :][: g.bitmap_bytes]
        self.journal = Journal(self.image, g)
        self.allocator: Allocator
        self._children: dict[int, dict[bytes, int]] = {}
        self._files: dict[int, _FileMap] = {}
        self._unread_maps: dict[int, tuple[int, int]] = {}  #: ino -> slice of _sorted_extents
        self._sorted_extents: tuple[np.ndarray, ...] = ()
        #: live extents sorted by first image page: (first page, end page, ino, first file page)
        self._owner_index: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None

    # ------------------------------------------------------------------ open

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, read_only: bool = False, lock: bool = True) -> Store:
        """Open, lock, recover and validate the image at ``path``.

        A read-only store maps the image copy-on-write, so journal recovery
        happens in private memory and never reaches the file. ``lock``
        takes an exclusive (shared when read-only) flock: a second daemon on
        the same image gets ``ImageBusy``.
        """
        path = os.fspath(path)
        # O_NONBLOCK: a read-only open of a FIFO must not wait for a writer (no effect on files)
        fd = os.open(path, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_NONBLOCK)
        try:
            if lock:
                try:
                    fcntl.flock(fd, (fcntl.LOCK_SH if read_only else fcntl.LOCK_EX) | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise ImageBusy(f"{path} is in use by another pkfuse process") from None
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise FormatError("image", 0, "not a regular file")
            size = st.st_size
            if size < fmt.PAGE_SIZE:
                raise FormatError("image", 0, f"{size} bytes: too small for a superblock page")  # as fsck says
            mm = fsck.map_private(fd, size) if read_only else mmap.mmap(fd, size, access=mmap.ACCESS_WRITE)
        except BaseException:
            os.close(fd)
            raise
        try:
            sb = bytes(mm[: fmt.SUPERBLOCK_DTYPE.itemsize])
            geometry = _geometry_from_superblock(sb, size)
        except BaseException:
            mm.close()
            os.close(fd)
            raise
        store = cls(path, fd, mm, read_only, geometry)
        try:
            store._recover_and_load()
        except BaseException as exc:
            if isinstance(exc, FormatError):  # expected: its frames need not pin the mapping
                exc.__traceback__ = None
            store._release()
            raise
        return store

    def _recover_and_load(self) -> None:
        self.journal_recovered = self.journal.recover()
        if self.journal_recovered:
            log.warning("%s: finished a transaction cut off by a restart", self.path)
        findings = fsck.check_metadata(self.image, self.geometry)
        if findings:  # nothing may use an invalid image
            raise _format_error(findings[0])
        self.allocator = Allocator(self.bitmap, self.geometry)
        self._build_indexes()
        if not self.read_only:
            self._free_orphans()
            words = self._sb.view("<u8")
            if not words[_SB_CLEAN_WORD]:
                log.info("%s: was not closed cleanly (a restart); state recovered", self.path)
            words[_SB_GENERATION_WORD] = int(words[_SB_GENERATION_WORD]) + 1
            words[_SB_CLEAN_WORD] = 0

    def _build_indexes(self) -> None:
        kinds = self.inodes["kind"]
        live = np.flatnonzero(kinds != fmt.KIND_FREE)
        orphan = (self.inodes["flags"] & fmt.IFLAG_ORPHAN) != 0
        self._children = {int(i): {} for i in live[kinds[live] == fmt.KIND_DIR]}
        named = live[(live != fmt.ROOT_INO) & ~orphan[live]]
        parents = self.dentries["parent"][named]
        lens = self.dentries["name_len"][named]
        names = self.dentries["name"][named]
        for ino, parent, n, name in zip(named.tolist(), parents.tolist(), lens.tolist(), names.tolist()):
            self._children[parent][name[:n]] = ino
        self._index_extents()
        self._owner_index = None

    def _free_orphans(self) -> None:
        # No pin_hook is installed during open. With IOMMU domains in the
        # image an orphan may still be mapped by one (unlinked while open,
        # then mapped): freeing it would hand DMA-visible pages to the next
        # file. Then Iommu.open calls free_orphans() once the pins are known.
        if np.any(self.inodes["kind"] == fmt.KIND_IOMMU_DOMAIN):
            return
        self.free_orphans()

    def free_orphans(self) -> int:
        """Free every orphan (unlinked while open, e.g. before a restart) that no domain maps.

        Returns how many were freed. A read-only store frees none.
        """
        with self.lock:
            if self.read_only:
                return 0
            orphans = np.flatnonzero((self.inodes["flags"] & fmt.IFLAG_ORPHAN) != 0)
            freed = 0
            for ino in orphans.tolist():
                if self._pinned(ino):
                    log.info("orphan inode %d is mapped by an IOMMU domain; kept", ino)
                    continue
                log.info("freeing orphan inode %d left open at the restart", ino)
                self.release_orphan(ino)
                freed += 1
            return freed

    # ----------------------------------------------------------------- close

    def close(self) -> None:
        """Mark the image clean and release it; the store is unusable afterwards."""
        with self.lock:
            if self._fd < 0:  # closed already (the mapping itself may outlive a close, see _release)
                return
            if not self.read_only:
                self._sb.view("<u8")[_SB_CLEAN_WORD] = 1
            self._release()

    def _release(self) -> None:
        # numpy views pin the mmap's buffer; drop them before closing it
        for name in ("image", "image_u64", "_sb", "inodes", "dentries", "extents_table", "bitmap", "journal"):
            self.__dict__.pop(name, None)
        self.__dict__.pop("allocator", None)
        try:
            self._mm.close()
        except BufferError:
            log.warning("image mapping still exported; it is released at exit")
        os.close(self._fd)
        self._fd = -1

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def fileno(self) -> int:
        """The store's descriptor of the image (read-write unless ``read_only``); the store owns it."""
        return self._fd

    @property
    def generation(self) -> int:
        return int(self._sb["generation"][0])

    @property
    def uuid(self) -> bytes:
        return bytes(self._sb["uuid"][0])

    # ------------------------------------------------------------- queries

    def getattr(self, ino: int) -> InodeAttr:
        with self.lock:
            rec = self._inode(ino)
            kind = int(rec["kind"])
            nlink = 1
            if kind == fmt.KIND_DIR:  # 2 + subdirectories, counted vectorized (thousands of guest files)
                kids = self._children.get(ino, {})
                sub = np.fromiter(kids.values(), np.int64, len(kids))
                nlink = 2 + int(np.count_nonzero(self.inodes["kind"][sub] == fmt.KIND_DIR))
            elif int(rec["flags"]) & fmt.IFLAG_ORPHAN:
                nlink = 0
            return InodeAttr(
                ino=ino, kind=kind, mode=int(rec["mode"]), uid=int(rec["uid"]), gid=int(rec["gid"]),
                size=int(rec["size"]), npages=int(rec["npages"]), nlink=nlink,
                atime_ns=int(rec["atime_ns"]), mtime_ns=int(rec["mtime_ns"]),
                ctime_ns=int(rec["ctime_ns"]), igen=int(rec["igen"]),
            )

    def lookup(self, parent: int, name: bytes) -> int:
        with self.lock:
            kids = self._dir(parent)
            try:
                return kids[name]
            except KeyError:
                raise StoreError(errno.ENOENT, f"no {name!r} in inode {parent}") from None

    def children(self, ino: int) -> list[tuple[bytes, int]]:
        """Entries of directory ``ino`` sorted by ino (a stable readdir order)."""
        with self.lock:
            return sorted(self._dir(ino).items(), key=lambda item: item[1])

    def parent(self, ino: int) -> int:
        """The directory holding ``ino``'s name (ENOENT for a free inode).

        ``ROOT_INO`` for the root itself and for an orphan, which has no
        name: ``..`` never leads out of the tree.
        """
        with self.lock:
            self._inode(ino)
            return int(self.dentries["parent"][ino]) or fmt.ROOT_INO

    def is_orphan(self, ino: int) -> bool:
        """Whether ``ino`` is a live inode unlinked while still open (``IFLAG_ORPHAN``);
        False for a free or out-of-range inode (an orphan that was freed already)."""
        with self.lock:
            if not 0 < ino < self.geometry.inode_count:
                return False
            rec = self.inodes[ino]
            return int(rec["kind"]) != fmt.KIND_FREE and bool(int(rec["flags"]) & fmt.IFLAG_ORPHAN)

    def path_of(self, ino: int) -> bytes:
        with self.lock:
            self._inode(ino)
            parts: list[bytes] = []
            while ino != fmt.ROOT_INO:
                d = self.dentries[ino]
                if d["parent"] == 0:
                    return b"(orphan)/" + str(ino).encode()
                parts.append(bytes(d["name"])[: int(d["name_len"])])
                ino = int(d["parent"])
            return b"/" + b"/".join(reversed(parts))

    def extents(self, ino: int) -> list[Extent]:
        """The physical layout of ``ino``, sorted by file offset."""
        with self.lock:
            if int(self._inode(ino)["kind"]) not in fmt.KINDS_WITH_PAGES:
                return []
            fm = self._file_map(ino)
            base = self.geometry.base_phys
            return [
                Extent(fp * PS, base + p * PS, n * PS, p)
                for fp, p, n in zip(fm.file_pages.tolist(), fm.pages.tolist(), fm.counts.tolist())
            ]

    def extent_runs(self, ino: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(first file page, first image page, pages)`` of each of ``ino``'s extents, sorted by
        file page: ``extents`` as int64 arrays (copies), for callers that handle thousands."""
        with self.lock:
            if int(self._inode(ino)["kind"]) not in fmt.KINDS_WITH_PAGES:
                e = np.zeros(0, np.int64)
                return e, e.copy(), e.copy()
            fm = self._file_map(ino)
            return fm.file_pages.copy(), fm.pages.copy(), fm.counts.copy()

    def image_pages(self, ino: int) -> np.ndarray:
        """Image page of each of ``ino``'s pages, in file order (int64; empty for a directory)."""
        with self.lock:
            if int(self._inode(ino)["kind"]) not in fmt.KINDS_WITH_PAGES:
                return np.zeros(0, np.int64)
            fm = self._file_map(ino)
            return expand_runs(fm.pages, fm.counts)

    def statfs(self) -> StatFs:
        with self.lock:
            kinds = self.inodes["kind"]
            npages = self.inodes["npages"]
            return StatFs(
                page_size=PS,
                total_pages=self.geometry.npages,
                free_pages=self.allocator.free_pages,
                metadata_pages=self.geometry.data_page,
                file_pages=int(npages[kinds == fmt.KIND_GUEST].sum()),
                table_pages=int(npages[np.isin(kinds, fmt.IOMMU_KINDS)].sum()),
                inode_count=self.geometry.inode_count - 1,
                free_inodes=int(np.count_nonzero(kinds[1:] == fmt.KIND_FREE)),
            )

    def extents_by_page(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Every live extent as ``(first page, end page, ino, first file page)``, sorted by first page.

        Pages are image pages (int64; the extent is [first, end)), ``ino``
        uint32. Extents never overlap (an invariant fsck checks at open), so
        the ends ascend too. The physical direction of the layout: one entry
        per extent record, not per file. The arrays are the store's own
        index, read-only; they stay valid only while ``lock`` is held (the
        next change of any file's pages rebuilds them).
        """
        with self.lock:
            return self._owners()

    def page_owner(self, pages: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Owner ino (0 for none) and its kind for each image page in ``pages``."""
        with self.lock:
            starts, ends, inos, _ = self._owners()
            owner = owner_of(starts, ends, inos, pages)
            return owner, self.inodes["kind"][owner]

    def extent_at(self, page: int) -> tuple[int, int, int, int] | None:
        """``(ino, first page, end page, first file page)`` of the extent holding image page ``page``.

        None for a page no extent holds. The physical-to-file direction of
        ``extents``: one lookup, for callers that walk physical ranges.
        """
        with self.lock:
            starts, ends, inos, file_pages = self._owners()
            i = int(np.searchsorted(starts, page, side="right")) - 1
            if i < 0 or page >= int(ends[i]):
                return None
            return int(inos[i]), int(starts[i]), int(ends[i]), int(file_pages[i])

    def _owners(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        if self._owner_index is None:
            live = np.flatnonzero(self.extents_table["npages"] != 0)
            order = np.argsort(self.extents_table["page"][live], kind="stable")
            rec = self.extents_table[live[order]]
            index = (rec["page"].astype(np.int64), (rec["page"] + rec["npages"]).astype(np.int64),
                     rec["ino"].astype(np.uint32), rec["file_page"].astype(np.int64))
            for a in index:
                a.flags.writeable = False  # handed out by extents_by_page
            self._owner_index = index
        return self._owner_index

    # ---------------------------------------------------------- namespace

    def create(self, parent: int, name: bytes, mode: int, uid: int, gid: int, *,
               kind: int = fmt.KIND_GUEST) -> int:
        """A new empty file (or directory for ``KIND_DIR``) named ``name`` in ``parent``."""
        with self.lock:
            self._writable()
            kids = self._dir(parent)
            _check_name(name)
            if name in kids:
                raise StoreError(errno.EEXIST, f"{name!r} exists")
            if kind not in fmt.KIND_NAMES or kind == fmt.KIND_FREE:
                raise StoreError(errno.EINVAL, f"bad kind {kind}")
            free = np.flatnonzero(self.inodes["kind"][2:] == fmt.KIND_FREE)
            if not free.size:
                raise StoreError(errno.ENOSPC, "inode table full")
            ino = int(free[0]) + 2
            now = _now()
            ifmt = stat.S_IFDIR if kind == fmt.KIND_DIR else stat.S_IFREG
            rec = np.zeros(1, fmt.INODE_DTYPE)
            rec["kind"], rec["mode"], rec["uid"], rec["gid"] = kind, ifmt | (mode & 0o7777), uid, gid
            rec["atime_ns"] = rec["mtime_ns"] = rec["ctime_ns"] = now
            rec["igen"] = int(self.inodes["igen"][ino]) + 1
            txn = Transaction()
            txn.put(self._inode_off(ino), rec)
            txn.put(self._dentry_off(ino), self._dentry(parent, name))
            self._touch(txn, parent, now)
            self.journal.commit(txn)
            kids[name] = ino
            if kind == fmt.KIND_DIR:
                self._children[ino] = {}
            elif kind in fmt.KINDS_WITH_PAGES:
                self._files[ino] = self._empty_map()
            return ino

    def mkdir(self, parent: int, name: bytes, mode: int, uid: int, gid: int) -> int:
        return self.create(parent, name, mode, uid, gid, kind=fmt.KIND_DIR)

    def unlink(self, parent: int, name: bytes, *, keep_open: bool = False, managed: bool = False) -> int:
        """Remove a file's name; free it now, or keep it as an orphan while open.

        ``managed``: pkfuse itself (backing.iommu destroying a domain, backing.lustate
        dropping a state) removes a daemon file, which users may not.
        """
        with self.lock:
            self._writable()
            ino = self.lookup(parent, name)
            if self.inodes["kind"][ino] == fmt.KIND_DIR:
                raise StoreError(errno.EISDIR, f"{name!r} is a directory")
            if not (managed and self.inodes["kind"][ino] in (fmt.KIND_IOMMU_DOMAIN, fmt.KIND_LU_STATE)):
                self._check_removable(ino)
            txn = Transaction()
            now = _now()
            self._touch(txn, parent, now)
            freed = self._stage_drop(txn, ino, keep_open, now)
            self.journal.commit(txn)
            del self._children[parent][name]
            self._after_drop(ino, keep_open, freed)
            return ino

    def rmdir(self, parent: int, name: bytes) -> None:
        with self.lock:
            self._writable()
            ino = self.lookup(parent, name)
            if self.inodes["kind"][ino] != fmt.KIND_DIR:
                raise StoreError(errno.ENOTDIR, f"{name!r} is not a directory")
            if self._children[ino]:
                raise StoreError(errno.ENOTEMPTY, f"{name!r} is not empty")
            self._check_removable(ino)
            txn = Transaction()
            self._touch(txn, parent, _now())
            self._stage_drop(txn, ino, False, 0)
            self.journal.commit(txn)
            del self._children[parent][name]
            del self._children[ino]

    def rename(self, parent: int, name: bytes, new_parent: int, new_name: bytes, *,
               noreplace: bool = False, keep_open: Callable[[int], bool] | None = None,
               managed: bool = False) -> int | None:
        """Move ``parent/name`` to ``new_parent/new_name`` atomically; returns a replaced ino.

        ``managed``: pkfuse itself renames a live-update state over the old one
        (its commit point), which users may not.
        """
        with self.lock:
            self._writable()
            ino = self.lookup(parent, name)
            new_kids = self._dir(new_parent)
            _check_name(new_name)
            is_dir = self.inodes["kind"][ino] == fmt.KIND_DIR
            managed = managed and int(self.inodes["kind"][ino]) == fmt.KIND_LU_STATE
            if not managed:  # a rename moves a name, not a page: a pinned source may move
                self._check_removable(ino, pinned_ok=True)
            target = new_kids.get(new_name)
            if target is not None and noreplace:  # also onto itself, as renameat2(2) says
                raise StoreError(errno.EEXIST, f"{new_name!r} exists")
            if target == ino:
                return None
            if is_dir:
                p = new_parent  # refuse moving a directory below itself
                while p != fmt.ROOT_INO:
                    if p == ino:
                        raise StoreError(errno.EINVAL, "cannot move a directory into itself")
                    p = int(self.dentries["parent"][p])
            keep = False
            if target is not None:
                target_dir = self.inodes["kind"][target] == fmt.KIND_DIR
                if is_dir and not target_dir:
                    raise StoreError(errno.ENOTDIR, f"{new_name!r} is not a directory")
                if not is_dir and target_dir:
                    raise StoreError(errno.EISDIR, f"{new_name!r} is a directory")
                if target_dir and self._children[target]:
                    raise StoreError(errno.ENOTEMPTY, f"{new_name!r} is not empty")
                if not (managed and int(self.inodes["kind"][target]) == fmt.KIND_LU_STATE):
                    self._check_removable(target)
                keep = bool(keep_open(target)) if (keep_open and not target_dir) else False
            now = _now()
            txn = Transaction()
            freed: list[Run] = []
            if target is not None:
                freed = self._stage_drop(txn, target, keep, now)
            txn.put(self._dentry_off(ino), self._dentry(new_parent, new_name))
            rec = self.inodes[ino : ino + 1].copy()
            rec["ctime_ns"] = now
            txn.put(self._inode_off(ino), rec)
            self._touch(txn, parent, now)
            if new_parent != parent:
                self._touch(txn, new_parent, now)
            self.journal.commit(txn)
            del self._children[parent][name]
            if target is not None:
                self._children.pop(target, None)
                self._after_drop(target, keep, freed)
            new_kids[new_name] = ino
            return target

    def release_orphan(self, ino: int) -> None:
        """Free an unlinked file once nothing holds it open."""
        with self.lock:
            self._writable()
            rec = self._inode(ino)
            if not int(rec["flags"]) & fmt.IFLAG_ORPHAN:
                raise StoreError(errno.EINVAL, f"inode {ino} is not an orphan")
            if self._pinned(ino):
                # a domain still maps it: leave it as an orphan; the next
                # open frees it once the mappings are gone
                log.warning("orphan inode %d is still mapped by a domain; kept", ino)
                return
            txn = Transaction()
            freed = self._stage_drop(txn, ino, False, 0)
            self.journal.commit(txn)
            self._after_drop(ino, False, freed)

    def setattr(self, ino: int, *, mode: int | None = None, uid: int | None = None, gid: int | None = None,
                atime_ns: int | None = None, mtime_ns: int | None = None) -> InodeAttr:
        with self.lock:
            self._writable()
            self._inode(ino)
            rec = self.inodes[ino : ino + 1].copy()
            if mode is not None:
                rec["mode"] = stat.S_IFMT(int(rec["mode"][0])) | (mode & 0o7777)
            if uid is not None:
                rec["uid"] = uid
            if gid is not None:
                rec["gid"] = gid
            if atime_ns is not None:
                rec["atime_ns"] = atime_ns
            if mtime_ns is not None:
                rec["mtime_ns"] = mtime_ns
            rec["ctime_ns"] = _now()
            txn = Transaction()
            txn.put(self._inode_off(ino), rec)
            self.journal.commit(txn)
            return self.getattr(ino)

    # --------------------------------------------------------------- data

    def truncate(self, ino: int, size: int) -> InodeAttr:
        """Set the size of a guest-RAM file, allocating or freeing whole pages."""
        with self.lock:
            rec = self._guest_file(ino)
            if size < 0 or size > self.geometry.size:
                raise StoreError(errno.EFBIG if size > 0 else errno.EINVAL, f"size {size} out of range")
            old_pages = int(rec["npages"])
            new_pages = -(-size // PS)
            if size != int(rec["size"]):
                self._check_size_frozen(ino)
            if new_pages < old_pages and self._pinned(ino):
                raise StoreError(errno.EBUSY, f"inode {ino} is mapped by an IOMMU domain")
            self._resize(ino, size, new_pages, _now(), b"")
            return self.getattr(ino)

    def write(self, ino: int, offset: int, data: bytes | memoryview) -> int:
        """Write ``data`` at byte ``offset``; extends (and allocates) past the end."""
        with self.lock:
            rec = self._guest_file(ino)
            if offset < 0:
                raise StoreError(errno.EINVAL, "negative offset")
            end = offset + len(data)
            size = int(rec["size"])
            if end > self.geometry.size:
                raise StoreError(errno.EFBIG, f"write ends at {end}, beyond the image")
            if not len(data):  # write(2) of 0 bytes changes nothing, not even the size
                return 0
            if end <= size:
                self._copy_in(self._file_map(ino), offset, data)
                self.stamp_write(ino, _now())
            else:
                self._check_size_frozen(ino)
                self._resize(ino, end, max(-(-end // PS), int(rec["npages"])), _now(), data, offset)
            return len(data)

    def stamp_write(self, ino: int, now_ns: int, *, granularity_ns: int = 0) -> None:
        """Set mtime and ctime of ``ino`` for a data write inside its size: two 8-byte stores, no journal.

        ``granularity_ns``: leave both as they are while mtime is less than
        that many nanoseconds before ``now_ns`` (a clock's granularity: the
        FUSE write path would otherwise store them for every request); an
        mtime ahead of ``now_ns`` is always replaced.

        Each field is one aligned 8-byte word, so a kill leaves it old or
        new, never torn; and under ``lock`` no transaction sits between its
        commit and applied stores, so no replay can bring back an older
        copy of the record. ctime goes first: a kill between the stores
        leaves ctime >= mtime. A journal transaction here would cost a
        commit per ``write()`` on the FUSE hot path.
        """
        with self.lock:
            self._writable()
            self._inode(ino)
            if 0 <= now_ns - int(self.inodes["mtime_ns"][ino]) < granularity_ns:
                return
            self.inodes["ctime_ns"][ino] = now_ns
            self.inodes["mtime_ns"][ino] = now_ns

    def image_span(self, ino: int, offset: int, length: int, *,
                   guest_only: bool = False) -> tuple[int, int] | None:
        """``(image offset, nbytes)`` of file bytes [offset, min(offset + length, size)) if one extent holds them.

        None if that range is empty or crosses an extent boundary, or if
        ``ino`` is not a page-holding inode (not a guest-RAM file, with
        ``guest_only``): the caller then takes the general path
        (``read``/``write``). For zero-copy reads and single-``pwrite``
        writes; hold ``lock`` while the span is used, since a truncate could
        free its pages.
        """
        with self.lock:
            if offset < 0 or not 0 < ino < self.geometry.inode_count:
                return None
            rec = self.inodes[ino]
            kind = int(rec["kind"])
            if kind != fmt.KIND_GUEST if guest_only else kind not in fmt.KINDS_WITH_PAGES:
                return None
            end = min(offset + length, int(rec["size"]))
            if end <= offset:
                return None
            fm = self._file_map(ino)
            i = int(np.searchsorted(fm.file_pages, offset // PS, side="right")) - 1
            if i < 0:
                return None
            ext_start = int(fm.file_pages[i]) * PS
            if end > ext_start + int(fm.counts[i]) * PS:
                return None
            return int(fm.pages[i]) * PS + offset - ext_start, end - offset

    def read(self, ino: int, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes at ``offset``, clipped at the end of the file."""
        with self.lock:
            rec = self._inode(ino)
            if int(rec["kind"]) == fmt.KIND_DIR:
                raise StoreError(errno.EISDIR, f"inode {ino} is a directory")
            if offset < 0 or length < 0:
                raise StoreError(errno.EINVAL, "negative offset or length")
            end = min(offset + length, int(rec["size"]))
            if end <= offset:
                return b""
            return b"".join(self.image[a:b].tobytes() for a, b in self._spans(self._file_map(ino), offset, end))

    def grow(self, ino: int, npages: int) -> list[Extent]:
        """Append ``npages`` zeroed pages to a file (how IOMMU files get table pages)."""
        with self.lock:
            self._writable()
            rec = self._inode(ino)
            if int(rec["kind"]) not in fmt.KINDS_WITH_PAGES:
                raise StoreError(errno.EISDIR, f"inode {ino} holds no pages")
            if npages < 0:  # would shrink the file below its size: an invalid inode
                raise StoreError(errno.EINVAL, f"cannot grow inode {ino} by {npages} pages")
            old = int(rec["npages"])
            total = old + npages
            self._resize(ino, max(int(rec["size"]), total * PS), total, _now(), b"")
            return [e for e in self.extents(ino) if e.file_offset + e.length > old * PS]

    # -------------------------------------------------------------- internals

    def _guest_file(self, ino: int) -> np.ndarray:
        """The inode record of ``ino`` if its data may change (a guest-RAM file of a writable store)."""
        self._writable()
        rec = self._inode(ino)
        kind = int(rec["kind"])
        if kind == fmt.KIND_DIR:
            raise StoreError(errno.EISDIR, f"inode {ino} is a directory")
        if kind != fmt.KIND_GUEST:
            raise StoreError(errno.EPERM, f"inode {ino} is an IOMMU file")
        return rec

    def _resize(self, ino: int, size: int, new_pages: int, now: int, data: bytes | memoryview,
                offset: int = 0) -> None:
        """One transaction: allocate or free pages, write ``data`` at ``offset``, set size."""
        rec = self.inodes[ino : ino + 1].copy()
        old_size, old_pages = int(rec["size"][0]), int(rec["npages"][0])
        fm = self._file_map(ino)
        txn = Transaction()
        alloc: list[Run] = []
        freed: list[Run] = []
        new_map = fm
        if new_pages > old_pages:
            alloc = self.allocator.find(new_pages - old_pages, old_pages) or []
            if not alloc:
                raise StoreError(errno.ENOSPC, f"no room for {new_pages - old_pages} pages")
            new_map = self._stage_extend(txn, ino, fm, old_pages, alloc)
            self._zero_pages(alloc)  # free pages: invisible until the commit
        elif new_pages < old_pages:
            new_map, freed = self._stage_shrink(txn, ino, fm, new_pages)
        if size > old_size and old_pages:
            # the old last page's bytes past the end become file contents
            self._zero_span(fm, old_size, min(size, old_pages * PS))
        if data:
            self._copy_in(new_map, offset, data)  # past the old end: invisible until commit
        for run_set, value in ((alloc, True), (freed, False)):
            for byte_off, bits in self.allocator.bitmap_records(run_set, value) if run_set else ():
                txn.put(self.geometry.bitmap_page * PS + byte_off, bits)
        rec["size"], rec["npages"] = size, new_pages
        rec["nextents"] = new_map.records.size
        rec["mtime_ns"] = rec["ctime_ns"] = now
        txn.put(self._inode_off(ino), rec)
        self.journal.commit(txn)
        if alloc:
            self.allocator.apply(alloc, True)
        if freed:
            self.allocator.apply(freed, False)
            self._zero_pages(freed)
        self._files[ino] = new_map
        self._owner_index = None

    def _stage_extend(self, txn: Transaction, ino: int, fm: _FileMap, old_pages: int,
                      runs: list[Run]) -> _FileMap:
        """Stage extent records appending ``runs`` at file page ``old_pages``."""
        table = self.extents_table
        records, file_pages = fm.records.tolist(), fm.file_pages.tolist()
        pages, counts = fm.pages.tolist(), fm.counts.tolist()
        fp = old_pages
        new_runs = list(runs)
        if records and pages[-1] + counts[-1] == new_runs[0][0]:
            # physically contiguous with the last extent: lengthen it
            counts[-1] += new_runs[0][1]
            fp += new_runs[0][1]
            new_runs.pop(0)
            rec = table[records[-1] : records[-1] + 1].copy()
            rec["npages"] = counts[-1]
            txn.put(self._extent_off(records[-1]), rec)
        if new_runs:
            limit = max_file_extents(self.geometry)
            if len(records) + len(new_runs) > limit:
                raise StoreError(errno.ENOSPC, f"a file of more than {limit} extents could not be freed "
                                               "in one journal transaction")
            free = np.flatnonzero(table["npages"] == 0)[: len(new_runs)]
            if free.size < len(new_runs):
                raise StoreError(errno.ENOSPC, "extent table full")
            out = np.zeros(len(new_runs), fmt.EXTENT_DTYPE)
            for i, (page, n) in enumerate(new_runs):
                out[i] = (ino, 0, fp, page, n)
                records.append(int(free[i]))
                file_pages.append(fp)
                pages.append(page)
                counts.append(n)
                fp += n
            # free records found by flatnonzero are ascending but not adjacent in general
            for i, r in enumerate(free.tolist()):
                txn.put(self._extent_off(r), out[i : i + 1])
        return _FileMap(np.array(records, np.int64), np.array(file_pages, np.int64),
                        np.array(pages, np.int64), np.array(counts, np.int64))

    def _stage_shrink(self, txn: Transaction, ino: int, fm: _FileMap, new_pages: int) -> tuple[_FileMap, list[Run]]:
        """Stage extent records keeping file pages [0, new_pages); return the freed runs."""
        keep = np.flatnonzero(fm.file_pages < new_pages)
        drop = np.flatnonzero(fm.file_pages >= new_pages)
        freed: list[Run] = [(int(fm.pages[i]), int(fm.counts[i])) for i in drop]
        zero = np.zeros(1, fmt.EXTENT_DTYPE)
        for i in drop.tolist():
            txn.put(self._extent_off(int(fm.records[i])), zero)
        counts = fm.counts[keep].copy()
        if keep.size:
            last = keep[-1]
            cut = int(fm.file_pages[last] + fm.counts[last]) - new_pages
            if cut > 0:
                counts[-1] -= cut
                freed.append((int(fm.pages[last] + counts[-1]), cut))
                rec = self.extents_table[int(fm.records[last]) : int(fm.records[last]) + 1].copy()
                rec["npages"] = counts[-1]
                txn.put(self._extent_off(int(fm.records[last])), rec)
        return _FileMap(fm.records[keep], fm.file_pages[keep], fm.pages[keep], counts), freed

    def _stage_drop(self, txn: Transaction, ino: int, keep_open: bool, now: int) -> list[Run]:
        """Stage removing ``ino``'s name; orphan it or free it. Returns freed runs."""
        txn.put(self._dentry_off(ino), np.zeros(1, fmt.DENTRY_DTYPE))
        rec = self.inodes[ino : ino + 1].copy()
        if keep_open:
            rec["flags"] |= fmt.IFLAG_ORPHAN
            rec["ctime_ns"] = now
            txn.put(self._inode_off(ino), rec)
            return []
        fm = self._file_map(ino) if int(rec["kind"][0]) in fmt.KINDS_WITH_PAGES else None
        freed: list[Run] = []
        if fm is not None and fm.records.size:
            zero = np.zeros(1, fmt.EXTENT_DTYPE)
            for r in fm.records.tolist():
                txn.put(self._extent_off(r), zero)
            freed = list(zip(fm.pages.tolist(), fm.counts.tolist()))
            for byte_off, bits in self.allocator.bitmap_records(freed, False):
                txn.put(self.geometry.bitmap_page * PS + byte_off, bits)
        cleared = np.zeros(1, fmt.INODE_DTYPE)
        cleared["igen"] = rec["igen"]
        txn.put(self._inode_off(ino), cleared)
        return freed

    def _after_drop(self, ino: int, keep_open: bool, freed: list[Run]) -> None:
        if keep_open:
            return
        self._files.pop(ino, None)
        self._unread_maps.pop(ino, None)
        if freed:
            self.allocator.apply(freed, False)
            self._zero_pages(freed)
            self._owner_index = None

    def _check_removable(self, ino: int, pinned_ok: bool = False) -> None:
        kind = int(self.inodes["kind"][ino])
        if kind in fmt.DAEMON_KINDS or ino in (fmt.ROOT_INO,) or self._is_top_dir(ino):
            raise StoreError(errno.EPERM, f"{self.path_of(ino)!r} is managed by pkfuse")
        if not pinned_ok and self._pinned(ino):
            raise StoreError(errno.EBUSY, f"inode {ino} is pinned: an IOMMU domain or a VMM maps it, "
                                          "or live update preserves it")

    def _is_top_dir(self, ino: int) -> bool:
        top = self._children.get(fmt.ROOT_INO, {})
        return ino in (top.get(fmt.GUEST_DIR_NAME), top.get(fmt.IOMMU_DIR_NAME))

    def _pinned(self, ino: int) -> bool:
        return bool(self.pin_hook and self.pin_hook(ino)) or bool(self.frozen_hook and self.frozen_hook(ino)) \
            or bool(self.map_hook and self.map_hook(ino))

    def _check_size_frozen(self, ino: int) -> None:
        if self.frozen_hook and self.frozen_hook(ino):
            raise StoreError(errno.EBUSY, f"inode {ino} is preserved for live update: its size is frozen")
        if self.map_hook and self.map_hook(ino):
            raise StoreError(errno.EBUSY, f"inode {ino} is mapped as guest memory: its size is fixed while mapped")

    def _spans(self, fm: _FileMap, start: int, end: int) -> list[tuple[int, int]]:
        """Image byte ranges holding file bytes [start, end)."""
        first = int(np.searchsorted(fm.file_pages, start // PS, side="right")) - 1
        out = []
        i = max(first, 0)
        pos = start
        while pos < end and i < fm.file_pages.size:
            ext_start = int(fm.file_pages[i]) * PS
            ext_end = ext_start + int(fm.counts[i]) * PS
            if pos < ext_end:
                a = int(fm.pages[i]) * PS + (pos - ext_start)
                n = min(end, ext_end) - pos
                out.append((a, a + n))
                pos += n
            i += 1
        if pos < end:
            raise StoreError(errno.EIO, f"file bytes {pos}..{end} have no extent")
        return out

    def _copy_in(self, fm: _FileMap, offset: int, data: bytes | memoryview) -> None:
        src = np.frombuffer(data, dtype=np.uint8)
        pos = 0
        for a, b in self._spans(fm, offset, offset + src.size):
            self.image[a:b] = src[pos : pos + (b - a)]
            pos += b - a

    def _zero_span(self, fm: _FileMap, start: int, end: int) -> None:
        if end > start:
            for a, b in self._spans(fm, start, end):
                self.image[a:b] = 0

    def _zero_pages(self, runs: list[Run]) -> None:
        """Make free pages read as zero: before they join a file, and after a commit freed
        them (their old bytes must not leak; punching also gives them back to the host)."""
        for page, n in runs:
            if not self._punch(page, n):
                self.image[page * PS : (page + n) * PS] = 0

    def _punch(self, page: int, n: int) -> bool:
        # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE: reads as zero, costs no
        # time per byte on ext4/xfs/tmpfs; fall back to stores elsewhere
        try:
            _fallocate(self._fd, 0x03, page * PS, n * PS)
            return True
        except OSError:
            return False

    def _touch(self, txn: Transaction, ino: int, now: int) -> None:
        """Stage mtime and ctime of ``ino`` in ``txn`` (a directory whose entries change)."""
        rec = self.inodes[ino : ino + 1].copy()
        rec["mtime_ns"] = rec["ctime_ns"] = now
        txn.put(self._inode_off(ino), rec)

    def _index_extents(self) -> None:
        """Sort the extent table once; per-file maps are cut from it on first use.

        Open must cost little per file (a mount of thousands of guest files
        answers in milliseconds), so no per-file arrays are built here.
        """
        table = self.extents_table
        live = np.flatnonzero(table["npages"] != 0)
        inos = table["ino"][live]
        order = np.lexsort((table["file_page"][live], inos))
        live, inos = live[order], inos[order]
        self._sorted_extents = (live.astype(np.int64), table["file_page"][live].astype(np.int64),
                                table["page"][live].astype(np.int64), table["npages"][live].astype(np.int64))
        firsts = np.flatnonzero(np.r_[True, inos[1:] != inos[:-1]]) if live.size else live
        ends = np.r_[firsts[1:], live.size] if live.size else live
        self._files = {}
        self._unread_maps = dict(zip(inos[firsts].tolist(), zip(firsts.tolist(), ends.tolist())))

    def _file_map(self, ino: int) -> _FileMap:
        """The extents of page-holding inode ``ino`` (empty for a file with no pages)."""
        fm = self._files.get(ino)
        if fm is None:
            span = self._unread_maps.pop(ino, None)
            if span is None:
                fm = self._empty_map()
            else:
                fm = _FileMap(*(a[span[0] : span[1]] for a in self._sorted_extents))
            self._files[ino] = fm
        return fm

    @staticmethod
    def _empty_map() -> _FileMap:
        e = np.zeros(0, np.int64)
        return _FileMap(e, e, e, e)

    def _dir(self, ino: int) -> dict[bytes, int]:
        self._inode(ino)
        kids = self._children.get(ino)
        if kids is None:
            raise StoreError(errno.ENOTDIR, f"inode {ino} is not a directory")
        return kids

    def _inode(self, ino: int) -> np.ndarray:
        if not 0 < ino < self.geometry.inode_count or self.inodes["kind"][ino] == fmt.KIND_FREE:
            raise StoreError(errno.ENOENT, f"no inode {ino}")
        return self.inodes[ino]

    def _writable(self) -> None:
        if self.read_only:
            raise StoreError(errno.EROFS, "image opened read-only")

    def _dentry(self, parent: int, name: bytes) -> np.ndarray:
        d = np.zeros(1, fmt.DENTRY_DTYPE)
        d["parent"], d["name_len"], d["name"] = parent, len(name), name
        return d

    def _table(self, page: int, count: int, dtype: np.dtype) -> np.ndarray:
        return record_table(self.image, page, count, dtype)

    def _inode_off(self, ino: int) -> int:
        return self.geometry.inode_off(ino)

    def _dentry_off(self, ino: int) -> int:
        return self.geometry.dentry_off(ino)

    def _extent_off(self, idx: int) -> int:
        return self.geometry.extent_off(idx)


def _geometry_from_superblock(sb_bytes: bytes, file_size: int) -> fmt.Geometry:
    """The geometry the superblock claims, accepted only if fsck's superblock checks pass."""
    geometry, findings = fsck.check_superblock(sb_bytes, file_size)
    if geometry is None or findings:
        raise _format_error(findings[0])
    return geometry


def _format_error(finding: Finding) -> FormatError:
    return FormatError(finding.structure, finding.offset, finding.problem)


def _load_fallocate() -> Callable[[int, int, int, int], None]:
    import ctypes
    import ctypes.util

    try:  # find_library runs ldconfig in a subprocess: tens of ms at every daemon start
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    fn = libc.fallocate
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]

    def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
        if fn(fd, mode, offset, length) != 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))

    return fallocate


_fallocate = _load_fallocate()
