"""What a requester reaches, walked as the hardware walks it: the image, the ephemeral memory, the registers.

``device_view`` asks no daemon: it maps the image and, when the file is
there, the ephemeral memory beside it (the review's design keeps its
domains there), opens the register block and translates with
``backing.walker`` -- the root table the registers name, the requester's
context entry, the second-level tables. It is what a restart test compares
before and after the jump, and what the IOMMU tests check mappings with.
``device_leaves`` gives the leaf size each IOVA's walk ends at (4 KiB, 2 MiB,
1 GiB): what the restart bench checks its 4 KiB rows with. ``device_reach``
is every page each requester can reach at all, found from the tables rather
than probed: what the restore fuzzers hold against the sessions' files.
A faulting IOVA is recorded in the register block's fault log, as the
hardware would record it, unless the context entry sets FPD: walk only
IOVAs that are meant to be mapped when the fault log matters.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from backing import ephemeral, regs, vtd, walker
from backing import format as fmt


@contextlib.contextmanager
def _hardware(image: str | os.PathLike[str], regs_path: str | os.PathLike[str] | None,
              ephemeral_path: str | os.PathLike[str] | None) -> Iterator[tuple[np.ndarray, int, int, Any, regs.Regs]]:
    """What the hardware reads: the image (u64 view, base_phys, npages), the ephemeral memory's region (None
    when its file is not there) and the open register block (``IMAGE.regs``, ``IMAGE.ephemeral`` by default)."""
    image = Path(image)
    u64, base, npages = walker.open_image(image)
    host_ram = Path(ephemeral_path) if ephemeral_path is not None else Path(ephemeral.default_path(image))
    region = walker.open_ephemeral(host_ram) if host_ram.exists() else None
    with regs.Regs.open(regs_path if regs_path is not None else regs.default_path(image), create=False) as r:
        yield u64, base, npages, region, r


def device_view(image: str | os.PathLike[str], sid: int, iovas: np.ndarray, *, write: bool = True,
                regs_path: str | os.PathLike[str] | None = None,
                ephemeral_path: str | os.PathLike[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(phys uint64, fault uint16) of requester ``sid`` at each IOVA; fault 0 where it translated.

    ``regs_path`` defaults to ``IMAGE.regs``, ``ephemeral_path`` to ``IMAGE.ephemeral`` (used when it exists).
    """
    with _hardware(image, regs_path, ephemeral_path) as (u64, base, npages, region, r):
        return walker.translate(u64, base, npages, r, sid, iovas, write, ephemeral=region)


#: a leaf level of ``device_leaves`` -> its size in bytes (VT-d second-level: 1 GiB, 2 MiB, 4 KiB)
LEAF_BYTES = {1: 1 << 30, 2: 2 << 20, 3: 4 << 10}


def device_leaves(image: str | os.PathLike[str], sid: int, iovas: np.ndarray, *,
                  regs_path: str | os.PathLike[str] | None = None,
                  ephemeral_path: str | os.PathLike[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(leaf size in bytes int64, fault uint16) of requester ``sid``'s translation of each IOVA: the level
    the hardware's walk ended at (what an IOTLB entry of it would cover), 0 where it faulted. Nothing is
    logged: a read-only look at the tables (``walker.walk_context`` + ``walk_tables``)."""
    iovas = np.ascontiguousarray(iovas, dtype=np.uint64).ravel()
    size = np.zeros(iovas.size, np.int64)
    with _hardware(image, regs_path, ephemeral_path) as (u64, base, npages, region, r):
        mem = walker.memory(u64, base, npages, region)
        reason, _fpd, slpt, _did = walker.walk_context(mem, r, sid)
        if reason:
            return size, np.full(iovas.size, reason, np.uint16)
        level = np.zeros(iovas.size, np.int8)
        _phys, fault = walker.walk_tables(mem, slpt, iovas, False, leaf=level)
    for lv, n in LEAF_BYTES.items():
        size[(level == lv) & (fault == 0)] = n
    return size, fault


class Reach(NamedTuple):
    """The leaves one requester's tables reach: physical frame, length in 4 KiB pages, rights (the AND of
    R=1 and W=2 along the walk); one row per distinct leaf (sorted), however many IOVAs map it."""

    pfn: np.ndarray  #: uint64
    npages: np.ndarray  #: uint64
    rights: np.ndarray  #: uint8

    def pages(self) -> int:
        return int(self.npages.sum())

    def page_set(self) -> tuple[np.ndarray, np.ndarray]:
        """(pfn, rights) of every page reached, sorted, each pfn once (the OR of every leaf's rights on it)."""
        n = self.npages.astype(np.int64)
        pfn = np.repeat(self.pfn.astype(np.int64) - np.cumsum(n) + n, n) + np.arange(int(n.sum()))
        rights = np.repeat(self.rights, n)
        order = np.argsort(pfn, kind="stable")
        pfn, rights = pfn[order], rights[order]
        if not pfn.size:
            return pfn.astype(np.uint64), rights
        first = np.flatnonzero(np.r_[True, pfn[1:] != pfn[:-1]])
        return pfn[first].astype(np.uint64), np.bitwise_or.reduceat(rights, first)

    def same(self, other: Reach) -> bool:
        """The same pages with the same rights, whatever the leaf sizes (a rebuilt domain may differ)."""
        if self.pages() > 4 * other.pages() + 512:  # not worth expanding: it is not the same
            return False
        return all(np.array_equal(a, b) for a, b in zip(self.page_set(), other.page_set()))


def device_reach(image: str | os.PathLike[str], *, regs_path: str | os.PathLike[str] | None = None,
                 ephemeral_path: str | os.PathLike[str] | None = None) -> dict[int, Reach]:
    """Requester id -> what it reaches, for every requester whose context entry the hardware would use.

    Found by reading the tables as the hardware decodes them -- the root table
    RTADDR names, each present root entry's context table, each valid context
    entry's second-level tree -- not by probing IOVAs, so a leaf anywhere in
    the 48-bit space counts. An entry with reserved bits set, or a pointer to no
    memory, faults in hardware and reaches nothing. Each table page is expanded
    once per level and set of rights, so a hostile tree (loops, one table
    shared by every entry) costs at most 4 x its pages x 512 entries, never
    its IOVA fan-out.
    """
    with _hardware(image, regs_path, ephemeral_path) as (u64, base, npages, region, r):
        mem = walker.memory(u64, base, npages, region)
        out: dict[int, Reach] = {}
        for sid in _present_requesters(mem, r):
            reason, _fpd, slpt, _did = walker.walk_context(mem, r, sid)
            if not reason:
                out[sid] = _tree_reach(mem, slpt)
        return out


def _page(mem: Any, where: tuple[int, int]) -> np.ndarray:
    return mem.u[where[0]][where[1] * 512 : (where[1] + 1) * 512]


def _present_requesters(mem: Any, r: regs.Regs) -> list[int]:
    """Source ids whose context entry has P set under a present root entry (validity is walk_context's)."""
    if not r.gsts & fmt.GSTS_TES or r.rtaddr % fmt.PAGE_SIZE:
        return []
    rt = mem.locate(r.rtaddr)
    if rt is None:
        return []
    root = _page(mem, rt)
    sids = []
    for bus in np.flatnonzero(root[0::2] & np.uint64(fmt.RE_LO_P)):
        ct = mem.locate(int(root[2 * bus]) & fmt.RE_LO_CTP_MASK)
        if ct is not None:
            lo = _page(mem, ct)[0::2]
            sids += [int(bus) << 8 | int(devfn) for devfn in np.flatnonzero(lo & np.uint64(fmt.CE_LO_P))]
    return sids


def _follow(mem: Any, pointers: np.ndarray, rights: np.ndarray) -> set[tuple[tuple[int, int], int]]:
    """((region, page), rights) of each table the ``pointers`` name that is in memory and reachable with
    some right (``walker``'s memory: the image, then the ephemeral memory); one per distinct pair."""
    keep = rights != 0
    pfn, rights = (pointers[keep] & np.uint64(fmt.SL_ADDR_MASK)) >> np.uint64(fmt.PAGE_SHIFT), rights[keep]
    out: set[tuple[tuple[int, int], int]] = set()
    for region, (first, n) in enumerate(zip(mem.base, mem.n)):  # disjoint ranges of frames
        page = pfn.astype(np.int64) - first
        here = (page >= 0) & (page < n)
        pairs = np.unique(np.stack([page[here], rights[here].astype(np.int64)], 1), axis=0)
        out.update(((region, int(p)), int(w)) for p, w in pairs)
    return out


def _tree_reach(mem: Any, pml4: tuple[int, int]) -> Reach:
    rw = np.uint64(vtd.RW)
    tables = {(pml4, int(rw))}  # (table page, rights of the path so far)
    pfns, lens, rights_of = [], [], []
    for level in range(fmt.VTD_LEVELS):
        below: set[tuple[tuple[int, int], int]] = set()
        for where, rights in tables:
            e = _page(mem, where)
            e = e[((e & rw) != 0) & (vtd.reserved_bits(level, e) == 0)]
            eff = e & rw & np.uint64(rights)
            leaf = vtd.is_leaf(level, e)
            if leaf.any():
                pfns.append((e[leaf] & np.uint64(vtd.LEAF_ADDR[level])) >> np.uint64(fmt.PAGE_SHIFT))
                lens.append(np.full(int(leaf.sum()), vtd.LEVEL_PAGES[level], np.uint64))
                rights_of.append(eff[leaf].astype(np.uint8))
            below.update(_follow(mem, e[~leaf], eff[~leaf]))
        tables = below
    if not pfns:
        return Reach(np.zeros(0, np.uint64), np.zeros(0, np.uint64), np.zeros(0, np.uint8))
    rows = np.unique(np.rec.fromarrays([np.concatenate(pfns), np.concatenate(lens), np.concatenate(rights_of)]))
    return Reach(rows["f0"].astype(np.uint64), rows["f1"].astype(np.uint64), rows["f2"].astype(np.uint8))


__all__ = ["device_view", "device_leaves", "device_reach", "Reach", "LEAF_BYTES"]
