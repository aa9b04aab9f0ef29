"""``pkfuse bench`` area ``vmm``: guest memory made of the image's pages.

Targets (issue 12): the remap of a 16 GiB guest file as the allocator lays it
out -- the extents as ``PKFUSE_GUEST_MMAP`` computes them
(``backing.guestmmap``) and ``GuestMemory`` over them: the reserved range and
one ``mmap(MAP_SHARED | MAP_FIXED)`` per extent -- under 10 ms. The worst case,
16 GiB in 8192 scattered 2 MiB extents (two files grown in turn, so no two of
a file's extents touch), against the floor measured beside it: the same
number of plain ``mmap(MAP_FIXED)`` calls of a plain file at the same offsets,
with nothing else around them. The cost is the kernel's, one VMA split per
extent: it grows with extents, never with bytes (mapping touches no page).

The images are opened with ``backing.store.Store`` directly: no mount, no
socket (``pkfuse bench --only control`` measures the socket's round trips).
Images are sparse (``mkfs`` is; allocation is metadata only), so a 16 GiB
guest costs no disk. Each measure alternates with its baseline round by
round (``best_interleaved``).
"""

from __future__ import annotations

import argparse
import ctypes
import mmap
import os
import tempfile
import time
from collections.abc import Callable

from backing import format as fmt
from backing.guestmmap import GuestMaps
from backing.mkfs import mkfs
from backing.store import Store
from pkfuse.vmm.memory import MAP_FIXED, MAP_NORESERVE, PROT_NONE, GuestMemory, _libc

from . import Report, best_interleaved

MiB = 1 << 20
GiB = 1 << 30
HUGE = fmt.HUGE_PAGE


def _guest_file(store: Store, name: bytes) -> int:
    return store.create(store.lookup(fmt.ROOT_INO, fmt.GUEST_DIR_NAME), name, 0o600, 0, 0)


def _scattered(store: Store, size: int) -> int:
    """A guest file of ``size`` bytes in ``size / 2 MiB`` extents, none touching the next: grown
    2 MiB at a time in turn with a second file of the same size."""
    a, b = _guest_file(store, b"scattered"), _guest_file(store, b"spacer")
    for end in range(HUGE, size + 1, HUGE):
        store.truncate(a, end)
        store.truncate(b, end)
    return a


class _Remap:
    """One measure: the remap of guest file ``ino`` -- its extents, then GuestMemory over them."""

    def __init__(self, store: Store, maps: GuestMaps, image_fd: int, ino: int) -> None:
        self.store, self.maps, self.image_fd, self.ino = store, maps, image_fd, ino
        self.mem: GuestMemory | None = None
        self.close_s = float("inf")  #: the fastest close (one munmap of the range)

    def __call__(self) -> None:
        m = self.maps.mmap(self, self.ino, os.O_RDWR)
        self.mem = GuestMemory(self.image_fd, m.extents, m.extents["length"].sum().item(), phys_base=m.phys_base)

    def reset(self) -> None:
        if self.mem is not None:
            t = time.perf_counter()
            self.mem.close()
            self.close_s = min(self.close_s, time.perf_counter() - t)
            self.mem = None
        self.maps.release(self)


class _Floor:
    """The same number of bare ``mmap(MAP_FIXED)`` calls of a plain file over a reserved range."""

    def __init__(self, fd: int, offsets: list[int], length: int) -> None:
        self.fd, self.offsets, self.length = fd, offsets, length
        self.size = len(offsets) * length
        self.base: int | None = None

    def __call__(self) -> None:
        base = _libc.mmap(None, self.size, PROT_NONE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
        map_, prot, flags, fd, n = _libc.mmap, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED | MAP_FIXED, \
            self.fd, self.length
        for i, off in enumerate(self.offsets):
            map_(base + i * n, n, prot, flags, fd, off)
        self.base = base

    def reset(self) -> None:
        if self.base is not None:
            _libc.munmap(ctypes.c_void_p(self.base), self.size)
            self.base = None


def _interleaved(fns: list[_Remap | _Floor], rounds: int) -> list[float]:
    def before() -> None:
        for f in fns:
            f.reset()

    calls: list[Callable[[], object]] = list(fns)
    try:
        return best_interleaved(calls, rounds=rounds, before=before)
    finally:
        before()


def run(report: Report, args: argparse.Namespace) -> None:
    quick = bool(getattr(args, "quick", False))
    size = 2 * GiB if quick else 16 * GiB
    rounds = 3 if quick else 5
    label = f"{size // GiB} GiB"
    with tempfile.TemporaryDirectory(prefix="pkfuse-bench-vmm-", dir=getattr(args, "dir", None)) as tmp:
        # ---- as the allocator lays it out: a fresh image, one truncate
        laid = os.path.join(tmp, "laid.img")
        mkfs(laid, size + 512 * MiB)
        with Store.open(laid) as store:
            maps = GuestMaps(store)
            ino = _guest_file(store, b"vm0")
            store.truncate(ino, size)
            image_fd = os.open(laid, os.O_RDWR | os.O_CLOEXEC)
            try:
                remap = _Remap(store, maps, image_fd, ino)
                (t,) = _interleaved([remap], rounds)
                n = maps.mmap("count", ino, os.O_RDWR).extents.size
                maps.release("count")
            finally:
                os.close(image_fd)
                maps.close()
        report.add(f"remap a {label} guest as allocated ({n} extents)", t * 1e3, "ms", below=10,
                   detail=f"extents + reserve + {n} mmap; close (munmap) {remap.close_s * 1e3:.2f} ms")

        # ---- worst case: every 2 MiB extent on its own
        worst = os.path.join(tmp, "worst.img")
        mkfs(worst, 2 * size + 512 * MiB)
        plain = os.path.join(tmp, "plain.bin")
        with Store.open(worst) as store:
            maps = GuestMaps(store)
            t0 = time.perf_counter()
            ino = _scattered(store, size)
            t_setup = time.perf_counter() - t0
            m = maps.mmap("layout", ino, os.O_RDWR)
            maps.release("layout")
            n = m.extents.size
            offsets = m.extents["image_offset"].tolist()
            image_fd = os.open(worst, os.O_RDWR | os.O_CLOEXEC)
            plain_fd = os.open(plain, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                os.ftruncate(plain_fd, os.fstat(image_fd).st_size)  # sparse, as the image
                remap = _Remap(store, maps, image_fd, ino)
                floor = _Floor(plain_fd, offsets, HUGE)
                t_remap, t_floor = _interleaved([remap, floor], rounds)
                t_extents = min(_time(lambda: maps.mmap("x", ino, os.O_RDWR)) for _ in range(rounds))
                maps.release("x")
            finally:
                os.close(image_fd)
                os.close(plain_fd)
                maps.close()
        report.add(f"remap a {label} guest in {n} scattered 2 MiB extents", t_remap * 1e3, "ms",
                   detail=f"close (munmap) {remap.close_s * 1e3:.1f} ms; layout made in {t_setup:.1f} s")
        report.add(f"bare floor: {n} mmap(MAP_FIXED) of a plain file", t_floor * 1e3, "ms",
                   detail=f"{t_floor / n * 1e6:.1f} us per call")
        report.add(f"remap in {n} extents / bare mmap floor", t_remap / t_floor, "x", below=2,
                   detail=f"of it, the daemon's extents and merge {t_extents * 1e3:.2f} ms")

        # ---- KVM rows go here (added with pkfuse/vmm/kvm.py by its owner): KVM_SET_USER_MEMORY_REGION
        # of a mapped GuestMemory (remap + memslot), and VM creation, each against a baseline measured
        # beside it as above.


def _time(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t
