"""fsck: validation of an image that trusts nothing in it.

Every invariant of ``backing/format.py`` has one ``check_<structure>_<what>``
function here (the s3ql style). Each takes an ``FsckContext`` and yields
``Finding(structure, offset, problem, fatal)`` with the byte offset in the
image of the field that is wrong. ``fatal`` findings make the image unusable
(the structures the other checks read cannot be trusted); the others are
inconsistencies of a readable image. ``Store.open`` refuses both.

Stages, each run only if the one before left something to check:

1. ``check_superblock``: magic, version, page size, checksum; the geometry
   must equal what ``fmt.compute_geometry`` makes of its own inputs and fit
   the file. Everything later indexes the image with this geometry, so every
   table slice is in range once it passes.
2. Journal recovery (``check_image`` only): a committed-but-unapplied
   transaction is what a restart leaves, not a finding; it is replayed into
   a private copy-on-write mapping, never into the file.
3. ``check_metadata``: the journal header, bitmap, inodes, dentries,
   extents, the namespace tree and the bitmap/extent agreement.
4. Deep checks (``check_image(deep=True)``, only without fatal findings):
   the VT-d tables, ``backing.tablecheck``. Both stages read the
   ``FsckContext`` of ``backing.fsckctx``; tablecheck imports nothing of fsck.

Cost: every check is vectorized over table records (inodes, dentries,
extents), so it grows with the tables and the number of extents, not with
image bytes. The one per-page pass is the bitmap compare, 1 bit per page,
built with ``np.repeat`` over extent runs and compared packed.

Garbage must only ever produce findings: every count and index read from
the image is bounded by the geometry (itself bounded by the file size)
before it is used, arithmetic on untrusted 64-bit fields is clamped before
it could wrap, and the number of findings per check is capped.
"""

from __future__ import annotations

import dataclasses
import mmap
import os
import stat
from collections.abc import Callable, Iterator

import numpy as np

from . import format as fmt
from . import lustate, tablecheck
from .errors import Finding, FormatError
from .fsckctx import FsckContext, owner_of
from .journal import Journal

__all__ = ["FsckContext", "owner_of", "check_image", "check_metadata", "check_superblock", "map_private",
           "status_of"]

PS = fmt.PAGE_SIZE
MAX_PER_CHECK = 8  #: findings reported per check before "and N more"
_MODE_BITS = stat.S_IFMT(0xFFFFFFFF) | 0o7777  #: every bit an inode mode may have

# field offsets inside records, for finding offsets
_SB = fmt.SUPERBLOCK_DTYPE.fields
_JH = fmt.JOURNAL_HEADER_DTYPE.fields
_IN = fmt.INODE_DTYPE.fields


# ------------------------------------------------------------------ helpers


def map_private(fd: int, size: int) -> mmap.mmap:
    """A copy-on-write mapping of ``size`` bytes of ``fd``: stores stay in this process.

    MAP_NORESERVE: the kernel would otherwise reserve memory for a private
    copy of every page, and refuse (ENOMEM) an image larger than RAM + swap.
    Only the pages journal recovery actually writes are ever copied.
    """
    return mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE | getattr(mmap, "MAP_NORESERVE", 0x4000),
                     prot=mmap.PROT_READ | mmap.PROT_WRITE)


def _capped(items: np.ndarray, make: Callable[[int], Finding], what: str, structure: str,
            offset: Callable[[int], int]) -> Iterator[Finding]:
    """Findings for the first ``MAX_PER_CHECK`` of ``items``, then one "and N more"."""
    items = np.asarray(items)
    for item in items[:MAX_PER_CHECK].tolist():
        yield make(item)
    if items.size > MAX_PER_CHECK:
        first = int(items[MAX_PER_CHECK])
        yield Finding(structure, offset(first), f"... and {items.size - MAX_PER_CHECK} more {what}")


def _name(ctx: FsckContext, ino: int) -> str:
    d = ctx.dentries[ino]
    n = min(int(d["name_len"]), fmt.NAME_MAX + 1)
    return repr(bytes(d["name"])[:n])[1:]


# --------------------------------------------------------------- superblock


def check_superblock(sb_bytes: bytes, file_size: int) -> tuple[fmt.Geometry | None, list[Finding]]:
    """The geometry of a superblock, or None and fatal findings saying why not.

    ``sb_bytes`` is the start of the image (at least the superblock's
    bytes); ``file_size`` the image file's size in bytes. Any finding here
    is fatal: without a trusted geometry no other structure can be found.
    """
    size = fmt.SUPERBLOCK_DTYPE.itemsize
    if len(sb_bytes) < size:
        return None, [Finding("superblock", 0, f"image holds {len(sb_bytes)} bytes, less than a superblock", True)]
    sb = np.frombuffer(sb_bytes[:size], fmt.SUPERBLOCK_DTYPE)[0]
    for check in (check_superblock_magic, check_superblock_version, check_superblock_checksum):
        found = list(check(sb, sb_bytes[:size]))
        if found:
            return None, found
    found = list(check_superblock_geometry(sb, file_size))
    if found:
        return None, found
    g = fmt.compute_geometry(int(sb["npages"]) * PS, int(sb["base_phys"]), int(sb["inode_count"]),
                             int(sb["extent_count"]))
    return g, []


def check_superblock_magic(sb: np.void, raw: bytes) -> Iterator[Finding]:
    if bytes(sb["magic"]) != fmt.MAGIC:
        yield Finding("superblock.magic", _SB["magic"][1], f"not a pkfuse image (magic {bytes(sb['magic'])!r})", True)


def check_superblock_version(sb: np.void, raw: bytes) -> Iterator[Finding]:
    if int(sb["version"]) != fmt.FORMAT_VERSION:
        yield Finding("superblock.version", _SB["version"][1],
                      f"format version {int(sb['version'])} is not {fmt.FORMAT_VERSION}", True)
    if int(sb["page_size"]) != PS:
        yield Finding("superblock.page_size", _SB["page_size"][1],
                      f"page size {int(sb['page_size'])} is not {PS}", True)


def check_superblock_checksum(sb: np.void, raw: bytes) -> Iterator[Finding]:
    want = fmt.superblock_checksum(raw)
    if int(sb["checksum"]) != want:
        yield Finding("superblock.checksum", _SB["checksum"][1],
                      f"checksum {int(sb['checksum']):#010x} != computed {want:#010x}", True)


def check_superblock_geometry(sb: np.void, file_size: int) -> Iterator[Finding]:
    """The geometry must be what mkfs computes from npages, base_phys and the table sizes."""
    npages, inode_count, extent_count = int(sb["npages"]), int(sb["inode_count"]), int(sb["extent_count"])
    if npages * PS > file_size:
        yield Finding("superblock.npages", _SB["npages"][1],
                      f"{npages} pages ({npages * PS} bytes) exceed the {file_size}-byte image file", True)
        return
    # bounded by the image before any arithmetic uses them: a table cannot outgrow the image
    if not 5 <= inode_count <= npages * PS // fmt.INODE_DTYPE.itemsize:
        yield Finding("superblock.inode_count", _SB["inode_count"][1],
                      f"{inode_count} inodes cannot fit a {npages}-page image with the fixed tree", True)
        return
    if not 1 <= extent_count <= npages * PS // fmt.EXTENT_DTYPE.itemsize:
        yield Finding("superblock.extent_count", _SB["extent_count"][1],
                      f"{extent_count} extent records cannot fit a {npages}-page image", True)
        return
    try:
        g = fmt.compute_geometry(npages * PS, int(sb["base_phys"]), inode_count, extent_count)
    except ValueError as exc:
        field = "base_phys" if "base_phys" in str(exc) else "npages"
        yield Finding(f"superblock.{field}", _SB[field][1], str(exc), True)
        return
    for field in dataclasses.fields(g):
        have, want = int(sb[field.name]), getattr(g, field.name)
        if have != want:
            yield Finding(f"superblock.{field.name}", _SB[field.name][1],
                          f"{have} differs from the layout rule ({want})", True)


# ----------------------------------------------------------------- metadata


def check_metadata(image: np.ndarray, geometry: fmt.Geometry) -> list[Finding]:
    """Every metadata invariant of an image whose superblock passed ``check_superblock``.

    ``image`` is the whole image as uint8 (at least ``geometry.npages``
    pages), after journal recovery: a pending transaction is a finding here.
    """
    _, findings = _check_metadata(image, geometry)
    return findings


def _check_metadata(image: np.ndarray, geometry: fmt.Geometry) -> tuple[FsckContext | None, list[Finding]]:
    if image.dtype != np.uint8 or image.ndim != 1 or image.size < geometry.npages * PS:
        return None, [Finding("image", 0, f"{image.size} bytes mapped, the superblock says {geometry.size}", True)]
    ctx = FsckContext.build(image[: geometry.npages * PS], geometry)
    findings: list[Finding] = []
    for check in METADATA_CHECKS:
        findings.extend(check(ctx))
    return ctx, findings


def check_superblock_after_recovery(ctx: FsckContext) -> Iterator[Finding]:
    """The superblock still passes ``check_superblock`` with the same geometry.

    Journal records may target page 0 (the store's only ever write the
    dynamic words there, directly), so a replayed transaction could have
    rewritten the geometry that everything here was indexed with.
    """
    g, found = check_superblock(ctx.image[: fmt.SUPERBLOCK_DTYPE.itemsize].tobytes(), ctx.image.size)
    yield from found
    if g is not None and g != ctx.geometry:
        yield Finding("superblock", 0, "geometry changed by journal recovery", True)


def check_superblock_dynamic(ctx: FsckContext) -> Iterator[Finding]:
    """``clean`` is 0 or 1; the rest of page 0 after the superblock is zero."""
    sb = ctx.image[: fmt.SUPERBLOCK_DTYPE.itemsize].view(fmt.SUPERBLOCK_DTYPE)[0]
    if int(sb["clean"]) > 1:
        yield Finding("superblock.clean", _SB["clean"][1], f"clean word is {int(sb['clean'])}, not 0 or 1")
    tail = np.flatnonzero(ctx.image[fmt.SUPERBLOCK_DTYPE.itemsize : PS])
    if tail.size:
        yield Finding("superblock", fmt.SUPERBLOCK_DTYPE.itemsize + int(tail[0]),
                      f"{tail.size} non-zero bytes after the superblock in page 0")


def check_journal_header(ctx: FsckContext) -> Iterator[Finding]:
    """Magic, sequence numbers in protocol order, body fields in range, nothing pending."""
    start = ctx.geometry.journal_page * PS
    h = ctx.image[start : start + fmt.JOURNAL_HEADER_DTYPE.itemsize].view(fmt.JOURNAL_HEADER_DTYPE)[0]
    if bytes(h["magic"]) != fmt.JOURNAL_MAGIC:
        yield Finding("journal.magic", start, f"bad magic {bytes(h['magic'])!r}", True)
        return
    commit, applied, txn = int(h["commit_seq"]), int(h["applied_seq"]), int(h["txn_seq"])
    if commit != applied:
        yield Finding("journal.commit_seq", start + _JH["commit_seq"][1],
                      f"transaction {commit} is committed but not applied (applied_seq {applied})", True)
    if txn not in (commit, commit + 1):
        # the writer stores txn_seq = commit_seq + 1 before the commit point
        yield Finding("journal.txn_seq", start + _JH["txn_seq"][1],
                      f"body transaction {txn} is neither the committed {commit} nor the next", True)
    body, nrec = int(h["body_bytes"]), int(h["nrecords"])
    if body > ctx.geometry.journal_body_bytes or body % 8:
        yield Finding("journal.body_bytes", start + _JH["body_bytes"][1],
                      f"{body} bytes do not fit the {ctx.geometry.journal_body_bytes}-byte body", True)
    elif nrec * fmt.JREC_DTYPE.itemsize > body and txn == commit:
        # only a committed body must be whole: one being written (txn_seq = commit_seq + 1)
        # is not trusted, and a writer killed between its field stores may leave them apart
        yield Finding("journal.nrecords", start + _JH["nrecords"][1],
                      f"{nrec} records cannot fit {body} body bytes", True)


def check_bitmap_tail(ctx: FsckContext) -> Iterator[Finding]:
    """Bytes of the bitmap pages past the last page's bit are zero (bits past npages inside
    the last byte are covered by ``check_bitmap_agrees``)."""
    g = ctx.geometry
    lo = g.bitmap_page * PS + g.bitmap_bytes
    tail = np.flatnonzero(ctx.image[lo : (g.bitmap_page + g.bitmap_npages) * PS])
    if tail.size:
        yield Finding("bitmap.tail", lo + int(tail[0]),
                      f"{tail.size} non-zero bytes past the bitmap's last page (page {g.npages - 1})")


def check_inode_record0(ctx: FsckContext) -> Iterator[Finding]:
    """Inode 0 is never used; the root is a live directory."""
    if ctx.live[0]:
        yield Finding("inode.kind", ctx.inode_off(0), "inode 0 is never used but is marked live")
    if ctx.kind[fmt.ROOT_INO] != fmt.KIND_DIR or ctx.orphan[fmt.ROOT_INO]:
        yield Finding("inode.root", ctx.inode_off(fmt.ROOT_INO),
                      f"root inode is {fmt.KIND_NAMES.get(int(ctx.kind[fmt.ROOT_INO]), 'bad kind')}"
                      f"{' (orphan)' if ctx.orphan[fmt.ROOT_INO] else ''}, not a directory", True)


def check_inode_kind(ctx: FsckContext) -> Iterator[Finding]:
    bad = np.flatnonzero(~np.isin(ctx.kind, list(fmt.KIND_NAMES)))
    yield from _capped(bad, lambda i: Finding("inode.kind", ctx.inode_off(i), f"inode {i} has unknown kind {ctx.kind[i]}"),
                       "inodes with unknown kinds", "inode.kind", ctx.inode_off)


def check_inode_mode(ctx: FsckContext) -> Iterator[Finding]:
    """S_IFDIR for directories, S_IFREG for files; no bits beyond type and permissions."""
    mode = ctx.inodes["mode"].astype(np.int64)
    ifmt = mode & stat.S_IFMT(0xFFFFFFFF)
    want = np.where(ctx.kind == fmt.KIND_DIR, stat.S_IFDIR, stat.S_IFREG)
    bad = np.flatnonzero(ctx.live & ((ifmt != want) | ((mode & ~_MODE_BITS) != 0)))
    yield from _capped(
        bad, lambda i: Finding("inode.mode", ctx.inode_off(i, "mode"),
                               f"inode {i} ({fmt.KIND_NAMES.get(int(ctx.kind[i]), 'bad kind')}) has mode {mode[i]:#o}"),
        "inodes with bad modes", "inode.mode", lambda i: ctx.inode_off(i, "mode"))


def check_inode_flags(ctx: FsckContext) -> Iterator[Finding]:
    """Only IFLAG_ORPHAN exists, and a directory is never an orphan."""
    flags = ctx.inodes["flags"].astype(np.int64)
    bad = np.flatnonzero(ctx.live & (((flags & ~fmt.IFLAG_ORPHAN) != 0) | (ctx.orphan & (ctx.kind == fmt.KIND_DIR))))
    yield from _capped(bad, lambda i: Finding("inode.flags", ctx.inode_off(i, "flags"),
                                              f"inode {i} has flags {flags[i]:#x}"),
                       "inodes with bad flags", "inode.flags", lambda i: ctx.inode_off(i, "flags"))


def check_inode_free_cleared(ctx: FsckContext) -> Iterator[Finding]:
    """A free record is all zero except ``igen`` (kept so a reused ino gets a new generation)."""
    words = ctx.inodes.view(np.uint8).view("<u8").reshape(-1, fmt.INODE_DTYPE.itemsize // 8)
    igen_word = _IN["igen"][1] // 8
    igen_mask = np.uint64(0xFFFFFFFF << ((_IN["igen"][1] % 8) * 8))
    stray = _or_columns(words, skip=igen_word) | (words[:, igen_word] & ~igen_mask)
    bad = np.flatnonzero(~ctx.live & (stray != 0))
    yield from _capped(bad, lambda i: Finding("inode.free", ctx.inode_off(i), f"free inode {i} is not cleared"),
                       "free inodes not cleared", "inode.free", ctx.inode_off)


def _or_columns(rows: np.ndarray, skip: int = -1) -> np.ndarray:
    """Bitwise OR of the columns of a narrow 2-D array (column ops beat a per-row reduce)."""
    out = np.zeros(rows.shape[0], rows.dtype)
    for c in range(rows.shape[1]):
        if c != skip:
            out |= rows[:, c]
    return out


def check_inode_size(ctx: FsckContext) -> Iterator[Finding]:
    """Files: size <= npages * PAGE_SIZE <= image size. Directories: size, npages, nextents 0."""
    size = ctx.inodes["size"]
    npages = ctx.inodes["npages"]
    cap = np.uint64(ctx.geometry.npages)
    holds = ctx.live & np.isin(ctx.kind, fmt.KINDS_WITH_PAGES)
    too_many = holds & (npages > cap)
    too_big = holds & ~too_many & (size > np.minimum(npages, cap) * np.uint64(PS))
    is_dir = ctx.live & (ctx.kind == fmt.KIND_DIR)
    dir_bad = is_dir & ((size != 0) | (npages != 0) | (ctx.inodes["nextents"] != 0))
    yield from _capped(np.flatnonzero(too_many), lambda i: Finding(
        "inode.npages", ctx.inode_off(i, "npages"), f"inode {i} claims {npages[i]} pages, more than the image"),
        "inodes with too many pages", "inode.npages", lambda i: ctx.inode_off(i, "npages"))
    yield from _capped(np.flatnonzero(too_big), lambda i: Finding(
        "inode.size", ctx.inode_off(i, "size"), f"inode {i} size {size[i]} exceeds its {npages[i]} pages"),
        "inodes larger than their pages", "inode.size", lambda i: ctx.inode_off(i, "size"))
    yield from _capped(np.flatnonzero(dir_bad), lambda i: Finding(
        "inode.size", ctx.inode_off(i, "size"),
        f"directory {i} has size {size[i]}, {npages[i]} pages, {ctx.inodes['nextents'][i]} extents"),
        "directories with sizes", "inode.size", lambda i: ctx.inode_off(i, "size"))


def check_dentry_cleared(ctx: FsckContext) -> Iterator[Finding]:
    """Free inodes, orphans, record 0 and the root have all-zero dentries."""
    rows = ctx.dentries.view(np.uint8).view("<u8").reshape(-1, fmt.DENTRY_DTYPE.itemsize // 8)
    used = np.bitwise_or.reduce(rows, axis=1) != 0
    bad = np.flatnonzero(used & ~ctx.named)
    yield from _capped(bad, lambda i: Finding(
        "dentry.unnamed", ctx.dentry_off(i),
        f"inode {i} ({'orphan' if ctx.orphan[i] else 'root' if i == fmt.ROOT_INO else 'free' if not ctx.live[i] else '?'})"
        " has a dentry"), "stray dentries", "dentry.unnamed", ctx.dentry_off)


def check_dentry_name(ctx: FsckContext) -> Iterator[Finding]:
    """1..NAME_MAX bytes, no '/' or NUL, not '.' or '..', zero padding after the name."""
    inos, _, nlen, names = ctx.named_view
    width = names.shape[1]
    inside = np.arange(width)[None, :] < np.minimum(nlen, width)[:, None]
    # with zero padding the non-zero bytes are exactly the name: a NUL inside or a
    # byte in the padding breaks that; '/' anywhere is wrong either way
    shape_bad = ((names != 0) != inside).any(axis=1)
    bad_byte = (names == ord("/")).any(axis=1) | (shape_bad & (np.count_nonzero(names, axis=1) < nlen))
    bad_pad = shape_bad & ~bad_byte
    dots = ((nlen == 1) & (names[:, 0] == ord("."))) | ((nlen == 2) & (names[:, 0] == ord(".")) & (names[:, 1] == ord(".")))
    bad_len = (nlen < 1) | (nlen > fmt.NAME_MAX)
    pad_field = ctx.dentries["_pad"][inos] != 0
    bad = np.flatnonzero(bad_len | bad_byte | bad_pad | dots | pad_field)

    def finding(j: int) -> Finding:
        i = int(inos[j])
        why = (f"length out of 1..{fmt.NAME_MAX}" if bad_len[j] else "contains '/' or NUL" if bad_byte[j]
               else "is '.' or '..'" if dots[j] else "has bytes after its end")
        return Finding("dentry.name", ctx.dentry_off(i, "name_len" if bad_len[j] else "name"),
                       f"inode {i} name {_name(ctx, i)} (length {nlen[j]}) {why}")

    yield from _capped(bad, finding, "bad names", "dentry.name", lambda j: ctx.dentry_off(int(inos[j]), "name"))


def check_dentry_parent(ctx: FsckContext) -> Iterator[Finding]:
    """The parent of a named inode is a live, non-orphan directory."""
    inos, parent, _, _ = ctx.named_view
    ic = ctx.geometry.inode_count
    safe = np.where(parent < ic, parent, 0)
    ok = (parent > 0) & (parent < ic) & (ctx.kind[safe] == fmt.KIND_DIR) & ~ctx.orphan[safe]
    bad = np.flatnonzero(~ok)
    yield from _capped(bad, lambda j: Finding(
        "dentry.parent", ctx.dentry_off(int(inos[j])),
        f"inode {inos[j]} {_name(ctx, int(inos[j]))}: parent {parent[j]} is not a live directory"),
        "dentries with bad parents", "dentry.parent", lambda j: ctx.dentry_off(int(inos[j])))


_HASH_MULT = (np.arange(1, 32, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)) | np.uint64(1)
_COMPARE_BATCH = 1 << 16  #: candidate name pairs compared per pass (bounds the gathered copies)


def check_dentry_unique(ctx: FsckContext) -> Iterator[Finding]:
    """No two dentries of one directory carry the same name (hash, sort, then compare bytes)."""
    inos, parent, nlen, names = ctx.named_view
    if inos.size < 2:
        return
    words = names.view("<u8")  # 248 bytes = 31 words
    h = (words * _HASH_MULT[None, : words.shape[1]]).sum(axis=1, dtype=np.uint64) ^ nlen.astype(np.uint64)
    order = np.lexsort((h, parent))
    same = np.flatnonzero((parent[order][1:] == parent[order][:-1]) & (h[order][1:] == h[order][:-1]))
    a, b = order[same], order[same + 1]
    equal = nlen[a] == nlen[b]
    for lo in range(0, same.size, _COMPARE_BATCH):  # garbage may make every pair a candidate
        cut = slice(lo, lo + _COMPARE_BATCH)
        equal[cut] &= (words[a[cut]] == words[b[cut]]).all(axis=1)
    first, second = inos[a[equal]], inos[b[equal]]
    for x, y in zip(first[:MAX_PER_CHECK].tolist(), second[:MAX_PER_CHECK].tolist()):
        yield Finding("dentry.duplicate", ctx.dentry_off(y, "name"),
                      f"inodes {x} and {y} are both named {_name(ctx, y)} in directory {int(ctx.dentries['parent'][y])}")
    if first.size > MAX_PER_CHECK:
        yield Finding("dentry.duplicate", ctx.dentry_off(int(second[MAX_PER_CHECK]), "name"),
                      f"... and {first.size - MAX_PER_CHECK} more duplicate names")


def check_dentry_tree(ctx: FsckContext) -> Iterator[Finding]:
    """Every named inode reaches the root through parents: no cycles, nothing detached.

    Pointer jumping: ``up = up[up]`` doubles the distance each step, so
    ceil(log2(inode_count)) + 1 steps settle every chain (most trees settle
    in two or three); a named inode whose ancestor is then not the root is
    on or below a cycle (or below a bad parent, reported by
    ``check_dentry_parent``).
    """
    ic = ctx.geometry.inode_count
    inos, parent, _, _ = ctx.named_view
    safe = np.where(parent < ic, parent, 0)
    valid = (parent > 0) & (parent < ic) & (ctx.kind[safe] == fmt.KIND_DIR) & ~ctx.orphan[safe]
    up = np.zeros(ic, np.int64)
    up[fmt.ROOT_INO] = fmt.ROOT_INO
    up[inos[valid]] = parent[valid]
    for _ in range(int(ic).bit_length() + 1):
        nxt = up[up]
        if np.array_equal(nxt, up):
            break
        up = nxt
    stuck = inos[valid & (up[inos] != fmt.ROOT_INO)]
    cyclic = stuck[up[stuck] != 0]  # chains that end at 0 hang below a bad parent: reported there
    yield from _capped(cyclic, lambda i: Finding(
        "dentry.tree", ctx.dentry_off(i), f"inode {i} {_name(ctx, i)} is not reachable from / (a cycle of parents)"),
        "inodes in cycles", "dentry.tree", ctx.dentry_off)


def check_namespace_required(ctx: FsckContext) -> Iterator[Finding]:
    """/guest_mem and /iommu are directories; /iommu/root-pgtables is the one KIND_IOMMU_ROOT
    inode and holds ROOT_PGTABLES_PAGES pages."""
    root_dentry = ctx.dentry_off(fmt.ROOT_INO)
    guest = ctx.child(fmt.ROOT_INO, fmt.GUEST_DIR_NAME)
    if guest is None or ctx.kind[guest] != fmt.KIND_DIR:
        yield Finding("namespace.guest_mem", ctx.dentry_off(guest) if guest else root_dentry,
                      "/guest_mem is missing or not a directory")
    iommu = ctx.child(fmt.ROOT_INO, fmt.IOMMU_DIR_NAME)
    if iommu is None or ctx.kind[iommu] != fmt.KIND_DIR:
        yield Finding("namespace.iommu", ctx.dentry_off(iommu) if iommu else root_dentry,
                      "/iommu is missing or not a directory")
        pgt = None
    else:
        pgt = ctx.child(iommu, fmt.ROOT_PGTABLES_NAME)
    roots = np.flatnonzero(ctx.kind == fmt.KIND_IOMMU_ROOT)
    if pgt is None or ctx.kind[pgt] != fmt.KIND_IOMMU_ROOT:
        yield Finding("namespace.root-pgtables", ctx.dentry_off(pgt) if pgt else root_dentry,
                      "/iommu/root-pgtables is missing or not the VT-d root table file")
    elif int(ctx.inodes["npages"][pgt]) != fmt.ROOT_PGTABLES_PAGES:
        yield Finding("namespace.root-pgtables", ctx.inode_off(pgt, "npages"),
                      f"/iommu/root-pgtables holds {int(ctx.inodes['npages'][pgt])} pages, "
                      f"not {fmt.ROOT_PGTABLES_PAGES}")
    for i in roots.tolist():
        if i != pgt:
            yield Finding("namespace.root-pgtables", ctx.inode_off(i),
                          f"inode {i} is a second VT-d root table file")
            break


def check_extent_free_cleared(ctx: FsckContext) -> Iterator[Finding]:
    """A free extent record (npages 0) is all zero; a live one has zero padding."""
    rows = ctx.extents.view(np.uint8).view("<u8").reshape(-1, fmt.EXTENT_DTYPE.itemsize // 8)
    nz = _or_columns(rows) != 0
    free = ctx.extents["npages"] == 0
    bad = np.flatnonzero((free & nz) | (~free & (ctx.extents["_pad"] != 0)))
    yield from _capped(bad, lambda r: Finding("extent.free", ctx.extent_off(r),
                                              f"extent record {r} has stray bytes"),
                       "extent records with stray bytes", "extent.free", ctx.extent_off)


def check_extent_range(ctx: FsckContext) -> Iterator[Finding]:
    """Every live extent lies in the pool: data_page <= page, page + npages <= npages."""
    bad = np.flatnonzero(~ctx.e_in_range)
    g = ctx.geometry
    yield from _capped(bad, lambda j: Finding(
        "extent.range", ctx.extent_off(int(ctx.e_rec[j]), "page"),
        f"extent record {ctx.e_rec[j]} (ino {ctx.e_ino[j]}) pages {ctx.e_page[j]}+{ctx.e_npages[j]} "
        f"outside the pool {g.data_page}..{g.npages}"),
        "extents out of range", "extent.range", lambda j: ctx.extent_off(int(ctx.e_rec[j]), "page"))


def check_extent_owner(ctx: FsckContext) -> Iterator[Finding]:
    """The owner of a live extent is a live inode of a page-holding kind."""
    bad = np.flatnonzero(~ctx.e_owner_ok)

    def finding(j: int) -> Finding:
        ino = int(ctx.e_ino[j])
        what = (f"kind {fmt.KIND_NAMES.get(int(ctx.kind[ino]), ctx.kind[ino])}"
                if 0 < ino < ctx.geometry.inode_count else "out of the inode table")
        return Finding("extent.owner", ctx.extent_off(int(ctx.e_rec[j])),
                       f"extent record {ctx.e_rec[j]} belongs to inode {ino}, {what}")

    yield from _capped(bad, finding, "extents with bad owners", "extent.owner", lambda j: ctx.extent_off(int(ctx.e_rec[j])))


def check_extent_overlap(ctx: FsckContext) -> Iterator[Finding]:
    """No image page is in two extents (the in-range extents sorted by page)."""
    s, e = ctx.owner_start, ctx.owner_end
    if s.size < 2:
        return
    reach = np.maximum.accumulate(e)[:-1]  # furthest page covered by the extents before each one
    bad = np.flatnonzero(s[1:] < reach) + 1

    def finding(k: int) -> Finding:
        other = int(np.argmax(e[:k] > s[k]))
        return Finding("extent.overlap", ctx.extent_off(int(ctx.owner_rec[k]), "page"),
                       f"extent record {ctx.owner_rec[k]} (ino {ctx.owner_ino[k]}, pages {s[k]}..{e[k] - 1}) "
                       f"overlaps record {ctx.owner_rec[other]} (ino {ctx.owner_ino[other]}, pages {s[other]}..{e[other] - 1})")

    yield from _capped(bad, finding, "overlapping extents", "extent.overlap",
                       lambda k: ctx.extent_off(int(ctx.owner_rec[k]), "page"))


def check_extent_file_coverage(ctx: FsckContext) -> Iterator[Finding]:
    """Each file's extents cover file pages 0..npages-1 exactly once; inode npages and
    nextents equal the extent table's totals."""
    g = ctx.geometry
    n = np.uint64(g.npages)
    sel = np.flatnonzero(ctx.e_owner_ok & (ctx.e_file_page < n) & (ctx.e_npages <= n))
    ino = ctx.e_ino[sel].astype(np.int64)
    fp = ctx.e_file_page[sel].astype(np.int64)
    cnt = ctx.e_npages[sel].astype(np.int64)
    rec = ctx.e_rec[sel]
    order = np.lexsort((fp, ino))
    ino, fp, cnt, rec = ino[order], fp[order], cnt[order], rec[order]
    first = np.ones(ino.size, bool)
    first[1:] = ino[1:] != ino[:-1]
    expect = np.zeros(ino.size, np.int64)
    expect[1:] = (fp + cnt)[:-1]
    bad = np.flatnonzero(np.where(first, fp != 0, fp != expect))

    def finding(k: int) -> Finding:
        want = 0 if first[k] else int(expect[k])
        how = "a gap before it" if fp[k] > want else "an overlap with the previous extent"
        return Finding("extent.coverage", ctx.extent_off(int(rec[k]), "file_page"),
                       f"inode {ino[k]}: extent record {rec[k]} starts at file page {fp[k]}, expected {want}: {how}")

    yield from _capped(bad, finding, "coverage breaks", "extent.coverage",
                       lambda k: ctx.extent_off(int(rec[k]), "file_page"))
    totals = np.zeros(g.inode_count, np.int64)
    counts = np.zeros(g.inode_count, np.int64)
    if ino.size:
        starts = np.flatnonzero(first)
        totals[ino[starts]] = np.add.reduceat(cnt, starts)
        counts[ino[starts]] = np.diff(np.append(starts, ino.size))
    holds = ctx.live & np.isin(ctx.kind, fmt.KINDS_WITH_PAGES)
    have_pages = ctx.inodes["npages"]
    have_ext = ctx.inodes["nextents"].astype(np.int64)
    bad_pages = np.flatnonzero(holds & (have_pages != totals.astype(np.uint64)))
    bad_ext = np.flatnonzero(holds & (have_ext != counts))
    yield from _capped(bad_pages, lambda i: Finding(
        "inode.npages", ctx.inode_off(i, "npages"),
        f"inode {i} records {have_pages[i]} pages, its extents hold {totals[i]}"),
        "inodes with wrong page counts", "inode.npages", lambda i: ctx.inode_off(i, "npages"))
    yield from _capped(bad_ext, lambda i: Finding(
        "inode.nextents", ctx.inode_off(i, "nextents"),
        f"inode {i} records {have_ext[i]} extents, the table holds {counts[i]}"),
        "inodes with wrong extent counts", "inode.nextents", lambda i: ctx.inode_off(i, "nextents"))


BITMAP_WINDOW = 1 << 26  #: pages compared per pass: bounds the 1-byte-per-page buffers to 64 MiB
MAX_BITMAP_MISMATCHES = 1 << 20  #: mismatching pages analysed into ranges; the rest only counted


def used_runs(ctx: FsckContext) -> tuple[np.ndarray, np.ndarray]:
    """(starts, ends) of the page runs that must be marked used: metadata, then the union of
    the in-range extents (overlapping or touching extents merge), ascending and disjoint."""
    s, e = ctx.owner_start, ctx.owner_end
    if s.size:
        reach = np.maximum.accumulate(e)
        new = np.ones(s.size, bool)
        new[1:] = s[1:] > reach[:-1]  # a run starts where no earlier extent reaches
        starts = s[new]
        ends = reach[np.append(np.flatnonzero(new)[1:] - 1, s.size - 1)]
    else:
        starts = ends = np.zeros(0, np.int64)
    return np.append(0, starts), np.append(ctx.geometry.data_page, ends)


def expected_bitmap(ctx: FsckContext, lo: int = 0, hi: int | None = None,
                    runs: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """The bitmap bytes ``lo // 8 .. hi // 8`` that metadata and extents imply.

    ``lo`` and ``hi`` (pages, multiples of 8; default the whole bitmap) pick
    a window; ``runs`` is ``used_runs(ctx)`` if the caller already has it.
    Built with ``np.repeat`` over the runs in the window (one byte per page,
    no Python loop) and packed little-endian.
    """
    hi = ctx.geometry.bitmap_bytes * 8 if hi is None else hi
    starts, ends = used_runs(ctx) if runs is None else runs
    a = int(np.searchsorted(ends, lo, side="right"))
    b = int(np.searchsorted(starts, hi, side="left"))
    edges = np.empty(2 * (b - a) + 2, np.int64)
    edges[0], edges[-1] = lo, hi
    edges[1:-1:2] = np.clip(starts[a:b], lo, hi)
    edges[2:-1:2] = np.clip(ends[a:b], lo, hi)
    values = np.zeros(edges.size - 1, bool)
    values[1::2] = True  # gap, run, gap, run, ..., gap
    return np.packbits(np.repeat(values, np.diff(edges)), bitorder="little")


def check_bitmap_agrees(ctx: FsckContext) -> Iterator[Finding]:
    """Bitmap == metadata pages + union of extents, bits past npages clear; reported as
    page ranges per kind of mismatch, not per page. Compared in windows of
    ``BITMAP_WINDOW`` pages, so a huge sparse image needs no huge buffer."""
    g = ctx.geometry
    base = g.bitmap_page * PS
    nbits = g.bitmap_bytes * 8
    found: list[np.ndarray] = []
    nfound = extra = 0
    runs = used_runs(ctx)  # once, not per window
    for lo in range(0, nbits, BITMAP_WINDOW):
        hi = min(lo + BITMAP_WINDOW, nbits)
        have = ctx.image[base + lo // 8 : base + hi // 8]
        diff = np.bitwise_xor(expected_bitmap(ctx, lo, hi, runs), have)
        bad_bytes = np.flatnonzero(diff)
        if not bad_bytes.size:
            continue
        if nfound >= MAX_BITMAP_MISMATCHES:
            extra += int(np.unpackbits(diff[bad_bytes]).sum())
            continue
        bits = np.unpackbits(diff[bad_bytes], bitorder="little").reshape(-1, 8).astype(bool)
        found.append(lo + (bad_bytes[:, None] * 8 + np.arange(8)[None, :])[bits])
        nfound += found[-1].size
    if not found:
        return
    pages = np.concatenate(found)
    bm = ctx.image[base : base + g.bitmap_bytes]
    used = (bm[pages // 8] >> (pages % 8).astype(np.uint8)) & 1
    # 0: metadata page marked free, 1: owned page marked free, 2: unowned page marked used, 3: past npages
    cls = np.where(pages >= g.npages, 3, np.where(pages < g.data_page, 0, np.where(used == 0, 1, 2)))
    brk = np.ones(pages.size, bool)
    brk[1:] = (np.diff(pages) != 1) | (cls[1:] != cls[:-1])
    starts = np.flatnonzero(brk)
    ends = np.append(starts[1:], pages.size) - 1
    names = ("bitmap.metadata", "bitmap.owned", "bitmap.used", "bitmap.tail")
    what = ("metadata pages marked free", "pages owned by extents marked free",
            "pages marked used that no extent owns", "bits set past the last page")
    for c in range(4):
        runs = np.flatnonzero(cls[starts] == c)
        for r in runs[:MAX_PER_CHECK].tolist():
            a, b = int(pages[starts[r]]), int(pages[ends[r]])
            yield Finding(names[c], base + a // 8, f"pages {a}..{b}: {what[c]}")
        if runs.size > MAX_PER_CHECK:
            total = int(np.sum(ends[runs] - starts[runs] + 1))
            yield Finding(names[c], base + int(pages[starts[runs[MAX_PER_CHECK]]]) // 8,
                          f"... {runs.size} ranges, {total} pages in all: {what[c]}")
    if extra:
        yield Finding("bitmap", base + int(pages[-1]) // 8,
                      f"{extra} more mismatching pages after page {int(pages[-1])} (not analysed)")


#: the metadata checks in the order they run; each takes an FsckContext
METADATA_CHECKS: tuple[Callable[[FsckContext], Iterator[Finding]], ...] = (
    check_superblock_after_recovery,
    check_superblock_dynamic,
    check_journal_header,
    check_bitmap_tail,
    check_inode_record0,
    check_inode_kind,
    check_inode_mode,
    check_inode_flags,
    check_inode_free_cleared,
    check_inode_size,
    check_dentry_cleared,
    check_dentry_name,
    check_dentry_parent,
    check_dentry_unique,
    check_dentry_tree,
    check_namespace_required,
    check_extent_free_cleared,
    check_extent_range,
    check_extent_owner,
    check_extent_overlap,
    check_extent_file_coverage,
    check_bitmap_agrees,
)


# -------------------------------------------------------------------- image


def _deep_checks(ctx: FsckContext) -> list[Finding]:
    """Checks of structures inside data pages (the VT-d tables, ``backing.tablecheck``;
    the live-update state, ``backing.lustate``);
    run last, only without fatal findings, so every extent is in range and every
    owner known."""
    return tablecheck.check_tables(ctx) + lustate.check(ctx)


def status_of(findings: list[Finding]) -> int:
    """0 clean, 1 findings, 2 unusable (a fatal finding)."""
    if any(f.fatal for f in findings):
        return 2
    return 1 if findings else 0


def check_image(path: str | os.PathLike[str], *, deep: bool = True) -> tuple[int, list[Finding]]:
    """Validate the image file at ``path``: (status 0 clean / 1 findings / 2 unusable, findings).

    Read-only: the file is mapped privately (copy-on-write), so replaying a
    committed transaction left by a restart happens in this process's
    memory only. Never raises for what the file holds; a file that cannot
    be read at all is one fatal finding with structure ``"image"``.
    """
    path = os.fspath(path)
    try:
        # O_NONBLOCK: opening a FIFO for reading must not wait for a writer
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        return 2, [Finding("image", 0, f"cannot open: {exc.strerror or exc}", True)]
    try:
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                what = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
                return 2, [Finding("image", 0, f"is {what}", True)]
            if st.st_size < PS:
                return 2, [Finding("image", 0, f"{st.st_size} bytes: too small for a superblock page", True)]
            sb = os.pread(fd, fmt.SUPERBLOCK_DTYPE.itemsize, 0)
        except OSError as exc:
            return 2, [Finding("image", 0, f"cannot read: {exc.strerror or exc}", True)]
        geometry, findings = check_superblock(sb, st.st_size)
        if geometry is None:
            return 2, findings
        try:
            mm = map_private(fd, geometry.size)
        except OSError as exc:
            return 2, [Finding("image", 0, f"cannot map {geometry.size} bytes: {exc.strerror or exc}", True)]
        try:
            return _check_mapped(mm, geometry, deep)
        finally:
            try:
                mm.close()
            except BufferError:  # a view escaped (a finding holds none); freed with it
                pass
    finally:
        os.close(fd)


def _check_mapped(mm: mmap.mmap, geometry: fmt.Geometry, deep: bool) -> tuple[int, list[Finding]]:
    image = np.frombuffer(mm, dtype=np.uint8)
    try:
        Journal(image, geometry).recover()  # into the private copy only
    except FormatError as exc:
        return 2, [Finding(exc.structure, exc.offset, exc.problem, True)]
    ctx, findings = _check_metadata(image, geometry)
    if deep and ctx is not None and not any(f.fatal for f in findings):
        findings.extend(_deep_checks(ctx))
    del ctx, image
    return status_of(findings), findings
