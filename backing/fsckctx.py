"""What fsck's metadata checks derive from an image, for the checks of later stages.

``FsckContext`` is built once per image from a geometry that passed
``fsck.check_superblock``: views of the record tables, per-inode masks, the
live extents and the index from image page to owner. ``backing.fsck`` (the
metadata checks) builds it; ``backing.tablecheck`` (the VT-d table checks
fsck runs after them) reads it. Living apart from both, it lets the two
read top-down: fsck imports tablecheck, and neither imports the other back.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from . import format as fmt

PS = fmt.PAGE_SIZE
_DE = fmt.DENTRY_DTYPE.fields


@dataclasses.dataclass
class FsckContext:
    """What the metadata checks derived from an image, for checks of later stages.

    Built once per image (``build``) from a geometry that passed
    ``check_superblock``; every array here is in range of the image. Arrays
    named ``e_*`` are per live extent record (``npages != 0``), in table
    order; ``owner_*`` are the in-range extents sorted by image page, the
    index behind ``page_owner``.
    """

    image: np.ndarray  #: uint8, the whole image (npages * PAGE_SIZE bytes)
    image_u64: np.ndarray  #: the same bytes as little-endian 8-byte words
    geometry: fmt.Geometry
    inodes: np.ndarray  #: INODE_DTYPE view of the inode table
    dentries: np.ndarray  #: DENTRY_DTYPE view of the dentry table
    extents: np.ndarray  #: EXTENT_DTYPE view of the extent table
    kind: np.ndarray  #: int64 kind per ino
    live: np.ndarray  #: bool per ino: kind != KIND_FREE
    orphan: np.ndarray  #: bool per ino: live and IFLAG_ORPHAN
    named: np.ndarray  #: bool per ino: live, not the root, not an orphan (has a dentry)
    e_rec: np.ndarray  #: extent-table index of each live extent record
    e_ino: np.ndarray  #: uint64
    e_file_page: np.ndarray  #: uint64
    e_page: np.ndarray  #: uint64
    e_npages: np.ndarray  #: uint64
    e_in_range: np.ndarray  #: bool: data_page <= page and page + npages <= geometry.npages
    e_owner_ok: np.ndarray  #: bool: ino is a live page-holding inode
    owner_start: np.ndarray  #: int64 first page of each in-range extent, ascending
    owner_end: np.ndarray  #: int64 page after it
    owner_ino: np.ndarray  #: uint32 owning ino; 0 where the record's ino is outside the inode table
    owner_rec: np.ndarray  #: int64 extent-table index

    @classmethod
    def build(cls, image: np.ndarray, geometry: fmt.Geometry) -> FsckContext:
        g = geometry
        inodes = record_table(image, g.inode_page, g.inode_count, fmt.INODE_DTYPE)
        dentries = record_table(image, g.dentry_page, g.inode_count, fmt.DENTRY_DTYPE)
        extents = record_table(image, g.extent_page, g.extent_count, fmt.EXTENT_DTYPE)
        kind = inodes["kind"].astype(np.int64)
        live = kind != fmt.KIND_FREE
        orphan = live & ((inodes["flags"] & fmt.IFLAG_ORPHAN) != 0)
        named = live & ~orphan
        named[: fmt.ROOT_INO + 1] = False  # record 0 is unused, the root has no dentry
        holds = live & np.isin(kind, fmt.KINDS_WITH_PAGES)

        e_rec = np.flatnonzero(extents["npages"] != 0)
        rec = extents[e_rec]
        e_ino = rec["ino"].astype(np.uint64)
        e_fp, e_page, e_n = rec["file_page"], rec["page"], rec["npages"]
        n = np.uint64(g.npages)
        e_in_range = (e_page >= g.data_page) & (e_page < n) & (e_n <= n - np.minimum(e_page, n))
        safe_ino = np.where(e_ino < g.inode_count, e_ino, 0).astype(np.int64)
        e_owner_ok = (e_ino != 0) & (e_ino < g.inode_count) & holds[safe_ino]

        inr = np.flatnonzero(e_in_range)
        order = inr[np.argsort(e_page[inr], kind="stable")]
        owner_start = e_page[order].astype(np.int64)
        owner_end = owner_start + e_n[order].astype(np.int64)
        return cls(
            image=image, image_u64=image[: image.size - image.size % 8].view("<u8"), geometry=g,
            inodes=inodes, dentries=dentries, extents=extents,
            kind=kind, live=live, orphan=orphan, named=named,
            e_rec=e_rec, e_ino=e_ino, e_file_page=e_fp, e_page=e_page, e_npages=e_n,
            e_in_range=e_in_range, e_owner_ok=e_owner_ok,
            owner_start=owner_start, owner_end=owner_end,
            owner_ino=np.where(e_ino[order] < g.inode_count, e_ino[order], 0).astype(np.uint32),
            owner_rec=e_rec[order].astype(np.int64),
        )

    @functools.cached_property
    def named_view(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(inos, parent, name_len, name bytes as an (n, 248) uint8 matrix) of the named inodes."""
        inos = np.flatnonzero(self.named)
        rec = self.dentries[inos]
        names = np.ascontiguousarray(rec["name"]).view(np.uint8).reshape(inos.size, _DE["name"][0].itemsize)
        return inos, rec["parent"].astype(np.int64), rec["name_len"].astype(np.int64), names

    def child(self, parent: int, name: bytes) -> int | None:
        """The named inode called ``name`` in directory ``parent``, or None (the first, if
        duplicate names make several)."""
        inos, par, nlen, names = self.named_view
        n = len(name)
        hit = (par == parent) & (nlen == n)
        if n and hit.any():
            hit[hit] = (names[hit, :n] == np.frombuffer(name, np.uint8)).all(axis=1)
        found = np.flatnonzero(hit)
        return int(inos[found[0]]) if found.size else None

    def page_owner(self, pages: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Owner ino (0 for none) and its kind for each image page in ``pages``.

        Vectorized (``searchsorted`` over the in-range extents); pages out of
        the image are owned by nobody. Where extents overlap (a finding of
        its own) one of the owners is returned; an extent whose ino is outside
        the inode table (an ``extent.owner`` finding) is owned by ino 0.
        """
        owner = owner_of(self.owner_start, self.owner_end, self.owner_ino, pages)
        return owner, self.kind[owner]

    def file_map(self, ino: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(file_page, image page, npages) of ``ino``'s in-range extents, sorted by file page."""
        sel = np.flatnonzero((self.e_ino == ino) & self.e_in_range)
        sel = sel[np.argsort(self.e_file_page[sel], kind="stable")]
        return (self.e_file_page[sel].astype(np.int64), self.e_page[sel].astype(np.int64),
                self.e_npages[sel].astype(np.int64))

    # offsets of records, for findings
    def inode_off(self, ino: int, field: str = "kind") -> int:
        return self.geometry.inode_off(ino, field)

    def dentry_off(self, ino: int, field: str = "parent") -> int:
        return self.geometry.dentry_off(ino, field)

    def extent_off(self, rec: int, field: str = "ino") -> int:
        return self.geometry.extent_off(rec, field)


def owner_of(starts: np.ndarray, ends: np.ndarray, inos: np.ndarray, pages: np.ndarray) -> np.ndarray:
    """uint32 owner ino of each of ``pages``: that of the extent [start, end) holding it, else 0.

    ``starts`` ascend (extents sorted by first page); one ``searchsorted``,
    no Python loop. Shared by ``FsckContext.page_owner`` and ``Store.page_owner``.
    """
    pages = np.asarray(pages, dtype=np.int64)
    if not starts.size:
        return np.zeros(pages.shape, np.uint32)
    idx = np.searchsorted(starts, pages, side="right") - 1
    safe = np.maximum(idx, 0)
    hit = (idx >= 0) & (pages < ends[safe])
    return np.where(hit, inos[safe], 0).astype(np.uint32)


def record_table(image: np.ndarray, page: int, count: int, dtype: np.dtype) -> np.ndarray:
    """The ``count`` records of ``dtype`` from image ``page`` on, as a view of ``image``."""
    start = page * PS
    return image[start : start + count * dtype.itemsize].view(dtype)
