"""The simulated IOMMU's DMA-remapping walker: IOVA -> physical address.

It does what VT-d hardware does for an untranslated request from a
requester (source id = bus:dev.fn), and reads nothing but the register
block and the image (so it runs in any process, against the image mapped
read-only, while the daemon changes the tables):

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

pkfuse's physical memory is the image: a pointer outside it faults
(root table FR_ROOT_TABLE_INVALID, context table FR_CONTEXT_TABLE_INVALID,
next table or leaf FR_NEXT_PT_INVALID) -- never an IndexError.

Every bit is decoded by ``backing.vtd`` (the module the domain code and
fsck use), so the walker and fsck cannot disagree on an entry.

Faults are appended to the register block's fault log (unless the context
entry has FPD set), not raised. A batch is translated level by level with
numpy gathers; the work per level shrinks as IOVAs fault or reach a leaf.
"""

from __future__ import annotations

import os

import numpy as np

from . import format as fmt
from . import vtd
from .errors import FormatError
from .regs import Regs

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


def translate(image_u64: np.ndarray, base_phys: int, npages: int, regs: Regs, source_id: int,
              iovas: np.ndarray, write: bool | np.ndarray = False) -> tuple[np.ndarray, np.ndarray]:
    """Translate ``iovas`` for requester ``source_id``: (phys uint64, fault uint16).

    ``fault`` is 0 where the translation succeeded, else the FR_* reason;
    ``phys`` is 0 where it faulted. ``write`` is the request type, one
    for all or one per IOVA.
    """
    iovas = np.ascontiguousarray(iovas, dtype=U64).ravel()
    if type(image_u64) is not np.ndarray:
        image_u64 = image_u64.view(np.ndarray)
    n = iovas.size
    phys = np.zeros(n, U64)
    fault = np.zeros(n, np.uint16)
    wr = np.broadcast_to(np.asarray(write, bool), (n,))
    if n == 0:
        return phys, fault
    npages = min(npages, image_u64.size // fmt.VTD_PT_ENTRIES)
    base_pfn = base_phys >> fmt.PAGE_SHIFT
    reason, fpd, slpt_page = _context(image_u64, base_pfn, npages, regs, source_id)
    if reason:
        fault[:] = reason
    else:
        _walk(image_u64, base_pfn, npages, slpt_page, iovas, wr, phys, fault)
    if not fpd:
        bad = np.flatnonzero(fault)
        if bad.size:
            regs.record_faults(source_id, iovas[bad], fault[bad], wr[bad])
    return phys, fault


def _page(phys_addr: int, base_pfn: int, npages: int) -> int | None:
    page = (phys_addr >> fmt.PAGE_SHIFT) - base_pfn
    return page if 0 <= page < npages else None


def _context(image_u64: np.ndarray, base_pfn: int, npages: int, regs: Regs, source_id: int,
             ) -> tuple[int, bool, int]:
    """Steps 1-3 for one requester: (fault reason or 0, FPD, SL-PML4 image page)."""
    if not regs.gsts & fmt.GSTS_TES:
        return fmt.FR_TRANSLATION_DISABLED, False, 0
    rt = _page(regs.rtaddr, base_pfn, npages)
    if rt is None or regs.rtaddr % fmt.PAGE_SIZE:
        return fmt.FR_ROOT_TABLE_INVALID, False, 0
    bus, devfn = (source_id >> 8) & 0xFF, source_id & 0xFF
    re = vtd.root_entry_fields(int(image_u64[rt * 512 + bus * 2]), int(image_u64[rt * 512 + bus * 2 + 1]))
    if not re["P"]:
        return fmt.FR_ROOT_NOT_PRESENT, False, 0
    if re["rsvd_lo"] or re["rsvd_hi"]:
        return fmt.FR_ROOT_RSVD, False, 0
    ct = _page(re["CTP"], base_pfn, npages)
    if ct is None:
        return fmt.FR_CONTEXT_TABLE_INVALID, False, 0
    ce = vtd.context_entry_fields(int(image_u64[ct * 512 + devfn * 2]), int(image_u64[ct * 512 + devfn * 2 + 1]))
    if not ce["P"]:
        return fmt.FR_CONTEXT_NOT_PRESENT, False, 0
    fpd = bool(ce["FPD"])
    if ce["rsvd_lo"] or ce["rsvd_hi"]:
        return fmt.FR_CONTEXT_RSVD, fpd, 0
    if ce["TT"] != fmt.CE_TT_UNTRANSLATED or ce["AW"] != fmt.CE_AW_48:
        return fmt.FR_CONTEXT_INVALID, fpd, 0
    slpt = _page(ce["SLPTPTR"], base_pfn, npages)
    if slpt is None:
        return fmt.FR_NEXT_PT_INVALID, fpd, 0
    return 0, fpd, slpt


def _walk(image_u64: np.ndarray, base_pfn: int, npages: int, slpt_page: int, iovas: np.ndarray,
          wr: np.ndarray, phys: np.ndarray, fault: np.ndarray) -> None:
    """Step 4 for a batch; fills ``phys`` and ``fault`` in place."""
    beyond = (iovas >> U64(fmt.VTD_IOVA_BITS)) != 0
    if beyond.any():
        fault[beyond] = fmt.FR_ADDR_BEYOND_AW
        idx = np.flatnonzero(~beyond)
        iv, w = iovas[idx], wr[idx]
    else:
        idx, iv, w = None, iovas, wr  # None: the identity (fast path, no gathers)
    tbl = np.int64(slpt_page) * 512  # u64 index of entry 0 of each IOVA's current table
    allow = np.ones(iv.size, bool)  # AND of the needed access right over the levels
    need = np.where(w, _W, _R)
    base = np.uint64(base_pfn)
    for level in range(fmt.VTD_LEVELS):
        e = image_u64[tbl + ((iv >> _SHIFTS[level]) & _IDX).astype(np.int64)]
        allow &= (e & need) != 0
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
            inside = ((pa >> _PAGE_SHIFT) - base) < U64(npages)  # wraps below base: huge -> outside
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
        cont = ok & ~leaf
        if level < 3:
            nxt = vtd.entry_pages(e[cont], base_pfn)
            outside = nxt.view(U64) >= U64(npages)  # a page below the image wraps to a huge one
            if outside.any():
                sub = np.flatnonzero(cont)[outside]
                if fr is None:
                    fr = np.zeros(e.size, np.uint16)
                fr[sub] = fmt.FR_NEXT_PT_INVALID
                cont[sub] = False
                nxt = nxt[~outside]
        if fr is not None:
            bad = fr != 0
            if bad.any():
                tgt = np.flatnonzero(bad) if idx is None else idx[bad]
                fault[tgt] = fr[bad]
        if level == 3 or not cont.any():
            return
        if cont.all():
            tbl = nxt * 512
            continue
        idx = np.flatnonzero(cont) if idx is None else idx[cont]
        iv, w, allow, need = iv[cont], w[cont], allow[cont], need[cont]
        tbl = nxt * 512
