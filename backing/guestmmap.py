"""The kernel's ``mmap(2)`` of a pkernfs guest-RAM file: which file, may the caller write it, its
pages as image offsets, and the pin a mapping holds.

The kernel serves a shared mapping of a pkernfs file by giving the VMA the
file's physical pages. pkfuse's daemon cannot give another process a
mapping, so ``GuestMaps.mmap`` answers with what the mapping is made of:
the file's extents as byte offsets of the image (runs contiguous in both the
file and the image merged) and the physical address of image offset 0; the
caller maps each extent of the image over its part of one reserved range
(``pkfuse.vmm.memory.GuestMemory``). The control socket's
``PKFUSE_GUEST_MMAP`` is the transport (``pkfuse.uapi.wire``).

Checks, in ``do_mmap``'s order: a descriptor not open for reading and
writing is EACCES (a shared writable mapping); a file that is not guest RAM
(IOMMU files, the live-update state, anything that is no inode of the image)
or that is empty is EINVAL.

The pin
-------
The kernel tears a truncated file's pages out of every VMA that maps them;
pkfuse cannot reach into another process's mappings. So a mapped file keeps
its size and its pages: ``Store.map_hook`` makes truncate (up or down), a
write past the end, unlink and a rename over the file EBUSY while any holder
maps it. A holder is whatever the caller names (the daemon: a control
connection); each ``mmap`` adds one pin of the holder on the file and
``release(holder)`` drops all of the holder's pins at once -- what closing
the connection, or its process dying, does. Pins are in memory only: a
restart of the daemon starts with none (the mappings of a killed daemon's
clients are the harness's business, as is a kexec'd kernel's).

Every method holds ``store.lock``.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
from collections import Counter
from collections.abc import Callable, Hashable

import numpy as np

from . import format as fmt
from .errors import StoreError
from .store import Store

log = logging.getLogger(__name__)

PS = fmt.PAGE_SIZE

#: one extent as the wire's ``pkfuse_guest_extent``: three little-endian u64, 24 bytes
GUEST_EXTENT_DTYPE = np.dtype([("file_offset", "<u8"), ("image_offset", "<u8"), ("length", "<u8")])


@dataclasses.dataclass(frozen=True)
class GuestMapping:
    """What a mapping of guest file ``ino`` is made of."""

    ino: int
    length: int  #: the file's size, bytes
    phys_base: int  #: physical address of image offset 0
    extents: np.ndarray  #: GUEST_EXTENT_DTYPE, sorted by file_offset, tiling [0, round_up(length, PS))


def merge_runs(file_pages: np.ndarray, pages: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Runs sorted by file page as GUEST_EXTENT_DTYPE bytes ranges, neighbours contiguous in both
    the file and the image merged into one (vectorized: a 16 GiB guest has up to 8192 runs)."""
    fp, pg, n = (np.asarray(a, np.int64) for a in (file_pages, pages, counts))
    if not fp.size:
        return np.zeros(0, GUEST_EXTENT_DTYPE)
    joins = (fp[1:] == fp[:-1] + n[:-1]) & (pg[1:] == pg[:-1] + n[:-1])
    starts = np.flatnonzero(np.r_[True, ~joins])
    ends = np.r_[starts[1:], fp.size]
    out = np.empty(starts.size, GUEST_EXTENT_DTYPE)
    out["file_offset"] = fp[starts] * PS
    out["image_offset"] = pg[starts] * PS
    out["length"] = (fp[ends - 1] + n[ends - 1] - fp[starts]) * PS
    return out


class GuestMaps:
    """The guest-RAM mappings of one store, by holder; installs itself as ``store.map_hook``.

    ``close`` puts back the hook it replaced. ``statistics()`` counts mapped
    files, pins and holders.
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self.pins: Counter[int] = Counter()  #: ino -> pins, over every holder
        self.holders: dict[Hashable, Counter[int]] = {}  #: holder -> ino -> its pins
        self.calls = 0  #: successful mmap calls
        self._prev_hook: Callable[[int], bool] | None = store.map_hook
        store.map_hook = self.mapped

    def mapped(self, ino: int) -> bool:
        """Store.map_hook: some holder maps ``ino``."""
        return self.pins.get(ino, 0) > 0 or bool(self._prev_hook and self._prev_hook(ino))

    def mmap(self, holder: Hashable, ino: int, accmode: int) -> GuestMapping:
        """Map guest file ``ino`` for ``holder``, from a descriptor opened with ``accmode``
        (``O_ACCMODE`` bits); pins the file until ``release(holder)``. StoreError: EACCES, EINVAL."""
        with self.store.lock:
            if accmode != os.O_RDWR:
                raise StoreError(errno.EACCES, "a shared writable mapping needs a descriptor open for "
                                               "reading and writing")
            st = self.store
            if not 0 < ino < st.geometry.inode_count or int(st.inodes["kind"][ino]) == fmt.KIND_FREE:
                raise StoreError(errno.EINVAL, f"inode {ino} is not a file of the image: nothing to map")
            kind = int(st.inodes["kind"][ino])
            if kind != fmt.KIND_GUEST:
                raise StoreError(errno.EINVAL, f"{st.path_of(ino).decode(errors='replace')} is a "
                                               f"{fmt.KIND_NAMES.get(kind, kind)} file, not guest RAM")
            size = int(st.inodes["size"][ino])
            if size == 0:
                raise StoreError(errno.EINVAL, f"{st.path_of(ino).decode(errors='replace')} is empty: "
                                               "a mapping of 0 bytes")
            fp, pg, n = st.extent_runs(ino)
            npages = -(-size // PS)
            keep = fp < npages  # guest files hold exactly their size's pages; never map past them
            fp, pg, n = fp[keep], pg[keep], np.minimum(n[keep], npages - fp[keep])
            extents = merge_runs(fp, pg, n)
            covered = int(extents["length"].sum()) if extents.size else 0
            if covered != npages * PS:
                raise StoreError(errno.EIO, f"inode {ino}: extents cover {covered:#x} bytes of {npages * PS:#x}")
            self.pins[ino] += 1
            self.holders.setdefault(holder, Counter())[ino] += 1
            self.calls += 1
            return GuestMapping(ino, size, st.geometry.base_phys, extents)

    def release(self, holder: Hashable) -> int:
        """Drop every pin of ``holder`` (its connection closed); returns how many there were."""
        with self.store.lock:
            mine = self.holders.pop(holder, None)
            if not mine:
                return 0
            self.pins.subtract(mine)
            for ino in [i for i, c in self.pins.items() if c <= 0]:
                del self.pins[ino]
            return sum(mine.values())

    def release_one(self, holder: Hashable, ino: int) -> None:
        """Drop one pin of ``holder`` on ``ino``: undo an ``mmap`` whose answer never reached the caller."""
        with self.store.lock:
            mine = self.holders.get(holder)
            if not mine or mine[ino] <= 0:
                return
            mine[ino] -= 1
            self.pins[ino] -= 1
            if mine[ino] <= 0:
                del mine[ino]
            if not mine:
                del self.holders[holder]
            if self.pins[ino] <= 0:
                del self.pins[ino]

    def held_by(self, holder: Hashable) -> int:
        """Pins ``holder`` holds (one per successful mmap)."""
        with self.store.lock:
            return sum(self.holders.get(holder, Counter()).values())

    def statistics(self) -> dict[str, int]:
        with self.store.lock:
            return {"files": len(self.pins), "pins": sum(self.pins.values()), "holders": len(self.holders),
                    "calls": self.calls}

    def close(self) -> None:
        """Drop every pin and put back the hook this replaced (if nothing replaced ours since)."""
        with self.store.lock:
            self.pins.clear()
            self.holders.clear()
            if self.store.map_hook == self.mapped:
                self.store.map_hook = self._prev_hook
