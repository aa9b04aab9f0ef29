"""The simulated IOMMU's DMA-remapping walker: IOVA -> physical address.

It does what VT-d hardware does for an untranslated request from a
requester (source id = bus:dev.fn), and reads nothing but the register
block and physical memory -- the image and, when given, the ephemeral
memory (``backing.ephemeral``) -- so it runs in any process, against both
files mapped read-only, while the daemon changes the tables:

1. GSTS.TES clear: the request is blocked (FR_TRANSLATION_DISABLED).
2. RTADDR -> root entry of the bus: present? reserved bits clear?
3. CTP -> context entry of dev.fn: present? reserved clear? TT must be
   untranslated, AW must be 48-bit (4 levels); SLPTPTR must be in memory.
4. SL-PML4E -> SL-PDPE -> SL-PDE -> SL-PTE, each entry read once (one
   8-byte load): R=W=0 is "not present" and reported as the missing access
   right; reserved bits by entry kind fault (SNP of a leaf among them: no
   snoop control is reported); bits hardware ignores -- ``SL_IGNORED`` (X
   among them), ``SL_IGNORED_PTE``, ``SL_IGNORED_NONLEAF`` -- never do; PS
   makes a 1 GiB (PDPE) or 2 MiB (PDE) leaf; the access rights are the AND
   of R/W over all levels.
5. An IOVA at or above 2**48 faults with FR_ADDR_BEYOND_AW.

pkfuse's physical memory is the image range ``[base_phys, base_phys +
npages * 4096)`` and, when ``translate`` is given ``ephemeral``, the
ephemeral range (above the image, with a hole between): any table or leaf
may be in either, as in host RAM, so a context entry whose SLPTPTR is in
ephemeral memory walks the tables there. A pointer into neither faults
(root table FR_ROOT_TABLE_INVALID, context table FR_CONTEXT_TABLE_INVALID,
next table or leaf FR_NEXT_PT_INVALID) -- never an IndexError. Poisoned
ephemeral memory (all-ones entries) faults with FR_PT_RSVD at the first
entry read.

Every bit is decoded by ``backing.vtd`` (the module the domain code and
fsck use), so the walker and fsck cannot disagree on an entry.

Faults are appended to the register block's fault log (unless the context
entry has FPD set), not raised. A batch is translated level by level with
numpy gathers; the work per level shrinks as IOVAs fault or reach a leaf.
Where every IOVA's table at a level is in one memory (always, for tables
pkfuse writes: a domain's tables are all in one memory) the level is one
gather from that memory's array; a level whose tables are in both is split.
"""

from __future__ import annotations

import os

import numpy as np

from . import format as fmt
from . import vtd
from .ephemeral import EPHEMERAL_HEADER_DTYPE, EPHEMERAL_MAGIC
from .errors import FormatError
from .regs import Regs

#: one range of physical memory as the walker reads it: (u64 words, base_phys, npages)
Region = tuple[np.ndarray, int, int]

U64 = np.uint64
_RW = U64(vtd.RW)
_R = U64(fmt.SL_R)
_W = U64(fmt.SL_W)
_LEAF_ADDR = tuple(None if m is None else U64(m) for m in vtd.LEAF_ADDR)
_SHIFTS = tuple(U64(s) for s in fmt.VTD_LEVEL_SHIFT)
_PAGE_SHIFT = U64(fmt.PAGE_SHIFT)
_IDX = U64(fmt.VTD_PT_ENTRIES - 1)


def open_image(path: str | os.PathLike[str]) -> tuple[np.ndarray, int, int]:
    """Map an image read-only for a walker: (image_u64, base_phys, npages)."""
    image = np.memmap(path, dtype=np.uint8, mode="r")
    sb = image[: fmt.SUPERBLOCK_DTYPE.itemsize].view(fmt.SUPERBLOCK_DTYPE)[0]
    if bytes(sb["magic"]) != fmt.MAGIC:
        raise FormatError("superblock.magic", 0, f"{os.fspath(path)} is not a pkfuse image")
    npages = min(int(sb["npages"]), image.size // fmt.PAGE_SIZE)
    # a plain ndarray view: memmap's __getitem__ costs more than the gathers
    return image[: npages * fmt.PAGE_SIZE].view("<u8").view(np.ndarray), int(sb["base_phys"]), npages


def open_ephemeral(path: str | os.PathLike[str]) -> Region:
    """Map an ephemeral memory file read-only for a walker: (u64, base_phys, npages).

    Good for one boot of the daemon: the header's ``boot_id`` changes at
    every restart (and ``base_phys`` may), then map it again."""
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    raw = mm[: EPHEMERAL_HEADER_DTYPE.itemsize]
    if raw.size < EPHEMERAL_HEADER_DTYPE.itemsize or bytes(raw[:8]) != EPHEMERAL_MAGIC:
        raise FormatError("ephemeral.magic", 0, f"{os.fspath(path)} is not a pkfuse ephemeral memory file")
    hdr = raw.view(EPHEMERAL_HEADER_DTYPE)[0]
    npages = min(int(hdr["npages"]), mm.size // fmt.PAGE_SIZE - 1)
    return (mm[fmt.PAGE_SIZE : (1 + npages) * fmt.PAGE_SIZE].view("<u8").view(np.ndarray),
            int(hdr["base_phys"]), npages)


def translate(image_u64: np.ndarray, base_phys: int, npages: int, regs: Regs, source_id: int,
              iovas: np.ndarray, write: bool | np.ndarray = False, *,
              ephemeral: Region | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Translate ``iovas`` for requester ``source_id``: (phys uint64, fault uint16).

    ``fault`` is 0 where the translation succeeded, else the FR_* reason;
    ``phys`` is 0 where it faulted. ``write`` is the request type, one
    for all or one per IOVA. ``ephemeral`` is the ephemeral memory's
    region (``EphemeralMemory.region()`` or ``open_ephemeral``); without it
    physical memory is the image alone.
    """
    iovas = np.ascontiguousarray(iovas, dtype=U64).ravel()
    n = iovas.size
    phys = np.zeros(n, U64)
    fault = np.zeros(n, np.uint16)
    wr = np.broadcast_to(np.asarray(write, bool), (n,))
    if n == 0:
        return phys, fault
    mem = _Memory(image_u64, base_phys, npages, ephemeral)
    reason, fpd, slpt, _did = _context(mem, regs, source_id)
    if reason:
        fault[:] = reason
    else:
        _walk(mem, slpt[0], slpt[1], iovas, wr, phys, fault)
    if not fpd:
        bad = np.flatnonzero(fault)
        if bad.size:
            regs.record_faults(source_id, iovas[bad], fault[bad], wr[bad])
    return phys, fault


class _Memory:
    """Physical memory for one translate call: region 0 the image, region 1 (if given)
    the ephemeral memory; per region a plain ndarray of words, its first pfn, its pages."""

    __slots__ = ("u", "base", "n")

    def __init__(self, image_u64: np.ndarray, base_phys: int, npages: int, ephemeral: Region | None) -> None:
        regions = [(image_u64, base_phys, npages)] + ([ephemeral] if ephemeral is not None else [])
        self.u: list[np.ndarray] = []
        self.base: list[int] = []
        self.n: list[int] = []
        for u, b, n in regions:
            if type(u) is not np.ndarray:  # memmap's __getitem__ costs more than the gathers
                u = u.view(np.ndarray)
            self.u.append(u)
            self.base.append(b >> fmt.PAGE_SHIFT)
            self.n.append(min(n, u.size // fmt.VTD_PT_ENTRIES))

    def locate(self, phys_addr: int) -> tuple[int, int] | None:
        """(region, page) of the page holding ``phys_addr``; None outside every region."""
        pfn = phys_addr >> fmt.PAGE_SHIFT
        for r, (b, n) in enumerate(zip(self.base, self.n)):
            if 0 <= pfn - b < n:
                return r, pfn - b
        return None

    def word(self, where: tuple[int, int], index: int) -> int:
        return int(self.u[where[0]][where[1] * 512 + index])


def memory(image_u64: np.ndarray, base_phys: int, npages: int, ephemeral: Region | None = None) -> _Memory:
    """Physical memory as ``walk_context`` and ``walk_tables`` read it (made once by a caller that
    translates often, as ``backing.iotlb`` does)."""
    return _Memory(image_u64, base_phys, npages, ephemeral)


def walk_context(mem: _Memory, regs: Regs, source_id: int) -> tuple[int, bool, tuple[int, int], int]:
    """Steps 1-3 alone, what a context-cache fill reads: (fault reason or 0, FPD, (region, page)
    of the SL-PML4, DID). On a fault the last two are meaningless."""
    return _context(mem, regs, source_id)


def walk_tables(mem: _Memory, slpt: tuple[int, int], iovas: np.ndarray, write: bool | np.ndarray, *,
                leaf: np.ndarray | None = None, rights: np.ndarray | None = None,
                ) -> tuple[np.ndarray, np.ndarray]:
    """Step 4 alone, from the SL-PML4 at ``slpt`` (``walk_context``'s): (phys, fault), no fault
    logged. Where given, ``leaf`` (int8) receives each IOVA's leaf level (1: 1 GiB, 2: 2 MiB, 3:
    4 KiB) and ``rights`` (uint64) the AND of R/W over the levels walked -- what an IOTLB fill
    keeps; both are meaningful only where fault is 0."""
    iovas = np.ascontiguousarray(iovas, dtype=U64).ravel()
    n = iovas.size
    phys = np.zeros(n, U64)
    fault = np.zeros(n, np.uint16)
    if n:
        wr = np.broadcast_to(np.asarray(write, bool), (n,))
        _walk(mem, slpt[0], slpt[1], iovas, wr, phys, fault, leaf, rights)
    return phys, fault


def _context(mem: _Memory, regs: Regs, source_id: int) -> tuple[int, bool, tuple[int, int], int]:
    """Steps 1-3 for one requester: (fault reason or 0, FPD, (region, page) of the SL-PML4, DID)."""
    none = (0, 0)
    if not regs.gsts & fmt.GSTS_TES:
        return fmt.FR_TRANSLATION_DISABLED, False, none, 0
    rt = mem.locate(regs.rtaddr)
    if rt is None or regs.rtaddr % fmt.PAGE_SIZE:
        return fmt.FR_ROOT_TABLE_INVALID, False, none, 0
    bus, devfn = (source_id >> 8) & 0xFF, source_id & 0xFF
    re = vtd.root_entry_fields(mem.word(rt, bus * 2), mem.word(rt, bus * 2 + 1))
    if not re["P"]:
        return fmt.FR_ROOT_NOT_PRESENT, False, none, 0
    if re["rsvd_lo"] or re["rsvd_hi"]:
        return fmt.FR_ROOT_RSVD, False, none, 0
    ct = mem.locate(re["CTP"])
    if ct is None:
        return fmt.FR_CONTEXT_TABLE_INVALID, False, none, 0
    ce = vtd.context_entry_fields(mem.word(ct, devfn * 2), mem.word(ct, devfn * 2 + 1))
    if not ce["P"]:
        return fmt.FR_CONTEXT_NOT_PRESENT, False, none, 0
    fpd, did = bool(ce["FPD"]), int(ce["DID"])
    if ce["rsvd_lo"] or ce["rsvd_hi"]:
        return fmt.FR_CONTEXT_RSVD, fpd, none, did
    if ce["TT"] != fmt.CE_TT_UNTRANSLATED or ce["AW"] != fmt.CE_AW_48:
        return fmt.FR_CONTEXT_INVALID, fpd, none, did
    slpt = mem.locate(ce["SLPTPTR"])
    if slpt is None:
        return fmt.FR_NEXT_PT_INVALID, fpd, none, did
    return 0, fpd, slpt, did


def _walk(mem: _Memory, region: int, slpt_page: int, iovas: np.ndarray, wr: np.ndarray, phys: np.ndarray,
          fault: np.ndarray, leaf_out: np.ndarray | None = None, rights_out: np.ndarray | None = None) -> None:
    """Step 4 for a batch; fills ``phys`` and ``fault`` (and ``leaf_out``, ``rights_out``:
    see ``walk_tables``) in place."""
    beyond = (iovas >> U64(fmt.VTD_IOVA_BITS)) != 0
    if beyond.any():
        fault[beyond] = fmt.FR_ADDR_BEYOND_AW
        idx = np.flatnonzero(~beyond)
        iv, w = iovas[idx], wr[idx]
    else:
        idx, iv, w = None, iovas, wr  # None: the identity (fast path, no gathers)
    two = len(mem.u) > 1
    base_pfn, npages = mem.base[0], mem.n[0]
    base, n0 = np.uint64(base_pfn), U64(npages)
    if two:
        base1, n1 = U64(mem.base[1]), U64(mem.n[1])
        shift1 = mem.base[1] - base_pfn  # image page - this = ephemeral page
    reg: int | np.ndarray = region  # memory of each IOVA's current table: one for all, or per IOVA
    tbl = np.int64(slpt_page) * 512  # word index (in that memory) of entry 0 of each IOVA's current table
    allow = np.ones(iv.size, bool)  # AND of the needed access right over the levels
    need = np.where(w, _W, _R)
    rights = None if rights_out is None else np.full(iv.size, _RW)  # AND of R/W over the levels
    for level in range(fmt.VTD_LEVELS):
        at = tbl + ((iv >> _SHIFTS[level]) & _IDX).astype(np.int64)
        e = mem.u[reg][at] if isinstance(reg, int) else _gather(mem, reg, at)
        allow &= (e & need) != 0
        if rights is not None:
            rights &= e
        present = (e & _RW) != 0
        leaf = present & vtd.is_leaf(level, e)
        rsvd = vtd.reserved_bits(level, e) != 0  # by entry kind; meaningful where present
        ok = present & ~rsvd
        if ok.all():  # the common case: no fault can arise at this level but at leaves
            fr = None
        else:
            fr = np.zeros(e.size, np.uint16)
            fr[~present] = fmt.FR_READ
            fr[~present & w] = fmt.FR_WRITE
            fr[rsvd & present] = fmt.FR_PT_RSVD
        # leaves: access right, then the address
        done = leaf & ok
        if done.any():
            every = bool(done.all())
            e_l = e if every else e[done]
            iv_l = iv if every else iv[done]
            pa = (e_l & _LEAF_ADDR[level]) | (iv_l & U64((1 << fmt.VTD_LEVEL_SHIFT[level]) - 1))
            allowed = allow if every else allow[done]
            inside = ((pa >> _PAGE_SHIFT) - base) < n0  # wraps below base: huge -> outside
            if two:
                inside |= ((pa >> _PAGE_SHIFT) - base1) < n1
            good = allowed & inside
            if not good.all():
                w_l = w if every else w[done]
                leaf_fr = np.zeros(pa.size, np.uint16)
                leaf_fr[~inside] = fmt.FR_NEXT_PT_INVALID
                denied = ~allowed
                leaf_fr[denied] = np.where(w_l[denied], fmt.FR_WRITE, fmt.FR_READ)
                pa[leaf_fr != 0] = 0
                if fr is None:
                    fr = np.zeros(e.size, np.uint16)
                fr[done] = leaf_fr
            if every:
                tgt = slice(None) if idx is None else idx
            else:
                tgt = np.flatnonzero(done) if idx is None else idx[done]
            phys[tgt] = pa
            if leaf_out is not None:
                leaf_out[tgt] = level
            if rights_out is not None and rights is not None:
                rights_out[tgt] = rights if every else rights[done]
        cont = ok & ~leaf
        if level < 3:
            nxt = vtd.entry_pages(e[cont], base_pfn)  # image pages
            in0 = nxt.view(U64) < n0  # a page below the image wraps to a huge one
            if two:
                nxt1 = nxt - shift1  # ephemeral pages
                in1 = nxt1.view(U64) < n1
                outside = ~(in0 | in1)
            else:
                outside = ~in0
            if outside.any():
                sub = np.flatnonzero(cont)[outside]
                if fr is None:
                    fr = np.zeros(e.size, np.uint16)
                fr[sub] = fmt.FR_NEXT_PT_INVALID
                cont[sub] = False
                inside = ~outside
                nxt, in0 = nxt[inside], in0[inside]
                if two:
                    nxt1 = nxt1[inside]
            nreg: int | np.ndarray = 0
            if two and not in0.all():
                if not in0.any():
                    nreg, nxt = 1, nxt1
                else:  # tables in both memories at this level
                    nreg, nxt = (~in0).astype(np.int8), np.where(in0, nxt, nxt1)
        if fr is not None:
            bad = fr != 0
            if bad.any():
                tgt = np.flatnonzero(bad) if idx is None else idx[bad]
                fault[tgt] = fr[bad]
        if level == 3 or not cont.any():
            return
        reg = nreg
        if cont.all():
            tbl = nxt * 512
            continue
        idx = np.flatnonzero(cont) if idx is None else idx[cont]
        iv, w, allow, need = iv[cont], w[cont], allow[cont], need[cont]
        if rights is not None:
            rights = rights[cont]
        tbl = nxt * 512


def _gather(mem: _Memory, reg: np.ndarray, at: np.ndarray) -> np.ndarray:
    """Words ``at[i]`` of memory ``reg[i]`` (a level whose tables are in both memories)."""
    e = np.empty(at.size, U64)
    in1 = reg.astype(bool)
    e[~in1] = mem.u[0][at[~in1]]
    e[in1] = mem.u[1][at[in1]]
    return e
