"""backing.iommufd against a pure-Python model: every id, IOVA, errno, translation and pin.

A hypothesis state machine drives random call sequences through two
contexts at once (the kernel layer directly, no socket) on a 64 MiB image
with three guest files of 1, 3 and 5 MiB in two or three extents each, some
2 MiB aligned and some not; each context starts with an IOAS and a bound
device, and a rule may close it (its process exits) and open a new one. The
model is a few dicts -- per context its objects by id (IOAS areas by IOVA,
HWPTs with their devices, devices with their HWPT), the bound requesters,
the destroyed domains still in their grace period -- and every call must
give the model's result: the same errno, or success with the same id, IOVA
or unmapped length. An automatic IOVA is the kernel's choice: the model
takes any that is non-zero, free, inside 48 bits and congruent to the file's
physical address modulo the largest leaf the length allows, and records it.

After every step: a device's translation caches (``backing.iotlb``), polled
after the step, translate every IOVA ever mapped as a fresh walk does, for
every requester -- the driver posted every invalidation the step needed;
each HWPT's domain translates exactly its IOAS's areas
(every page: its physical address, write bit, file and offset); every
attached requester's context entry points at its HWPT's domain and the
walker translates through it from the root table; a dying domain still
translates what it did when it died, is attached to nothing, and is not
freed before its grace period ends (nor kept after a reap once it has); the
pins are the areas' plus what dying domains map. ``backing.iommu`` runs on
the machine's clock, which a rule advances; at teardown everything is
closed, the grace period skipped and reaped, and fsck finds the image clean
with every page back in the pool.

Where several faults meet in one call the model follows the order of
``backing.iommufd``'s checks; each single fault has the Linux errno
(drivers/iommu/iommufd: ioas.c, io_pagetable.c, hw_pagetable.c, device.c).
Object ids are never reused within a context (pkfuse's choice; Linux's
xarray hands out the lowest free id).
"""

from __future__ import annotations

import dataclasses
import errno
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test

import backing.iommu
from backing import format as fmt
from backing.errors import StoreError
from backing.fsck import check_image
from backing.iommu import FREE_GRACE_S, Domain, Iommu
from backing.iommufd import IOVA_LIMIT, U64_MAX, Context, Iommufd
from backing.iotlb import TranslationCache
from backing.mkfs import mkfs
from backing.regs import default_path
from backing.store import Store

PS = fmt.PAGE_SIZE
MiB = 1 << 20
LEAVES = (1 << 30, 2 * MiB, PS)  #: what an automatic IOVA is aligned for, largest first
PROBES_KEPT = 64  #: IOVAs the cache invariant translates after each step
RIDS = (0x18, 0x20, 0x21, 0x100)  #: 00:03.0, 00:04.0, 00:04.1, 01:00.0
BAD_RIDS = (0x10000, 0x1FFFF)  #: not 16 bits


class Clock:
    """Stands in for the ``time`` module of ``backing.iommu``: the grace periods run on it."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += max(seconds, 0.0)


# ------------------------------------------------------------------ model


@dataclasses.dataclass(frozen=True)
class MArea:
    iova: int
    length: int
    ino: int
    offset: int
    write: bool


@dataclasses.dataclass
class MIoas:
    kind = "ioas"
    areas: dict[int, MArea] = dataclasses.field(default_factory=dict)  #: by iova
    hwpts: list[int] = dataclasses.field(default_factory=list)

    def overlapping(self, first: int, last: int) -> list[MArea]:
        return sorted((a for a in self.areas.values() if a.iova <= last and a.iova + a.length - 1 >= first),
                      key=lambda a: a.iova)


@dataclasses.dataclass
class MHwpt:
    kind = "hwpt"
    ioas: int
    auto: bool
    domain: Domain  #: the real domain, captured when the HWPT was made
    devices: set[int] = dataclasses.field(default_factory=set)
    left: float = -math.inf  #: when a device last left it (detach, replace, close)


@dataclasses.dataclass
class MDev:
    kind = "device"
    rid: int
    hwpt: int | None = None


MObj = MIoas | MHwpt | MDev


class MCtx:
    """One open /dev/iommu: the real context and the model's objects in it."""

    def __init__(self, real: Context) -> None:
        self.real = real
        self.objs: dict[int, MObj] = {}
        self.next_id = 1

    def get(self, obj_id: int, *kinds: str) -> MObj | None:
        o = self.objs.get(obj_id)
        return o if o is not None and (not kinds or o.kind in kinds) else None

    def new_id(self) -> int:
        self.next_id += 1
        return self.next_id - 1


@dataclasses.dataclass
class Dying:
    domain: Domain
    free_after: float
    expect: tuple[np.ndarray, ...]  #: its translations when it died


class Mismatch(AssertionError):
    """The kernel layer and the model disagree about a call's outcome."""


# ------------------------------------------------------------- strategies

HUGE = (U64_MAX, U64_MAX - PS + 1, 1 << 63, 1 << 52)


def _unaligned(limit: int) -> st.SearchStrategy[int]:
    """A byte count below ``limit`` that is not a multiple of 4 KiB."""
    return st.tuples(st.integers(0, limit // PS - 1), st.integers(1, PS - 1)).map(lambda t: t[0] * PS + t[1])


def _pages(lo: int, hi: int) -> st.SearchStrategy[int]:
    """A multiple of 4 KiB in [lo, hi] (both multiples of 4 KiB)."""
    return st.integers(lo // PS, hi // PS).map(lambda n: n * PS)


#: which arguments of a map the draw spoils: mostly none, so that most maps are valid
FAULTS = ("none",) * 5 + ("start", "length", "iova", "start+length")


def _bad_start(size: int) -> st.SearchStrategy[int]:
    return st.one_of(_unaligned(size), st.sampled_from([size, size + PS, *HUGE]))


def _bad_length(room: int) -> st.SearchStrategy[int]:
    return st.one_of(st.just(0), _unaligned(room), st.sampled_from([room + PS, 2 * room, *HUGE]))


def _bad_iova(length: int) -> st.SearchStrategy[int]:
    return st.one_of(_unaligned(8 * MiB), st.sampled_from([max(IOVA_LIMIT - length + PS, 0), IOVA_LIMIT, *HUGE]))


def _expand(first: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """``first[i] + 0 .. counts[i]-1`` for every i, concatenated."""
    counts = np.asarray(counts, np.int64)
    total = int(counts.sum())
    if not total:
        return np.zeros(0, np.int64)
    starts = np.repeat(np.asarray(first, np.int64), counts)
    within = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
    return starts + within


class IommufdMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.path = Path(_tmpdir) / f"iommufd-{id(self)}.img"
        self.store: Store | None = None
        self.cache: TranslationCache | None = None  #: a device's caches, polled after every step
        self.probes: dict[int, None] = {}  #: IOVAs mapped at some point (the latest PROBES_KEPT)
        self.clock = Clock()
        self._saved_time = backing.iommu.time

    # ------------------------------------------------------------ set-up

    @initialize()
    def make_image(self) -> None:
        mkfs(self.path, 64 * MiB, force=True)
        backing.iommu.time = self.clock  # type: ignore[assignment]
        self.store = s = Store.open(self.path)
        self.io = Iommu.open(s, default_path(self.path))
        top = s.lookup(fmt.ROOT_INO, fmt.GUEST_DIR_NAME)

        def guest(name: bytes, size: int) -> int:
            ino = s.create(top, name, 0o644, 0, 0)
            s.truncate(ino, size)
            return ino

        a = guest(b"a", 2 * MiB)
        b = guest(b"b", 3 * MiB)
        s.truncate(a, 5 * MiB)  # a's last 3 MiB come after b's: a second (and third) extent
        c = guest(b"c", MiB)
        self.files = [(ino, s.getattr(ino).npages * PS) for ino in (a, b, c)]
        self.phys: dict[int, np.ndarray] = {}  #: ino -> physical page of each file page
        for ino, size in self.files:
            pages = np.zeros(size // PS, np.int64)
            extents = s.extents(ino)
            assert len(extents) >= 2
            for e in extents:
                pages[e.file_offset // PS : (e.file_offset + e.length) // PS] = (
                    e.phys_addr // PS + np.arange(e.length // PS))
            self.phys[ino] = pages
        self.free_pages = s.statfs().free_pages
        self.kernel = Iommufd(s, self.io)
        assert self.io.regs is not None
        self.cache = TranslationCache(s.image_u64, s.geometry.base_phys, s.geometry.npages, self.io.regs)
        self.ctxs = [MCtx(self.kernel.open_context()), MCtx(self.kernel.open_context())]
        self.bound: dict[int, MCtx] = {}
        self.dying: list[Dying] = []
        self.ever_attached = False
        for c, mc in enumerate(self.ctxs):  # something to map into and attach from the first step on
            assert mc.real.ioas_alloc() == mc.new_id()
            mc.objs[1] = MIoas()
            assert mc.real.device_bind(RIDS[c]) == mc.new_id()
            mc.objs[2] = MDev(RIDS[c])
            self.bound[RIDS[c]] = mc

    def teardown(self) -> None:
        try:
            if self.store is None:
                return
            self.cache = None  # its views of the image go before the store's mapping
            for mc in self.ctxs:
                mc.real.close()
            self.clock.now += 10 * FREE_GRACE_S  # the grace period, skipped
            assert self.kernel.reap() == 0.0
            assert self.kernel.dying == [] and self.io.domains == {} and self.io.attached == {}
            assert self.kernel.bound == {} and self.kernel.area_pins == {}
            assert not any(self.store.pin_hook(ino) for ino, _ in self.files)
            self.kernel.close()
            self.io.close()
            assert self.store.statfs().free_pages == self.free_pages  # no page leaked
            self.store.close()
            self.store = None
            status, findings = check_image(str(self.path))
            assert status == 0, findings
        finally:
            backing.iommu.time = self._saved_time
            if self.store is not None:
                self.store.close()
            self.path.unlink(missing_ok=True)

    # ------------------------------------------------------------ helpers

    def attempt(self, what: str, fn: Callable[[], Any], want: int | None) -> Any:
        """Run ``fn``: it must fail with errno ``want``, or succeed if ``want`` is None."""
        try:
            got = fn()
        except StoreError as exc:
            if exc.errno != want:
                model = "success" if want is None else errno.errorcode[want]
                raise Mismatch(f"{what}: {errno.errorcode.get(exc.errno, exc.errno)} ({exc}), "
                               f"the model says {model}") from exc
            return None
        if want is not None:
            raise Mismatch(f"{what}: returned {got!r}, the model says {errno.errorcode[want]}")
        return got

    def pick(self, data: st.DataObject, c: int, *kinds: str) -> int:
        """An id to pass to context ``c``: mostly one of the wanted kinds, else one of another
        kind, one that only the other context has, one never given out, or 0."""
        mc, other = self.ctxs[c], self.ctxs[1 - c]
        own = sorted(i for i, o in mc.objs.items() if o.kind in kinds)
        if own and data.draw(st.sampled_from([True] * 9 + [False]), label="own id?"):
            return data.draw(st.sampled_from(own), label="id")
        pool = [0, mc.next_id, mc.next_id + 5]
        pool += [i for i in mc.objs if i not in own]
        pool += [i for i in other.objs if i not in mc.objs]
        return data.draw(st.sampled_from(sorted(set(pool))), label="odd id")

    def ctx(self, data: st.DataObject) -> int:
        return data.draw(st.integers(0, 1), label="context")

    def expect_pages(self, areas: list[MArea]) -> tuple[np.ndarray, ...]:
        """(iova page, physical page, write, ino, file page) of every page of ``areas``, by IOVA."""
        areas = sorted(areas, key=lambda a: a.iova)
        n = np.array([a.length // PS for a in areas], np.int64)
        iova = _expand(np.array([a.iova // PS for a in areas], np.int64), n)
        filepage = _expand(np.array([a.offset // PS for a in areas], np.int64), n)
        phys = (np.concatenate([self.phys[a.ino][a.offset // PS : a.offset // PS + a.length // PS] for a in areas])
                if areas else np.zeros(0, np.int64))
        write = np.repeat(np.array([a.write for a in areas], bool), n)
        ino = np.repeat(np.array([a.ino for a in areas], np.int64), n)
        return iova, phys, write, ino, filepage

    @staticmethod
    def domain_pages(d: Domain) -> tuple[np.ndarray, ...]:
        ms = d.mappings()
        n = np.array([m.length // PS for m in ms], np.int64)
        return (_expand(np.array([m.iova // PS for m in ms], np.int64), n),
                _expand(np.array([m.phys_addr // PS for m in ms], np.int64), n),
                np.repeat(np.array([m.write for m in ms], bool), n),
                np.repeat(np.array([m.ino for m in ms], np.int64), n),
                _expand(np.array([m.file_offset // PS for m in ms], np.int64), n))

    def free_hwpt(self, mc: MCtx, hid: int) -> None:
        """The HWPT goes; its domain dies, freed once its grace period has passed."""
        h = mc.objs.pop(hid)
        assert isinstance(h, MHwpt) and not h.devices
        ioas = mc.objs[h.ioas]
        assert isinstance(ioas, MIoas)
        ioas.hwpts.remove(hid)
        self.dying.append(Dying(h.domain, h.left + FREE_GRACE_S, self.expect_pages(list(ioas.areas.values()))))

    def leave(self, mc: MCtx, dev_id: int) -> None:
        """Device ``dev_id`` leaves its HWPT, which goes if it was automatic and is now unused."""
        dev = mc.objs[dev_id]
        assert isinstance(dev, MDev) and dev.hwpt is not None
        h = mc.objs[dev.hwpt]
        assert isinstance(h, MHwpt)
        h.devices.discard(dev_id)
        h.left = self.clock.now
        old, dev.hwpt = dev.hwpt, None
        if h.auto and not h.devices:
            self.free_hwpt(mc, old)

    def areas_of(self, ino: int) -> int:
        return sum(1 for mc in self.ctxs for o in mc.objs.values() if isinstance(o, MIoas)
                   for a in o.areas.values() if a.ino == ino)

    # ------------------------------------------------------------- IOAS

    @rule(data=st.data())
    def ioas_alloc(self, data: st.DataObject) -> None:
        mc = self.ctxs[self.ctx(data)]
        got = self.attempt("ioas_alloc", mc.real.ioas_alloc, None)
        want = mc.new_id()
        assert got == want, f"ioas_alloc gave id {got}, the model says {want}"
        mc.objs[want] = MIoas()

    @rule(data=st.data())
    def ioas_map_file_fixed(self, data: st.DataObject) -> None:
        self.map_file(data, fixed=True)

    @rule(data=st.data())
    def ioas_map_file_auto(self, data: st.DataObject) -> None:
        self.map_file(data, fixed=False)

    def map_file(self, data: st.DataObject, *, fixed: bool) -> None:
        c = self.ctx(data)
        mc = self.ctxs[c]
        ioas_id = self.pick(data, c, "ioas")
        ino, size = data.draw(st.sampled_from(self.files), label="file")
        fault = data.draw(st.sampled_from(FAULTS), label="fault")
        start = data.draw(st.one_of(st.sampled_from([0, 2 * MiB, size - PS]), _pages(0, size - PS)), label="start")
        if "start" in fault:
            start = data.draw(_bad_start(size), label="bad start")
        room = max(size - start, PS)
        length = data.draw(st.one_of(st.sampled_from([room, PS, min(2 * MiB, room)]), _pages(PS, room)),
                           label="length")
        if "length" in fault:
            length = data.draw(_bad_length(room), label="bad length")
        ioas = mc.get(ioas_id, "ioas")
        iova = None
        if fixed:
            iova = data.draw(self.iovas(ioas if isinstance(ioas, MIoas) else None, length), label="iova")
            if fault == "iova":
                iova = data.draw(_bad_iova(length), label="bad iova")
        write = data.draw(st.booleans(), label="writeable")
        want = self.map_errno(ioas, size, start, length, iova)
        what = f"ioas_map_file(ioas {ioas_id}, ino {ino}, {start:#x}, {length:#x}, " \
               f"{'auto' if iova is None else hex(iova)})"
        got = self.attempt(what, lambda: mc.real.ioas_map_file(ioas_id, ino, start, length, iova, writeable=write),
                           want)
        if want is not None:
            return
        assert isinstance(ioas, MIoas)
        if iova is not None:
            assert got == iova, f"{what} returned {got:#x}"
        else:
            phys = int(self.phys[ino][start // PS]) * PS
            align = next(s for s in LEAVES if s <= length)
            assert got % PS == 0 and got > 0, f"{what}: automatic IOVA {got:#x}"  # the kernel never picks 0
            assert got % align == phys % align, f"{what}: IOVA {got:#x} not congruent to {phys:#x} mod {align:#x}"
            assert got + length <= IOVA_LIMIT, f"{what}: IOVA {got:#x} beyond 48 bits"
            assert not ioas.overlapping(got, got + length - 1), f"{what}: IOVA {got:#x} overlaps a map"
        ioas.areas[got] = MArea(got, length, ino, start, write)

    def iovas(self, ioas: MIoas | None, length: int) -> st.SearchStrategy[int]:
        """Aligned IOVAs, often at, just before or just after an existing map."""
        near = [0]
        for a in ioas.areas.values() if ioas else ():
            near += [a.iova, a.iova + a.length, a.iova + PS, a.iova - length, a.iova - PS]
        return st.one_of(
            st.sampled_from(sorted({x for x in near if x >= 0})),
            _pages(0, 24 * MiB),
            st.integers(0, 16).map(lambda n: n * 2 * MiB),
            st.sampled_from([IOVA_LIMIT - 2 * MiB, max(IOVA_LIMIT - length, 0) // PS * PS]),
        )

    @staticmethod
    def map_errno(ioas: MIoas | None, size: int, start: int, length: int, iova: int | None) -> int | None:
        if (iova is not None and iova >= U64_MAX) or length >= U64_MAX:
            return errno.EOVERFLOW  # ioas.c, before the IOAS is looked up
        if ioas is None:
            return errno.ENOENT
        if length == 0:
            return errno.EINVAL
        if start + length - 1 > U64_MAX:
            return errno.EOVERFLOW  # check_add_overflow(start, length - 1)
        if iova is not None and iova + length - 1 > U64_MAX:
            return errno.EOVERFLOW
        if start % PS or length % PS or (iova is not None and iova % PS):
            return errno.EINVAL
        if start + length > size:
            return errno.EINVAL
        if iova is None:
            return None
        if iova + length > IOVA_LIMIT:
            return errno.EINVAL  # reserved: beyond the domain's aperture
        if ioas.overlapping(iova, iova + length - 1):
            return errno.EEXIST
        return None

    @rule(data=st.data())
    def ioas_unmap_maps(self, data: st.DataObject) -> None:
        """Unmap one or more whole maps, exactly or with room around them (which may cut a neighbour)."""
        self.unmap(data, odd=False)

    @rule(data=st.data())
    def ioas_unmap_odd(self, data: st.DataObject) -> None:
        """Unmap a range that cuts a map, misses everything, says everything, or overflows."""
        self.unmap(data, odd=True)

    def unmap(self, data: st.DataObject, *, odd: bool) -> None:
        c = self.ctx(data)
        mc = self.ctxs[c]
        ioas_id = self.pick(data, c, "ioas")
        ioas = mc.get(ioas_id, "ioas")
        areas = sorted(ioas.areas.values(), key=lambda a: a.iova) if isinstance(ioas, MIoas) else []
        if areas and not odd:
            i = data.draw(st.integers(0, len(areas) - 1), label="first map")
            j = data.draw(st.integers(i, min(i + 2, len(areas) - 1)), label="last map")
            lo, hi = areas[i].iova, areas[j].iova + areas[j].length
            before = data.draw(st.sampled_from([0, 0, PS, 2 * MiB]), label="room before")
            after = data.draw(st.sampled_from([0, 0, PS, 2 * MiB]), label="room after")
            iova, length = max(lo - before, 0), hi + after - max(lo - before, 0)
            self.check_unmap(mc, ioas_id, ioas, iova, length)
            return
        choices = [(0, U64_MAX), (1, U64_MAX), (U64_MAX, 1), (0, 0), (PS, 0), (U64_MAX - PS + 1, 2 * PS),
                   (1 << 63, 1 << 63), (0, IOVA_LIMIT), (IOVA_LIMIT, PS), (20 * MiB, 4 * MiB)]
        for a in areas:
            choices += [(a.iova, a.length), (a.iova + 1, a.length), (a.iova, a.length + 1), (a.iova, PS)]
            if a.length > PS:
                choices += [(a.iova + PS, a.length - PS), (a.iova, a.length - PS)]  # cutting it
            if a.iova >= PS:
                choices += [(a.iova - PS, a.length + 2 * PS), (a.iova - PS, 2 * PS)]
        if areas:
            lo, hi = areas[0].iova, max(a.iova + a.length for a in areas)
            choices += [(lo, hi - lo), (max(lo - 2 * MiB, 0), hi - lo + 4 * MiB)]
        iova, length = data.draw(st.one_of(
            st.sampled_from(choices),
            st.tuples(st.integers(0, 24 * MiB // PS).map(lambda n: n * PS),
                      st.integers(1, 4 * MiB // PS).map(lambda n: n * PS))), label="range")
        self.check_unmap(mc, ioas_id, ioas, iova, length)

    def check_unmap(self, mc: MCtx, ioas_id: int, ioas: MObj | None, iova: int, length: int) -> None:
        want, victims = self.unmap_outcome(ioas, iova, length)
        got = self.attempt(f"ioas_unmap(ioas {ioas_id}, {iova:#x}, {length:#x})",
                           lambda: mc.real.ioas_unmap(ioas_id, iova, length), want)
        if want is None:
            assert isinstance(ioas, MIoas)
            assert got == sum(a.length for a in victims), f"unmapped {got:#x}, the model {victims}"
            for a in victims:
                del ioas.areas[a.iova]

    @staticmethod
    def unmap_outcome(ioas: MObj | None, iova: int, length: int) -> tuple[int | None, list[MArea]]:
        if not isinstance(ioas, MIoas):
            return errno.ENOENT, []
        if iova == 0 and length == U64_MAX:
            return None, list(ioas.areas.values())
        if iova >= U64_MAX or length >= U64_MAX:
            return errno.EOVERFLOW, []  # ioas.c: only 0..U64_MAX may say "everything"
        if length == 0:
            return errno.EINVAL, []
        if iova + length - 1 > U64_MAX:
            return errno.EOVERFLOW, []
        last = iova + length - 1
        victims = ioas.overlapping(iova, last)
        if not victims or any(a.iova < iova or a.iova + a.length - 1 > last for a in victims):
            return errno.ENOENT, []  # nothing there, or a map it would cut
        return None, victims

    @rule(data=st.data())
    def ioas_iova_ranges(self, data: st.DataObject) -> None:
        c = self.ctx(data)
        ioas_id = self.pick(data, c, "ioas")
        want = None if self.ctxs[c].get(ioas_id, "ioas") else errno.ENOENT
        got = self.attempt(f"ioas_iova_ranges({ioas_id})", lambda: self.ctxs[c].real.ioas_iova_ranges(ioas_id), want)
        if want is None:
            assert got == ([(0, IOVA_LIMIT - 1)], PS)

    # ------------------------------------------------------------- HWPT

    @rule(data=st.data())
    def hwpt_alloc(self, data: st.DataObject) -> None:
        c = self.ctx(data)
        mc = self.ctxs[c]
        dev_id = self.pick(data, c, "device")
        pt_id = self.pick(data, c, "ioas")  # its odd ids include HWPTs and devices
        pt = mc.get(pt_id)
        if mc.get(dev_id, "device") is None:
            want = errno.ENOENT
        elif pt is None or isinstance(pt, MDev):
            want = errno.EINVAL  # hw_pagetable.c: any pt_id that is not an IOAS or a HWPT
        elif isinstance(pt, MHwpt):
            want = errno.EOPNOTSUPP  # a nested HWPT needs driver data, which pkfuse has none of
        else:
            want = None
        got = self.attempt(f"hwpt_alloc(dev {dev_id}, pt {pt_id})", lambda: mc.real.hwpt_alloc(dev_id, pt_id), want)
        if want is None:
            hid = mc.new_id()
            assert got == hid, f"hwpt_alloc gave id {got}, the model says {hid}"
            assert isinstance(pt, MIoas)
            pt.hwpts.append(hid)
            mc.objs[hid] = MHwpt(pt_id, False, mc.real.hwpt(hid).domain)

    # ----------------------------------------------------------- devices

    @rule(data=st.data())
    def device_bind(self, data: st.DataObject) -> None:
        mc = self.ctxs[self.ctx(data)]
        rid = data.draw(st.sampled_from(RIDS + BAD_RIDS), label="rid")
        if not 0 <= rid <= 0xFFFF:
            want = errno.EINVAL
        elif rid in self.bound:
            want = errno.EBUSY
        else:
            want = None
        got = self.attempt(f"device_bind({rid:#x})", lambda: mc.real.device_bind(rid), want)
        if want is None:
            dev_id = mc.new_id()
            assert got == dev_id, f"device_bind gave id {got}, the model says {dev_id}"
            mc.objs[dev_id] = MDev(rid)
            self.bound[rid] = mc

    @rule(data=st.data())
    def device_attach_ioas(self, data: st.DataObject) -> None:
        self.attach(data, "ioas")

    @rule(data=st.data())
    def device_attach_hwpt(self, data: st.DataObject) -> None:
        self.attach(data, "hwpt")

    def attach(self, data: st.DataObject, kind: str) -> None:
        c = self.ctx(data)
        mc = self.ctxs[c]
        dev_id = self.pick(data, c, "device")
        pt_id = self.pick(data, c, kind)
        dev, pt = mc.get(dev_id, "device"), mc.get(pt_id)
        target: int | None = None
        if dev is None or pt is None:
            want = errno.ENOENT
        elif isinstance(pt, MDev):
            want = errno.EINVAL  # device.c: the object is neither an IOAS nor a HWPT
        else:
            want = None
            if isinstance(pt, MHwpt):
                target = pt_id
            else:
                assert isinstance(pt, MIoas)
                target = next((h for h in pt.hwpts if getattr(mc.objs[h], "auto", False)), None)
        got = self.attempt(f"device_attach(dev {dev_id}, pt {pt_id})", lambda: mc.real.device_attach(dev_id, pt_id),
                           want)
        if want is not None:
            return
        assert isinstance(dev, MDev)
        if target is None:  # a new automatic HWPT for the IOAS
            assert isinstance(pt, MIoas)
            target = mc.new_id()
            pt.hwpts.append(target)
            mc.objs[target] = MHwpt(pt_id, True, mc.real.hwpt(target).domain)
        assert got == target, f"device_attach gave HWPT {got}, the model says {target}"
        if dev.hwpt != target:
            if dev.hwpt is not None:
                self.leave(mc, dev_id)
            dev.hwpt = target
            h = mc.objs[target]
            assert isinstance(h, MHwpt)
            h.devices.add(dev_id)
            self.ever_attached = True

    @rule(data=st.data())
    def device_detach(self, data: st.DataObject) -> None:
        c = self.ctx(data)
        mc = self.ctxs[c]
        dev_id = self.pick(data, c, "device")
        dev = mc.get(dev_id, "device")
        self.attempt(f"device_detach({dev_id})", lambda: mc.real.device_detach(dev_id),
                     None if dev else errno.ENOENT)
        if isinstance(dev, MDev) and dev.hwpt is not None:
            self.leave(mc, dev_id)

    # ----------------------------------------------------------- destroy

    @rule(data=st.data())
    def destroy(self, data: st.DataObject) -> None:
        c = self.ctx(data)
        mc = self.ctxs[c]
        obj_id = self.pick(data, c, *data.draw(st.sampled_from([("ioas",), ("hwpt",), ("device",)]), label="kind"))
        o = mc.get(obj_id)
        if o is None:
            want = errno.ENOENT
        elif (isinstance(o, MIoas) and o.hwpts) or (isinstance(o, MHwpt) and o.devices) or (
                isinstance(o, MDev) and o.hwpt is not None):
            want = errno.EBUSY
        else:
            want = None
        self.attempt(f"destroy({obj_id})", lambda: mc.real.destroy(obj_id), want)
        if want is not None:
            return
        if isinstance(o, MHwpt):
            self.free_hwpt(mc, obj_id)
            return
        del mc.objs[obj_id]
        if isinstance(o, MDev):
            del self.bound[o.rid]

    @rule(data=st.data())
    def close_context(self, data: st.DataObject) -> None:
        """The process holding context ``c`` exits; a new one opens /dev/iommu in its place."""
        c = self.ctx(data)
        mc = self.ctxs[c]
        mc.real.close()
        for dev_id, o in sorted(mc.objs.items()):
            if isinstance(o, MDev):
                if o.hwpt is not None:
                    self.leave(mc, dev_id)
                del self.bound[o.rid]
        for hid in [i for i, o in sorted(mc.objs.items()) if isinstance(o, MHwpt)]:
            self.free_hwpt(mc, hid)
        assert mc.real.objects == {} and mc.real not in self.kernel.contexts
        self.ctxs[c] = MCtx(self.kernel.open_context())

    # -------------------------------------------------------------- time

    @rule(dt=st.sampled_from([0.3, FREE_GRACE_S / 2, 1.2 * FREE_GRACE_S]))
    def tick(self, dt: float) -> None:
        self.clock.now += dt

    @rule()
    def reap(self) -> None:
        wait = self.kernel.reap()
        now = self.clock.now
        live = [d for d in self.dying if self.io.domains.get(d.domain.domain_id) is d.domain]
        for d in live:
            assert d.free_after > now, f"{d.domain} outlived its grace period ({now} >= {d.free_after})"
        want = min((d.free_after - now for d in live), default=0.0)
        assert wait == pytest.approx(want), f"reap says {wait}s to the next free, the model {want}s"

    # --------------------------------------------------------- invariants

    @invariant()
    def objects_match(self) -> None:
        if self.store is None:
            return
        assert sorted(map(id, self.kernel.contexts)) == sorted(id(mc.real) for mc in self.ctxs)
        for mc in self.ctxs:
            real = mc.real.objects
            assert {i: o.kind.value for i, o in real.items()} == {i: o.kind for i, o in mc.objs.items()}
            for i, o in mc.objs.items():
                r = real[i]
                if isinstance(o, MIoas):
                    assert [(a.iova, a.length, a.ino, a.offset, a.writeable) for a in r.areas] == [
                        (a.iova, a.length, a.ino, a.offset, a.write) for a in sorted(o.areas.values(),
                                                                                      key=lambda a: a.iova)]
                    assert sorted(h.id for h in r.hwpts) == sorted(o.hwpts)
                elif isinstance(o, MHwpt):
                    assert r.domain is o.domain and r.ioas.id == o.ioas and r.auto == o.auto
                    assert r.devices == o.devices
                else:
                    assert r.rid == o.rid and (r.hwpt.id if r.hwpt else None) == o.hwpt
        assert self.kernel.bound == {rid: mc.real for rid, mc in self.bound.items()}

    @invariant()
    def device_caches_translate_as_a_fresh_walk(self) -> None:
        if self.store is None or self.cache is None:
            return
        for mc in self.ctxs:
            for o in mc.objs.values():
                if isinstance(o, MIoas):
                    for a in o.areas.values():
                        for iova in (a.iova, a.iova + a.length // 2 // PS * PS, a.iova + a.length - PS):
                            self.probes.pop(iova, None)
                            self.probes[iova] = None
        while len(self.probes) > PROBES_KEPT:
            del self.probes[next(iter(self.probes))]
        if not self.probes:
            return
        iovas = np.array(list(self.probes), np.uint64)
        self.cache.poll()
        for rid in RIDS:
            for write in (False, True):
                phys, fault, hit = self.cache.translate(rid, iovas, write)
                walked, wfault = self.io.translate(rid >> 8, (rid >> 3) & 31, rid & 7, iovas, write)
                bad = (phys != walked) | (fault != wfault)
                if bad.any():
                    i = int(np.flatnonzero(bad)[0])
                    raise AssertionError(
                        f"stale translation: requester {fmt.requester_name(rid)} {'write' if write else 'read'} "
                        f"of IOVA {int(iovas[i]):#x} gave {int(phys[i]):#x} fault {int(fault[i]):#x} "
                        f"({'IOTLB hit' if hit[i] else 'walked'}), a fresh walk {int(walked[i]):#x} "
                        f"fault {int(wfault[i]):#x}")

    @invariant()
    def domains_translate_their_ioas(self) -> None:
        if self.store is None:
            return
        for mc in self.ctxs:
            for hid, h in mc.objs.items():
                if not isinstance(h, MHwpt):
                    continue
                ioas = mc.objs[h.ioas]
                assert isinstance(ioas, MIoas)
                want = self.expect_pages(list(ioas.areas.values()))
                got = self.domain_pages(h.domain)
                for name, w, g in zip(("iova", "phys", "write", "ino", "file page"), want, got):
                    assert np.array_equal(w, g), f"HWPT {hid} ({h.domain}): the {name} of its pages differ"
                for a in ioas.areas.values():  # the software walk agrees at each end
                    assert h.domain.translate_soft(a.iova) == int(self.phys[a.ino][a.offset // PS]) * PS
                    end = a.iova + a.length
                    if not ioas.overlapping(end, end):
                        assert h.domain.translate_soft(end) is None

    @invariant()
    def context_entries_point_at_the_hwpts(self) -> None:
        if self.store is None:
            return
        want: dict[int, int] = {}
        for mc in self.ctxs:
            for o in mc.objs.values():
                if isinstance(o, MDev) and o.hwpt is not None:
                    h = mc.objs[o.hwpt]
                    assert isinstance(h, MHwpt)
                    want[o.rid] = h.domain.domain_id
                    ioas = mc.objs[h.ioas]
                    assert isinstance(ioas, MIoas)
                    if ioas.areas:  # the walker, from the root table in the image, agrees
                        areas = sorted(ioas.areas.values(), key=lambda a: a.iova)
                        iovas = [a.iova for a in areas] + [a.iova + a.length - PS for a in areas]
                        phys, faults = self.io.translate(o.rid >> 8, (o.rid >> 3) & 31, o.rid & 7, iovas)
                        expect = [int(self.phys[a.ino][a.offset // PS]) * PS for a in areas] + [
                            int(self.phys[a.ino][(a.offset + a.length) // PS - 1]) * PS for a in areas]
                        assert faults.tolist() == [0] * len(iovas) and phys.tolist() == expect
        assert self.io.attached == want
        if self.ever_attached:
            assert self.io.regs is not None and self.io.regs.enabled

    @invariant()
    def dying_domains_wait_out_their_grace_period(self) -> None:
        if self.store is None:
            return
        live = {id(h.domain) for mc in self.ctxs for h in mc.objs.values() if isinstance(h, MHwpt)}
        dying = {id(d.domain) for d in self.dying}
        for d in self.io.domains.values():
            assert id(d) in live or id(d) in dying, f"{d} belongs to no HWPT and did not die"
        still = []
        for d in self.dying:
            present = self.io.domains.get(d.domain.domain_id) is d.domain
            if not present:
                assert d.free_after <= self.clock.now, f"{d.domain} freed before its grace period ended"
                continue
            still.append(d)
            assert d.domain.attached == []
            for w, g in zip(d.expect, self.domain_pages(d.domain)):
                assert np.array_equal(w, g), f"dying {d.domain} changed"
        self.dying = still

    @invariant()
    def pins_are_the_areas(self) -> None:
        if self.store is None:
            return
        counts = {ino: self.areas_of(ino) for ino, _ in self.files}
        assert self.kernel.area_pins == {ino: n for ino, n in counts.items() if n}
        for ino, _ in self.files:
            by_dying = any(d.domain.pins.get(ino) for d in self.dying)
            assert self.store.pin_hook(ino) == (counts[ino] > 0 or by_dying), f"pin of inode {ino}"


_tmpdir = ""


@pytest.fixture(autouse=True)
def _scratch(tmp_path: Path) -> None:
    global _tmpdir
    _tmpdir = str(tmp_path)


IommufdMachine.TestCase.settings = settings(
    max_examples=80, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    # no explain phase: re-running every shrunk step to explain it takes minutes on a machine this size
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
)
TestIommufdAgainstModel = IommufdMachine.TestCase


@pytest.mark.parametrize("posting", ["_flush_iotlb_psi", "_flush_context_device"])
def test_a_dropped_invalidation_fails_the_model(monkeypatch: pytest.MonkeyPatch, posting: str) -> None:
    """The cache invariant is not vacuous: without one posting call it finds a stale translation."""
    monkeypatch.setattr(Iommu, posting, lambda self, *a: None)
    with pytest.raises(AssertionError, match="stale translation"):
        run_state_machine_as_test(IommufdMachine, settings=settings(
            max_examples=300, stateful_step_count=40, deadline=None, database=None, derandomize=True,
            suppress_health_check=list(HealthCheck), phases=[Phase.generate]))
