"""Guest memory: one contiguous guest-physical range made of a file's scattered image pages.

The kernel maps a pkernfs file by handing the VMA the file's physical pages;
pkfuse cannot (a MAP_SHARED mmap of a file on the FUSE mount is ENODEV), so
the VMM does it by the physical layout: it reserves one virtual range of the
guest's size (``PROT_NONE``, no memory behind it) and maps each extent of the
image over its part of the range with ``MAP_SHARED | MAP_FIXED``. A store
through the range is a store into the image's page cache: it survives a
SIGKILL of every process with no msync, and a DMA through the IOMMU, which
reads the same pages, sees it at once. No copy is ever made.

Invariants: the extents tile ``[0, size)`` exactly (no gap: a ``PROT_NONE``
hole inside a KVM memory slot makes ``KVM_RUN`` fail with EFAULT); every
extent is page-aligned in the file and the image. ``close`` unmaps the whole
range in one call.

Where the extents come from: ``GuestMemory.map_file`` asks the daemon
(``PKFUSE_GUEST_MMAP``, the control call standing for the kernel's mmap of a
pkernfs file), which checks that the caller may write the file, answers with
the image and the file's extents as image offsets, and pins the file (its
size fixed, unlink EBUSY) until the connection that asked is closed: keep that
connection open for as long as the mapping lives. ``of_file`` maps a plain
file (no mount, no pin). The cost is one ``mmap`` per merged extent, each
splitting the reserved range: it grows with extents, not bytes.
"""

from __future__ import annotations

import bisect
import ctypes
import mmap
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple, Protocol

import numpy as np

if TYPE_CHECKING:
    from pkfuse.uapi.client import GuestMapping

_libc = ctypes.CDLL(None, use_errno=True)  # no find_library: it forks ldconfig (~6 ms)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.restype = ctypes.c_int
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.madvise.restype = ctypes.c_int
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]

MAP_FAILED = ctypes.c_void_p(-1).value
MAP_FIXED = 0x10
MAP_NORESERVE = 0x4000
MADV_POPULATE_WRITE = 23  # Linux 5.14
PAGE_SIZE = mmap.PAGESIZE
PROT_NONE = 0


class MmapClient(Protocol):
    """What ``map_file`` needs of a control connection (``pkfuse.uapi.Iommufd`` has it, as every one does)."""

    def guest_mmap(self, fd: int) -> GuestMapping: ...


class Extent(NamedTuple):
    """``length`` bytes at ``file_offset`` of the guest file are at ``image_offset`` of the image."""

    file_offset: int
    image_offset: int
    length: int


class GuestMemoryError(ValueError):
    """The extents cannot form the guest's range (says which extent and why)."""


def _as_array(extents: Sequence[Extent] | np.ndarray) -> np.ndarray:
    """``extents`` as an (n, 3) int64 array of (file_offset, image_offset, length) rows, sorted by
    file offset: tuples, ``Extent``s, or a structured array with those three fields."""
    if isinstance(extents, np.ndarray) and extents.dtype.names:
        rows = np.stack([extents[f].astype(np.int64) for f in Extent._fields], axis=1)
    else:
        rows = np.asarray(extents, dtype=np.int64).reshape(-1, 3)
    return rows[np.argsort(rows[:, 0], kind="stable")]


def _check_rows(rows: np.ndarray, size: int) -> None:
    """Raise ``GuestMemoryError`` naming the first extent (in file order) that breaks the tiling."""
    fo, io, n = rows[:, 0], rows[:, 1], rows[:, 2]
    expected = np.r_[0, np.cumsum(n)[:-1]] if rows.size else np.zeros(0, np.int64)
    bad_start = fo != expected
    bad_shape = (n <= 0) | ((fo | io | n) % PAGE_SIZE != 0)
    bad = np.flatnonzero(bad_start | bad_shape)
    if bad.size:
        i = int(bad[0])
        e = Extent(*(int(x) for x in rows[i]))
        if bad_start[i]:
            raise GuestMemoryError(f"extent {i} starts at file offset {e.file_offset:#x}, expected "
                                   f"{int(expected[i]):#x}: the extents must tile the guest range with no gap "
                                   "or overlap")
        raise GuestMemoryError(f"extent {i} ({e.file_offset:#x}, {e.image_offset:#x}, {e.length:#x}) "
                               "is empty or not page-aligned")
    at = int(n.sum()) if rows.size else 0
    if at != size:
        raise GuestMemoryError(f"the extents cover {at:#x} bytes, the guest is {size:#x}")


def _merge_rows(rows: np.ndarray) -> np.ndarray:
    """Rows contiguous in both the file and the image joined: one mmap call each (rows sorted)."""
    if len(rows) < 2:
        return rows
    fo, io, n = rows[:, 0], rows[:, 1], rows[:, 2]
    joins = (fo[1:] == fo[:-1] + n[:-1]) & (io[1:] == io[:-1] + n[:-1])
    starts = np.flatnonzero(np.r_[True, ~joins])
    ends = np.r_[starts[1:], len(rows)]
    out = rows[starts].copy()
    out[:, 2] = fo[ends - 1] + n[ends - 1] - fo[starts]
    return out


def _check_extents(extents: Sequence[Extent], size: int) -> None:
    """``GuestMemoryError`` (one line, naming the extent) unless ``extents`` tile ``[0, size)`` in pages."""
    _check_rows(_as_array(extents), size)


def _merge(extents: Sequence[Extent]) -> list[Extent]:
    """Runs contiguous in both the file and the image as one extent: one mmap call each."""
    return [Extent(*e) for e in _merge_rows(_as_array(extents)).tolist()]


class GuestMemory:
    """Guest-physical ``[0, size)`` mapped from ``fd`` (the image) at ``extents``.

    ``address`` is the host virtual address of guest-physical 0, ``array`` a
    uint8 numpy array over the range, ``view`` a memoryview of it. The fd is
    not kept: the mappings hold the file. ``extents``: ``Extent``s or
    ``(file_offset, image_offset, length)`` tuples, or a structured array
    with those fields. ``phys_base``: the physical address of image offset 0
    (``phys_addr`` needs it; None for a plain file). ``read_only``: mapped
    ``PROT_READ`` (``fd`` may be O_RDONLY) and ``array`` not writeable -- an
    observer's view, as the restart harness reads a paused guest in place.
    """

    def __init__(self, fd: int, extents: Sequence[Extent] | np.ndarray, size: int, *,
                 phys_base: int | None = None, read_only: bool = False) -> None:
        rows = _as_array(extents)
        _check_rows(rows, size)
        self.size = size
        rows = _merge_rows(rows)
        flat = rows.tolist()
        self.extents = [Extent(*e) for e in flat]
        self.phys_base = phys_base
        self._starts = [e[0] for e in flat]  #: file offsets, for phys_addr's bisect
        base = _libc.mmap(None, size, PROT_NONE,
                          mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
        if base in (None, MAP_FAILED):
            err = ctypes.get_errno()
            raise OSError(err, f"reserving {size:#x} bytes of address space: {os.strerror(err)}")
        self.address: int = base
        try:
            prot = mmap.PROT_READ if read_only else mmap.PROT_READ | mmap.PROT_WRITE
            map_, flags = _libc.mmap, mmap.MAP_SHARED | MAP_FIXED
            for file_offset, image_offset, length in flat:  # the hot loop: one syscall per extent
                want = base + file_offset
                if map_(want, length, prot, flags, fd, image_offset) != want:
                    err = ctypes.get_errno()
                    raise OSError(err, f"mmap of image offset {image_offset:#x} (+{length:#x}) at guest-physical "
                                       f"{file_offset:#x}: {os.strerror(err)}")
        except BaseException:
            _libc.munmap(base, size)
            raise
        self._buffer = (ctypes.c_uint8 * size).from_address(base)
        self.array: np.ndarray = np.frombuffer(self._buffer, dtype=np.uint8)
        self.view = memoryview(self._buffer).cast("B")
        if read_only:  # a store would be a SIGSEGV, not an exception
            self.array.flags.writeable = False
            self.view = self.view.toreadonly()
        self.closed = False

    @classmethod
    def of_file(cls, fd: int, size: int) -> GuestMemory:
        """A plain file as guest RAM (one extent): for engines' tests and machines without a mount."""
        return cls(fd, [Extent(0, 0, size)], size)

    @classmethod
    def map_file(cls, client: MmapClient, guest_fd: int) -> GuestMemory:
        """The guest-RAM file ``guest_fd`` (opened O_RDWR on the mount) as one contiguous range.

        ``client``: an open control connection (``pkfuse.uapi.Iommufd``, or
        any other); it makes PKFUSE_GUEST_MMAP, and the file stays pinned
        while it is open. The range is the file's pages: its size rounded up
        to a page. The image descriptor the call returned is closed once
        mapped. Raises the call's ``OSError`` (EBADF, EACCES, EINVAL).
        """
        m = client.guest_mmap(guest_fd)
        try:
            size = -(-m.length // PAGE_SIZE) * PAGE_SIZE
            return cls(m.image_fd, m.extents, size, phys_base=m.phys_base)
        finally:
            m.close()

    def phys_addr(self, gpa: int) -> int:
        """The physical address (the image's, as the IOMMU sees it) of guest-physical ``gpa``."""
        if self.phys_base is None:
            raise GuestMemoryError("this guest memory is a plain file: it has no physical addresses")
        if not 0 <= gpa < self.size:
            raise GuestMemoryError(f"guest-physical {gpa:#x} is outside the guest's {self.size:#x} bytes")
        e = self.extents[bisect.bisect_right(self._starts, gpa) - 1]
        return self.phys_base + e.image_offset + gpa - e.file_offset

    def phys_addrs(self, gpas: np.ndarray) -> np.ndarray:
        """``phys_addr`` of each guest-physical address in ``gpas``, vectorized (uint64)."""
        if self.phys_base is None:
            raise GuestMemoryError("this guest memory is a plain file: it has no physical addresses")
        g = np.asarray(gpas, dtype=np.uint64)
        if g.size and int(g.max()) >= self.size:
            raise GuestMemoryError(f"guest-physical {int(g.max()):#x} is outside the guest's {self.size:#x} bytes")
        starts = np.asarray(self._starts, dtype=np.uint64)
        i = np.searchsorted(starts, g, side="right") - 1
        delta = np.asarray([e.image_offset - e.file_offset for e in self.extents], dtype=np.int64)
        return (g.astype(np.int64) + delta[i] + self.phys_base).astype(np.uint64)

    def populate(self) -> None:
        """Fault every page in for writing now (MADV_POPULATE_WRITE), off the guest's first touch."""
        if _libc.madvise(self.address, self.size, MADV_POPULATE_WRITE) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"MADV_POPULATE_WRITE of guest memory: {os.strerror(err)}")

    def close(self) -> None:
        """Unmap the range. Arrays and views over it must be gone: a later access faults."""
        if self.closed:
            return
        self.closed = True
        self.view.release()
        del self.array
        _libc.munmap(self.address, self.size)

    def __enter__(self) -> GuestMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
