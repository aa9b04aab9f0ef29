"""``pkfuse bench`` area ``vmm``: guest memory made of the image's pages, and the engines over it.

Targets and figures (issue 12), all measured in one run:

- **Remap** of a 16 GiB guest file: the daemon's extents (``PKFUSE_GUEST_MMAP``
  as ``backing.guestmmap`` computes them), ``GuestMemory`` over them (the
  reserved range and one ``mmap(MAP_SHARED | MAP_FIXED)`` per extent) and the
  memory slot (``KVM_SET_USER_MEMORY_REGION`` of the whole range, into a VM
  made beforehand, outside the timing; the slot is deleted between rounds).
  As the allocator lays it out (one truncate of a fresh image): under 10 ms.
  The worst case, 8192 scattered 2 MiB extents, against the floor measured
  beside it: the same number of bare ``mmap(MAP_FIXED)`` calls of the same
  file at the same offsets. Its extents are computed -- a random permutation
  of the 2 MiB chunks of a sparse 16 GiB file, no two file-consecutive chunks
  image-consecutive (so none merge) -- because a store layout of 8192
  scattered 2 MiB extents takes a store call per extent (``scattered_layout``)
  and each scans the 16 GiB image's bitmap and extent table: 6 s here. The
  daemon's side of the call is timed on a real store layout of as many
  extents, made the same way in a small image with 4 KiB extents (2-4 s; its
  cost grows with extents, never with bytes). The mmaps' cost is the
  kernel's, one VMA split per extent; the slot's grows with bytes (KVM's
  per-page arrays), not with extents.
- **VM + memslot + vCPU creation** (``vm.Vm`` over a 16 GiB guest, one vCPU).
- **Guest fill bandwidth through KVM**: the guest program in ``MODE_FILL``
  (``rep stosq`` over its dirty area, then ``OUT PORT_DONE``), one vCPU, from
  start (resume) to its ``PORT_DONE``, alternating round by round with a host
  ``memset`` of the same mapping. Over pages already present: the file
  pre-faulted (``GuestMemory.populate``) and each round a cold boot of the same
  paused VM (``Vm.boot``), so the VM's own MMU keeps the mappings of the
  rounds before (the first pass of a new VM, which builds them, is shown
  apart); target >= 0.8x. On first touch: the area's pages punched out of the
  file before every round (the guest's and the host's alike), a figure.
- **The same fill on Unicorn** (``emulator.Emulator``), over a smaller area, a
  figure.
- **Pause to resume of one vCPU's save and restore** with the guest running
  (mode RUN): pause + save + a new VM + restore + start, the way a successor
  takes over (a restore into the same VM is refused by KVM once the vCPU has
  run: see ``_resume_rows``).

Without ``/dev/kvm`` the KVM rows are skipped with one line (and the remap has
no slot); without a guest binary, the fill and resume rows. The images are
opened with ``backing.store.Store`` directly: no mount, no socket (``pkfuse
bench --only control`` measures the socket's round trips). Files are sparse,
so a 16 GiB guest costs no disk. Each measure alternates with its baseline
round by round (``best_interleaved``'s reasoning: a slow spell of the shared
machine hits both).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import mmap
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator

import numpy as np

from backing import format as fmt
from backing.guestmmap import GuestMaps
from backing.mkfs import mkfs
from backing.store import Store, max_file_extents
from pkfuse.vmm import abi, boot, kvm, verify
from pkfuse.vmm.engine import EngineError
from pkfuse.vmm.memory import MAP_FIXED, MAP_NORESERVE, PROT_NONE, GuestMemory, _libc
from pkfuse.vmm.vm import Vm

from . import Report, best_interleaved

MiB = 1 << 20
GiB = 1 << 30
PS = fmt.PAGE_SIZE
HUGE = fmt.HUGE_PAGE
FILL_VALUE = 0x5A5A_0123_4567_89AB

_libc.fallocate.restype = ctypes.c_int
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
_PUNCH_HOLE = 0x03  #: FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE


def _guest_file(store: Store, name: bytes) -> int:
    return store.create(store.lookup(fmt.ROOT_INO, fmt.GUEST_DIR_NAME), name, 0o600, 0, 0)


def _sparse_file(path: str, size: int) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    os.ftruncate(fd, size)
    return fd


def _punch(fd: int, offset: int, length: int) -> None:
    """Drop the file's pages there (out of the page cache and every mapping): the next touch is a first one."""
    if _libc.fallocate(fd, _PUNCH_HOLE, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"fallocate(PUNCH_HOLE): {os.strerror(err)}")


def _med(xs: list[float]) -> float:
    return statistics.median(xs)


def _span(xs: list[float], scale: float = 1.0, f: str = ".2f") -> str:
    return f"{min(xs) * scale:{f}}-{max(xs) * scale:{f}}"


# ------------------------------------------------------------------ layouts
def scattered_layout(store: Store, name: bytes, n: int, unit: int) -> int:
    """A guest file of ``n`` extents of ``unit`` bytes, no two touching in both file and image; its ino.

    The allocator takes the lowest free runs that fit, so a file grown alone is
    one extent, and every separation costs a call (a call splits at most a run
    or two). Here ``k`` spacer files are grown ``unit`` at a time in turn (the
    image then holds them interleaved, spacer j at units j, j + k, ...), a
    filler takes what is left, then each spacer in turn is unlinked and the file
    grown into its holes, which are ``k`` units apart: file unit j * n/k + i is
    image unit i * k + j (a transpose), n + 2k + 1 calls in all instead of the
    2n of two files grown in turn, and the image need hold only the file.
    """
    k = min(256, n // 2)
    m, rest = divmod(n, k)
    assert m >= 2 and not rest, f"{n} extents: a multiple of {k}"
    root = store.lookup(fmt.ROOT_INO, fmt.GUEST_DIR_NAME)
    names = [b"%s.spacer%03d" % (name, j) for j in range(k)]
    spacers = [_guest_file(store, s) for s in names]
    for i in range(1, m + 1):
        for s in spacers:
            store.truncate(s, i * unit)
    free = store.statfs().free_pages
    if free:
        store.truncate(_guest_file(store, name + b".filler"), free * PS)
    ino = _guest_file(store, name)
    for j, s in enumerate(names):
        store.unlink(root, s)
        store.truncate(ino, (j + 1) * m * unit)
    return ino


def permuted_extents(n: int, unit: int, seed: int = 12) -> np.ndarray:
    """``(file_offset, image_offset, length)`` rows: file unit i at image unit perm[i], a random
    permutation with no file-consecutive pair image-consecutive (``GuestMemory`` merges such a pair)."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    while True:
        bad = np.flatnonzero(perm[1:] == perm[:-1] + 1) + 1
        if not bad.size:
            break
        other = rng.integers(0, n, bad.size)
        perm[bad], perm[other] = perm[other].copy(), perm[bad].copy()
    i = np.arange(n, dtype=np.int64)
    return np.stack([i * unit, perm.astype(np.int64) * unit, np.full(n, unit, np.int64)], axis=1)


# ------------------------------------------------------------------ remap measures
class _Slots:
    """A VM to register memory slots in (made once, outside every timing); ``vm_fd`` None without KVM."""

    def __init__(self) -> None:
        self.kvm_fd = self.vm_fd = -1
        self.why = ""
        try:
            self.kvm_fd = kvm.open_kvm()
            kvm.check_capabilities(self.kvm_fd, 1)
            self.vm_fd = kvm.create_vm(self.kvm_fd)
        except (EngineError, OSError) as e:
            self.why = str(e)
            self.close()

    @property
    def ok(self) -> bool:
        return self.vm_fd >= 0

    def set(self, mem: GuestMemory) -> None:
        kvm.set_user_memory_region(self.vm_fd, kvm.kvm_userspace_memory_region(
            slot=0, flags=0, guest_phys_addr=0, memory_size=mem.size, userspace_addr=mem.address))

    def delete(self) -> None:
        kvm.set_user_memory_region(self.vm_fd, kvm.kvm_userspace_memory_region(slot=0, memory_size=0))

    def close(self) -> None:
        for fd in (self.vm_fd, self.kvm_fd):
            if fd >= 0:
                os.close(fd)
        self.kvm_fd = self.vm_fd = -1


class _Remap:
    """One measure: the remap -- ``lookup()`` gives (extents, size, phys_base), GuestMemory over them
    in ``image_fd``, then the memory slot. Each round's parts in ``parts`` (seconds)."""

    def __init__(self, lookup: Callable[[], tuple[np.ndarray, int, int | None]], image_fd: int, slots: _Slots,
                 release: Callable[[], object] = lambda: None) -> None:
        self.lookup, self.image_fd, self.slots, self.release = lookup, image_fd, slots, release
        self.mem: GuestMemory | None = None
        self.slot = False
        self.parts: list[tuple[float, float, float]] = []  #: (extents, mmaps, slot) per round
        self.close_s = float("inf")  #: the fastest close (slot deleted, one munmap of the range)

    def __call__(self) -> None:
        clock = time.perf_counter
        t0 = clock()
        extents, size, phys_base = self.lookup()
        t1 = clock()
        self.mem = GuestMemory(self.image_fd, extents, size, phys_base=phys_base)
        t2 = clock()
        if self.slots.ok:
            self.slots.set(self.mem)
            self.slot = True
        t3 = clock()
        self.parts.append((t1 - t0, t2 - t1, t3 - t2))

    def reset(self) -> None:
        if self.mem is not None:
            t = time.perf_counter()
            if self.slot:
                self.slots.delete()
                self.slot = False
            self.mem.close()
            self.close_s = min(self.close_s, time.perf_counter() - t)
            self.mem = None
        self.release()

    def best(self) -> tuple[float, tuple[float, float, float], list[float]]:
        """(fastest total, its parts, every total)."""
        totals = [sum(p) for p in self.parts]
        i = int(np.argmin(totals))
        return totals[i], self.parts[i], totals


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


class _Lookup:
    """The daemon's side alone: ``GuestMaps.mmap`` of ``ino`` (its extents, merged), released after."""

    def __init__(self, maps: GuestMaps, ino: int) -> None:
        self.maps, self.ino, self.extents = maps, ino, 0

    def __call__(self) -> None:
        self.extents = self.maps.mmap(self, self.ino, os.O_RDWR).extents.size

    def reset(self) -> None:
        self.maps.release(self)


def _interleaved(fns: list[_Remap | _Floor | _Lookup], rounds: int) -> list[float]:
    def before() -> None:
        for f in fns:
            f.reset()

    calls: list[Callable[[], object]] = list(fns)
    try:
        return best_interleaved(calls, rounds=rounds, before=before)
    finally:
        before()


def _daemon_lookup(maps: GuestMaps, holder: object, ino: int) -> Callable[[], tuple[np.ndarray, int, int]]:
    def lookup() -> tuple[np.ndarray, int, int]:
        m = maps.mmap(holder, ino, os.O_RDWR)
        return m.extents, -(-m.length // PS) * PS, m.phys_base
    return lookup


def _remap_rows(report: Report, tmp: str, size: int, rounds: int, slots: _Slots) -> None:
    label = f"{size // GiB} GiB"
    what = "mmaps + memory slot" if slots.ok else "mmaps; no memory slot: " + slots.why

    # ---- as the allocator lays it out: a fresh image, one truncate
    laid = os.path.join(tmp, "laid.img")
    mkfs(laid, size + 512 * MiB)
    with Store.open(laid) as store:
        maps = GuestMaps(store)
        ino = _guest_file(store, b"vm0")
        store.truncate(ino, size)
        image_fd = os.open(laid, os.O_RDWR | os.O_CLOEXEC)
        holder = object()
        try:
            remap = _Remap(_daemon_lookup(maps, holder, ino), image_fd, slots, lambda: maps.release(holder))
            _interleaved([remap], rounds)
            n = maps.mmap("count", ino, os.O_RDWR).extents.size
            maps.release("count")
        finally:
            os.close(image_fd)
            maps.close()
    t, (t_ext, t_map, t_slot), totals = remap.best()
    report.add(f"remap a {label} guest as allocated ({n} extent{'' if n == 1 else 's'})", t * 1e3, "ms", below=10,
               detail=f"{what}; best of {rounds} ({_span(totals, 1e3)} ms): extents {t_ext * 1e3:.2f} + reserve "
                      f"and {n} mmap {t_map * 1e3:.2f} + slot {t_slot * 1e3:.2f} ms; close {remap.close_s * 1e3:.2f} ms")

    # ---- worst case: every 2 MiB extent on its own
    n = size // HUGE
    lookup_img = os.path.join(tmp, "lookup.img")
    # the smallest extent table that allows a file of n extents (max_file_extents: the journal is sized
    # by the table); each allocation scans the whole table, so no larger
    extent_count = 2 * n
    while max_file_extents(fmt.compute_geometry(n * PS + 8 * MiB, fmt.DEFAULT_BASE_PHYS, None, extent_count)) < n:
        extent_count += extent_count // 4
    mkfs(lookup_img, n * PS + 8 * MiB, extent_count=extent_count)
    plain = os.path.join(tmp, "scattered.img")
    extents = permuted_extents(n, HUGE)
    with Store.open(lookup_img) as store:
        maps = GuestMaps(store)
        t0 = time.perf_counter()
        ino = scattered_layout(store, b"scattered", n, PS)
        t_setup = time.perf_counter() - t0
        plain_fd = _sparse_file(plain, size)
        try:
            remap = _Remap(lambda: (extents, size, None), plain_fd, slots)
            floor = _Floor(plain_fd, extents[:, 1].tolist(), HUGE)
            lookup = _Lookup(maps, ino)
            _, t_floor, t_lookup = _interleaved([remap, floor, lookup], rounds)
        finally:
            os.close(plain_fd)
            maps.close()
    assert lookup.extents == n, f"the store layout has {lookup.extents} extents, not {n}"
    t, (_, t_map, t_slot), totals = remap.best()
    report.add(f"remap a {label} guest in {n} scattered 2 MiB extents", (t_lookup + t_map + t_slot) * 1e3, "ms",
               detail=f"{what}: daemon's extents {t_lookup * 1e3:.2f} (a store layout of {n} scattered 4 KiB "
                      f"extents, made in {t_setup:.1f} s) + reserve and {n} mmap {t_map * 1e3:.1f} (computed: "
                      f"a random permutation of a sparse {label} file's chunks) + slot {t_slot * 1e3:.1f} ms; "
                      f"best of {rounds}, mmaps + slot {_span(totals, 1e3, '.1f')} ms; close {remap.close_s * 1e3:.1f} ms")
    report.add(f"bare floor: {n} mmap(MAP_FIXED) of a plain file", t_floor * 1e3, "ms",
               detail=f"{t_floor / n * 1e6:.1f} us per call, the same offsets")
    report.add(f"remap's extents + mmaps in {n} extents / bare mmap floor", (t_lookup + t_map) / t_floor, "x",
               below=2, detail=f"the slot aside (the floor has none): {(t_lookup + t_map) * 1e3:.1f} ms vs "
                               f"{t_floor * 1e3:.1f} ms")


# ------------------------------------------------------------------ running the guest
class PortLog:
    """A port handler that times each vCPU's first ``PORT_DONE`` after ``arm()``.

    ``PORT_STARTED`` goes on; ``PORT_DONE`` goes on too unless ``stop_at_done``
    (the guest then spins on it: pause the VM); any other port (``PORT_ERROR``)
    stops the vCPU and is kept in ``errors``.
    """

    def __init__(self, nr_vcpus: int, *, stop_at_done: bool = False) -> None:
        self.nr_vcpus, self.stop_at_done = nr_vcpus, stop_at_done
        self.errors: list[tuple[int, int, int]] = []
        self._cond = threading.Condition()
        self.arm()

    def arm(self) -> None:
        with self._cond:
            self.done: list[float | None] = [None] * self.nr_vcpus

    def __call__(self, vcpu: int, port: int, value: int) -> bool:
        if port == abi.PORT_STARTED:
            return True
        with self._cond:
            if port == abi.PORT_DONE:
                if self.done[vcpu] is None:
                    self.done[vcpu] = time.perf_counter()
                    self._cond.notify_all()
                return not self.stop_at_done
            self.errors.append((vcpu, port, value))
            self._cond.notify_all()
            return False

    def wait_done(self, stopped: Callable[[], dict[int, str]], timeout: float = 120.0) -> float:
        """The time of the last vCPU's PORT_DONE; RuntimeError on an error port, a stop or the timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not all(d is not None for d in self.done):
                if self.errors or time.monotonic() > deadline:
                    raise RuntimeError(f"the fill guest did not finish: error ports {self.errors}, "
                                       f"stopped {stopped()}")
                self._cond.wait(0.05)
                if not self.stop_at_done and stopped():
                    raise RuntimeError(f"the fill guest stopped: {stopped()}")
            return max(d for d in self.done if d is not None)


def fill_params(area: int, nr_vcpus: int = 1) -> tuple[boot.GuestParams, int]:
    """Mode FILL over ``area`` bytes per vCPU: (the parameters, the RAM size they need)."""
    ram = abi.DIRTY_GPA + nr_vcpus * area  # the dirty area is all the RAM above DIRTY_GPA
    p = boot.GuestParams(nr_vcpus=nr_vcpus, ram_size=ram, mode=abi.MODE_FILL, dma_every=0, dirty_share=1.0,
                         fill_value=FILL_VALUE)
    assert int(p.config()["dirty_pages"]) * PS == area, "the area is not the dirty area"
    return p, ram


@contextlib.contextmanager
def _ram(path: str, size: int) -> Iterator[tuple[GuestMemory, int]]:
    """A sparse file of ``size`` bytes as guest RAM; yields (memory, the file's fd)."""
    fd = _sparse_file(path, size)
    mem = GuestMemory.of_file(fd, size)
    try:
        yield mem, fd
    finally:
        mem.close()
        os.close(fd)


def _check_filled(mem: GuestMemory, gpa: int, area: int) -> None:
    q = mem.array[gpa:gpa + area].view("<u8")[::PS // 8]  # a qword of every page
    if not (q == FILL_VALUE).all():
        raise RuntimeError("the guest's fill is not in its area")


def _host_memset(mem: GuestMemory, gpa: int, area: int) -> float:
    t = time.perf_counter()
    ctypes.memset(mem.address + gpa, 0x11, area)
    return time.perf_counter() - t


def kvm_fill_rounds(mem: GuestMemory, text: bytes, area: int, rounds: int, *,
                    before: Callable[[], object] = lambda: None) -> tuple[list[float], list[float]]:
    """Mode FILL on one vCPU of one VM over ``mem``, ``rounds`` times, each a cold boot of the paused VM
    (the first pass is the new VM's), each followed by a host memset of the same area; ``before`` runs
    (untimed) before every pass of either. Returns (guest seconds per pass, host seconds per memset)."""
    params, _ = fill_params(area)
    boot.write_boot(mem.array, params, text, fresh=True)
    ports = PortLog(1)
    guest, host = [], []
    with Vm(mem, 1, ports) as vm:
        for r in range(rounds):
            before()
            ports.arm()
            vm.boot()
            t0 = time.perf_counter()
            if r == 0:
                vm.start()
            else:
                vm.resume()
            guest.append(ports.wait_done(vm.stopped) - t0)
            vm.pause()
            _check_filled(mem, abi.DIRTY_GPA, area)
            before()
            host.append(_host_memset(mem, abi.DIRTY_GPA, area))
    return guest, host


def unicorn_fill_rounds(mem: GuestMemory, text: bytes, area: int, rounds: int, *,
                        before: Callable[[], object] = lambda: None) -> tuple[list[float], list[float]]:
    """As ``kvm_fill_rounds`` on Unicorn: a new Emulator each round (one cannot be booted twice)."""
    from pkfuse.vmm.emulator import Emulator

    params, _ = fill_params(area)
    boot.write_boot(mem.array, params, text, fresh=True)
    guest, host = [], []
    for _ in range(rounds):
        ports = PortLog(1, stop_at_done=True)
        with Emulator(mem, 1, ports) as emu:
            emu.boot()
            before()
            t0 = time.perf_counter()
            emu.start()
            guest.append(ports.wait_done(emu.stopped) - t0)
        _check_filled(mem, abi.DIRTY_GPA, area)
        before()
        host.append(_host_memset(mem, abi.DIRTY_GPA, area))
    return guest, host


def _gbs(area: int, secs: list[float]) -> list[float]:
    return [area / s / 1e9 for s in secs]


def _fill_rows(report: Report, engine: str, tmp: str, text: bytes, area: int, rounds: int,
               touch_area: int, touch_rounds: int, *, target: float | None) -> None:
    run_rounds = kvm_fill_rounds if engine == "kvm" else unicorn_fill_rounds
    name = "KVM" if engine == "kvm" else "Unicorn"
    _, ram_size = fill_params(area)
    with _ram(os.path.join(tmp, f"fill-{engine}.ram"), ram_size) as (mem, _fd):
        t = time.perf_counter()
        mem.populate()
        t_pop = time.perf_counter() - t
        guest, host = run_rounds(mem, text, area, rounds + 1 if engine == "kvm" else rounds)
    cold = ""
    if engine == "kvm":  # the first pass is the new VM's: its MMU maps every page on the way
        cold = f"; a new VM's first pass over them {_gbs(area, guest[:1])[0]:.2f} GB/s"
        guest = guest[1:]
    g, h = _gbs(area, guest), _gbs(area, host)
    report.add(f"{name} guest fill of {area // MiB} MiB, pages present", _med(g), "GB/s",
               detail=f"1 vCPU, rep stosq, start to PORT_DONE; median of {len(g)} ({_span(g)}); "
                      f"populated in {t_pop * 1e3:.0f} ms{cold}")
    report.add(f"{name} guest fill / host memset of the same mapping", _med(g) / _med(h), "x",
               at_least=target, detail=f"host memset median {_med(h):.2f} GB/s ({_span(h)}), alternating")

    _, ram_size = fill_params(touch_area)
    with _ram(os.path.join(tmp, f"touch-{engine}.ram"), ram_size) as (mem, fd):
        guest, host = run_rounds(mem, text, touch_area, touch_rounds,
                                 before=lambda: _punch(fd, abi.DIRTY_GPA, touch_area))
    g, h = _gbs(touch_area, guest), _gbs(touch_area, host)
    report.add(f"{name} guest fill of {touch_area // MiB} MiB, first touch", _med(g), "GB/s",
               detail=f"the area punched out of the file (and so of every mapping) before each pass; median of {len(g)} ({_span(g, f='.3f')})")
    report.add(f"{name} first-touch fill / host memset's first touch", _med(g) / _med(h), "x",
               detail=f"host first touch median {_med(h):.2f} GB/s ({_span(h)}), alternating")


# ------------------------------------------------------------------ KVM: creation, pause to resume
def _creation_row(report: Report, tmp: str, size: int, rounds: int) -> None:
    with _ram(os.path.join(tmp, "create.ram"), size) as (mem, _fd):
        totals, parts = [], []
        for _ in range(rounds):
            t = time.perf_counter()
            vm = Vm(mem, 1, PortLog(1))
            totals.append(time.perf_counter() - t)
            parts.append(vm.creation_ns)
            vm.close()
    i = int(np.argsort(totals)[len(totals) // 2])
    p = parts[i]
    report.add(f"KVM VM + memslot + vCPU creation, {size // GiB} GiB guest", _med(totals) * 1e3, "ms",
               detail=f"vm.Vm, 1 vCPU; median of {rounds} ({_span(totals, 1e3)} ms): open + checks + "
                      f"KVM_CREATE_VM {p['vm'] / 1e6:.2f}, memslot {p['memslot'] / 1e6:.2f}, vCPU + CPUID + "
                      f"MSR filter {p['vcpus'] / 1e6:.2f} ms")


def _resume_rows(report: Report, tmp: str, text: bytes, rounds: int) -> None:
    """Pause + save + a new VM + restore + start, the guest running in mode RUN; the guest checks at
    every step that its registers and RAM agree, and the verifier checks RAM at the end.

    (A restore into the same VM is not what a successor does, and ``Vm.restore`` fails there once the
    vCPU has run: its KVM_SET_CPUID2 of the saved entries gets EINVAL -- after KVM_RUN the kernel takes
    CPUID only when it equals what it holds.)"""
    size = 16 * MiB
    clock = time.perf_counter
    with _ram(os.path.join(tmp, "resume.ram"), size) as (mem, _fd):
        boot.write_boot(mem.array, boot.GuestParams(nr_vcpus=1, ram_size=size, dma_every=0, dirty_share=0.25),
                        text, fresh=True)
        ports = PortLog(1)
        vm = Vm(mem, 1, ports)
        try:
            vm.boot()
            vm.start()
            parts: list[tuple[float, ...]] = []
            for _ in range(rounds):
                _wait_in_run(vm)
                t0 = clock()
                vm.pause()
                t1 = clock()
                blobs = vm.save()
                t2 = clock()
                new = Vm(mem, 1, ports)
                t3 = clock()
                try:
                    new.restore(blobs)
                    t4 = clock()
                    new.start()
                except BaseException:
                    new.close()
                    raise
                parts.append((t1 - t0, t2 - t1, t3 - t2, t4 - t3, clock() - t4))
                old, vm = vm, new
                old.close()
            _wait_in_run(vm)
            time.sleep(0.01)
            vm.pause()
            verdict = verify.verify(mem.array)
            if vm.stopped() or ports.errors or not verdict.ok or verdict.vcpus[0].counter == 0:
                raise RuntimeError(f"the guest did not survive its restores: stopped {vm.stopped()}, "
                                   f"error ports {ports.errors}, {verdict.summary()}")
        finally:
            vm.close()
    names = ("pause", "save", "new Vm", "restore", "start")
    totals = [sum(p) for p in parts]
    med = [_med([p[k] for p in parts]) * 1e3 for k in range(len(names))]
    report.add("KVM pause to start of 1 vCPU: save, new VM, restore", _med(totals) * 1e3, "ms",
               detail=f"guest running; median of {rounds} ({_span(totals, 1e3)} ms): "
                      + ", ".join(f"{n} {v:.2f}" for n, v in zip(names, med)) + f" ms (medians); 16 MiB slot; "
                      f"then verified (counter {verdict.vcpus[0].counter})")


def _wait_in_run(vm: Vm, timeout: float = 10.0) -> None:
    """Until vCPU 0 is inside KVM_RUN (the guest running, not between exits)."""
    deadline = time.monotonic() + timeout
    v = vm.vcpus[0]
    while not v.in_run:
        if time.monotonic() > deadline:
            raise RuntimeError("vCPU 0 never entered KVM_RUN")
        time.sleep(0.0005)
    time.sleep(0.002)


def _guest_text() -> bytes | None:
    from pkfuse.vmm import guest

    try:
        return guest.load()
    except guest.GuestBuildError as e:
        print(f"vmm: fill and resume rows skipped (no guest binary: {e})", file=sys.stderr)
        return None


# ------------------------------------------------------------------ the area
def run(report: Report, args: argparse.Namespace) -> None:
    quick = bool(getattr(args, "quick", False))
    size = 2 * GiB if quick else 16 * GiB
    rounds = 3 if quick else 5
    fill_area = 256 * MiB if quick else 512 * MiB
    touch_area = 16 * MiB if quick else 64 * MiB
    emu_area = 16 * MiB if quick else 64 * MiB
    with tempfile.TemporaryDirectory(prefix="pkfuse-bench-vmm-", dir=getattr(args, "dir", None)) as tmp:
        slots = _Slots()
        have_kvm = slots.ok
        try:
            _remap_rows(report, tmp, size, rounds, slots)
        finally:
            slots.close()
        text = _guest_text()
        if not have_kvm:
            print(f"vmm: KVM rows skipped (no /dev/kvm: {slots.why})", file=sys.stderr)
        else:
            _creation_row(report, tmp, size, rounds)
            if text is not None:
                _fill_rows(report, "kvm", tmp, text, fill_area, rounds, touch_area, 2 if quick else 3,
                           target=0.8)
                _resume_rows(report, tmp, text, rounds if quick else 10)
        if text is not None:
            _fill_rows(report, "unicorn", tmp, text, emu_area, 2 if quick else 3, emu_area // 4, 1, target=None)
