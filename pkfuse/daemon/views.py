"""Text views of an open store: ``.pkernfs/{status,memmap,iommu,info}`` and ``user.pkernfs.*`` xattrs.

Pure functions of a ``Store`` (and the IOMMU object when there is one): the
FUSE handlers, ``pkfuse info`` on an unmounted image and the tests all read
the same text. Physical addresses are ``base_phys + image offset``; ranges
in the memory map are inclusive at both ends, as in ``/proc/iomem``.

xattrs (what the VMM and the user read):

- ``user.pkernfs.extents``: one line per extent, ``file_offset phys_addr length``,
  each in hex with ``0x``, sorted by file offset.
- ``user.pkernfs.total``: bytes held in extents (hex), which is ``st_blocks * 512``.
- ``user.pkernfs.page_size``: ``4096``.
- ``user.pkernfs.kind``: ``guest-ram``, ``iommu-root``, ``iommu-domain`` or ``directory``.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np

from backing import format as fmt
from backing.errors import StoreError
from backing.store import Store

if TYPE_CHECKING:  # the IOMMU library is not imported for a view of the store alone
    from collections.abc import Mapping

    from backing.guestmmap import GuestMaps
    from backing.iommu import Iommu, MappingRange
    from backing.iommufd import Context, Iommufd
    from backing.liveupdate import LiveUpdate

PS = fmt.PAGE_SIZE

XATTR_EXTENTS = b"user.pkernfs.extents"
XATTR_TOTAL = b"user.pkernfs.total"
XATTR_PAGE_SIZE = b"user.pkernfs.page_size"
XATTR_KIND = b"user.pkernfs.kind"


def xattrs(store: Store, ino: int) -> dict[bytes, bytes]:
    """The ``user.pkernfs.*`` attributes of image inode ``ino``."""
    with store.lock:
        a = store.getattr(ino)
        out = {XATTR_KIND: fmt.KIND_NAMES.get(a.kind, str(a.kind)).encode()}
        if a.kind in fmt.KINDS_WITH_PAGES:
            exts = store.extents(ino)
            out[XATTR_EXTENTS] = "".join(f"{e.file_offset:#x} {e.phys_addr:#x} {e.length:#x}\n"
                                         for e in exts).encode()
            out[XATTR_TOTAL] = f"{a.npages * PS:#x}".encode()
            out[XATTR_PAGE_SIZE] = str(PS).encode()
        return out


def render_status(store: Store, *, iommu: Iommu | None = None, regs_path: str | None = None,
                  pid: int | str | None = None, control: str | None = None,
                  iommufd: Iommufd | None = None, liveupdate: LiveUpdate | None = None,
                  guest_maps: GuestMaps | None = None, connections: int | None = None) -> str:
    """``key: value`` lines describing the image and the daemon serving it (``pid``: ours by default).

    ``iommufd``: the daemon's live iommufd objects, counted on an ``iommufd`` line (a daemon
    without a control socket, and ``pkfuse info IMAGE``, have none and show no such line).
    ``guest_maps``: the PKFUSE_GUEST_MMAP pins, on a ``guest_mmaps`` line (likewise).
    ``connections``: the control socket's open connections (session fds included), on a
    ``control_connections`` line: a client that closed one sees when the daemon has released it."""
    g = store.geometry
    with store.lock:
        s = store.statfs()
        lines = [
            ("image", os.path.abspath(store.path)),
            ("uuid", store.uuid.hex()),
            ("generation", str(store.generation)),
            ("daemon_pid", str(os.getpid() if pid is None else pid)),
            ("read_only", "yes" if store.read_only else "no"),
            ("journal_replayed_at_open", "yes" if store.journal_recovered else "no"),
            ("base_phys", f"{g.base_phys:#x}"),
            ("page_size", str(s.page_size)),
            ("size", f"{g.size} bytes ({_human(g.size)})"),
            ("pages_total", str(s.total_pages)),
            ("pages_free", str(s.free_pages)),
            ("pages_metadata", str(s.metadata_pages)),
            ("pages_guest_ram", str(s.file_pages)),
            ("pages_iommu", str(s.table_pages)),
            ("inodes_total", str(s.inode_count)),
            ("inodes_free", str(s.free_inodes)),
            ("extent_records", str(g.extent_count)),
            ("data_page", str(g.data_page)),
        ]
    if regs_path is not None:
        lines.append(("iommu_regs", regs_path))
    if control is not None:  # the /dev/iommu and /dev/liveupdate of this "kernel" (pkfuse.uapi finds it here)
        lines.append(("control_socket", control))
        if connections is not None:
            lines.append(("control_connections", str(connections)))
    lines.append(("iommu", iommu_summary(iommu)))
    if liveupdate is not None:
        lines.append(("liveupdate", liveupdate.summary()))
    if iommufd is not None:
        lines.append(("iommufd", iommufd_summary(iommufd)))
    if guest_maps is not None:
        st = guest_maps.statistics()
        lines.append(("guest_mmaps", f"{st['files']} files mapped, {st['pins']} mappings, "
                                     f"{st['holders']} connections"))
    width = max(len(k) for k, _ in lines)
    return "".join(f"{k + ':':{width + 1}s} {v}\n" for k, v in lines)


def iommu_summary(iommu: Iommu | None) -> str:
    """One line: domains, attached requesters, translation state (details in .pkernfs/iommu)."""
    if iommu is None:
        return "not loaded"
    parts = [f"{len(iommu.domains)} domains", f"{len(iommu.attached)} requesters attached"]
    if iommu.refused:  # garbage found at open: .pkernfs/iommu lists each finding
        parts.append(f"{len(iommu.refused)} refused at open or restore")
    if iommu.regs is not None:
        parts.append(f"translation {'enabled' if iommu.regs.enabled else 'disabled'}")
        parts.append(f"{iommu.regs.fault_seq} faults")
    return ", ".join(parts)


def iommufd_summary(iommufd: Iommufd) -> str:
    """One line: ``N contexts, N ioas, N hwpts, N devices`` over every open /dev/iommu."""
    with iommufd.store.lock:
        counts = {"ioas": 0, "hwpt": 0, "device": 0}
        for ctx in iommufd.contexts:
            for obj in ctx.objects.values():
                counts[obj.kind.value] += 1
        return (f"{len(iommufd.contexts)} contexts, {counts['ioas']} ioas, {counts['hwpt']} hwpts, "
                f"{counts['device']} devices")


def metadata_regions(g: fmt.Geometry) -> list[tuple[int, int, str]]:
    """``(first_page, npages, name)`` of every metadata region, in page order."""
    ps = PS
    inode_pages = -(-g.inode_count * fmt.INODE_DTYPE.itemsize // ps)
    dentry_pages = -(-g.inode_count * fmt.DENTRY_DTYPE.itemsize // ps)
    extent_pages = -(-g.extent_count * fmt.EXTENT_DTYPE.itemsize // ps)
    regions = [
        (0, 1, "superblock"),
        (g.journal_page, g.journal_npages, "journal"),
        (g.bitmap_page, g.bitmap_npages, "allocation bitmap"),
        (g.inode_page, inode_pages, "inode table"),
        (g.dentry_page, dentry_pages, "dentry table"),
        (g.extent_page, extent_pages, "extent table"),
    ]
    end = g.extent_page + extent_pages
    if end < g.data_page:
        regions.append((end, g.data_page - end, "metadata (alignment to 2 MiB)"))
    return regions


def memmap_ranges(store: Store) -> list[tuple[int, int, str]]:
    """``(first_page, npages, owner)`` covering every image page once, in page order.

    Owners: a metadata region's name, ``<path> +<file offset>`` for file
    pages (physically contiguous extents of one file coalesced), or
    ``free``. Work is per extent record, not per page.
    """
    g = store.geometry
    with store.lock:
        pages, ends, inos, fpages = store.extents_by_page()
        counts = ends - pages
        # coalesce records that continue the previous one in the same file
        cont = np.zeros(pages.size, bool)
        if pages.size > 1:
            cont[1:] = ((pages[1:] == pages[:-1] + counts[:-1]) & (inos[1:] == inos[:-1])
                        & (fpages[1:] == fpages[:-1] + counts[:-1]))
        heads = np.flatnonzero(~cont)
        group_pages = pages[heads]
        group_ends = np.add.reduceat(counts, heads) + group_pages if heads.size else heads
        paths: dict[int, str] = {}
        for ino in np.unique(inos).tolist():
            paths[ino] = store.path_of(ino).decode(errors="backslashreplace")
        group_names = [f"{paths[int(inos[h])]} +{int(fpages[h]) * PS:#x}" for h in heads.tolist()]
    out = list(metadata_regions(g))
    pos = g.data_page
    for start, end, name in zip(group_pages.tolist(), group_ends.tolist(), group_names):
        if start > pos:
            out.append((pos, start - pos, "free"))
        out.append((start, end - start, name))
        pos = end
    if pos < g.npages:
        out.append((pos, g.npages - pos, "free"))
    return out


def render_memmap(store: Store) -> str:
    """The physical memory map: ``first-last  pages  owner`` per range (addresses inclusive)."""
    base = store.geometry.base_phys
    lines = [f"# physical memory map of {os.path.abspath(store.path)} (base_phys {base:#x}, page {PS} bytes)\n",
             "# first_phys_addr-last_phys_addr        pages  owner\n"]
    for first, n, owner in memmap_ranges(store):
        a = base + first * PS
        b = a + n * PS - 1
        lines.append(f"{a:#016x}-{b:#016x} {n:>12d}  {owner}\n")
    return "".join(lines)


def render_iommu(iommu: Iommu | None) -> str:
    """The text of ``.pkernfs/iommu`` (and of ``pkfuse iommu list``): the registers, then
    every domain with its attached requesters and its mappings, coalesced, by IOVA."""
    if iommu is None:  # a read-only mount whose IOMMU state did not load: the log says why
        return "# IOMMU state not loaded (the daemon's log says why)\n"
    with iommu.store.lock:  # one consistent picture while the daemon maps
        lines = []
        regs = iommu.regs
        if regs is not None:
            lines.append(f"translation {'enabled' if regs.enabled else 'disabled'}, RTADDR {regs.rtaddr:#x}, "
                         f"faults recorded {regs.fault_seq}")
        elif iommu.regs_error:
            lines.append(f"register block not opened: {iommu.regs_error}")
        lines.append(f"root table {iommu.root_table_phys:#x} (iommu/root-pgtables)")
        lines.extend(f"refused: {f}" for f in iommu.refused)
        for sid in sorted(s for s, did in iommu.attached.items() if did not in iommu.domains):
            lines.append(f"requester {fmt.requester_name(sid)}: context entry points at no known domain")
        for did in sorted(iommu.domains):
            d = iommu.domains[did]
            rids = ", ".join(fmt.requester_name(s) for s in d.attached) or "none"
            flags = " saved" if d.flags & fmt.DOMF_SAVED else ""
            lines.append(f"{d.path}: DID {did}, compatible {fmt.DOMAIN_COMPATIBLE.decode()}{flags}, "
                         f"table pages {d.table_pages} of {d.file_pages}, attached {rids}")
            lines.extend(f"  {mapping_line(m)}" for m in d.mappings())
        return "\n".join(lines) + "\n"


def render_iommufd(iommufd: Iommufd, pids: Mapping[Context, int] | None = None) -> str:
    """The live iommufd objects, after the domains in ``.pkernfs/iommu``: the summary line
    (``iommufd: N contexts, ...``, as in the status), then each context (an open /dev/iommu,
    named by the pid of the connection that opened it: ``pids``) with its IOAS and their
    areas, its HWPTs and the DID of each one's domain, its devices (each kind by id); then
    the destroyed HWPTs' domains still in their grace period. A section of its own, which
    starts with an unindented ``iommufd:`` line: other live objects (live-update sessions)
    get a render function and a section of their own after it."""
    pids = pids or {}
    with iommufd.store.lock:  # one moment of the objects
        lines = [f"iommufd: {iommufd_summary(iommufd)}"]
        for ctx in iommufd.contexts:
            pid = pids.get(ctx)
            who = (f"pid {pid}" if pid is not None else
                   "a closed file (objects kept by live update)" if ctx.closed else "unknown pid")
            lines.append(f"context of {who}: {len(ctx.objects)} objects")
            for obj in sorted(ctx.iter_objects(), key=lambda o: _KIND_ORDER[o.kind.value]):  # stable: by id
                lines.extend(f"  {line}" for line in _iommufd_object(iommufd, obj))
        if iommufd.dying:
            dids = ", ".join(str(d.domain_id) for d in iommufd.dying)
            lines.append(f"freeing domains {dids} (destroyed HWPTs', in their grace period)")
        return "\n".join(lines) + "\n"


_KIND_ORDER = {"ioas": 0, "hwpt": 1, "device": 2}  #: IOAS, then HWPTs, then devices, each by id


def _iommufd_object(iommufd: Iommufd, obj: object) -> list[str]:
    """The lines of one IOAS, HWPT or device of a context (``render_iommufd``)."""
    from backing.iommufd import Device, Hwpt, Ioas  # loaded already: there is an Iommufd

    if isinstance(obj, Ioas):
        hwpts = ", ".join(str(h.id) for h in obj.hwpts) or "none"
        frozen = ", preserved" if obj.frozen else ""
        small = ", huge pages off" if not obj.huge_pages else ""  # IOMMU_OPTION_HUGE_PAGES 0: 4 KiB leaves
        out = [f"ioas {obj.id}: {len(obj.areas)} areas, hwpts {hwpts}{frozen}{small}"]
        for a in obj.areas:
            out.append(f"  {a.iova:#014x}-{a.last:#014x} -> {_ino_path(iommufd.store, a.ino)}+{a.offset:#x} "
                       f"{'rw' if a.writeable else 'r-'}")
        return out
    if isinstance(obj, Hwpt):
        devices = ", ".join(str(d) for d in sorted(obj.devices)) or "none"
        return [f"hwpt {obj.id}: ioas {obj.ioas.id}, DID {obj.domain.domain_id}, "
                f"{'auto' if obj.auto else 'allocated'}, devices {devices}"]
    assert isinstance(obj, Device)
    attached = f"hwpt {obj.hwpt.id}" if obj.hwpt is not None else "none"
    return [f"device {obj.id}: rid {fmt.requester_name(obj.rid)}, attached {attached}"]


def _ino_path(store: Store, ino: int) -> str:
    try:
        return store.path_of(ino).decode(errors="backslashreplace").lstrip("/")
    except StoreError:  # a view never fails for one name
        return f"(inode {ino})"


def mapping_line(m: MappingRange) -> str:
    """``iova_first-iova_last -> phys_first-phys_last rw path+offset`` (inclusive, hex)."""
    perms = "rw" if m.write else "r-"
    return (f"{m.iova:#014x}-{m.iova + m.length - 1:#014x} -> "
            f"{m.phys_addr:#014x}-{m.phys_addr + m.length - 1:#014x} {perms} {m.path}+{m.file_offset:#x}")


def render_info(store: Store, iommu: Iommu | None, *, regs_path: str | None = None,
                pid: int | str | None = None, iommu_error: str = "") -> str:
    """The whole of ``pkfuse info``: status, every file with its extents, the physical memory
    map and the IOMMU view, blank lines between. The daemon serves it as ``.pkernfs/info``
    and ``pkfuse info IMAGE`` prints it for an unmounted image, so one image gives one text
    but for the lines that say who serves it (``daemon_pid``, ``read_only``).
    ``iommu_error``: why ``iommu`` is None, when the caller knows."""
    iommu_text = (f"# IOMMU state not loaded: {iommu_error}\n" if iommu is None and iommu_error
                  else render_iommu(iommu))
    with store.lock:  # one moment of the image for all four parts
        return "\n".join((render_status(store, iommu=iommu, regs_path=regs_path, pid=pid), render_files(store),
                          render_memmap(store), iommu_text))


def render_files(store: Store) -> str:
    """Every directory and file of the tree, each directory followed by its entries (in ino
    order, as readdir lists them), each file with its kind, size, pages and physical
    extents (``file_offset phys_addr length``, hex)."""
    lines: list[str] = []
    with store.lock:
        stack = [(name, ino, b"") for name, ino in reversed(store.children(fmt.ROOT_INO))]
        while stack:  # depth first, no recursion: a deep tree cannot exhaust the Python stack
            name, ino, parent = stack.pop()
            path = parent + b"/" + name
            shown = path.decode(errors="backslashreplace")
            a = store.getattr(ino)
            if a.kind == fmt.KIND_DIR:
                lines.append(f"{shown}/\n")
                stack.extend((n, i, path) for n, i in reversed(store.children(ino)))
                continue
            lines.append(f"{shown}  {fmt.KIND_NAMES.get(a.kind, a.kind)}  size {a.size} "
                         f"({_human(a.size)}), {a.npages} pages\n")
            for e in store.extents(ino):
                lines.append(f"    {e.file_offset:#x} {e.phys_addr:#x} {e.length:#x}\n")
    return "".join(lines)


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:g} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def render_liveupdate(lu: LiveUpdate) -> str:
    """The live-update section of ``.pkernfs/iommu``: an unindented ``liveupdate:`` line (as in the
    status), then one line per session with its state and what is left to reclaim."""
    with lu.store.lock:
        return "\n".join([f"liveupdate: {lu.summary()}", *(f"  {line}" for line in lu.describe()),
                          *(f"  restore: {f}" for f in lu.findings)]) + "\n"
