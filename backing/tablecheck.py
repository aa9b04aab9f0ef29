"""fsck of the VT-d tables in an image: root table, context entries, every domain's tree.

Called by ``backing.fsck`` after the metadata checks passed without a fatal
finding (so extents are in range and owners are known: ``FsckContext``, of
``backing.fsckctx``; this module imports nothing of fsck itself).
Trusts nothing in the tables: every pointer is range-checked before it is
followed, the tree depth is fixed at four levels, a page referenced twice
is reported and not followed again, and each check lists at most
``MAX_PER_CHECK`` findings. Garbage gives findings, never an exception.

Checks, one function each:

* ``check_root_pgtables_file``: iommu/root-pgtables exists with 257 pages.
* ``check_root_entries``: present root entries have reserved bits clear and
  point at the context table of their bus (file page 1 + bus); others are 0.
* ``check_context_entries``: present context entries have reserved bits
  clear, TT untranslated, AW 48-bit, and SLPTPTR at the SL-PML4 of a
  domain file or at or above the image's end -- ephemeral memory
  (``backing.ephemeral``, always placed above the image): tables that a
  restart does not keep, which the next read-write ``Iommu.open`` clears;
  accepted, as the crash state of a daemon that ran ephemeral domains. A
  DID other than the domain's is a replacing attach cut between its two
  stores (table pointer first, then DID; ``Iommu.open`` finishes it), and
  the old DID may be an ephemeral domain's, which the image does not name:
  accepted, but DID 0 (no domain's, ever) is reported. Non-present entries
  have a zero lo word (the hi word may outlive a detach cut short by a
  kill); a present entry on a bus whose root entry is clear is unreachable
  (reported).
* ``check_domain_header``: in /iommu, and ``domainhdr``'s rule (the one
  ``Iommu.open`` applies): name dom-<DID>, two pages at least, magic,
  compatible string, DID = file name, address width, SL-PML4 at file page 1.
* ``check_domain_tree``: tree shape (pointers only to the domain's own pool
  pages, no page shared or referenced twice, PS only at PDPE/PDE),
  reserved bits clear, no bits set that hardware ignores (pkfuse never
  writes them), non-present entries zero.
* ``check_domain_leaves``: every leaf maps only pages of guest-RAM files.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from . import format as fmt
from . import vtd
from .allocator import expand_runs
from .domainhdr import check_domain_file
from .errors import Finding
from .fsckctx import FsckContext

PS = fmt.PAGE_SIZE
U64 = np.uint64
MAX_PER_CHECK = 50
_ROOT = "iommu/root-pgtables"


class _Domain:
    """What the checks learn about one domain file."""

    def __init__(self, ino: int, name: bytes, pages: np.ndarray) -> None:
        self.ino = ino
        self.name = name
        self.path = "iommu/" + name.decode(errors="replace")
        self.pages = pages  #: image page of each file page (in-range extents, file order)
        self.domain_id: int | None = None  #: set when the header is valid
        self.walked: tuple[list[vtd.Level], list[vtd.Problem]] | None = None


def check_tables(ctx: FsckContext) -> list[Finding]:
    """Every finding about the VT-d tables of the image behind ``ctx``."""
    findings: list[Finding] = []
    iommu_dir = ctx.child(fmt.ROOT_INO, fmt.IOMMU_DIR_NAME)
    if iommu_dir is None:
        return findings  # the namespace checks report the missing directory
    root_pages = None
    root_ino = ctx.child(iommu_dir, fmt.ROOT_PGTABLES_NAME)
    findings += _capped(check_root_pgtables_file(ctx, root_ino))
    if root_ino is not None and int(ctx.kind[root_ino]) == fmt.KIND_IOMMU_ROOT:
        pages = _file_pages(ctx, root_ino)
        if pages.size == fmt.ROOT_PGTABLES_PAGES:
            root_pages = pages
    domains = []
    reach: tuple[np.ndarray, np.ndarray] | None = None  # built once, for the first domain with leaves to check
    for ino in np.flatnonzero(ctx.live & (ctx.kind == fmt.KIND_IOMMU_DOMAIN)).tolist():
        d = ctx.dentries[ino]
        name = bytes(d["name"])[: min(int(d["name_len"]), fmt.NAME_MAX)]
        dom = _Domain(ino, name, _file_pages(ctx, ino))
        findings += _capped(check_domain_header(ctx, dom, iommu_dir))
        if dom.domain_id is not None:
            findings += _capped(check_domain_tree(ctx, dom))
            reach = reach if reach is not None else _guest_reach(ctx)
            findings += _capped(check_domain_leaves(ctx, dom, reach))
        domains.append(dom)
    if root_pages is not None:
        findings += _capped(check_root_entries(ctx, root_pages))
        findings += _capped(check_context_entries(ctx, root_pages, domains))
    return findings


# ------------------------------------------------------------------ helpers


def _file_pages(ctx: FsckContext, ino: int) -> np.ndarray:
    """Image page of each file page, for the leading run of file pages with extents."""
    fp, page, n = ctx.file_map(ino)
    gaps = np.flatnonzero(fp != np.cumsum(n) - n)  # an extent not starting where the previous ones end
    k = int(gaps[0]) if gaps.size else fp.size
    return expand_runs(page[:k], n[:k])


def _capped(findings: Iterator[Finding]) -> list[Finding]:
    out = []
    more = 0
    first_extra: Finding | None = None
    for f in findings:
        if len(out) < MAX_PER_CHECK:
            out.append(f)
        else:
            more += 1
            first_extra = first_extra or f
    if first_extra is not None:
        out.append(Finding(first_extra.structure, first_extra.offset, f"... and {more} more findings like these"))
    return out


def _words(ctx: FsckContext, page: int) -> np.ndarray:
    return ctx.image_u64[page * 512 : page * 512 + 512]


# ---------------------------------------------------------- root and context


def check_root_pgtables_file(ctx: FsckContext, root_ino: int | None) -> Iterator[Finding]:
    if root_ino is None:
        yield Finding(_ROOT, 0, "missing: the VT-d root and context tables are gone")
        return
    if int(ctx.kind[root_ino]) != fmt.KIND_IOMMU_ROOT:
        yield Finding(_ROOT, ctx.inode_off(root_ino), f"inode {root_ino} has kind {int(ctx.kind[root_ino])}, "
                      "not the VT-d root table file")
        return
    n = _file_pages(ctx, root_ino).size
    if n != fmt.ROOT_PGTABLES_PAGES:
        yield Finding(_ROOT, ctx.inode_off(root_ino, "npages"),
                      f"{n} pages with extents, want {fmt.ROOT_PGTABLES_PAGES} (root table + 256 context tables)")


def check_root_entries(ctx: FsckContext, root_pages: np.ndarray) -> Iterator[Finding]:
    rt = int(root_pages[0])
    w = _words(ctx, rt)
    lo, hi = w[0::2], w[1::2]
    for bus in range(fmt.VTD_ROOT_ENTRIES):
        off = (rt * 512 + bus * 2) * 8
        lw, hw = int(lo[bus]), int(hi[bus])
        if not lw & fmt.RE_LO_P:
            if lw or hw:
                yield Finding(f"{_ROOT} root entry {bus:02x}", off, f"not present but holds {hw:#x}:{lw:#x}")
            continue
        f = vtd.root_entry_fields(lw, hw)
        if f["rsvd_lo"] or f["rsvd_hi"]:
            yield Finding(f"{_ROOT} root entry {bus:02x}", off,
                          f"reserved bits set: lo {f['rsvd_lo']:#x} hi {f['rsvd_hi']:#x}")
        want = ctx.geometry.phys_addr(int(root_pages[1 + bus]))
        if f["CTP"] != want:
            yield Finding(f"{_ROOT} root entry {bus:02x}", off,
                          f"CTP {f['CTP']:#x} is not the bus's context table {want:#x}")


def check_context_entries(ctx: FsckContext, root_pages: np.ndarray, domains: list[_Domain]) -> Iterator[Finding]:
    by_pml4 = {ctx.geometry.phys_addr(int(d.pages[1])): d for d in domains if d.domain_id is not None}
    above = ctx.geometry.base_phys + ctx.geometry.npages * PS  # ephemeral memory: at or above
    re_lo = _words(ctx, int(root_pages[0]))[0::2]
    ctables = ctx.image_u64.reshape(-1, 512)[root_pages[1:]]  # (256, 512)
    lo, hi = ctables[:, 0::2], ctables[:, 1::2]
    present = (lo & U64(fmt.CE_LO_P)) != 0
    # a non-present entry may keep its hi word: detach clears lo (P) first
    stray = ~present & (lo != 0)
    for bus, devfn in zip(*np.nonzero(stray)):
        yield Finding(_ce(bus, devfn), _ce_off(root_pages, bus, devfn),
                      f"not present but holds {int(hi[bus, devfn]):#x}:{int(lo[bus, devfn]):#x}")
    for bus, devfn in zip(*np.nonzero(present)):
        lw, hw = int(lo[bus, devfn]), int(hi[bus, devfn])
        where, off = _ce(bus, devfn), _ce_off(root_pages, bus, devfn)
        f = vtd.context_entry_fields(lw, hw)
        if not int(re_lo[bus]) & fmt.RE_LO_P:
            yield Finding(where, off, "present, but the root entry of its bus is not: unreachable")
        if f["rsvd_lo"] or f["rsvd_hi"]:
            yield Finding(where, off, f"reserved bits set: lo {f['rsvd_lo']:#x} hi {f['rsvd_hi']:#x}")
        if f["TT"] != fmt.CE_TT_UNTRANSLATED:
            yield Finding(where, off, f"translation type {f['TT']:#b} is not untranslated (0b00)")
        if f["AW"] != fmt.CE_AW_48:
            yield Finding(where, off, f"address width {f['AW']:#b} is not 48-bit (0b010)")
        if f["DID"] == 0:
            yield Finding(where, off, "DID 0 is no domain's")
        if f["SLPTPTR"] >= above:
            continue  # an ephemeral domain's: not kept by a restart, cleared at the next open
        dom = by_pml4.get(f["SLPTPTR"])
        if dom is None:
            yield Finding(where, off, f"SLPTPTR {f['SLPTPTR']:#x} is not the SL-PML4 of any domain")


def _ce(bus: int, devfn: int) -> str:
    return f"{_ROOT} context entry {int(bus):02x}:{int(devfn) >> 3:02x}.{int(devfn) & 7}"


def _ce_off(root_pages: np.ndarray, bus: int, devfn: int) -> int:
    return (int(root_pages[1 + int(bus)]) * 512 + int(devfn) * 2) * 8


# ------------------------------------------------------------------ domains


def check_domain_header(ctx: FsckContext, dom: _Domain, iommu_dir: int) -> Iterator[Finding]:
    """The domain file lives in /iommu and passes ``domainhdr.check_domain_file`` (name,
    size, header), the rule ``Iommu.open`` applies; a half-made file is no finding."""
    parent = int(ctx.dentries[dom.ino]["parent"])
    if parent != iommu_dir:
        yield Finding(dom.path, ctx.dentry_off(dom.ino), "IOMMU domain file outside /iommu")
    verdict = check_domain_file(ctx.image, ctx.geometry, dom.ino, dom.name, dom.pages)
    yield from verdict.problems
    dom.domain_id = verdict.domain_id  # None unless valid: the tree and leaf checks skip it


def _walk(ctx: FsckContext, dom: _Domain) -> tuple[list[vtd.Level], list[vtd.Problem]]:
    if dom.walked is None:
        pool = np.sort(dom.pages[2:])
        dom.walked = vtd.walk_tree(ctx.image_u64, ctx.geometry.base_pfn, int(dom.pages[1]), pool,
                                   MAX_PER_CHECK)
    return dom.walked


def check_domain_tree(ctx: FsckContext, dom: _Domain) -> Iterator[Finding]:
    _, problems = _walk(ctx, dom)
    for p in problems:
        yield Finding(f"{dom.path} {vtd.LEVEL_NAMES[p.level]}", p.where * 8, p.what)


def check_domain_leaves(ctx: FsckContext, dom: _Domain, reach: tuple[np.ndarray, np.ndarray],
                        ) -> Iterator[Finding]:
    """``reach`` is ``_guest_reach(ctx)``: the guest-RAM runs a leaf may map."""
    levels, _ = _walk(ctx, dom)
    where, pfn, npages = [], [], []
    for level, lv in enumerate(levels):
        m = lv.leaf
        where.append(lv.where[m])
        pfn.append(vtd.entry_pages(lv.entries[m]))
        npages.append(np.full(int(m.sum()), vtd.LEVEL_PAGES[level], np.int64))
    w, p, n = np.concatenate(where), np.concatenate(pfn), np.concatenate(npages)
    page = p - ctx.geometry.base_pfn
    inside = (page >= 0) & (page + n <= ctx.geometry.npages)
    for i in np.flatnonzero(~inside).tolist():
        yield Finding(f"{dom.path} leaf", int(w[i]) * 8,
                      f"maps {n[i]} pages at {int(p[i]) << 12:#x}, outside the image")
    starts, ends_reach = reach
    idx = np.searchsorted(starts, page, side="right") - 1
    safe = np.maximum(idx, 0)
    guest = inside & (idx >= 0) & (page + n <= ends_reach[safe]) & (page >= starts[safe]) if starts.size \
        else np.zeros(page.shape, bool)
    for i in np.flatnonzero(inside & ~guest).tolist():
        owner, kind = ctx.page_owner(np.array([page[i]]))
        what = "a free page" if int(owner[0]) == 0 else \
            fmt.KIND_NAMES.get(int(kind[0]), "?") + f" inode {int(owner[0])}"
        yield Finding(f"{dom.path} leaf", int(w[i]) * 8,
                      f"maps {n[i]} pages at {int(p[i]) << 12:#x}, not all guest RAM (starts in {what})")


def _guest_reach(ctx: FsckContext) -> tuple[np.ndarray, np.ndarray]:
    """Starts of guest-RAM extents (sorted) and, for each, the end of the run of
    guest-RAM extents that continue it without a gap: a leaf starting in
    extent i maps only guest pages iff it ends by reach[i]."""
    guest = ctx.kind[ctx.owner_ino] == fmt.KIND_GUEST
    starts, ends = ctx.owner_start[guest], ctx.owner_end[guest]
    if not starts.size:
        return starts, ends
    brk = np.concatenate(([True], starts[1:] != ends[:-1]))
    group = np.cumsum(brk) - 1
    last_end = np.zeros(group[-1] + 1, np.int64)
    np.maximum.at(last_end, group, ends)
    return starts, last_end[group]
