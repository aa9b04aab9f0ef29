"""A VT-d unit's translation caches, as a DMA device's hardware holds them.

``TranslationCache`` is the context cache and the IOTLB of one remapping
unit, for a device process that translates its own DMA (issue 13: the
device is hardware, it never asks the daemon). It reads what hardware
reads -- the register block and physical memory (the image and, when
given, the ephemeral memory) -- and walks with ``backing.walker``:

* the **context cache**: requester id (SID) -> the context entry as a walk
  found it (DID, the SL-PML4's place in memory, FPD). Filled by a walk of
  the root and context tables at the first request of a SID that misses.
* the **IOTLB**: (DID, leaf) -> physical leaf and the R/W rights ANDed over
  the levels, one entry per *leaf* -- a 4 KiB page, a 2 MiB or a 1 GiB
  superpage -- so a DMA over a superpage is one entry. Keyed by the DID
  tag, as hardware keys it: two requesters attached to one domain share
  entries, and an entry survives the requester's context changing.

Nothing that faults is cached (no caching of not-present entries: caching
mode 0), and a hit whose cached rights lack the one a request needs is
treated as a miss and walked again. No paging-structure caches are kept
(every miss walks from the SL-PML4), so an invalidation of them is moot.

The invariant
-------------
**A translation served from the cache is the one the tables gave when it
was filled, until an invalidation that covers it is posted to the register
block and read by ``poll``.** Entries are dropped *only* by invalidation
descriptors (``Regs.invalidations_since``): a context-cache descriptor
(global; domain-selective: entries whose DID is the descriptor's;
device-selective: the SID's entry), an IOTLB descriptor (global;
domain-selective: entries tagged the DID; page-selective: entries tagged
the DID overlapping ``[addr, addr + 4096 << am)``, a superpage entry
included if it overlaps at all); an overrun of the queue drops everything
(``poll`` counts it). Capacity evictions (``capacity`` entries per DID and
leaf size; dropping more than needed is always safe) are the one other
way an entry goes. So a driver that changes a translation and forgets the
invalidation leaves the old one served -- the stale translation a real
machine would show.

The device polls before each request it translates (``poll`` costs one
8-byte load when nothing was posted): the driver never waits for the
invalidation (``backing.iommu.FREE_GRACE_S`` stands for its wait
descriptor), so a poll later than that could use a translation through a
table page already reused.

Faults are logged in the register block's fault log, as the walker logs
them (unless the context entry has FPD set). ``translate`` is vectorized:
a lookup is a ``searchsorted`` per leaf size in the DID's entries, the
misses are one batched walk; there is no Python loop per page.
"""

from __future__ import annotations

import logging

import numpy as np

from . import format as fmt
from . import walker
from .regs import Regs

log = logging.getLogger(__name__)

U64 = np.uint64
IOTLB_CAPACITY = 1 << 16  #: entries per DID and leaf size before the whole set is evicted
#: the walker's leaf levels: 1 (SL-PDPE, 1 GiB), 2 (SL-PDE, 2 MiB), 3 (SL-PTE, 4 KiB)
_LEAF_LEVELS = (1, 2, 3)
_SHIFT = {lv: U64(fmt.VTD_LEVEL_SHIFT[lv]) for lv in _LEAF_LEVELS}
_R, _W = U64(fmt.SL_R), U64(fmt.SL_W)
_INV_NAMES = {
    (fmt.INV_TYPE_CC, fmt.INV_G_GLOBAL): "cc_global",
    (fmt.INV_TYPE_CC, fmt.INV_G_DOMAIN): "cc_domain",
    (fmt.INV_TYPE_CC, fmt.INV_G_DEVICE): "cc_device",
    (fmt.INV_TYPE_IOTLB, fmt.INV_G_GLOBAL): "iotlb_global",
    (fmt.INV_TYPE_IOTLB, fmt.INV_G_DOMAIN): "iotlb_domain",
    (fmt.INV_TYPE_IOTLB, fmt.INV_G_PAGE): "iotlb_page",
}


class _Context:
    """A context-cache entry: what the walk of the root and context tables found."""

    __slots__ = ("did", "slpt", "fpd")

    def __init__(self, did: int, slpt: tuple[int, int], fpd: bool) -> None:
        self.did = did
        self.slpt = slpt  #: (memory region, page) of the SL-PML4
        self.fpd = fpd


class _Leaves:
    """The IOTLB entries of one DID for one leaf size, sorted by leaf number (IOVA >> shift)."""

    __slots__ = ("keys", "frame", "rights")

    def __init__(self) -> None:
        self.keys = np.zeros(0, U64)  #: IOVA >> shift of each cached leaf, sorted, unique
        self.frame = np.zeros(0, U64)  #: physical address >> shift of the leaf
        self.rights = np.zeros(0, U64)  #: SL_R | SL_W, ANDed over the levels walked

    def __len__(self) -> int:
        return int(self.keys.size)


class TranslationCache:
    """A VT-d unit's context cache and IOTLB (see the module docstring).

    ``image_u64, base, npages`` are ``walker.open_image``'s; ``regs`` the
    register block; ``ephemeral`` the ephemeral memory's region
    (``walker.open_ephemeral``), without which physical memory is the
    image alone. The cache starts empty, at the queue's current tail.
    """

    def __init__(self, image_u64: np.ndarray, base: int, npages: int, regs: Regs,
                 ephemeral: walker.Region | None = None, *, capacity: int = IOTLB_CAPACITY) -> None:
        self.regs = regs
        self.capacity = capacity
        self._image = (image_u64, base, npages)
        self._mem = walker.memory(image_u64, base, npages, ephemeral)
        self._seq = regs.iq_tail  #: the last descriptor read
        self._contexts: dict[int, _Context] = {}
        self._iotlb: dict[int, dict[int, _Leaves]] = {}  #: DID -> leaf level -> entries
        self._stats = dict.fromkeys(
            ("hits", "misses", "walks", "context_hits", "context_misses", "faults", "overruns", "evictions",
             *(f"inv_{n}" for n in _INV_NAMES.values())), 0)

    def set_ephemeral(self, ephemeral: walker.Region | None) -> None:
        """Read the ephemeral memory through a new mapping (after the daemon's restart the file's
        ``boot_id`` and possibly its ``base_phys`` changed). Changes no cached entry: the
        driver's invalidations say which are stale, as for any other memory -- except that
        without ephemeral memory a context entry cached into it cannot be walked, and goes."""
        self._mem = walker.memory(*self._image, ephemeral)
        if ephemeral is None:
            for s in [s for s, c in self._contexts.items() if c.slpt[0] != 0]:
                del self._contexts[s]

    # ---------------------------------------------------------------- poll

    def poll(self) -> int:
        """Read the invalidation descriptors posted since the last poll and drop what they
        cover (everything, after an overrun); returns how many were posted."""
        descs, seq, overrun = self.regs.invalidations_since(self._seq)
        posted = seq - self._seq if seq >= self._seq else 0
        self._seq = seq
        if overrun:
            log.warning("invalidation queue overrun (more than %d descriptors behind): flushing everything",
                        fmt.INV_QUEUE_ENTRIES)
            self._stats["overruns"] += 1
            self._contexts.clear()
            self._iotlb.clear()
            return posted
        for d in descs.tolist():  # (seq, type, granularity, did, sid, am, addr); a few per poll
            self._apply(int(d[1]), int(d[2]), int(d[3]), int(d[4]), int(d[5]), int(d[6]))
        return posted

    def _apply(self, kind: int, gran: int, did: int, sid: int, am: int, addr: int) -> None:
        name = _INV_NAMES.get((kind, gran))
        if name is None:
            log.warning("unknown invalidation descriptor type %d granularity %d: flushing everything", kind, gran)
            self._contexts.clear()
            self._iotlb.clear()
            return
        self._stats[f"inv_{name}"] += 1
        if kind == fmt.INV_TYPE_CC:
            if gran == fmt.INV_G_GLOBAL:
                self._contexts.clear()
            elif gran == fmt.INV_G_DOMAIN:
                for s in [s for s, c in self._contexts.items() if c.did == did]:
                    del self._contexts[s]
            else:
                self._contexts.pop(sid, None)
        elif gran == fmt.INV_G_GLOBAL:
            self._iotlb.clear()
        elif gran == fmt.INV_G_DOMAIN:
            self._iotlb.pop(did, None)
        else:
            sets = self._iotlb.get(did)
            if not sets:
                return
            first, last = U64(addr), U64(addr + (fmt.PAGE_SIZE << am) - 1)
            for level, lv in sets.items():
                lo = np.searchsorted(lv.keys, first >> _SHIFT[level], "left")
                hi = np.searchsorted(lv.keys, last >> _SHIFT[level], "right")
                if hi > lo:
                    keep = np.r_[0:lo, hi:lv.keys.size]
                    lv.keys, lv.frame, lv.rights = lv.keys[keep], lv.frame[keep], lv.rights[keep]

    # ----------------------------------------------------------- translate

    def translate(self, sid: int, iovas: np.ndarray, write: bool | np.ndarray = False,
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Translate ``iovas`` for requester ``sid``: (phys uint64, fault uint16, hit bool).

        As ``walker.translate`` (``phys`` 0 and the FR_* reason where a
        request faults, faults logged unless FPD), but served from the
        caches where they hold the translation (``hit``), walking and
        filling where they do not. Does not poll."""
        iovas = np.ascontiguousarray(iovas, dtype=U64).ravel()
        n = iovas.size
        phys = np.zeros(n, U64)
        fault = np.zeros(n, np.uint16)
        hit = np.zeros(n, bool)
        if n == 0:
            return phys, fault, hit
        regs = self.regs
        if not regs.gsts & fmt.GSTS_TES:  # the caches are not used while translation is off
            fault[:] = fmt.FR_TRANSLATION_DISABLED
            self._fault(sid, iovas, fault, _per_iova(write, n), False)
            return phys, fault, hit
        ctx = self._contexts.get(sid)
        if ctx is None:
            self._stats["context_misses"] += 1
            reason, fpd, slpt, did = walker.walk_context(self._mem, regs, sid)
            if reason:
                fault[:] = reason
                self._fault(sid, iovas, fault, _per_iova(write, n), fpd)
                return phys, fault, hit
            ctx = self._contexts[sid] = _Context(did, slpt, fpd)
        else:
            self._stats["context_hits"] += 1
        sets = self._iotlb.get(ctx.did)
        if sets:
            # the right each request needs: one for all (the common case) or per IOVA
            need: np.uint64 | np.ndarray = (_W if write else _R) if np.ndim(write) == 0 else np.where(_per_iova(write, n), _W, _R)
            todo: np.ndarray | None = None  # IOVAs not hit yet (None: all of them)
            for level, lv in sets.items():
                if not lv.keys.size:
                    continue
                iv = iovas if todo is None else iovas[todo]
                k = iv >> _SHIFT[level]
                pos = np.searchsorted(lv.keys, k)
                np.minimum(pos, lv.keys.size - 1, out=pos)
                nd = need if todo is None or need.ndim == 0 else need[todo]
                m = (lv.keys[pos] == k) & ((lv.rights[pos] & nd) != 0)
                if not m.any():
                    continue
                at = np.flatnonzero(m) if todo is None else todo[m]
                mask = (U64(1) << _SHIFT[level]) - U64(1)
                phys[at] = (lv.frame[pos[m]] << _SHIFT[level]) | (iv[m] & mask)
                hit[at] = True
                if m.all():  # every IOVA still to do hit: none left
                    break
                todo = np.flatnonzero(~hit)
        nhit = int(np.count_nonzero(hit))
        self._stats["hits"] += nhit
        if nhit == n:
            return phys, fault, hit
        miss = np.flatnonzero(~hit)
        wr = _per_iova(write, n)
        self._stats["misses"] += miss.size
        self._stats["walks"] += 1
        leaf = np.zeros(miss.size, np.int8)
        rights = np.zeros(miss.size, U64)
        iv = iovas[miss]
        p, f = walker.walk_tables(self._mem, ctx.slpt, iv, wr[miss], leaf=leaf, rights=rights)
        phys[miss], fault[miss] = p, f
        good = f == 0
        if good.any():
            self._fill(ctx.did, iv[good], p[good], leaf[good], rights[good])
        if not good.all():
            self._fault(sid, iovas, fault, wr, ctx.fpd)
        return phys, fault, hit

    def _fault(self, sid: int, iovas: np.ndarray, fault: np.ndarray, wr: np.ndarray, fpd: bool) -> None:
        bad = np.flatnonzero(fault)
        self._stats["faults"] += bad.size
        if bad.size and not fpd:
            self.regs.record_faults(sid, iovas[bad], fault[bad], wr[bad])

    def _fill(self, did: int, iv: np.ndarray, pa: np.ndarray, leaf: np.ndarray, rights: np.ndarray) -> None:
        sets = self._iotlb.setdefault(did, {})
        for level in _LEAF_LEVELS:
            m = leaf == level
            if not m.any():
                continue
            sh = _SHIFT[level]
            lv = sets.get(level)
            if lv is None:
                lv = sets[level] = _Leaves()
            if lv.keys.size >= self.capacity:
                self._stats["evictions"] += lv.keys.size
                lv.keys, lv.frame, lv.rights = lv.keys[:0], lv.frame[:0], lv.rights[:0]
            # the new entries first: np.unique keeps the first of equal keys (a refill wins)
            keys = np.concatenate([iv[m] >> sh, lv.keys])
            frame = np.concatenate([pa[m] >> sh, lv.frame])
            rt = np.concatenate([rights[m], lv.rights])
            lv.keys, first = np.unique(keys, return_index=True)
            lv.frame, lv.rights = frame[first], rt[first]

    def cached_context(self, sid: int) -> tuple[int, int] | None:
        """The context-cache entry of requester ``sid``: (DID, SL-PML4 physical address) that its
        requests translate through now, or None if none is cached."""
        c = self._contexts.get(sid)
        if c is None:
            return None
        region, page = c.slpt
        return c.did, (self._mem.base[region] + page) << fmt.PAGE_SHIFT

    # ---------------------------------------------------------- statistics

    def statistics(self) -> dict[str, int]:
        """Counters since creation: IOVAs served from the IOTLB (hits) or walked (misses),
        batched table walks, context-cache hits and misses, faults, invalidations by type
        (inv_cc_global, ..., inv_iotlb_page), overruns, evicted entries; and the entries
        held now (context_entries, iotlb_entries, iotlb_dids); seq, the last descriptor read."""
        out = dict(self._stats)
        out["context_entries"] = len(self._contexts)
        out["iotlb_entries"] = sum(len(lv) for sets in self._iotlb.values() for lv in sets.values())
        out["iotlb_dids"] = sum(1 for sets in self._iotlb.values() if any(len(lv) for lv in sets.values()))
        out["seq"] = self._seq
        return out


def _per_iova(write: bool | np.ndarray, n: int) -> np.ndarray:
    """The request type of each of ``n`` IOVAs (``write``: one for all, or one each)."""
    return np.broadcast_to(np.asarray(write, bool), (n,))
