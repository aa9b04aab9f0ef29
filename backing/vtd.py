"""Intel VT-d entries: encode and decode, and a bounded walk of a domain's tree.

Only arithmetic on the bit layouts of ``backing/format.py`` lives here (no
image I/O beyond reading a table view it is given), so the domain code, the
hardware walker and fsck agree on every bit.

Units: ``pfn`` is a physical page frame number (phys_addr >> 12); ``page``
is an image page index (pfn - base_pfn); an IOVA "slot" at level L is
``iova >> LEVEL_SHIFT[L]``. Level 0 is the SL-PML4, level 3 the SL-PT.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from . import format as fmt

U64 = np.uint64
RW = fmt.SL_R | fmt.SL_W
LEVEL_PAGES = tuple(1 << (s - fmt.PAGE_SHIFT) for s in fmt.VTD_LEVEL_SHIFT)  #: 4 KiB pages per entry
LEVEL_NAMES = ("SL-PML4E", "SL-PDPE", "SL-PDE", "SL-PTE")
#: reserved bits of a leaf entry at each level (None: no leaf allowed there)
LEAF_RSVD = (None, fmt.SL_RSVD_LEAF_1G, fmt.SL_RSVD_LEAF_2M, fmt.SL_RSVD_LEAF_4K)
LEAF_ADDR = (None, fmt.SL_ADDR_MASK_1G, fmt.SL_ADDR_MASK_2M, fmt.SL_ADDR_MASK)
#: bits hardware ignores in a leaf entry at each level (bit 7 too in an SL-PTE)
LEAF_IGNORED = (None, fmt.SL_IGNORED, fmt.SL_IGNORED, fmt.SL_IGNORED_PTE)
IOVA_LIMIT = 1 << fmt.VTD_IOVA_BITS
ABOVE_52 = 0xFFF0_0000_0000_0000  #: pointer bits 63:52: beyond any host address; pkfuse keeps them 0
#: the address field of root, context and second-level entries alike (RE_LO_CTP_MASK,
#: CE_LO_SLPTPTR_MASK and SL_ADDR_MASK are all bits 51:12)
_ADDR_FIELD = U64(fmt.ADDR_MASK)
_PAGE_SHIFT = U64(fmt.PAGE_SHIFT)
assert fmt.RE_LO_CTP_MASK == fmt.CE_LO_SLPTPTR_MASK == fmt.SL_ADDR_MASK == fmt.ADDR_MASK


# ---------------------------------------------------------------- root entry


def root_entry(ctp_phys: int) -> tuple[int, int]:
    """(lo, hi) of a present root entry pointing at the context table at ``ctp_phys``."""
    if ctp_phys & ~fmt.RE_LO_CTP_MASK:
        raise ValueError(f"context-table pointer {ctp_phys:#x} not a 4 KiB aligned 52-bit address")
    return (ctp_phys & fmt.RE_LO_CTP_MASK) | fmt.RE_LO_P, 0


def root_entry_fields(lo: int, hi: int) -> dict[str, int]:
    return {"P": lo & fmt.RE_LO_P, "CTP": lo & fmt.RE_LO_CTP_MASK,
            "rsvd_lo": lo & (fmt.RE_LO_RSVD | ABOVE_52), "rsvd_hi": hi & fmt.RE_HI_RSVD}


# ------------------------------------------------------------- context entry


def context_entry(slptptr: int, domain_id: int, *, aw: int = fmt.CE_AW_48, tt: int = fmt.CE_TT_UNTRANSLATED,
                  fpd: bool = False) -> tuple[int, int]:
    """(lo, hi) of a present legacy-mode context entry."""
    if slptptr & ~fmt.CE_LO_SLPTPTR_MASK:
        raise ValueError(f"SLPTPTR {slptptr:#x} not a 4 KiB aligned 52-bit address")
    if not 0 <= domain_id <= 0xFFFF:
        raise ValueError(f"domain id {domain_id} does not fit 16 bits")
    lo = fmt.CE_LO_P | (fmt.CE_LO_FPD if fpd else 0) | ((tt << fmt.CE_LO_TT_SHIFT) & fmt.CE_LO_TT_MASK) | slptptr
    hi = (aw & fmt.CE_HI_AW_MASK) | (domain_id << fmt.CE_HI_DID_SHIFT)
    return lo, hi


def context_entry_fields(lo: int, hi: int) -> dict[str, int]:
    return {
        "P": lo & fmt.CE_LO_P,
        "FPD": (lo & fmt.CE_LO_FPD) >> 1,
        "TT": (lo & fmt.CE_LO_TT_MASK) >> fmt.CE_LO_TT_SHIFT,
        "SLPTPTR": lo & fmt.CE_LO_SLPTPTR_MASK,
        "AW": hi & fmt.CE_HI_AW_MASK,
        "DID": (hi & fmt.CE_HI_DID_MASK) >> fmt.CE_HI_DID_SHIFT,
        "rsvd_lo": lo & (fmt.CE_LO_RSVD | ABOVE_52),
        "rsvd_hi": hi & fmt.CE_HI_RSVD,
    }


# -------------------------------------------------------- second-level entries


def table_entry(table_phys: int) -> int:
    """A non-leaf SL entry (PML4E/PDPE/PDE) pointing at the next table; R and W set
    so that the leaf alone decides the access rights (as the Linux driver does)."""
    if table_phys & ~fmt.SL_ADDR_MASK:
        raise ValueError(f"table address {table_phys:#x} not 4 KiB aligned below 2**52")
    return table_phys | RW


def leaf_entry(level: int, phys_addr: int, write: bool) -> int:
    """A leaf at ``level`` (1: 1 GiB SL-PDPE, 2: 2 MiB SL-PDE, 3: 4 KiB SL-PTE)."""
    mask = LEAF_ADDR[level]
    if mask is None or phys_addr & ~mask:
        raise ValueError(f"{phys_addr:#x} is not a valid level-{level} leaf address")
    return phys_addr | fmt.SL_R | (fmt.SL_W if write else 0) | (fmt.SL_PS if level < 3 else 0)


def entry_pages(entries: np.ndarray | int, base_pfn: int = 0) -> np.ndarray:
    """The page each entry's address field (bits 51:12) names, as int64 ``pfn - base_pfn``.

    One decoder for every entry that points at a page: a root entry's
    context table, a context entry's SL-PML4, a non-leaf SL entry's next
    table and a leaf's first frame (a 2 MiB or 1 GiB leaf's low address bits
    are reserved, so once the walk or fsck accepted it bits 51:12 are its
    address). ``base_pfn`` 0 gives the pfn itself, the image's
    ``base_phys >> 12`` gives image pages. Vectorized; not range-checked:
    garbage gives pages outside the image, negative ones too, which the
    caller refuses (``view(np.uint64)`` turns a negative page into a huge one).
    """
    pfn = ((np.asarray(entries, U64) & _ADDR_FIELD) >> _PAGE_SHIFT).view(np.int64)  # < 2**40: no copy
    return pfn - base_pfn if base_pfn else pfn


def leaf_entries(level: int, pfns: np.ndarray, write: bool) -> np.ndarray:
    """Vectorized ``leaf_entry`` for page frame numbers ``pfns`` (already aligned)."""
    bits = fmt.SL_R | (fmt.SL_W if write else 0) | (fmt.SL_PS if level < 3 else 0)
    return (pfns.astype(U64) << U64(fmt.PAGE_SHIFT)) | U64(bits)


def is_leaf(level: int, entries: np.ndarray) -> np.ndarray:
    """Which present entries at ``level`` are leaves (PS at PDPE/PDE, always at PTE)."""
    if level == 3:
        return np.ones(entries.shape, bool)
    if level == 0:
        return np.zeros(entries.shape, bool)
    return (entries & U64(fmt.SL_PS)) != 0


def ignored_bits(level: int, entries: np.ndarray) -> np.ndarray:
    """Bits hardware ignores set in present entries at ``level``, by entry kind
    (``SL_IGNORED`` in a 1 GiB or 2 MiB leaf, ``SL_IGNORED_PTE`` in a 4 KiB
    leaf, ``SL_IGNORED_NONLEAF`` in a pointer to a table): garbage to fsck,
    not a fault."""
    if level == 3:
        return entries & U64(fmt.SL_IGNORED_PTE)
    nonleaf = entries & U64(fmt.SL_IGNORED_NONLEAF)
    if level == 0:
        return nonleaf
    return np.where(is_leaf(level, entries), entries & U64(LEAF_IGNORED[level]), nonleaf)


def reserved_bits(level: int, entries: np.ndarray) -> np.ndarray:
    """Reserved bits set in present entries at ``level``, by entry kind."""
    leaf = is_leaf(level, entries)
    rsvd_leaf = LEAF_RSVD[level]
    nonleaf = entries & U64(fmt.SL_RSVD_NONLEAF)
    if level == 0:
        return nonleaf  # PS is reserved in a PML4E
    return np.where(leaf, entries & U64(rsvd_leaf), nonleaf)


# ------------------------------------------------------------- tree walk


@dataclasses.dataclass
class Level:
    """The present entries of one level of a domain's tree."""

    tables: np.ndarray  #: image pages of this level's tables (int64)
    slots: np.ndarray  #: IOVA slot (iova >> LEVEL_SHIFT) of each present entry (int64)
    where: np.ndarray  #: index of each entry in the image's u64 view (int64)
    entries: np.ndarray  #: the entry values (uint64)
    leaf: np.ndarray  #: bool: a leaf (mapping), else a pointer to a next-level table


@dataclasses.dataclass
class Problem:
    level: int
    where: int  #: u64 index of the entry (or table page * 512 for a table)
    what: str


#: per level, every bit that is reserved or ignored in some kind of entry there:
#: an entry with none of them needs no per-kind check
_SUSPECT = (
    fmt.SL_RSVD_NONLEAF | fmt.SL_IGNORED_NONLEAF,
    fmt.SL_RSVD_NONLEAF | fmt.SL_IGNORED_NONLEAF | fmt.SL_RSVD_LEAF_1G | fmt.SL_IGNORED,
    fmt.SL_RSVD_NONLEAF | fmt.SL_IGNORED_NONLEAF | fmt.SL_RSVD_LEAF_2M | fmt.SL_IGNORED,
    fmt.SL_RSVD_LEAF_4K | fmt.SL_IGNORED_PTE,
)


def walk_tree(image_u64: np.ndarray, base_pfn: int, pml4_page: int, allowed: np.ndarray,
              limit: int = 100) -> tuple[list[Level], list[Problem]]:
    """Collect every present entry of the tree rooted at image page ``pml4_page``.

    ``allowed`` is a sorted int64 array of image pages that may hold this
    tree's tables (the domain file's pool). Pointers outside it, a page
    referenced twice (shared or cyclic), reserved bits and PS where it is
    not allowed are reported as problems and not followed, so garbage gives
    problems, never an exception; the depth is fixed at four levels.
    Cost is one gather per level: O(tables * 512). At most ``limit``
    problems of each kind are listed, then one "... and N more".
    """
    tables_u64 = image_u64[: image_u64.size // fmt.VTD_PT_ENTRIES * fmt.VTD_PT_ENTRIES].reshape(-1, fmt.VTD_PT_ENTRIES)
    levels: list[Level] = []
    problems: list[Problem] = []
    tables = np.array([pml4_page], np.int64)
    bases = np.zeros(1, np.int64)  # IOVA slot of entry 0 of each table, at this level
    seen = tables.copy()
    for level in range(fmt.VTD_LEVELS):
        block = tables_u64[tables].ravel()  # k tables * 512 entries, in table order
        present = (block & U64(RW)) != 0
        idx = np.flatnonzero(present)  # 1-D: cheaper than a 2-D nonzero and gather
        if idx.size != block.size:
            stray = np.flatnonzero(~present & (block != 0))
            if stray.size:
                _report(problems, level, tables[stray >> 9] * 512 + (stray & 511), block[stray], limit,
                        lambda v, level=level: f"{LEVEL_NAMES[level]} not present but has bits {v:#x}")
        entries = block[idx]
        rows, cols = idx >> 9, idx & 511
        where = tables[rows] * 512 + cols
        slots = bases[rows] * 512 + cols
        leaf = is_leaf(level, entries)
        if (entries & U64(_SUSPECT[level])).any():  # else no reserved or ignored bit anywhere (common)
            rsvd = reserved_bits(level, entries)
            bad = rsvd != 0
            if bad.any():
                _report(problems, level, where[bad], rsvd[bad], limit,
                        lambda v, level=level: f"{LEVEL_NAMES[level]} has reserved bits {v:#x} set")
            ign = ignored_bits(level, entries)
            junk = ign != 0
            if junk.any():
                _report(problems, level, where[junk], ign[junk], limit,
                        lambda v, level=level: f"{LEVEL_NAMES[level]} has bits {v:#x} set that hardware ignores "
                        "and pkfuse never writes")
            ok = ~bad & ~junk
            if not ok.all():
                slots, where, entries, leaf = slots[ok], where[ok], entries[ok], leaf[ok]
        # rights pkfuse never writes: a table pointer without R and W (the walk would AND the missing
        # right into every leaf below), a leaf without R (every map is readable)
        partial = (entries & U64(fmt.SL_R)) == 0  # (cheap over a level of 4 KiB leaves: one test)
        if level < 3:
            partial[~leaf] |= (entries[~leaf] & U64(fmt.SL_W)) == 0
        if partial.any():
            _report(problems, level, where[partial], entries[partial], limit,
                    lambda v, level=level: f"{LEVEL_NAMES[level]} {v:#x} lacks a right pkfuse always sets "
                    "(R in a leaf, R and W in a table pointer)")
            keep = ~partial
            slots, where, entries, leaf = slots[keep], where[keep], entries[keep], leaf[keep]
        levels.append(Level(tables, slots, where, entries, leaf))
        if level == fmt.VTD_LEVELS - 1:
            break
        desc = ~leaf  # of the entries kept (ok ones)
        child = entry_pages(entries[desc], base_pfn)
        pos = np.searchsorted(allowed, child)
        inside = (pos < allowed.size) & (allowed[np.minimum(pos, max(allowed.size - 1, 0))] == child) \
            if allowed.size else np.zeros(child.shape, bool)
        dwhere, dslots = where[desc], slots[desc]
        if not inside.all():
            _report(problems, level, dwhere[~inside], child[~inside], limit,
                    lambda v, level=level: f"{LEVEL_NAMES[level]} points at image page {v} outside the domain's table pool")
        child, dwhere, dslots = child[inside], dwhere[inside], dslots[inside]
        _, first = np.unique(child, return_index=True)
        again = np.isin(child, seen)
        dup = np.ones(child.shape, bool)
        dup[first] = False
        dup |= again
        if dup.any():
            _report(problems, level, dwhere[dup], child[dup], limit,
                    lambda v, level=level: f"{LEVEL_NAMES[level]} points at table page {v}, which another entry also uses")
        keep = ~dup & ~np.isin(child, child[dup])
        tables, bases = child[keep], dslots[keep]
        seen = np.concatenate([seen, tables])
    return levels, problems


def _report(problems: list[Problem], level: int, where: np.ndarray, values: np.ndarray, limit: int,
            text: Callable[[int], str]) -> None:
    for w, v in zip(where[:limit].tolist(), values[:limit].tolist()):
        problems.append(Problem(level, int(w), text(int(v))))
    if where.size > limit:
        problems.append(Problem(level, int(where[limit]), f"... and {where.size - limit} more like it"))


def leaf_frames(levels: list[Level]) -> tuple[np.ndarray, np.ndarray]:
    """Every leaf as (pfn, pages), in walk order -- level by level, each level's entries as walked --
    not IOVA order (cheaper than ``leaf_ranges``)."""
    pfn, npages = [], []
    for level, lv in enumerate(levels):
        e = lv.entries if level == 3 else lv.entries[lv.leaf]
        pfn.append(entry_pages(e))
        npages.append(np.full(e.size, LEVEL_PAGES[level], np.int64))
    return np.concatenate(pfn), np.concatenate(npages)


def leaf_ranges(levels: list[Level]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Every leaf as (iova page, pfn, pages, writable), sorted by IOVA."""
    iova, pfn, npages, wr = [], [], [], []
    for level, lv in enumerate(levels):
        m = lv.leaf
        if not m.any():
            continue
        e = lv.entries[m]
        iova.append(lv.slots[m] * LEVEL_PAGES[level])
        pfn.append(entry_pages(e))
        npages.append(np.full(e.size, LEVEL_PAGES[level], np.int64))
        wr.append((e & U64(fmt.SL_W)) != 0)
    if not iova:
        z = np.zeros(0, np.int64)
        return z, z, z, np.zeros(0, bool)
    iv, pf, n, w = (np.concatenate(x) for x in (iova, pfn, npages, wr))
    order = np.argsort(iv, kind="stable")
    return iv[order], pf[order], n[order], w[order]


def coalesce(iova: np.ndarray, pfn: np.ndarray, npages: np.ndarray, write: np.ndarray,
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Merge IOVA-sorted leaves that continue each other in IOVA, pfn and permission."""
    if iova.size == 0:
        return iova, pfn, npages, write
    cont = (iova[1:] == iova[:-1] + npages[:-1]) & (pfn[1:] == pfn[:-1] + npages[:-1]) & (write[1:] == write[:-1])
    starts = np.flatnonzero(np.concatenate(([True], ~cont)))
    return iova[starts], pfn[starts], np.add.reduceat(npages, starts), write[starts]
