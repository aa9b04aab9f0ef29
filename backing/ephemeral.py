"""Ephemeral memory: the host RAM outside the reserved range, which no restart keeps.

Why
---
pkernfs reserves one physical range at boot -- the image -- and only that
range survives a kexec. Every other page of host RAM is ordinary kernel
memory: the next kernel reuses it, and whatever it held is gone. The review
(issue 11, "Where domains live") asks that the IOMMU domains of normal
operation live *there*, as the kernel's own ``iommu_domain`` tables do, and
that only the fixed domain a live-update freeze fills lives in the image.
``EphemeralMemory`` stands for that RAM: a file of its own (by default
``IMAGE.ephemeral``, beside the image, as ``IMAGE.regs`` is), mapped
shared, seen as uint64 words, at physical addresses of its own.

Layout (units: bytes for offsets and addresses, 4 KiB pages for counts)
----------------------------------------------------------------------
File page 0 is the header, ``EPHEMERAL_HEADER_DTYPE``; it is bookkeeping,
not memory, and no physical address names it. File page ``1 + n`` is memory
page ``n``, physical address ``base_phys + n * 4096``, for
``0 <= n < npages``. ``u64`` is the memory (file pages 1..npages) as one flat
uint64 array, so memory page ``n`` is ``u64[n * 512 : n * 512 + 512]``, the
same indexing as the image's ``image_u64``.

Placement
---------
The range lies wholly above the image: ``base_phys`` is 4 KiB aligned, at
or above the image's end (``image base_phys + npages * 4096``), and the
range ends at or below 2**52. ``default_base`` is the first 1 GiB boundary
strictly above the image's end, so there is always a hole between the two
ranges (an address just past the image is in neither). Because ephemeral
memory is always above the image, the image alone tells fsck and
``Iommu.open`` that a context entry whose SLPTPTR is at or above the
image's end points at ephemeral memory: tables that did not survive.
``Iommu.open`` checks the placement (EINVAL).

Poison: what a restart does to host RAM
---------------------------------------
``poison()`` fills every memory page with 0xFF bytes -- each 8-byte entry
``POISON`` = 0xFFFF_FFFF_FFFF_FFFF -- forgets every allocation, and
rewrites the header with ``boot_id`` + 1. An all-ones entry is present (R
and W set) with reserved bits set at every level (bit 62 and SNP, bit 11,
in every kind of entry; PS in an SL-PML4E; bits 29:12 or 20:12 of a
superpage leaf), so a walk that reaches poisoned tables faults with
``FR_PT_RSVD`` at the first entry it reads: it never translates to garbage
and never leaves the memory. ``Iommu.open`` poisons at every open (a
restart happened), then uses the memory fresh. Pages are poisoned again
when freed, so a table used after it was freed faults too -- and a table
page handed out is never zero: code that forgets to write a whole table
before it becomes reachable is caught by the walker and by ``walk_tree``.
Poisoning a 64 MiB file takes ~5 ms once its pages are in memory (~40-60 ms
the first time, while the sparse file gets its blocks; measured by hand).

Allocator
---------
Which pages are in use is process state, not stored (nothing in this
memory outlives the process): one bool per page, True = free. ``alloc(k)``
takes the ``k`` lowest free pages (one vectorized search), ENOMEM naming
the counts when fewer are free; ``free(pages)`` poisons and returns them.
Callers serialize (``Iommu`` holds ``store.lock``).

The size is fixed while open: a writable open grows the file to the pages
asked for (sparse; never shrinks it), and the memory does not grow after
that -- a device process's read-only mapping could not see new pages, and
one of a file that shrank would SIGBUS. ``DEFAULT_NPAGES`` (64 MiB) holds
the tables of a 32 GiB guest mapped with 4 KiB leaves (about 1/512 of the
mapped size, ``pkfuse bench --only iommu``).

Processes
---------
One writer, the daemon: a writable open takes an exclusive flock (EBUSY
for a second). Readers -- the device process's walker -- open read-only
(``read_only=True``, no lock, no change) and take ``region()``: a view is
good for one boot; ``boot_id`` in the header says when to take a new one.

Crash consistency
-----------------
A new file's header is written in a temporary file renamed into place, so
no kill leaves a half-made header under the name; afterwards ``base_phys``
and ``npages`` change only at a writable open that asks for others and
``boot_id`` only at a poison, each by one aligned 8-byte store. A kill in
the middle of a poison leaves pages partly poisoned, which the next open
poisons again. A file whose magic is not ``EPHEMERAL_MAGIC`` is refused,
never overwritten (so the image's path given by mistake is never poisoned).
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os

import numpy as np

from . import format as fmt
from .errors import FormatError, StoreError

PS = fmt.PAGE_SIZE
GiB = 1 << 30
PHYS_LIMIT = 1 << 52  #: VT-d addresses are 52 bits: no memory at or above
EPHEMERAL_MAGIC = b"PKEPHMEM"  #: header bytes 0..7
EPHEMERAL_VERSION = 1
POISON = 0xFFFF_FFFF_FFFF_FFFF  #: every 8-byte word of a poisoned page
DEFAULT_NPAGES = 16384  #: 64 MiB of memory

EPHEMERAL_HEADER_DTYPE = np.dtype(
    [
        ("magic", "S8"),  # EPHEMERAL_MAGIC
        ("version", "<u4"),  # EPHEMERAL_VERSION
        ("page_size", "<u4"),  # 4096
        ("base_phys", "<u8"),  # physical address of memory page 0 (file page 1)
        ("npages", "<u8"),  # memory pages, after the header page
        ("boot_id", "<u8"),  # +1 at every poison: which boot the contents belong to
    ]
)
assert EPHEMERAL_HEADER_DTYPE.itemsize == 40
_BASE_WORD = EPHEMERAL_HEADER_DTYPE.fields["base_phys"][1] // 8
_NPAGES_WORD = EPHEMERAL_HEADER_DTYPE.fields["npages"][1] // 8
_BOOT_WORD = EPHEMERAL_HEADER_DTYPE.fields["boot_id"][1] // 8
_U64_POISON = np.uint64(POISON)


def default_path(image_path: str | os.PathLike[str]) -> str:
    return os.fspath(image_path) + ".ephemeral"


def image_end(geometry: fmt.Geometry) -> int:
    """The first physical address past the image: ephemeral memory starts at or above it."""
    return geometry.base_phys + geometry.npages * PS


def default_base(geometry: fmt.Geometry) -> int:
    """The first 1 GiB boundary strictly above the image's end."""
    return (image_end(geometry) // GiB + 1) * GiB


def check_placement(geometry: fmt.Geometry, base_phys: int, npages: int) -> None:
    """EINVAL unless ``npages`` pages at ``base_phys`` lie above the image and below 2**52."""
    end = image_end(geometry)
    if base_phys % PS or base_phys < end or base_phys + npages * PS > PHYS_LIMIT:
        raise StoreError(errno.EINVAL, f"ephemeral memory at {base_phys:#x}, {npages} pages, must be "
                         f"4 KiB aligned, at or above the image's end {end:#x} and below 2**52")


def _check_header(path: str, hdr: np.void, file_size: int) -> str:
    """Why the header (magic known) cannot be used as is, or ''."""
    if int(hdr["version"]) != EPHEMERAL_VERSION or int(hdr["page_size"]) != PS:
        return f"version {int(hdr['version'])}, page size {int(hdr['page_size'])}"
    base, n = int(hdr["base_phys"]), int(hdr["npages"])
    if n < 1 or base == 0 or base % PS or base + n * PS > PHYS_LIMIT:
        return f"base_phys {base:#x}, npages {n}"
    if file_size < (1 + n) * PS:
        return f"{file_size} bytes, too short for {n} pages"
    return ""


class EphemeralMemory:
    """An open ephemeral memory (see the module docstring)."""

    def __init__(self, path: str, fd: int, mm: mmap.mmap, read_only: bool) -> None:
        self.path = path
        self.read_only = read_only
        self._fd = fd
        self._mm = mm
        self._words = np.frombuffer(mm, dtype="<u8", count=PS // 8)  #: the header page
        self.header = self._words[: EPHEMERAL_HEADER_DTYPE.itemsize // 8].view(EPHEMERAL_HEADER_DTYPE)
        self.base_phys = int(self._words[_BASE_WORD])
        self.npages = int(self._words[_NPAGES_WORD])
        self.base_pfn = self.base_phys >> fmt.PAGE_SHIFT
        #: memory pages 0..npages-1 (file pages 1..npages) as one flat word array
        self.u64 = np.frombuffer(mm, dtype="<u8", count=self.npages * 512, offset=PS)
        self.tables = self.u64.reshape(-1, 512)
        self._free = np.ones(self.npages, bool)  #: per page: free for ``alloc``

    # ------------------------------------------------------------ lifecycle

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, base_phys: int | None = None, npages: int | None = None,
             create: bool = True, read_only: bool = False) -> EphemeralMemory:
        """Open (or, writable with ``create``, make) the ephemeral memory file at ``path``.

        Writable: ``base_phys`` is where the memory is (None: the header's), ``npages`` at
        least how many pages it has (None: ``DEFAULT_NPAGES``; the file never shrinks, so
        a bigger file keeps its size). The header is rewritten if it says otherwise; the
        contents are whatever the file held until ``poison()``. EBUSY while another
        writer has it open. Read-only: everything from the header, nothing changed.
        FormatError for a file that is not an ephemeral memory file, or whose header
        a read-only open cannot use.
        """
        path = os.fspath(path)
        if not read_only and create and (not os.path.exists(path) or os.path.getsize(path) == 0):
            if base_phys is None:
                raise StoreError(errno.EINVAL, f"{path}: a new ephemeral memory needs its base_phys")
            _create(path, base_phys, npages or DEFAULT_NPAGES)
        fd = os.open(path, os.O_RDONLY if read_only else os.O_RDWR)
        try:
            if not read_only:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise StoreError(errno.EBUSY, f"{path}: ephemeral memory in use by another daemon") from None
            size = os.fstat(fd).st_size
            raw = os.pread(fd, EPHEMERAL_HEADER_DTYPE.itemsize, 0)
            if len(raw) < EPHEMERAL_HEADER_DTYPE.itemsize or raw[:8] != EPHEMERAL_MAGIC:
                raise FormatError("ephemeral.magic", 0, f"{path} is not a pkfuse ephemeral memory file")
            hdr = np.frombuffer(raw, EPHEMERAL_HEADER_DTYPE)[0]
            why = _check_header(path, hdr, size)
            if read_only:
                if why:
                    raise FormatError("ephemeral header", 0, f"{path}: {why}")
                mm = mmap.mmap(fd, (1 + int(hdr["npages"])) * PS, access=mmap.ACCESS_READ)
            else:
                base = int(hdr["base_phys"]) if base_phys is None else base_phys
                want = max(npages or DEFAULT_NPAGES, 0 if why else int(hdr["npages"]))
                if base == 0 or base % PS or base + want * PS > PHYS_LIMIT:
                    raise StoreError(errno.EINVAL, f"{path}: ephemeral memory at {base:#x}, {want} pages, "
                                     "must be 4 KiB aligned, not at 0, and below 2**52")
                if size < (1 + want) * PS:
                    os.ftruncate(fd, (1 + want) * PS)  # sparse
                mm = mmap.mmap(fd, (1 + want) * PS, access=mmap.ACCESS_WRITE)
                words = np.frombuffer(mm, dtype="<u8", count=EPHEMERAL_HEADER_DTYPE.itemsize // 8)
                if why or int(words[_BASE_WORD]) != base or int(words[_NPAGES_WORD]) != want:
                    _write_header(words, base, want, int(words[_BOOT_WORD]))
                del words
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, mm, read_only)

    def close(self) -> None:
        if self._mm.closed:
            return
        del self.header, self._words, self.u64, self.tables
        try:
            self._mm.close()
        except BufferError:  # a view handed out is still alive: the mapping goes with it
            pass
        os.close(self._fd)

    def __enter__(self) -> EphemeralMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"EphemeralMemory({self.path}, {self.base_phys:#x}+{self.npages} pages, boot {self.boot_id})"

    # ------------------------------------------------------------ contents

    @property
    def boot_id(self) -> int:
        return int(self._words[_BOOT_WORD])

    @property
    def end_phys(self) -> int:
        return self.base_phys + self.npages * PS

    def region(self) -> tuple[np.ndarray, int, int]:
        """(u64, base_phys, npages): the memory as ``backing.walker.translate`` reads it."""
        return self.u64, self.base_phys, self.npages

    def poison(self) -> None:
        """What a restart does to host RAM: every page 0xFF, every allocation forgotten,
        the header rewritten with the next ``boot_id``."""
        self._writable()
        self.u64.fill(_U64_POISON)
        self._free[:] = True
        _write_header(self._words, self.base_phys, self.npages, self.boot_id + 1)

    # ------------------------------------------------------------ allocator

    @property
    def free_pages(self) -> int:
        return int(np.count_nonzero(self._free))

    def alloc(self, k: int) -> np.ndarray:
        """The ``k`` lowest free pages (int64 memory pages, ascending), now in use; their
        contents are poison or stale. ENOMEM (nothing taken) if fewer are free."""
        self._writable()
        if k <= 0:
            return np.zeros(0, np.int64)
        free = np.flatnonzero(self._free)
        if free.size < k:
            raise StoreError(errno.ENOMEM, f"ephemeral memory {self.path} has {free.size} free pages of "
                             f"{self.npages}, {k} wanted (open it with more pages)")
        take = free[:k].astype(np.int64)
        self._free[take] = False
        return take

    def free(self, pages: np.ndarray) -> None:
        """Poison ``pages`` (in use) and make them free. ValueError for a page that is not
        in use, or outside the memory, without changing anything."""
        self._writable()
        pages = np.asarray(pages, np.int64).ravel()
        if not pages.size:
            return
        if pages.min() < 0 or pages.max() >= self.npages or self._free[pages].any() \
                or np.unique(pages).size != pages.size:
            raise ValueError(f"freeing ephemeral pages not in use: {pages[:8].tolist()}...")
        self.tables[pages] = _U64_POISON
        self._free[pages] = True

    def pages_of(self, phys_addrs: np.ndarray) -> np.ndarray:
        """Memory page of each physical address (int64; outside the memory: -1)."""
        p = (np.asarray(phys_addrs, np.uint64) >> np.uint64(fmt.PAGE_SHIFT)).astype(np.int64) - self.base_pfn
        return np.where((p >= 0) & (p < self.npages), p, -1)

    def _writable(self) -> None:
        if self.read_only:
            raise StoreError(errno.EROFS, f"ephemeral memory {self.path} opened read-only")


def _write_header(words: np.ndarray, base_phys: int, npages: int, boot_id: int) -> None:
    """Rewrite the fields after the magic, each one aligned store, ``boot_id`` last."""
    hdr = np.zeros(1, EPHEMERAL_HEADER_DTYPE)
    hdr["magic"], hdr["version"], hdr["page_size"] = EPHEMERAL_MAGIC, EPHEMERAL_VERSION, PS
    hdr["base_phys"], hdr["npages"], hdr["boot_id"] = base_phys, npages, boot_id
    new = hdr.view("<u8")
    for i in range(1, new.size):
        words[i] = new[i]


def _create(path: str, base_phys: int, npages: int) -> None:
    """A new file at ``path``: header complete in a temporary file, then renamed into place."""
    tmp = f"{path}.tmp.{os.getpid()}"
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.ftruncate(fd, (1 + npages) * PS)  # sparse: pages read as zero until poisoned
        hdr = np.zeros(1, EPHEMERAL_HEADER_DTYPE)
        hdr["magic"], hdr["version"], hdr["page_size"] = EPHEMERAL_MAGIC, EPHEMERAL_VERSION, PS
        hdr["base_phys"], hdr["npages"], hdr["boot_id"] = base_phys, npages, 0
        os.pwrite(fd, hdr.tobytes(), 0)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    os.rename(tmp, path)
