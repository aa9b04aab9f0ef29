"""mkfs: lay out an empty image.

mkfs is not crash-consistent and need not be: a half-made image has no
superblock magic (it is written last) and fsck calls it unusable.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import secrets
import stat
import time

import numpy as np

from . import format as fmt
from .errors import StoreError
from .journal import initial_header

# "iB" only after a unit letter: "16iB" is not a size
_SIZE_RE = re.compile(r"^\s*(\d+)\s*(?:([kKmMgGtT])(i?[bB])?|[bB]?)\s*$")
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """Bytes in ``"16G"``, ``"512M"``, ``"64KiB"`` or ``"4096"`` (binary units)."""
    m = _SIZE_RE.match(text)
    if not m:
        raise ValueError(f"not a size: {text!r} (examples: 16G, 512M, 4096)")
    return int(m.group(1)) * _UNITS[(m.group(2) or "").lower()]


def parse_addr(text: str) -> int:
    """A physical address given as ``0x100000000``, ``4294967296`` or ``4G``."""
    try:
        value = int(text, 0)
    except ValueError:
        return parse_size(text)
    if value < 0:  # int() takes a sign; a physical address has none
        raise ValueError(f"not an address: {text!r} (negative)")
    return value


def _record(dtype: np.dtype, **fields: object) -> np.ndarray:
    rec = np.zeros(1, dtype)
    for name, value in fields.items():
        rec[name] = value
    return rec


def mkfs(
    path: str | os.PathLike[str],
    size: int,
    base_phys: int = fmt.DEFAULT_BASE_PHYS,
    *,
    inode_count: int | None = None,
    extent_count: int | None = None,
    force: bool = False,
) -> fmt.Geometry:
    """Create an empty image of ``size`` bytes at ``path`` (sparse where possible).

    Makes ``/guest_mem``, ``/iommu`` and ``/iommu/root-pgtables`` (the VT-d
    root table and 256 context tables, zeroed). Refuses to overwrite a
    non-empty regular file unless ``force``.
    """
    try:
        if base_phys < 0:  # compute_geometry's modulo check passes -2 MiB; the u8 field would overflow
            raise ValueError(f"base_phys {base_phys:#x} is negative")
        geometry = fmt.compute_geometry(size, base_phys, inode_count, extent_count)
    except ValueError as exc:
        raise StoreError(errno.EINVAL, str(exc)) from None
    path = os.fspath(path)
    if os.path.exists(path):
        st = os.stat(path)
        if stat.S_ISREG(st.st_mode) and st.st_size and not force:
            raise StoreError(errno.EEXIST, f"{path} exists and is not empty (use --force to overwrite)")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            os.fchmod(fd, 0o600)  # the image is memory: its owner's (and root's) only, an overwritten one too
        try:  # the lock a Store holds: truncating a mapped image would SIGBUS its daemon
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StoreError(errno.EBUSY, f"{path} is in use by a pkfuse process") from None
        os.ftruncate(fd, 0)  # drop old contents so every page reads as zero
        os.ftruncate(fd, size)
        image = np.memmap(path, dtype=np.uint8, mode="r+", shape=(size,))
        try:
            _write_layout(image, geometry)
            image.flush()
        finally:
            del image
    finally:
        os.close(fd)
    return geometry


def _write_layout(image: np.ndarray, g: fmt.Geometry) -> None:
    ps = fmt.PAGE_SIZE
    now = time.time_ns()
    # journal header
    jh = g.journal_page * ps
    image[jh : jh + fmt.JOURNAL_HEADER_DTYPE.itemsize] = initial_header().view(np.uint8)
    # inodes and dentries of the fixed tree
    inodes = image[g.inode_page * ps :][: g.inode_count * fmt.INODE_DTYPE.itemsize].view(fmt.INODE_DTYPE)
    dentries = image[g.dentry_page * ps :][: g.inode_count * fmt.DENTRY_DTYPE.itemsize].view(fmt.DENTRY_DTYPE)
    extents = image[g.extent_page * ps :][: g.extent_count * fmt.EXTENT_DTYPE.itemsize].view(fmt.EXTENT_DTYPE)
    times = dict(atime_ns=now, mtime_ns=now, ctime_ns=now, igen=1)
    dir_mode = stat.S_IFDIR | 0o755
    tree = [
        # ino, parent, name, kind, mode, npages
        (fmt.ROOT_INO, 0, b"", fmt.KIND_DIR, dir_mode, 0),
        (2, fmt.ROOT_INO, fmt.GUEST_DIR_NAME, fmt.KIND_DIR, dir_mode, 0),
        (3, fmt.ROOT_INO, fmt.IOMMU_DIR_NAME, fmt.KIND_DIR, dir_mode, 0),
        (4, 3, fmt.ROOT_PGTABLES_NAME, fmt.KIND_IOMMU_ROOT, stat.S_IFREG | 0o444, fmt.ROOT_PGTABLES_PAGES),
    ]
    for ino, parent, name, kind, mode, npages in tree:
        inodes[ino] = _record(
            fmt.INODE_DTYPE, kind=kind, mode=mode, size=npages * ps, npages=npages,
            nextents=1 if npages else 0, **times,
        )[0]
        if parent:
            dentries[ino] = _record(fmt.DENTRY_DTYPE, parent=parent, name_len=len(name), name=name)[0]
    extents[0] = _record(
        fmt.EXTENT_DTYPE, ino=4, file_page=0, page=g.data_page, npages=fmt.ROOT_PGTABLES_PAGES
    )[0]
    # bitmap: metadata pages and the root-pgtables extent
    used = np.zeros(g.bitmap_bytes * 8, dtype=bool)
    used[: g.data_page] = True
    used[g.data_page : g.data_page + fmt.ROOT_PGTABLES_PAGES] = True
    bm = g.bitmap_page * ps
    image[bm : bm + g.bitmap_bytes] = np.packbits(used, bitorder="little")
    # superblock last: until its magic is there the image is not an image
    sb = _record(
        fmt.SUPERBLOCK_DTYPE,
        magic=fmt.MAGIC, version=fmt.FORMAT_VERSION, page_size=ps, npages=g.npages,
        base_phys=g.base_phys, uuid=secrets.token_bytes(16),
        journal_page=g.journal_page, journal_npages=g.journal_npages,
        bitmap_page=g.bitmap_page, bitmap_npages=g.bitmap_npages,
        inode_page=g.inode_page, inode_count=g.inode_count, dentry_page=g.dentry_page,
        extent_page=g.extent_page, extent_count=g.extent_count, data_page=g.data_page,
        mkfs_time_ns=now, generation=0, clean=1,
    )
    sb["checksum"] = fmt.superblock_checksum(sb.tobytes())
    image[: fmt.SUPERBLOCK_DTYPE.itemsize] = sb.view(np.uint8)
