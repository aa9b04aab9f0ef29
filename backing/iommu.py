"""IOMMU domains: VT-d second-level page tables, in the image (kept by a restart) or in
ephemeral memory (not kept).

Objects
-------
``Iommu`` is the kernel's IOMMU driver state for one open store: the
root-pgtables file (VT-d root table in file page 0, context table of bus
``b`` in file page ``1 + b``), every domain, the per-guest-file pin counts
(installed as ``store.pin_hook``) and, optionally, the simulated register
block and the ephemeral memory (``backing.ephemeral``). ``Domain`` is one
domain; where its tables live is its ``TableMemory``:

* ``ImageTables`` -- the file ``iommu/dom-<DID>``: file page 0 its header
  (``format.DOMAIN_HEADER_DTYPE``, KHO-style compatible string), file page
  1 its SL-PML4, the other file pages its pool of table pages. Nothing
  about such a domain lives outside the image. Which pool pages are in use
  is *derived*: ``Iommu.open`` walks each tree from its SL-PML4 and every
  pool page not reachable is free (this also reclaims tables that a kill
  cut off in the middle of a map).
* ``EphemeralTables`` -- pages of the ephemeral memory, host RAM outside
  the reserved range (issue 11, "Where domains live": normal domains live
  there, only the fixed domain a live-update freeze fills lives in the
  image). No file and no header: the domain is process state, and nothing
  of it survives a restart -- ``Iommu.open`` poisons that memory and clears
  every context entry pointing into it (anything at or above the image's
  end), blocking the device. Its pages never come from the image.

Both kinds have one API and one mapping code (the memory object only
allocates pages, holds freed ones for the grace period and encodes
pointers), share one DID space (``Iommu.domains``), pin guest files alike,
attach alike (a replacing attach between the kinds is hitless) and copy
into each other (``copy_domain``: ephemeral -> image with DOMF_SAVED is
the freeze; image -> ephemeral the restore). Table entries hold physical
addresses: of image pages, or of ephemeral pages; leaves always point at
guest pages in the image.

Ordering (what a walker in another process may observe)
-------------------------------------------------------
* A new table page is written completely (all 512 entries, as whole rows)
  before any entry that makes it reachable; every change to a reachable
  table is one aligned 8-byte store. So a concurrent walk sees each entry
  either old or new, never torn, and never a half-filled table. (A page of
  ephemeral memory handed out holds poison, never zeros: nothing relies on
  a fresh page being empty -- a new ephemeral domain's SL-PML4 is zeroed
  before the domain exists.)
* Splitting a superpage builds the equivalent next-level table first and
  swaps the parent entry with one store: translations do not change.
* Unmap clears leaves first, then the pointers to tables that became
  empty, then posts the IOTLB invalidation (below). A freed table page
  goes back to the pool only ``FREE_GRACE_S`` seconds later -- pkfuse's
  stand-in for the invalidation's wait descriptor: a walk that read the
  old pointer has finished, and a device has read the invalidation, before
  the page is reused. Pages found free at open are free at once: a restart
  takes longer than any walk.
* Root and context entries: attach makes the bus's root entry present
  first (its context table was zeroed at mkfs), then writes the context
  entry's hi word (DID, AW), then its lo word (SLPTPTR, TT, P) last; detach
  clears lo first so P drops in one store. A kill between the two stores
  leaves a non-present entry with an old hi word, which hardware ignores
  and fsck accepts. A replacing attach switches lo in one store (the entry
  stays present) and then hi (see ``Iommu.attach``), between the kinds too.

Invalidation (what a device's caches need, ``backing.iotlb``)
-------------------------------------------------------------
Hardware caches context entries and translations and drops them only when
the driver invalidates (VT-d queued invalidation: the register block's
queue, ``backing.regs``). As Linux does, the tables change first, then the
descriptors are posted: unmap of a domain attached somewhere -> IOTLB
page-selective for its DID over the range (domain-selective when the
aligned range exceeds ``INV_MAX_AM``); attach -> context-cache
device-selective for the SID; a replacing attach (the hitless switch) and
detach -> context-cache device-selective for the SID, then IOTLB
domain-selective for the old DID; domain free -> IOTLB domain-selective
(its DID may name the next domain); RTADDR/TE changes (``enable``,
``disable``) and every read-write ``open`` (the driver's start after a
restart: covers the context entries it clears, the poisoned ephemeral
memory, and whatever a killed predecessor changed without posting) ->
context-cache global, then IOTLB global. A map only fills not-present
entries and a superpage split keeps every translation, so they post none
(caching mode 0: hardware caches nothing not present). The iommufd,
live-update and command-line paths all change tables through these calls.

Crash consistency: pool growth is a journaled ``Store.grow``; table writes
need no journal because of the ordering above -- after a kill, every
translation is old or new and unreachable pages are free at the next open.
A domain file whose header magic is still zero (killed during creation) is
removed at open. Ephemeral tables need no crash story: a kill loses them all.

Superpages: ``map`` uses 1 GiB (SL-PDPE) and 2 MiB (SL-PDE) leaves wherever
the IOVA slot is wholly inside the request and IOVA and physical address
are aligned alike (``huge=False``: 4 KiB leaves only, for an IOAS whose
huge pages are off). ``unmap`` of part of a superpage splits it first (the
rest stays mapped), so unmap works on any 4 KiB-aligned range.

All state changes hold ``store.lock``; none sleeps while holding it
(``destroy_domain`` waits out its grace period with the lock released).
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import time
from collections.abc import Callable, Iterable

import numpy as np

from . import format as fmt
from . import vtd
from .allocator import expand_runs
from .domainhdr import MAX_DOMAIN_ID, check_domain_file, domain_file_name
from .ephemeral import EphemeralMemory, check_placement, default_base, image_end
from .errors import Finding, FormatError, PkfuseError, StoreError
from .regs import Regs
from .store import Store

log = logging.getLogger(__name__)

PS = fmt.PAGE_SIZE
U64 = np.uint64
GROW_CHUNK = 64  #: pool pages added at a time (a big map grows by exactly what it needs)
FREE_GRACE_S = 1.0  #: seconds before a freed table page may be reused (invalidation wait)
_LEVEL_PAGES = vtd.LEVEL_PAGES
_IOVA_PAGES = 1 << (fmt.VTD_IOVA_BITS - fmt.PAGE_SHIFT)
#: 4 KiB leaves per run of consecutive frames, on average, above which pins are
#: counted per run (owner lookups per extent) rather than per page
_RUN_LOOKUP_PAGES = 1024


@dataclasses.dataclass(frozen=True)
class MappingRange:
    """A run of IOVA space mapped contiguously to one guest file."""

    iova: int
    phys_addr: int
    length: int  #: bytes
    write: bool
    ino: int  #: owning guest-RAM file (0: not a guest page -- corrupt tables)
    file_offset: int
    path: str


def _errno(code: int, msg: str) -> StoreError:
    return StoreError(code, msg)


def _next_slots(a: int, b: int, level: int, parents: np.ndarray, children: np.ndarray,
                ) -> tuple[np.ndarray, np.ndarray]:
    """The slots at ``level + 1`` inside IOVA pages [a, b) under each parent slot at
    ``level``, and the table page (or new-table ref) of each: the next step of a descent."""
    nsp = _LEVEL_PAGES[level + 1]
    lo, hi = a // nsp, (b - 1) // nsp + 1
    starts = np.maximum(parents * 512, lo)
    counts = np.minimum(parents * 512 + 512, hi) - starts
    return expand_runs(starts, counts), np.repeat(children, counts)


class TableMemory:
    """Where one domain's table pages live: a pool of pages in one physical memory.

    ``pages`` is the memory page of each *slot* (the memory's ``u64`` holds
    page ``p`` at words ``p * 512 ..``); slot ``first - 1`` is the SL-PML4,
    the slots from ``first`` are the pool the domain's other tables come
    from. ``ImageTables`` are the pages of the file ``iommu/dom-<DID>`` (slot
    = file page: 0 the header, 1 the SL-PML4); ``EphemeralTables`` are pages
    of the ephemeral memory (slot 0 the SL-PML4). Everything else -- which
    pool pages are free, the grace period of freed ones, encoding and
    checking pointers -- is this class, the same for both, so the mapping
    code of ``Domain`` is written once.
    """

    first = 2  #: slot of the first pool page
    ephemeral = False
    ino = 0  #: the domain file's inode (image tables only)

    def __init__(self) -> None:
        self.pages = np.zeros(0, np.int64)  #: memory page of each slot
        self._sorted = np.zeros(0, np.int64)  #: pool pages (slots >= first), sorted
        self._sorted_slot = np.zeros(0, np.int64)
        self._free = np.zeros(0, bool)  #: per slot: free for allocation now
        self._held: list[tuple[float, np.ndarray]] = []  #: (reusable after, slots)

    # ---------------------------------------------------------- the memory

    base_pfn: int  #: page frame number of memory page 0

    @property
    def u64(self) -> np.ndarray:
        raise NotImplementedError

    @property
    def tables(self) -> np.ndarray:
        """The memory as rows of 512 entries, one row per page."""
        raise NotImplementedError

    @property
    def alive(self) -> bool:
        """False once the memory the tables were in is gone (ephemeral memory poisoned)."""
        return True

    def _grow(self, k: int) -> np.ndarray:
        """The memory page of every slot once at least ``k`` pool slots were added."""
        raise NotImplementedError

    def destroy(self) -> None:
        """Give every page back to the memory (the grace period has passed)."""
        raise NotImplementedError

    # -------------------------------------------------------------- pool

    @property
    def pml4_page(self) -> int:
        return int(self.pages[self.first - 1])

    @property
    def pml4_phys(self) -> int:
        return (self.base_pfn + self.pml4_page) << fmt.PAGE_SHIFT

    @property
    def allowed(self) -> np.ndarray:
        """Sorted pages that may hold this domain's tables below the SL-PML4 (``vtd.walk_tree``)."""
        return self._sorted

    @property
    def table_pages(self) -> int:
        """Pages holding live tables (SL-PML4 included)."""
        return int(self.pages.size - (self.first - 1) - np.count_nonzero(self._free)
                   - sum(h.size for _, h in self._held))

    def _set_pages(self, pages: np.ndarray) -> None:
        old = self._free.size
        free = np.zeros(pages.size, bool)
        free[:old] = self._free
        free[max(old, self.first):] = True
        self.pages, self._free = pages, free
        slots = np.arange(self.first, pages.size, dtype=np.int64)
        order = np.argsort(pages[self.first:], kind="stable")
        self._sorted, self._sorted_slot = pages[self.first:][order], slots[order]

    def slots_of(self, pages: np.ndarray) -> np.ndarray:
        """Slot of each pool page (all must be in the pool)."""
        return self._sorted_slot[np.searchsorted(self._sorted, pages)]

    def in_pool(self, pages: np.ndarray) -> np.ndarray:
        if not self._sorted.size:
            return np.zeros(pages.shape, bool)
        pos = np.minimum(np.searchsorted(self._sorted, pages), self._sorted.size - 1)
        return self._sorted[pos] == pages

    def mark_used(self, used: np.ndarray) -> None:
        """At open: the pool pages in ``used`` hold tables, every other one is free at once
        (a restart takes longer than any walk: no grace needed)."""
        free = np.ones(self.pages.size, bool)
        free[: self.first] = False
        free[self.slots_of(used)] = False
        self._free[:] = free
        self._held = []

    def _release_held(self) -> None:
        now = time.monotonic()
        keep = []
        for when, slots in self._held:
            if when <= now:
                self._free[slots] = True
            else:
                keep.append((when, slots))
        self._held = keep

    def alloc(self, k: int) -> np.ndarray:
        """``k`` table pages (memory pages), growing the pool if it is short. Their
        contents are stale (or poison): the caller writes each one whole."""
        if k == 0:
            return np.zeros(0, np.int64)
        self._release_held()
        free = np.flatnonzero(self._free)
        if free.size < k:
            self._set_pages(self._grow(max(GROW_CHUNK, k - free.size)))
            free = np.flatnonzero(self._free)
        take = free[:k]
        self._free[take] = False
        return self.pages[take]

    def hold(self, pages: np.ndarray) -> None:
        """Return table pages to the pool after the grace period."""
        if pages.size:
            self._held.append((time.monotonic() + FREE_GRACE_S, self.slots_of(pages)))

    # ---------------------------------------------------------- pointers

    def phys_entry(self, pages: np.ndarray) -> np.ndarray:
        """Non-leaf entries pointing at tables in memory ``pages``."""
        return ((pages.astype(U64) + U64(self.base_pfn)) << U64(fmt.PAGE_SHIFT)) | U64(vtd.RW)

    def child_pages(self, entries: np.ndarray, where: np.ndarray, path: str) -> np.ndarray:
        """The pool page each non-leaf entry points at; FormatError for one outside the pool."""
        child = vtd.entry_pages(entries, self.base_pfn)
        bad = ~self.in_pool(child)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise FormatError(f"{path} table entry", int(where[i]) * 8,
                              f"points at page {int(child[i])} outside the domain's pool")
        return child


class ImageTables(TableMemory):
    """A domain's tables in the image: the pages of its file ``iommu/dom-<DID>``, grown by a
    journaled ``Store.grow``, freed by unlinking the file."""

    def __init__(self, store: Store, iommu_dir: int, ino: int, name: bytes) -> None:
        super().__init__()
        self.store = store
        self.iommu_dir = iommu_dir
        self.ino = ino
        self.name = name
        self.base_pfn = store.geometry.base_pfn
        self._set_pages(store.image_pages(ino))

    @property
    def u64(self) -> np.ndarray:
        return self.store.image_u64

    @property
    def tables(self) -> np.ndarray:
        u = self.store.image_u64
        return u[: u.size // 512 * 512].reshape(-1, 512)

    def _grow(self, k: int) -> np.ndarray:
        self.store.grow(self.ino, k)
        return self.store.image_pages(self.ino)

    def destroy(self) -> None:
        self.store.unlink(self.iommu_dir, self.name, managed=True)


class EphemeralTables(TableMemory):
    """A domain's tables in ephemeral memory (``backing.ephemeral``): no file, no header,
    pages taken from the memory's allocator ``GROW_CHUNK`` at a time and given back (poisoned)
    when the domain is destroyed. Nothing of it survives a restart: after the memory is
    poisoned (``boot_id`` changed) the tables are gone and ``alive`` is False."""

    first = 1
    ephemeral = True

    def __init__(self, memory: EphemeralMemory) -> None:
        super().__init__()
        self.memory = memory
        self.base_pfn = memory.base_pfn
        self.boot_id = memory.boot_id
        self._set_pages(memory.alloc(1 + GROW_CHUNK))

    @property
    def u64(self) -> np.ndarray:
        return self.memory.u64

    @property
    def tables(self) -> np.ndarray:
        return self.memory.tables

    @property
    def alive(self) -> bool:
        return self.memory.boot_id == self.boot_id

    def _grow(self, k: int) -> np.ndarray:
        return np.concatenate([self.pages, self.memory.alloc(k)])

    def destroy(self) -> None:
        if self.alive:  # else the poison took the pages back already
            self.memory.free(self.pages)


class Domain:
    """One IOMMU domain: a 4-level second-level tree in its ``TableMemory`` -- the file
    ``iommu/dom-<DID>`` in the image, or pages of the ephemeral memory."""

    def __init__(self, iommu: Iommu, memory: TableMemory, domain_id: int, flags: int) -> None:
        self.iommu = iommu
        self.store = iommu.store
        self.memory = memory
        self.name = domain_file_name(domain_id).decode()
        self.domain_id = domain_id
        self.flags = flags
        self.pins: dict[int, int] = {}  #: guest ino -> pages this domain maps
        self._quiet_after = 0.0  #: destroy waits until a walker cannot be inside

    # -------------------------------------------------------------- identity

    @property
    def ephemeral(self) -> bool:
        return self.memory.ephemeral

    @property
    def ino(self) -> int:
        """The domain file's inode (0 for an ephemeral domain: it has no file)."""
        return self.memory.ino

    @property
    def path(self) -> str:
        return f"{'ephemeral' if self.ephemeral else 'iommu'}/{self.name}"

    @property
    def pml4_page(self) -> int:
        """The SL-PML4's page in the domain's memory (image page, or ephemeral page)."""
        return self.memory.pml4_page

    @property
    def pml4_phys(self) -> int:
        return self.memory.pml4_phys

    @property
    def table_pages(self) -> int:
        """Pages holding live tables (SL-PML4 included)."""
        return self.memory.table_pages

    @property
    def file_pages(self) -> int:
        """Pages the domain holds (its file's, or taken from the ephemeral memory)."""
        return int(self.memory.pages.size)

    @property
    def attached(self) -> list[int]:
        return sorted(s for s, d in self.iommu.attached.items() if d == self.domain_id)

    def __repr__(self) -> str:
        return f"Domain({self.path}, DID {self.domain_id})"

    # ----------------------------------------------------------- table I/O

    @property
    def _pages(self) -> np.ndarray:
        return self.memory.pages

    @property
    def _u64(self) -> np.ndarray:
        return self.memory.u64

    @property
    def _tables(self) -> np.ndarray:
        return self.memory.tables

    def _alloc(self, k: int) -> np.ndarray:
        return self.memory.alloc(k)

    def _hold(self, pages: np.ndarray) -> None:
        self.memory.hold(pages)

    def _phys_entry(self, pages: np.ndarray) -> np.ndarray:
        return self.memory.phys_entry(pages)

    def _child_pages(self, entries: np.ndarray, where: np.ndarray) -> np.ndarray:
        return self.memory.child_pages(entries, where, self.path)

    # ------------------------------------------------------------- mapping

    def map(self, iova: int, phys_addr: int, length: int, *, write: bool = True, huge: bool = True) -> None:
        """Map ``[iova, iova + length)`` to ``[phys_addr, ...)``, readable, writable if ``write``.

        ``huge`` False: 4 KiB leaves only, no superpage (iommufd's IOAS with
        ``IOMMU_OPTION_HUGE_PAGES`` 0: "everything is mapped to PAGE_SIZE").
        Refuses (StoreError) EINVAL for misalignment or a range beyond 48
        bits, EFAULT unless every physical page belongs to a guest-RAM
        file, EEXIST if any part of the IOVA range is mapped already. A
        refused map changes nothing.
        """
        _check_range(iova, length)
        if phys_addr % PS or phys_addr < 0:
            raise _errno(errno.EINVAL, f"phys_addr {phys_addr:#x} is not 4 KiB aligned")
        with self.store.lock:
            self.iommu._writable(self)
            g = self.store.geometry
            a, n = iova >> fmt.PAGE_SHIFT, length >> fmt.PAGE_SHIFT
            pfn0 = phys_addr >> fmt.PAGE_SHIFT
            runs = self.iommu._guest_runs(pfn0 - g.base_pfn, n, strict=True)
            plan = self._plan_map(a, a + n, pfn0, write, huge)
            self._apply_plan(plan)
            for ino, _page, count, _off in runs:
                self.pins[ino] = self.pins.get(ino, 0) + count

    def map_file(self, ino: int, offset: int, length: int, iova: int, *, write: bool = True,
                 huge: bool = True) -> None:
        """Map bytes ``[offset, offset + length)`` of guest-RAM file ``ino`` at ``iova``, all or nothing.

        The call behind iommufd's IOAS_MAP_FILE. Offsets and lengths are
        bytes. Refuses (StoreError) EINVAL unless ``ino`` is a guest-RAM
        file, ``offset``, ``length`` and ``iova`` are 4 KiB aligned,
        ``length > 0``, the range lies inside the file's allocated pages and
        ``[iova, iova + length)`` inside the 48-bit IOVA space. The range is
        split where the file's extents stop being physically contiguous and
        each piece goes through ``map`` (2 MiB and 1 GiB leaves wherever IOVA
        and physical address are aligned alike, unless ``huge`` is False: then
        4 KiB leaves only). If a piece is refused
        (EEXIST for an IOVA mapped already, ENOSPC for table pages, ...) the
        pieces mapped before it are unmapped, so translations and pins are
        as before the call. Holds ``store.lock`` throughout, so the file's
        layout cannot change between the checks and the last piece.
        """
        st = self.store
        with st.lock:
            try:
                attr = st.getattr(ino)
            except StoreError:
                attr = None
            if attr is None or attr.kind != fmt.KIND_GUEST:
                raise _errno(errno.EINVAL, f"inode {ino} is not a guest-RAM file")
            name = self.iommu._path(ino)
            for what, value in (("offset", offset), ("length", length), ("iova", iova)):
                if value < 0:
                    raise _errno(errno.EINVAL, f"{what} {value:#x} is negative")
                if value % PS:
                    raise _errno(errno.EINVAL, f"{what} {value:#x} is not 4 KiB aligned")
            if length == 0:  # else no piece, and mapping nothing would pass for success
                raise _errno(errno.EINVAL, "length 0 maps nothing")
            if offset + length > attr.npages * PS:
                raise _errno(errno.EINVAL, f"{name} has no bytes {offset:#x}..{offset + length:#x} "
                             f"(it holds {attr.npages * PS:#x})")
            if iova + length > vtd.IOVA_LIMIT:
                raise _errno(errno.EINVAL, f"IOVA range {iova:#x}+{length:#x} goes beyond the 48-bit address width")
            pieces: list[tuple[int, int, int]] = []  # (iova, phys_addr, bytes), physically contiguous each
            end = offset + length
            for e in st.extents(ino):
                lo, hi = max(offset, e.file_offset), min(end, e.file_offset + e.length)
                if lo >= hi:
                    continue
                p_iova, p_phys = iova + lo - offset, e.phys_addr + lo - e.file_offset
                if pieces and pieces[-1][1] + pieces[-1][2] == p_phys:
                    pieces[-1] = (pieces[-1][0], pieces[-1][1], pieces[-1][2] + hi - lo)
                else:
                    pieces.append((p_iova, p_phys, hi - lo))
            done: list[tuple[int, int]] = []
            try:
                for p_iova, p_phys, n in pieces:
                    self.map(p_iova, p_phys, n, write=write, huge=huge)
                    done.append((p_iova, n))
            except BaseException:
                for p_iova, n in reversed(done):  # all or nothing
                    self.unmap(p_iova, n)
                raise

    def _plan_map(self, a: int, b: int, pfn0: int, write: bool, huge: bool = True) -> _Plan:
        """Every entry a map of IOVA pages [a, b) writes; new tables numbered -1, -2, ...
        (superpages where aligned, unless ``huge`` is False)."""
        u64 = self._u64
        delta = pfn0 - a
        aligned = (False, huge and delta % _LEVEL_PAGES[1] == 0, huge and delta % _LEVEL_PAGES[2] == 0, True)
        plan = _Plan()
        slots, tref = self._pml4_slots(a, b)
        for level in range(fmt.VTD_LEVELS):
            sp = _LEVEL_PAGES[level]
            existing = tref >= 0
            ent = np.zeros(slots.size, U64)
            if existing.any():
                where = tref[existing] * 512 + (slots[existing] & 511)
                ent[existing] = u64[where]
            present = (ent & U64(vtd.RW)) != 0
            clash = present & vtd.is_leaf(level, ent)
            if clash.any():
                s = int(slots[np.flatnonzero(clash)[0]])
                raise _errno(errno.EEXIST, f"{self.path}: IOVA {max(s * sp, a) << fmt.PAGE_SHIFT:#x} is already mapped")
            if level == 3:
                make_leaf = np.ones(slots.size, bool)
            elif aligned[level]:
                first = slots * sp
                make_leaf = (first >= a) & (first + sp <= b) & ~present
            else:
                make_leaf = np.zeros(slots.size, bool)
            if make_leaf.any():
                s = slots[make_leaf]
                plan.add(tref[make_leaf], s & 511, vtd.leaf_entries(level, s * sp + delta, write), None)
            if level == 3:
                break
            need = ~make_leaf
            child = np.zeros(slots.size, np.int64)
            old = present & need
            if old.any():
                child[old] = self._child_pages(ent[old], tref[old] * 512 + (slots[old] & 511))
            new = need & ~present
            k = int(np.count_nonzero(new))
            if k:
                child[new] = -(plan.new_tables + np.arange(k, dtype=np.int64)) - 1
                plan.new_tables += k
                plan.add(tref[new], slots[new] & 511, None, child[new])
            slots, tref = _next_slots(a, b, level, slots[need], child[need])
        return plan

    def _apply_plan(self, plan: _Plan) -> None:
        """Write a plan: new tables whole (unreachable), then entries of live tables."""
        pages = self._alloc(plan.new_tables)
        tref, col, val, ptr = plan.arrays()
        if ptr.size:
            has_ptr = ptr != 0
            val[has_ptr] = self._phys_entry(pages[-ptr[has_ptr] - 1])
        new = tref < 0
        if plan.new_tables:
            contents = np.zeros((plan.new_tables, 512), U64)
            contents[-tref[new] - 1, col[new]] = val[new]
            self._tables[pages] = contents  # unreachable until the stores below
        live = ~new
        self._u64[tref[live] * 512 + col[live]] = val[live]  # one aligned 8-byte store each

    def unmap(self, iova: int, length: int) -> int:
        """Unmap ``[iova, iova + length)``; returns the bytes that were mapped there.

        Unmapped parts of the range are skipped. A superpage that the range
        covers in part is split first, so its other part stays mapped.
        """
        _check_range(iova, length)
        with self.store.lock:
            self.iommu._writable(self)
            a, b = iova >> fmt.PAGE_SHIFT, (iova + length) >> fmt.PAGE_SHIFT
            self._split_at(a)
            self._split_at(b)
            levels = self._range_levels(a, b)
            leaf_where, leaf_pfn, leaf_pages = [], [], []
            for level, (slots, _tref, where, ent) in enumerate(levels):
                m = ((ent & U64(vtd.RW)) != 0) & vtd.is_leaf(level, ent)
                if m.any():
                    leaf_where.append(where[m])
                    leaf_pfn.append(vtd.entry_pages(ent[m]))
                    leaf_pages.append(np.full(int(m.sum()), _LEVEL_PAGES[level], np.int64))
            if not leaf_where:
                return 0
            where = np.concatenate(leaf_where)
            self._u64[where] = 0  # leaves first
            freed = self._free_empty_tables(levels)
            self._hold(freed)
            if self.attached:  # then the IOTLB (a domain nobody is attached to has no entries cached)
                self.iommu._flush_iotlb_psi(self.domain_id, a, b)
            pfn, npages = np.concatenate(leaf_pfn), np.concatenate(leaf_pages)
            self._unpin(pfn, npages)
            return int(npages.sum()) * PS

    def _unpin(self, pfn: np.ndarray, npages: np.ndarray) -> None:
        for ino, c in self.iommu._count_owners(pfn, npages).items():
            left = self.pins.get(ino, 0) - c
            if left > 0:
                self.pins[ino] = left
            else:
                self.pins.pop(ino, None)

    def _free_empty_tables(self, levels: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]) -> np.ndarray:
        """Clear pointers to tables (below the SL-PML4) left empty, bottom-up; return their pages."""
        tables = self._tables
        freed = []
        for level in range(3, 0, -1):
            _slots, tref, _where, _ent = levels[level]
            cand = np.unique(tref)
            if not cand.size:
                continue
            empty = cand[~tables[cand].any(axis=1)]
            if not empty.size:
                continue
            # the parent entries pointing at them, from the level above
            _ps, _pt, pwhere, pent = levels[level - 1]
            pres = ((pent & U64(vtd.RW)) != 0) & ~vtd.is_leaf(level - 1, pent)
            child = vtd.entry_pages(pent, self.memory.base_pfn)
            hit = pres & np.isin(child, empty)
            self._u64[pwhere[hit]] = 0  # after the leaves below them were cleared
            freed.append(child[hit])
        return np.concatenate(freed) if freed else np.zeros(0, np.int64)

    def _range_levels(self, a: int, b: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
        """Per level (slots, table page, u64 index, entry) of live entries covering [a, b)."""
        u64 = self._u64
        out = []
        slots, tref = self._pml4_slots(a, b)
        for level in range(fmt.VTD_LEVELS):
            where = tref * 512 + (slots & 511)
            ent = u64[where]
            out.append((slots, tref, where, ent))
            if level == 3:
                break
            desc = ((ent & U64(vtd.RW)) != 0) & ~vtd.is_leaf(level, ent)
            slots, tref = _next_slots(a, b, level, slots[desc], self._child_pages(ent[desc], where[desc]))
        return out

    def _pml4_slots(self, a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
        """The SL-PML4 slots covering IOVA pages [a, b), each with the SL-PML4's page."""
        slots = np.arange(a // _LEVEL_PAGES[0], (b - 1) // _LEVEL_PAGES[0] + 1, dtype=np.int64)
        return slots, np.full(slots.size, self.pml4_page, np.int64)

    def _split_at(self, page: int) -> None:
        """Split superpages that contain both IOVA pages ``page - 1`` and ``page``."""
        if page <= 0 or page >= _IOVA_PAGES:
            return
        u64 = self._u64
        table = self.pml4_page
        for level in range(3):
            where = table * 512 + (page // _LEVEL_PAGES[level]) % 512
            e = int(u64[where])
            if not e & vtd.RW:
                return
            if level and e & fmt.SL_PS:
                if page % _LEVEL_PAGES[level] == 0:
                    return
                pfn = int(vtd.entry_pages(e))
                sub = level + 1
                pfns = pfn + np.arange(512, dtype=np.int64) * _LEVEL_PAGES[sub]
                contents = vtd.leaf_entries(sub, pfns, bool(e & fmt.SL_W))
                new = self._alloc(1)
                self._tables[int(new[0])] = contents  # the same translations, one level down
                u64[where] = self._phys_entry(new)[0]  # swap in one store
                e = int(u64[where])
            table = int(self._child_pages(np.array([e], U64), np.array([where]))[0])

    # ------------------------------------------------------------- queries

    def walk(self) -> tuple[list[vtd.Level], list[vtd.Problem]]:
        """The whole tree as read from the domain's memory (``vtd.walk_tree``): the levels'
        ``tables`` and ``where`` index that memory."""
        m = self.memory
        return vtd.walk_tree(m.u64, m.base_pfn, m.pml4_page, m.allowed)

    def mappings(self) -> list[MappingRange]:
        """Every mapping, coalesced into ranges, sorted by IOVA."""
        with self.store.lock:
            levels, _ = self.walk()
            iova, pfn, npages, wr = vtd.coalesce(*vtd.leaf_ranges(levels))
            g = self.store.geometry
            base_pfn = g.base_pfn
            out: list[MappingRange] = []
            for i, p, n, w in zip(iova.tolist(), pfn.tolist(), npages.tolist(), wr.tolist()):
                pos = i
                for ino, page, count, off in self.iommu._guest_runs(p - base_pfn, n, strict=False):
                    phys = g.phys_addr(page)
                    prev = out[-1] if out else None
                    if (prev and prev.ino == ino and prev.write == w and prev.iova + prev.length == pos * PS
                            and prev.phys_addr + prev.length == phys and prev.file_offset + prev.length == off):
                        out[-1] = dataclasses.replace(prev, length=prev.length + count * PS)
                    else:
                        out.append(MappingRange(pos * PS, phys, count * PS, w, ino, off, self.iommu._path(ino)))
                    pos += count
            return out

    def translate_soft(self, iova: int) -> int | None:
        """Software lookup of one IOVA in this domain (no context, no fault log): the
        physical address, or None where nothing is mapped (or the IOVA is beyond 48 bits)."""
        with self.store.lock:
            leaf = self.leaf_at(iova)
            if leaf is None:
                return None
            level, where = leaf
            offset = iova & ((1 << fmt.VTD_LEVEL_SHIFT[level]) - 1)
            return (int(vtd.entry_pages(int(self._u64[where]))) << fmt.PAGE_SHIFT) | offset

    def leaf_at(self, iova: int) -> tuple[int, int] | None:
        """The leaf translating ``iova``: (level, index of the entry in the memory's u64 view);
        None where nothing is mapped. For findings: the entry to name."""
        if not 0 <= iova < vtd.IOVA_LIMIT:
            return None
        with self.store.lock:
            table = self.pml4_page
            for level in range(fmt.VTD_LEVELS):
                where = table * 512 + (iova >> fmt.VTD_LEVEL_SHIFT[level]) % 512
                e = int(self._u64[where])
                if not e & vtd.RW:
                    return None
                if level == 3 or (level and e & fmt.SL_PS):
                    return level, where
                table = int(self._child_pages(np.array([e], U64), np.array([where]))[0])
            return None

    # ----------------------------------------------------------- requesters

    def attach(self, bus: int, dev: int, fn: int, *, replace: bool = False) -> None:
        self.iommu.attach(self, bus, dev, fn, replace=replace)

    def detach(self, bus: int, dev: int, fn: int) -> None:
        self.iommu.detach(self, bus, dev, fn)

    def copy_to(self, dst: Domain) -> None:
        self.iommu.copy_into(self, dst)


class _Plan:
    """Entries a map will write, in blocks: (table ref, index, value or child ref)."""

    def __init__(self) -> None:
        self.new_tables = 0
        self._blocks: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []

    def add(self, tref: np.ndarray, col: np.ndarray, val: np.ndarray | None, ptr: np.ndarray | None) -> None:
        n = tref.size
        self._blocks.append((tref, col, val if val is not None else np.zeros(n, U64),
                             ptr if ptr is not None else np.zeros(n, np.int64)))

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        if not self._blocks:
            z = np.zeros(0, np.int64)
            return z, z, np.zeros(0, U64), z
        if len(self._blocks) == 1:
            t, c, v, p = self._blocks[0]
            return t, c, v.copy(), p
        return tuple(np.concatenate(x) for x in zip(*self._blocks))  # type: ignore[return-value]


def _check_range(iova: int, length: int) -> None:
    if iova < 0 or length <= 0 or iova % PS or length % PS:
        raise _errno(errno.EINVAL, f"IOVA range {iova:#x}+{length:#x} is not 4 KiB aligned and non-empty")
    if iova + length > vtd.IOVA_LIMIT:
        raise _errno(errno.EINVAL, f"IOVA range {iova:#x}+{length:#x} goes beyond the 48-bit address width")


class Iommu:
    """The IOMMU driver's state over one open store (see the module docstring)."""

    def __init__(self, store: Store, regs: Regs | None) -> None:
        self.store = store
        self.regs = regs
        self.regs_error = ""  #: why the register block could not be opened
        self.ephemeral: EphemeralMemory | None = None  #: where ephemeral domains' tables live
        self._owns_ephemeral = False  #: opened by ``open`` from a path: ``close`` closes it
        self.domains: dict[int, Domain] = {}  #: image and ephemeral domains: one DID space
        self.attached: dict[int, int] = {}  #: source id -> domain id (-1: unknown tables)
        #: source id -> SLPTPTR of each context entry found at open pointing into memory
        #: above the image (ephemeral memory: no tables there survived); cleared unless read-only
        self.stale_entries: dict[int, int] = {}
        #: what ``open`` refused, one finding each: domains whose tables are garbage and table
        #: entries no valid domain explains (blocked and removed, unless the store is read-only);
        #: then what the restore blocked (``refuse_attachment``)
        self.refused: list[Finding] = []
        self.iommu_dir = 0
        self.root_ino = 0
        self.root_pages = np.zeros(0, np.int64)
        self._prev_pin_hook: Callable[[int], bool] | None = None  #: store.pin_hook before open

    # ------------------------------------------------------------ lifecycle

    @classmethod
    def open(cls, store: Store, regs_path: str | None = None, *,
             ephemeral: EphemeralMemory | str | os.PathLike[str] | None = None) -> Iommu:
        """Load every domain under ``/iommu`` and pin the guest files they map.

        Raises FormatError naming a domain whose format (magic, compatible
        string) is unknown or whose tree is malformed. A register block
        that cannot be opened does not stop the pins: it is logged, kept in
        ``regs_error``, and ``regs`` stays None.

        An open is the driver starting after a restart. ``ephemeral`` is the
        memory for ephemeral domains (``create_domain(ephemeral=True)``): an
        open ``EphemeralMemory`` (the caller closes it) or a path (opened
        here at ``ephemeral.default_base``, closed by ``close``; EBUSY if
        another daemon has it). On a read-write store it is poisoned first
        -- what the restart did to host RAM -- then used fresh; and every
        context entry pointing into memory above the image (the previous
        daemon's ephemeral domains: nothing there survived, whether or not
        this open has ephemeral memory) is logged and cleared, blocking
        that device, and kept in ``stale_entries``. A read-only store
        changes nothing: such entries show as attached to unknown tables
        (-1), and a path is opened read-only if the file exists (for
        ``translate``); one that cannot be is logged and left out.
        EINVAL if the memory overlaps the image or lies below it.
        """
        io = cls(store, None)
        mem = io._open_ephemeral(ephemeral)
        try:
            if mem is not None and not store.read_only and not mem.read_only:
                mem.poison()
            with store.lock:
                io._load()
                io._prev_pin_hook = store.pin_hook
                store.pin_hook = io.pinned
                store.free_orphans()  # deferred by Store.open until the pins are known
        except BaseException:
            io._close_ephemeral()
            raise
        if regs_path:
            try:
                io.regs = Regs.open(regs_path)
            except (PkfuseError, OSError) as exc:
                io.regs_error = str(exc)
                log.error("IOMMU register block %s not opened: %s", regs_path, exc)
            else:
                if not store.read_only:
                    # the driver starting after a restart (Linux: iommu_set_root_entry's global
                    # flushes): covers what the open changed -- context entries into ephemeral
                    # memory cleared, that memory poisoned, a replace finished -- and whatever a
                    # killed predecessor changed without getting to post its invalidation
                    io._flush_global()
        return io

    def _open_ephemeral(self, ephemeral: EphemeralMemory | str | os.PathLike[str] | None) -> EphemeralMemory | None:
        """``open``'s ephemeral memory, placement checked (not poisoned yet)."""
        st = self.store
        if ephemeral is None:
            return None
        try:
            if isinstance(ephemeral, EphemeralMemory):
                self.ephemeral = ephemeral
            elif not st.read_only:
                self.ephemeral = EphemeralMemory.open(ephemeral, base_phys=default_base(st.geometry))
                self._owns_ephemeral = True
            elif os.path.exists(ephemeral):
                self.ephemeral = EphemeralMemory.open(ephemeral, read_only=True)
                self._owns_ephemeral = True
            else:
                return None
            check_placement(st.geometry, self.ephemeral.base_phys, self.ephemeral.npages)
        except (PkfuseError, OSError) as exc:
            self._close_ephemeral()
            if not st.read_only:
                raise
            log.warning("ephemeral memory %s not opened: %s", os.fspath(ephemeral) if not isinstance(
                ephemeral, EphemeralMemory) else ephemeral.path, exc)
            return None
        return self.ephemeral

    def _close_ephemeral(self) -> None:
        if self.ephemeral is not None and self._owns_ephemeral:
            self.ephemeral.close()
        self.ephemeral, self._owns_ephemeral = None, False

    def close(self) -> None:
        """Put back the pin hook that ``open`` replaced (only if ours is still the one
        installed: a hook installed after ours is left alone) and close the registers
        (and the ephemeral memory, if ``open`` opened it). Ephemeral domains are not
        detached: a restart finds their context entries and clears them."""
        with self.store.lock:
            if self.store.pin_hook == self.pinned:
                self.store.pin_hook = self._prev_pin_hook
            self._prev_pin_hook = None
        if self.regs is not None:
            self.regs.close()
            self.regs = None
        self._close_ephemeral()

    def __enter__(self) -> Iommu:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _load(self) -> None:
        st = self.store
        self.iommu_dir = st.lookup(fmt.ROOT_INO, fmt.IOMMU_DIR_NAME)
        self.root_ino = st.lookup(self.iommu_dir, fmt.ROOT_PGTABLES_NAME)
        attr = st.getattr(self.root_ino)
        if attr.kind != fmt.KIND_IOMMU_ROOT or attr.npages != fmt.ROOT_PGTABLES_PAGES:
            raise FormatError("iommu/root-pgtables", 0,
                              f"kind {attr.kind}, {attr.npages} pages: not the VT-d root table file")
        self.root_pages = st.image_pages(self.root_ino)
        self.refused = []
        refused: dict[int, Domain] = {}  #: SL-PML4 phys -> a domain whose tables were refused
        for name, ino in st.children(self.iommu_dir):
            if st.getattr(ino).kind != fmt.KIND_IOMMU_DOMAIN:
                continue
            loaded = self._load_domain(name, ino)
            if loaded is None:
                continue
            dom, finding = loaded
            if finding is not None:
                log.error("%s refused: %s", dom.path, finding)
                self.refused.append(finding)
                refused[dom.pml4_phys] = dom
            else:
                self.domains[dom.domain_id] = dom
        self._scan_root_entries()
        self._scan_context_entries(refused)
        if not st.read_only:
            for dom in refused.values():  # no entry points at them any more (the scan blocked them)
                dom.memory.destroy()
                log.warning("%s removed: its tables were refused", dom.path)

    def _load_domain(self, name: bytes, ino: int) -> tuple[Domain, Finding | None] | None:
        """The domain of file ``name`` and, if its tables are refused, why; None for a
        half-made one (removed).

        The header decides whether the file is a domain of this format at all:
        a bad one raises FormatError (refused, never removed: what it is is
        unknown). Past a valid header the file is ours and its tables are
        trusted no further than they check: a malformed tree (``vtd.walk_tree``:
        a pointer outside its pool -- into another domain's tables or any other
        file --, a page reached twice -- shared or a loop --, reserved or ignored
        bits) or a leaf mapping anything but guest RAM refuses the domain alone:
        the other domains, and the sessions over them, go on.
        """
        st = self.store
        path = "iommu/" + name.decode(errors="replace")
        verdict = check_domain_file(st.image, st.geometry, ino, name, st.image_pages(ino))
        if verdict.problems:  # what fsck reports: refused here, never removed
            bad = verdict.problems[0]
            raise FormatError(bad.structure, bad.offset, bad.problem)
        if verdict.domain_id is None:
            return self._half_made(name, path, verdict.half_made)
        did = verdict.domain_id
        dom = Domain(self, ImageTables(st, self.iommu_dir, ino, name), did, verdict.flags)
        levels, problems = dom.walk()
        if problems:
            p = problems[0]
            return dom, Finding(f"{path} {vtd.LEVEL_NAMES[p.level]}", p.where * 8, p.what)
        frames = vtd.leaf_frames(levels)
        finding = self._non_guest_leaf(path, levels, *frames)
        if finding is not None:
            return dom, finding
        dom.memory.mark_used(np.concatenate([lv.tables for lv in levels[1:]]))
        dom.pins = self._count_owners(*frames)
        return dom, None

    def _non_guest_leaf(self, path: str, levels: list[vtd.Level], pfn: np.ndarray,
                        npages: np.ndarray) -> Finding | None:
        """The first leaf (in walk order: ``vtd.leaf_frames``'s ``pfn``, ``npages``) that maps a page
        outside guest-RAM files -- metadata, a free page, an IOMMU file, outside the image: a table
        pkfuse never wrote. Vectorized: 4 KiB leaves are checked as runs of consecutive frames, as
        they mostly come; the frames are the ones the pins are then counted from."""
        base_pfn = self.store.geometry.base_pfn
        if not pfn.size:
            return None
        page, n = pfn - base_pfn, npages
        starts, reach = self._guest_reach()
        # runs: a leaf continuing the previous one's frames (same size) joins its run
        brk = np.flatnonzero(np.concatenate(([True], (page[1:] != page[:-1] + n[:-1]) | (n[1:] != n[:-1]))))
        run_n = np.add.reduceat(n, brk)
        ok = _inside(starts, reach, page[brk], run_n)
        if ok.all():
            return None
        w = np.concatenate([lv.where[lv.leaf if level < 3 else slice(None)] for level, lv in enumerate(levels)])
        r = int(np.flatnonzero(~ok)[0])
        lo, hi = int(brk[r]), int(brk[r + 1]) if r + 1 < brk.size else w.size
        i = lo + int(np.flatnonzero(~_inside(starts, reach, page[lo:hi], n[lo:hi]))[0])
        level = vtd.LEVEL_PAGES.index(int(n[i]))
        p = int(page[i])
        if not 0 <= p < self.store.geometry.npages:
            what = "outside the image"
        elif p < self.store.geometry.data_page:
            what = "not all guest RAM (starts in metadata)"
        else:
            owner, kind = self.store.page_owner(np.array([p]))
            what = "a free page" if int(owner[0]) == 0 else f"{fmt.KIND_NAMES.get(int(kind[0]), '?')} inode {int(owner[0])}"
            what = f"not all guest RAM (starts in {what})"
        return Finding(f"{path} {vtd.LEVEL_NAMES[level]}", int(w[i]) * 8,
                       f"maps {int(n[i])} pages at {(p + base_pfn) << fmt.PAGE_SHIFT:#x}, {what}")

    def _guest_reach(self) -> tuple[np.ndarray, np.ndarray]:
        """Starts of guest-RAM extents (sorted, image pages) and, for each, the end of the run
        of guest-RAM extents continuing it without a gap (as ``tablecheck._guest_reach``)."""
        starts, ends, inos, _ = self.store.extents_by_page()
        guest = self.store.inodes["kind"][inos] == fmt.KIND_GUEST
        starts, ends = starts[guest], ends[guest]
        if not starts.size:
            return starts, ends
        group = np.cumsum(np.concatenate(([True], starts[1:] != ends[:-1]))) - 1
        last_end = np.zeros(int(group[-1]) + 1, np.int64)
        np.maximum.at(last_end, group, ends)
        return starts, last_end[group]

    def _half_made(self, name: bytes, path: str, why: str) -> None:
        if self.store.read_only:
            log.warning("%s: half-made domain (%s); ignored on a read-only store", path, why)
        else:
            log.warning("%s: half-made domain (%s), left by a restart; removed", path, why)
            self.store.unlink(self.iommu_dir, name, managed=True)

    def _scan_root_entries(self) -> None:
        """The root table is the layout's, not data: bus b's entry is absent or points at
        file page 1 + b. An entry that is not is refused and rewritten: present ones to
        the layout's pointer (the context table the driver keeps for that bus), others
        to zero (unless read-only)."""
        u64 = self.store.image_u64
        g = self.store.geometry
        root = int(self.root_pages[0]) * 512
        lo, hi = u64[root : root + 512 : 2], u64[root + 1 : root + 512 : 2]
        present = (lo & U64(fmt.RE_LO_P)) != 0
        want = (((self.root_pages[1:] + g.base_pfn) << fmt.PAGE_SHIFT).astype(U64)) | U64(fmt.RE_LO_P)
        bad = (present & ((lo != want) | (hi != 0))) | (~present & ((lo != 0) | (hi != 0)))
        for bus in np.flatnonzero(bad).tolist():
            self._refuse_entry(f"iommu/root-pgtables root entry {bus:02x}", (root + bus * 2) * 8,
                               f"holds {int(hi[bus]):#x}:{int(lo[bus]):#x}, not the layout's "
                               + (f"pointer to its context table {int(want[bus]):#x}" if present[bus] else "zero"))
            if not self.store.read_only:
                u64[root + bus * 2 + 1] = 0
                u64[root + bus * 2] = want[bus] if present[bus] else 0

    def _scan_context_entries(self, refused: dict[int, Domain]) -> None:
        """Who is attached to what, from the context entries; every present entry that no
        loaded domain explains is blocked (cleared, lo word first; left on a read-only
        store, as attached to -1): malformed ones (reserved bits, TT, AW), ones on a bus
        whose root entry is absent (a later attach on that bus would make them live), ones
        whose SLPTPTR is a refused domain's or no domain's. Entries into memory above the
        image are ephemeral domains' (``_stale_entry``)."""
        u64 = self.store.image_u64
        above = image_end(self.store.geometry)  # ephemeral memory is at or above it
        by_pml4 = {d.pml4_phys: d.domain_id for d in self.domains.values()}
        root = int(self.root_pages[0]) * 512
        re_present = (u64[root : root + 512 : 2] & U64(fmt.RE_LO_P)) != 0
        ct = self.root_pages[1:] * 512  # each bus's context table, as a u64 index
        lo_at = ct[:, None] + np.arange(0, 512, 2)[None, :]  # (256 buses, 256 devfns)
        lo = u64[lo_at]
        present = (lo & U64(fmt.CE_LO_P)) != 0
        self.attached = {}
        self.stale_entries = {}
        for bus, devfn in zip(*np.nonzero(~present & (lo != 0))):
            # detach clears lo (P) first, so a kill leaves at most the hi word
            where = int(lo_at[bus, devfn])
            self._refuse_entry(_ce_name(int(bus), int(devfn)), where * 8,
                               f"not present but holds {int(lo[bus, devfn]):#x} in its lo word")
            if not self.store.read_only:
                u64[where] = 0
        for bus, devfn in zip(*np.nonzero(present)):
            bus, devfn = int(bus), int(devfn)
            sid, where = (bus << 8) | devfn, int(lo_at[bus, devfn])
            lw, hw = int(u64[where]), int(u64[where + 1])
            f = vtd.context_entry_fields(lw, hw)
            ptr = f["SLPTPTR"]
            why = ""
            if not re_present[bus]:
                why = "present, but the root entry of its bus is not"
            elif f["rsvd_lo"] or f["rsvd_hi"]:
                why = f"reserved bits set: lo {f['rsvd_lo']:#x} hi {f['rsvd_hi']:#x}"
            elif f["TT"] != fmt.CE_TT_UNTRANSLATED or f["AW"] != fmt.CE_AW_48:
                why = f"translation type {f['TT']:#b} / address width {f['AW']:#b}: not untranslated, 48-bit"
            elif ptr >= above:
                self._stale_entry(sid, where, ptr)
                continue
            elif ptr in refused:
                why = f"points at {refused[ptr].path}, whose tables were refused"
            elif ptr not in by_pml4:
                why = f"SLPTPTR {ptr:#x} is the SL-PML4 of no domain"
            if why:
                self._refuse_entry(_ce_name(bus, devfn), where * 8, why + ": the device is blocked")
                if self.store.read_only:
                    self.attached[sid] = -1
                else:
                    u64[where] = 0  # P drops in one store
                    u64[where + 1] = 0
                continue
            did = by_pml4[ptr]
            self.attached[sid] = did
            if f["DID"] != did and not self.store.read_only:
                # killed inside a replacing attach, between its two stores: finish it
                u64[where + 1] = vtd.context_entry(0, did)[1]

    def refuse_attachment(self, sid: int, why: str) -> Finding:
        """Block requester ``sid`` for a reason found after open (its context entry cleared), recorded
        in ``refused`` as open's own refusals are: named by the entry and its image offset."""
        bus, dev, fn = sid >> 8, (sid >> 3) & 0x1F, sid & 7
        _sid, _ct, where = self._context_where(bus, dev, fn)
        self.detach(self.domains[self.attached[sid]], bus, dev, fn)
        self._refuse_entry(_ce_name(bus, sid & 0xFF), where * 8, why + ": the device is blocked")
        return self.refused[-1]

    def _refuse_entry(self, structure: str, offset: int, why: str) -> None:
        finding = Finding(structure, offset, why)
        log.error("%s%s", finding, " (left as is: read-only)" if self.store.read_only else "")
        self.refused.append(finding)

    def _stale_entry(self, sid: int, where: int, ptr: int) -> None:
        """A context entry pointing into ephemeral memory, found at open: its tables did not
        survive the restart. Cleared (P first), unless the store is read-only."""
        u64 = self.store.image_u64
        did = vtd.context_entry_fields(0, int(u64[where + 1]))["DID"]
        mem = self.ephemeral
        what = "this boot's ephemeral memory, just poisoned" if mem is not None and \
            mem.base_phys <= ptr < mem.end_phys else "memory above the image (ephemeral)"
        self.stale_entries[sid] = ptr
        if self.store.read_only:
            log.warning("requester %s: context entry (DID %d) points at %#x in %s, whose tables did not "
                        "survive the restart; left as is on a read-only store", fmt.requester_name(sid), did, ptr, what)
            self.attached[sid] = -1
            return
        log.warning("requester %s: context entry (DID %d) points at %#x in %s, whose tables did not survive "
                    "the restart; cleared, the device is blocked", fmt.requester_name(sid), did, ptr, what)
        u64[where] = 0  # P drops in one store
        u64[where + 1] = 0

    def _writable(self, *domains: Domain, dead_ok: bool = False) -> None:
        """Refuse a change to a read-only image, or to a Domain object whose file
        was destroyed (its pages may belong to another file by now), or -- unless
        ``dead_ok`` (detach, destroy) -- to an ephemeral domain whose memory was
        poisoned since it was made."""
        if self.store.read_only:
            raise _errno(errno.EROFS, "image opened read-only")
        for d in domains:
            if self.domains.get(d.domain_id) is not d:
                raise _errno(errno.ENOENT, f"{d.path} is not a live domain")
            if not dead_ok and not d.memory.alive:
                raise _errno(errno.ENOENT, f"{d.path}: its ephemeral memory was poisoned (a restart) since")

    def _need_ephemeral(self) -> EphemeralMemory:
        if self.ephemeral is None:
            raise _errno(errno.ENODEV, "no ephemeral memory was opened (Iommu.open(..., ephemeral=...))")
        if self.ephemeral.read_only:
            raise _errno(errno.EROFS, f"ephemeral memory {self.ephemeral.path} opened read-only")
        return self.ephemeral

    # --------------------------------------------------------------- pins

    def pinned(self, ino: int) -> bool:
        """Whether any domain maps a page of guest file ``ino`` (Store.pin_hook)."""
        return any(d.pins.get(ino) for d in self.domains.values())

    def pinned_pages(self, ino: int) -> int:
        return sum(d.pins.get(ino, 0) for d in self.domains.values())

    def _path(self, ino: int) -> str:
        if ino == 0:
            return "(not a guest page)"
        try:
            return self.store.path_of(ino).decode(errors="replace").lstrip("/")
        except StoreError:
            return f"(inode {ino})"

    def _count_owners(self, pfn: np.ndarray, npages: np.ndarray) -> dict[int, int]:
        """Pages per owning guest file of the leaves (pfn, npages); vectorized for 4 KiB leaves.

        4 KiB leaves in walk order are in IOVA order: when they form few runs
        of consecutive frames (a guest mapped contiguously), owners are looked
        up once per run and extent; otherwise once per page, vectorized.
        """
        out: dict[int, int] = {}
        base_pfn = self.store.geometry.base_pfn
        small = npages == 1
        p = pfn[small]
        if p.size:
            starts = np.flatnonzero(np.concatenate(([True], p[1:] != p[:-1] + 1)))
            if starts.size * _RUN_LOOKUP_PAGES <= p.size:
                self._count_runs(out, p[starts] - base_pfn, np.diff(np.append(starts, p.size)))
            else:
                owner, kind = self.store.page_owner(p - base_pfn)
                owner = np.where(kind == fmt.KIND_GUEST, owner, 0)
                counts = np.bincount(owner.astype(np.int64))
                for ino in np.flatnonzero(counts).tolist():
                    if ino:
                        out[ino] = out.get(ino, 0) + int(counts[ino])
        big_pfn, big_n = pfn[~small], npages[~small]
        order = np.argsort(big_pfn, kind="stable")
        _, big_pfn, big_n, _ = vtd.coalesce(big_pfn[order], big_pfn[order], big_n[order], np.zeros(order.size, bool))
        self._count_runs(out, big_pfn - base_pfn, big_n)
        return out

    def _count_runs(self, out: dict[int, int], pages: np.ndarray, counts: np.ndarray) -> None:
        """Add to ``out`` the guest pages per file of image pages [pages[i], + counts[i])."""
        for start, count in zip(pages.tolist(), counts.tolist()):
            for ino, _page, c, _off in self._guest_runs(start, count, strict=False):
                if ino:
                    out[ino] = out.get(ino, 0) + c

    def _guest_runs(self, page: int, n: int, *, strict: bool) -> list[tuple[int, int, int, int]]:
        """Split image pages [page, page + n) by owning file: (ino, page, count, file offset).

        ``strict``: refuse (EFAULT) unless every page belongs to a guest-RAM
        file; otherwise pages that do not are reported with ino 0. Costs one
        lookup per extent crossed, not per page.
        """
        st = self.store
        npages = st.geometry.npages
        end = page + n
        out: list[tuple[int, int, int, int]] = []
        while page < end:
            if page < 0 or page >= npages:
                if strict:
                    raise _errno(errno.EFAULT, f"physical page {st.geometry.phys_addr(page):#x} is outside the image")
                out.append((0, page, end - page, 0))
                break
            hit = st.extent_at(page)
            ino = hit[0] if hit is not None else 0
            k = int(st.inodes["kind"][ino])
            if hit is None or k != fmt.KIND_GUEST:
                if strict:
                    what = "a free page" if ino == 0 else ("metadata" if page < st.geometry.data_page else
                                                           f"{fmt.KIND_NAMES.get(k, k)} file {self._path(ino)}")
                    raise _errno(errno.EFAULT, f"physical address {st.geometry.phys_addr(page):#x} is {what}, "
                                 "not guest RAM")
                span = np.arange(page, min(end, npages), dtype=np.int64)
                o, kk = st.page_owner(span)
                good = np.flatnonzero((o != 0) & (kk == fmt.KIND_GUEST))
                stop = page + (int(good[0]) if good.size else span.size)
                stop = max(stop, page + 1)
                out.append((0, page, stop - page, 0))
                page = stop
                continue
            _, first, ext_end, file_page = hit
            stop = min(end, ext_end)
            out.append((ino, page, stop - page, (file_page + page - first) * PS))
            page = stop
        return out

    # ------------------------------------------------------------ domains

    def domain(self, domain_id: int) -> Domain:
        try:
            return self.domains[domain_id]
        except KeyError:
            raise _errno(errno.ENOENT, f"no IOMMU domain {domain_id}") from None

    def create_domain(self, domain_id: int | None = None, *, flags: int = 0, ephemeral: bool = False) -> Domain:
        """A new empty domain (smallest free DID >= 1 by default; EEXIST for a DID in use).

        By default its tables are the file ``iommu/dom-<DID>`` in the image,
        which a restart keeps. With ``ephemeral`` they are pages of the
        ephemeral memory (ENODEV unless ``open`` was given one, ENOMEM when
        it is full): no file, nothing a restart keeps, the same API. Image
        and ephemeral domains share one DID space, so a context entry's DID
        names one domain of either kind.
        """
        with self.store.lock:
            self._writable()
            if domain_id is None:
                domain_id = next(i for i in range(1, MAX_DOMAIN_ID + 2) if i not in self.domains)
            if not 0 < domain_id <= MAX_DOMAIN_ID:
                raise _errno(errno.EINVAL, f"domain id {domain_id} outside 1..{MAX_DOMAIN_ID}")
            if domain_id in self.domains:
                raise _errno(errno.EEXIST, f"IOMMU domain {domain_id} exists")
            if ephemeral:
                tables = EphemeralTables(self._need_ephemeral())
                tables.tables[tables.pml4_page] = 0  # an empty SL-PML4 (the page held poison)
                dom = Domain(self, tables, domain_id, flags)
                self.domains[domain_id] = dom
                return dom
            name = domain_file_name(domain_id)
            ino = self.store.create(self.iommu_dir, name, 0o444, 0, 0, kind=fmt.KIND_IOMMU_DOMAIN)
            try:
                self.store.grow(ino, 2 + GROW_CHUNK)
            except BaseException:
                self.store.unlink(self.iommu_dir, name, managed=True)
                raise
            dom = Domain(self, ImageTables(self.store, self.iommu_dir, ino, name), domain_id, flags)
            hdr = np.zeros(1, fmt.DOMAIN_HEADER_DTYPE)
            hdr["compatible"], hdr["domain_id"], hdr["address_width"] = fmt.DOMAIN_COMPATIBLE, domain_id, fmt.CE_AW_48
            hdr["flags"], hdr["pml4_file_page"], hdr["magic"] = flags, 1, fmt.DOMAIN_MAGIC
            raw = hdr.view(np.uint8)
            off = int(dom._pages[0]) * PS
            self.store.image[off + 8 : off + raw.size] = raw[8:]
            self.store.image_u64[off // 8] = hdr.view("<u8")[0]  # magic last: the domain exists
            self.domains[domain_id] = dom
            return dom

    def destroy_domain(self, domain: Domain) -> None:
        """Free every page of ``domain`` -- unlink its file, or give its pages back to the
        ephemeral memory -- once no walk can be inside (EBUSY while attached); its pins
        go with it.

        Waits out the grace period after the last detach (up to
        ``FREE_GRACE_S``) *without* holding ``store.lock``: other store and
        IOMMU calls go on meanwhile, and each wake-up re-checks the domain
        (EBUSY if attached again, ENOENT if destroyed by someone else). A
        caller that holds the lock itself keeps it across the wait.
        """
        while True:
            wait = self.try_destroy_domain(domain)
            if wait <= 0:
                return
            time.sleep(wait)

    def try_destroy_domain(self, domain: Domain) -> float:
        """``destroy_domain`` without the wait: destroys and returns 0.0 if the grace
        period since the last detach has passed, else changes nothing and returns the
        seconds left (a trio caller sleeps them with ``trio.sleep`` and calls again)."""
        with self.store.lock:
            self._writable(domain, dead_ok=True)
            if domain.attached:
                rids = ", ".join(fmt.requester_name(s) for s in domain.attached)
                raise _errno(errno.EBUSY, f"{domain.path} is attached to {rids}")
            wait = domain._quiet_after - time.monotonic()
            if wait > 0:  # a walk that read its context entry before the detach
                return wait
            domain.memory.destroy()
            del self.domains[domain.domain_id]
            domain.pins.clear()
            self._flush_iotlb_dsi(domain.domain_id)  # its DID may name the next domain made
            return 0.0

    def copy_domain(self, src: Domain, domain_id: int | None = None, *, ephemeral: bool = False) -> Domain:
        """A new domain with the same translations as ``src``, of either kind from either:
        in the image with flag DOMF_SAVED (what a live-update freeze makes of an
        ephemeral domain), or with ``ephemeral`` in the ephemeral memory, flags 0 (what
        a restore makes of the saved one)."""
        with self.store.lock:
            dst = self.create_domain(domain_id, flags=0 if ephemeral else fmt.DOMF_SAVED, ephemeral=ephemeral)
            try:
                self.copy_into(src, dst)
            except BaseException:
                self.destroy_domain(dst)
                raise
            return dst

    def copy_into(self, src: Domain, dst: Domain) -> None:
        """Make the empty domain ``dst`` translate exactly as ``src`` (a full copy of the tree,
        from either memory into either: pointers are re-encoded for ``dst``'s memory)."""
        with self.store.lock:
            self._writable(src, dst)
            levels, problems = src.walk()
            if problems:
                p = problems[0]
                raise FormatError(f"{src.path} {vtd.LEVEL_NAMES[p.level]}", p.where * 8, p.what)
            if dst.table_pages != 1 or dst._tables[dst.pml4_page].any():
                raise _errno(errno.EEXIST, f"{dst.path} is not empty")
            old = np.concatenate([lv.tables for lv in levels[1:]])
            new = dst._alloc(old.size)
            order = np.argsort(old)
            old_sorted, new_sorted = old[order], new[order]
            src_tables, dst_tables = src._tables, dst._tables
            src_base, dst_base = src.memory.base_pfn, dst.memory.base_pfn
            contents = []
            for level, lv in enumerate(levels[:3]):
                block = src_tables[lv.tables].copy()
                ptr = ((block & U64(vtd.RW)) != 0) & ~vtd.is_leaf(level, block)
                moved = new_sorted[np.searchsorted(old_sorted, vtd.entry_pages(block[ptr], src_base))]
                # the same entry (R/W and all) pointing at the copy of its table
                block[ptr] = (block[ptr] & ~U64(fmt.SL_ADDR_MASK)) | ((moved.astype(U64) + U64(dst_base)) << U64(12))
                contents.append(block)
            contents.append(src_tables[levels[3].tables].copy())
            if old.size:
                dst_tables[new] = np.concatenate(contents[1:])  # unreachable until the SL-PML4 below
            pml4 = contents[0][0]
            used = np.flatnonzero(pml4)  # dst may be attached: one 8-byte store per entry
            dst._u64[dst.pml4_page * 512 + used] = pml4[used]
            for ino, n in src.pins.items():
                dst.pins[ino] = dst.pins.get(ino, 0) + n

    # --------------------------------------------------------- requesters

    def _context_where(self, bus: int, dev: int, fn: int) -> tuple[int, int, int]:
        if not (0 <= bus <= 255 and 0 <= dev <= 31 and 0 <= fn <= 7):
            raise _errno(errno.EINVAL, f"requester {bus}:{dev}.{fn} out of range (bus 0-255, dev 0-31, fn 0-7)")
        sid = fmt.requester_id(bus, dev, fn)
        ct_page = int(self.root_pages[1 + bus])
        return sid, ct_page, ct_page * 512 + (sid & 0xFF) * 2

    def attach(self, domain: Domain, bus: int, dev: int, fn: int, *, replace: bool = False) -> None:
        """Point requester bus:dev.fn at ``domain``: the bus's root entry (if not yet
        present), then the context entry, hi word before lo.

        EBUSY if the requester is attached to another domain, unless
        ``replace``. A replace never unmaps the device, not for an instant:
        the lo word (table pointer, present) switches to the new tables in
        one store with the old DID still in hi -- a walker reading the entry
        before or after it sees a valid entry -- then hi takes the new DID.
        A walk between the two stores translates through the new tables
        under the old tag, which the invalidations posted after the switch
        cover (context-cache device-selective, then IOTLB domain-selective
        for the old DID); a kill between them is repaired at the next open,
        whose global invalidation covers it too.
        """
        with self.store.lock:
            self._writable(domain)
            sid, ct_page, where = self._context_where(bus, dev, fn)
            cur = self.attached.get(sid)
            if cur == domain.domain_id:
                return
            if cur is not None and not replace:
                raise _errno(errno.EBUSY, f"requester {fmt.requester_name(sid)} is attached to domain {cur}")
            u64 = self.store.image_u64
            g = self.store.geometry
            re_where = int(self.root_pages[0]) * 512 + bus * 2
            if not int(u64[re_where]) & fmt.RE_LO_P:
                # the bus's context table (zeroed at mkfs) is complete before it is reachable
                re_lo, re_hi = vtd.root_entry(g.phys_addr(ct_page))
                u64[re_where + 1] = re_hi
                u64[re_where] = re_lo
            lo, hi = vtd.context_entry(domain.pml4_phys, domain.domain_id)
            if cur is not None:
                old_did = vtd.context_entry_fields(0, int(u64[where + 1]))["DID"]
                u64[where] = lo  # the switch: one aligned store, the entry stays present
                u64[where + 1] = hi  # then the DID
                # then the caches: the SID's context entry, and what the old DID cached (also
                # through the new tables, by a walk between the two stores)
                self._flush_context_device(sid, old_did)
                self._flush_iotlb_dsi(old_did)
            else:
                u64[where + 1] = hi
                u64[where] = lo  # P last: the entry is complete when it becomes present
                # not present before, so not cached (caching mode 0): Linux only flushes the
                # write buffer here; posted all the same, so no cache can keep a stale one
                self._flush_context_device(sid, domain.domain_id)
            self.attached[sid] = domain.domain_id
            if cur is not None and cur in self.domains:
                self.domains[cur]._quiet_after = time.monotonic() + FREE_GRACE_S

    def detach(self, domain: Domain, bus: int, dev: int, fn: int) -> None:
        """Clear the requester's context entry (ENOENT unless attached to ``domain``)."""
        with self.store.lock:
            self._writable(domain, dead_ok=True)
            sid, _ct, where = self._context_where(bus, dev, fn)
            if self.attached.get(sid) != domain.domain_id:
                raise _errno(errno.ENOENT, f"requester {fmt.requester_name(sid)} is not attached to {domain.path}")
            u64 = self.store.image_u64
            u64[where] = 0  # P drops in one store
            u64[where + 1] = 0
            self._flush_context_device(sid, domain.domain_id)  # then the caches
            self._flush_iotlb_dsi(domain.domain_id)
            del self.attached[sid]
            domain._quiet_after = time.monotonic() + FREE_GRACE_S

    # ------------------------------------------------------- hardware side

    @property
    def root_table_phys(self) -> int:
        return self.store.geometry.phys_addr(int(self.root_pages[0]))

    def _need_regs(self) -> Regs:
        if self.regs is None:
            raise _errno(errno.ENODEV, "no IOMMU register block was opened")
        return self.regs

    def enable(self) -> None:
        """Program RTADDR with the root table and set TE (the boot-time driver step), then
        invalidate the context cache and the IOTLB globally."""
        regs = self._need_regs()
        regs.set_root_table(self.root_table_phys)
        regs.enable()
        self._flush_global()

    def disable(self) -> None:
        """Clear TE, then invalidate both caches globally."""
        self._need_regs().disable()
        self._flush_global()

    # ------------------------------------------------ invalidation (posting)
    # Each is posted after the table change it covers (Linux's order), to the register
    # block's queue (``Regs.invalidate_*``); a no-op without a register block.

    def _flush_context_device(self, sid: int, did: int) -> None:
        """Context-cache device-selective: requester ``sid``'s entry (whose DID was ``did``)."""
        if self.regs is not None:
            self.regs.invalidate_context(fmt.INV_G_DEVICE, did=did, sid=sid)

    def _flush_iotlb_dsi(self, did: int) -> None:
        """IOTLB domain-selective: every entry tagged ``did``."""
        if self.regs is not None:
            self.regs.invalidate_iotlb(fmt.INV_G_DOMAIN, did=did)

    def _flush_iotlb_psi(self, did: int, first: int, end: int) -> None:
        """IOTLB page-selective for IOVA pages [first, end): the smallest naturally aligned
        2**am pages covering them (Linux's ``iommu_flush_iotlb_psi``, aligned as its
        ``calculate_psi_aligned_address``), domain-selective above ``INV_MAX_AM``."""
        if self.regs is None:
            return
        am = ((first ^ (end - 1)).bit_length())  # the low bits in which first and last differ
        if am > fmt.INV_MAX_AM:
            self.regs.invalidate_iotlb(fmt.INV_G_DOMAIN, did=did)
            return
        self.regs.invalidate_iotlb(fmt.INV_G_PAGE, did=did, addr=(first >> am << am) << fmt.PAGE_SHIFT, am=am)

    def _flush_global(self) -> None:
        """Context cache, then IOTLB, globally (after SRTP, TE changes, a restart)."""
        if self.regs is not None:
            self.regs.invalidate_context(fmt.INV_G_GLOBAL)
            self.regs.invalidate_iotlb(fmt.INV_G_GLOBAL)

    def translate(self, bus: int, dev: int, fn: int, iovas: Iterable[int] | np.ndarray,
                  write: bool | np.ndarray = False) -> tuple[np.ndarray, np.ndarray]:
        """Run the hardware walker over this store's image and the ephemeral memory, if
        open (see ``backing.walker``)."""
        from .walker import translate

        g = self.store.geometry
        mem = self.ephemeral.region() if self.ephemeral is not None else None
        return translate(self.store.image_u64, g.base_phys, g.npages, self._need_regs(),
                         fmt.requester_id(bus, dev, fn), np.asarray(iovas, U64), write, ephemeral=mem)


def _ce_name(bus: int, devfn: int) -> str:
    return f"iommu/root-pgtables context entry {bus:02x}:{devfn >> 3:02x}.{devfn & 7}"


def _inside(starts: np.ndarray, reach: np.ndarray, page: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Whether image pages [page, page + n) are all guest RAM (``Iommu._guest_reach``)."""
    if not starts.size:
        return np.zeros(page.shape, bool)
    idx = np.searchsorted(starts, page, side="right") - 1
    safe = np.maximum(idx, 0)
    return (idx >= 0) & (page >= starts[safe]) & (page + n <= reach[safe])
