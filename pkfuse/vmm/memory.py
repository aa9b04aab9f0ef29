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
"""

from __future__ import annotations

import ctypes
import mmap
import os
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

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


class Extent(NamedTuple):
    """``length`` bytes at ``file_offset`` of the guest file are at ``image_offset`` of the image."""

    file_offset: int
    image_offset: int
    length: int


class GuestMemoryError(ValueError):
    """The extents cannot form the guest's range (says which extent and why)."""


def _check_extents(extents: Sequence[Extent], size: int) -> None:
    at = 0
    for i, e in enumerate(sorted(extents)):
        if e.file_offset != at:
            raise GuestMemoryError(f"extent {i} starts at file offset {e.file_offset:#x}, expected {at:#x}: "
                                   "the extents must tile the guest range with no gap or overlap")
        if e.length <= 0 or (e.file_offset | e.image_offset | e.length) % PAGE_SIZE:
            raise GuestMemoryError(f"extent {i} ({e.file_offset:#x}, {e.image_offset:#x}, {e.length:#x}) "
                                   "is empty or not page-aligned")
        at += e.length
    if at != size:
        raise GuestMemoryError(f"the extents cover {at:#x} bytes, the guest is {size:#x}")


def _merge(extents: Sequence[Extent]) -> list[Extent]:
    """Runs contiguous in both the file and the image as one extent: one mmap call each."""
    out: list[Extent] = []
    for e in sorted(extents):
        if out and out[-1].file_offset + out[-1].length == e.file_offset \
                and out[-1].image_offset + out[-1].length == e.image_offset:
            out[-1] = out[-1]._replace(length=out[-1].length + e.length)
        else:
            out.append(e)
    return out


class GuestMemory:
    """Guest-physical ``[0, size)`` mapped from ``fd`` (the image) at ``extents``.

    ``address`` is the host virtual address of guest-physical 0, ``array`` a
    uint8 numpy array over the range, ``view`` a memoryview of it. The fd is
    not kept: the mappings hold the file.
    """

    def __init__(self, fd: int, extents: Sequence[Extent], size: int) -> None:
        extents = [Extent(*e) for e in extents]
        _check_extents(extents, size)
        self.size = size
        self.extents = _merge(extents)
        base = _libc.mmap(None, size, PROT_NONE,
                          mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
        if base in (None, MAP_FAILED):
            err = ctypes.get_errno()
            raise OSError(err, f"reserving {size:#x} bytes of address space: {os.strerror(err)}")
        self.address: int = base
        try:
            for e in self.extents:
                got = _libc.mmap(base + e.file_offset, e.length, mmap.PROT_READ | mmap.PROT_WRITE,
                                 mmap.MAP_SHARED | MAP_FIXED, fd, e.image_offset)
                if got != base + e.file_offset:
                    err = ctypes.get_errno()
                    raise OSError(err, f"mmap of image offset {e.image_offset:#x} (+{e.length:#x}) at guest-physical "
                                       f"{e.file_offset:#x}: {os.strerror(err)}")
        except BaseException:
            _libc.munmap(base, size)
            raise
        self._buffer = (ctypes.c_uint8 * size).from_address(base)
        self.array: np.ndarray = np.frombuffer(self._buffer, dtype=np.uint8)
        self.view = memoryview(self._buffer).cast("B")
        self.closed = False

    @classmethod
    def of_file(cls, fd: int, size: int) -> GuestMemory:
        """A plain file as guest RAM (one extent): for engines' tests and machines without a mount."""
        return cls(fd, [Extent(0, 0, size)], size)

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
