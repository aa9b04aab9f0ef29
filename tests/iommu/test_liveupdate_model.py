"""backing.liveupdate against a pure-Python model: sessions, reboot(), restore, reclaim, every errno.

A hypothesis state machine drives random call sequences through boots of one
64 MiB image (a boot is a Store, its Iommu, Iommufd and LiveUpdate; a restart
is ``reboot()``, the boot closed -- the halted kernel releases nothing -- and
a new boot on the same image, which restores). The image holds three guest
files of 768, 512 and 256 KiB in two or three extents each; a VM is one
context with one IOAS mapping some of six fixed maps (whole files and parts
of them, writeable or not, at fixed IOVAs), one or two of three requester
ids bound, one HWPT and the devices attached to it.

The model is a few dicts and small records: the live domains (DID and the
maps they translate), which requester is attached to which domain, the VMs
(open or closed, and what a closed one kept), the outgoing sessions (files
and HWPTs by token), the incoming ones (files, restored HWPTs with their
maps, requesters, domain, adopter), the refused ones, the files' sizes.
Every call must give the model's result: the same errno, or success with the
same id and DID (a new domain takes the smallest free DID, an adopted one
keeps the preserved DID). ``reboot()``'s state must be the one the model
predicts, field by field; restore must accept and refuse exactly the
sessions the model says, with one finding for each session refused and
each domain freed, and nothing else.

Between boots a restart may corrupt the image offline: a page of a preserved
domain unmapped, a preserved file grown by a page, a byte of ``lu-state``
flipped (refused whole: the domains are left as they are, their devices
attached, and the state goes). A kill (no ``reboot()``) while incoming
sessions are unfinished restores them again.

After every step: every requester's context entry points at the model's
domain for it and the walker translates the first and last page of each map
through it from the root table; every live domain translates exactly its
maps, page by page (physical page, write bit, file and file page) and no
domain is left that the model does not know; files are frozen exactly when a
session holds them; IOASes are frozen exactly when an outgoing session
preserves their HWPT or their HWPT adopted a domain of a session not yet
finished; the bound requesters, the contexts still open or kept, the
sessions and the state file are the model's. Grace periods run on a fake
clock that each step advances past them (``test_iommufd_model`` checks the
grace periods themselves). At teardown everything is closed and freed and
fsck finds the image clean with every page back in the pool.

The tests at the bottom of this file are the bugs this machine found, now
fixed: an adopter's IOAS is frozen until its session finishes, finish waits
until every requester on an adopted domain is attached through the adopter,
the state's CRC covers its header, and a HWPT that adopted a domain of an
unfinished session cannot be preserved (EBUSY: a cancel unfroze its IOAS).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import itertools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, event, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import backing.iommu
from backing import format as fmt
from backing import fsck, lustate
from backing.errors import StoreError
from backing.iommu import FREE_GRACE_S, Domain, Iommu
from backing.iommufd import Context, Iommufd
from backing.liveupdate import IncomingSession, LiveUpdate, OutgoingSession, _read_state
from backing.lustate import SavedMap
from backing.regs import default_path
from backing.store import Store

PS = fmt.PAGE_SIZE
KiB = 1 << 10
MiB = 1 << 20
RIDS = (0x18, 0x20, 0x21)  #: 00:03.0, 00:04.0, 00:04.1
NAMES = (b"s0", b"s1", b"vm-" + b"y" * 60)  #: good session names (the last is 63 bytes)
BAD_NAMES = (b"", b"x" * 64, b"a\0b")
TOKENS = (1, 2, 3, 4, 5)
#: header bytes that the records' CRC does not cover and decode does not check
#: (see test_a_flipped_byte_of_the_state_header_is_noticed): the machine flips any other byte
UNCHECKED_HEADER = set(range(fmt.LU_HEADER_DTYPE.fields["boot"][1], fmt.LU_HEADER_DTYPE.fields["boot"][1] + 8)) | set(
    range(fmt.LU_HEADER_DTYPE.fields["domains"][1], fmt.LU_HEADER_DTYPE.fields["domains"][1] + 4))


class Clock:
    """Stands in for the ``time`` module of ``backing.iommu``: the grace periods run on it."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += max(seconds, 0.0)


class Boot:
    """One daemon's kernel state on ``path`` (the restore runs at open)."""

    def __init__(self, path: Path) -> None:
        self.store = Store.open(path)
        self.io = Iommu.open(self.store, default_path(path))
        self.fd = Iommufd(self.store, self.io)
        self.lu = LiveUpdate(self.store, self.fd)
        self.findings = self.lu.restore()

    def close(self) -> None:
        """A clean stop (after reboot(): the halted kernel releases nothing)."""
        self.fd.close()
        self.io.close()
        self.store.close()

    def kill(self) -> None:
        """A SIGKILL: the image as it is, nothing torn down."""
        self.io.close()
        self.store.close()


# ------------------------------------------------------------------ model


@dataclasses.dataclass(frozen=True)
class Slot:
    """One of the fixed maps an IOAS may have: ``length`` bytes of file ``f`` from ``offset``."""

    iova: int
    f: int  #: index into the machine's files
    offset: int
    length: int
    write: bool


#: file sizes (bytes; each file also has a 2-page tail that truncate adds and removes)
BASE = (768 * KiB, 512 * KiB, 256 * KiB)
TAIL = 2 * PS
SLOTS = (
    Slot(0x4000_0000, 0, 0, 768 * KiB, True),  # a whole file of three extents
    Slot(0x4100_0000, 0, 64 * KiB, 256 * KiB, False),  # across its first extent boundary, read-only
    Slot(0x4200_0000, 1, 0, 512 * KiB, True),
    Slot(0x4300_0000, 1, 0, 64 * KiB, False),
    Slot(0x4400_0000, 2, 0, 256 * KiB, True),
    Slot(0x4500_0000, 2, 128 * KiB, 128 * KiB, True),
)


@dataclasses.dataclass(eq=False)
class MDom:
    """A live domain: its DID and the slots it translates."""

    did: int
    maps: set[int]


@dataclasses.dataclass(eq=False)
class MVm:
    """One context: IOAS 1 with ``maps``, bound devices, at most one HWPT with ``dom``."""

    ctx: Context
    maps: set[int] | None = dataclasses.field(default_factory=set)  #: None: the IOAS is gone
    devs: dict[int, int] = dataclasses.field(default_factory=dict)  #: rid -> device id
    attached: set[int] = dataclasses.field(default_factory=set)  #: rids attached to the HWPT
    hwpt: int | None = None
    dom: MDom | None = None
    closed: bool = False
    next_id: int = 2  #: the IOAS is 1


@dataclasses.dataclass(eq=False)
class MOut:
    real: OutgoingSession
    name: bytes
    files: dict[int, int] = dataclasses.field(default_factory=dict)  #: token -> file index
    hwpts: dict[int, MVm] = dataclasses.field(default_factory=dict)  #: token -> the VM whose HWPT it is

    def tokens(self) -> set[int]:
        return set(self.files) | set(self.hwpts)


@dataclasses.dataclass(eq=False)
class MRest:
    """A preserved HWPT after the restart."""

    maps: frozenset[int]
    rids: frozenset[int]
    dom: MDom
    adopted_by: MVm | None = None


@dataclasses.dataclass(eq=False)
class MIn:
    name: bytes
    files: dict[int, int]  #: token -> file index
    hwpts: dict[int, MRest]
    retrieved: set[int] = dataclasses.field(default_factory=set)
    real: IncomingSession | None = None  #: what retrieve_session gave (the session fd)
    open: bool = False


class Mismatch(AssertionError):
    """The kernel layer and the model disagree about a call's outcome."""


def _expand(first: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """``first[i] + 0 .. counts[i]-1`` for every i, concatenated."""
    counts = np.asarray(counts, np.int64)
    total = int(counts.sum())
    if not total:
        return np.zeros(0, np.int64)
    starts = np.repeat(np.asarray(first, np.int64), counts)
    within = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
    return starts + within


def domain_pages(d: Domain) -> tuple[np.ndarray, ...]:
    """(iova page, physical page, write, ino, file page) of every page ``d`` maps, by IOVA."""
    ms = d.mappings()
    n = np.array([m.length // PS for m in ms], np.int64)
    return (_expand(np.array([m.iova // PS for m in ms], np.int64), n),
            _expand(np.array([m.phys_addr // PS for m in ms], np.int64), n),
            np.repeat(np.array([m.write for m in ms], bool), n),
            np.repeat(np.array([m.ino for m in ms], np.int64), n),
            _expand(np.array([m.file_offset // PS for m in ms], np.int64), n))


_make_image: Callable[..., Path] | None = None
_serial = itertools.count()


@pytest.fixture(autouse=True)
def _scratch(make_image: Callable[..., Path]) -> None:
    global _make_image
    _make_image = make_image


class LiveUpdateMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.b: Boot | None = None
        self.restarts = 0
        self.clock = Clock()
        self._saved_time = backing.iommu.time

    # ------------------------------------------------------------ set-up

    @initialize(preserve=st.sampled_from([(), (0,), (0, 1)]))
    def make_image(self, preserve: tuple[int, ...]) -> None:
        assert _make_image is not None
        self.path = _make_image("64M", name=f"lu-{next(_serial)}.img")
        backing.iommu.time = self.clock  # type: ignore[assignment]
        self.b = b = Boot(self.path)
        s = b.store
        self.free_pages = s.statfs().free_pages
        self.guest_dir = s.lookup(fmt.ROOT_INO, fmt.GUEST_DIR_NAME)
        names = [b"f0", b"f1", b"f2"]
        self.inos = [s.create(self.guest_dir, n, 0o644, 0, 0) for n in names]
        self.names = names
        # interleaved growth: every file in two or three extents
        for f, size in ((0, 128 * KiB), (1, 128 * KiB), (2, 64 * KiB), (0, 384 * KiB), (1, 512 * KiB),
                        (2, 256 * KiB), (0, 768 * KiB)):
            s.truncate(self.inos[f], size)
        self.igen = [s.getattr(ino).igen for ino in self.inos]
        self.size = list(BASE)
        self.phys: list[np.ndarray] = []  #: file -> physical page of each base page
        for f, ino in enumerate(self.inos):
            pages = np.zeros(BASE[f] // PS, np.int64)
            extents = s.extents(ino)
            assert len(extents) >= 2
            for e in extents:
                pages[e.file_offset // PS : (e.file_offset + e.length) // PS] = e.phys_addr // PS + np.arange(
                    e.length // PS)
            self.phys.append(pages)
        self.slot_pages = [self._slot_pages(k) for k in range(len(SLOTS))]
        # the model
        self.doms: list[MDom] = []
        self.att: dict[int, MDom] = {}  #: rid -> the domain its context entry points at
        self.vms: list[MVm] = []  #: this boot's contexts, open and closed
        self.outgoing: dict[bytes, MOut] = {}
        self.incoming: dict[bytes, MIn] = {}
        self.refused: set[bytes] = set()  #: this boot's restore refused them
        self.orphans: list[MDom] = []  #: left as they were by a state refused whole (until replaced)
        self.finished: list[IncomingSession] = []  #: finished sessions' fds, still open
        self.boot = 0
        self.restarts = 0
        # something to preserve from the first step on: one device on one HWPT, two on another
        self.open_vm([RIDS[0]], {0, 3})
        self.open_vm([RIDS[1], RIDS[2]], {2, 4})
        for i in preserve:  # and, mostly, already in a session
            if NAMES[0] not in self.outgoing:
                self.outgoing[NAMES[0]] = MOut(self.b.lu.create_session(NAMES[0]), NAMES[0])
            s = self.outgoing[NAMES[0]]
            vm = self.vms[i]
            assert vm.maps is not None and vm.hwpt is not None
            for f in sorted({SLOTS[k].f for k in vm.maps}):
                self.preserve_file(s, f, len(s.tokens()) + 1)
            self.preserve_hwpt(s, vm, vm.hwpt, len(s.tokens()) + 1)

    def teardown(self) -> None:
        try:
            if self.b is None:
                return
            event(f"restarts: {min(self.restarts, 3)}{'+' if self.restarts >= 3 else ''}")
            b = self.b
            b.fd.close()  # every context closed, every outgoing session dropped (no reboot)
            self.clock.now += 10 * FREE_GRACE_S
            io = b.io
            left = {r.dom.did for r in self.restored()} | {d.did for d in self.orphans}
            assert set(io.domains) == left, "domains that a close should have freed"
            for d in list(io.domains.values()):  # restored and orphan domains: what a VMM would reclaim
                for rid in d.attached:
                    io.detach(d, rid >> 8, (rid >> 3) & 0x1F, rid & 7)
                self.clock.now += 10 * FREE_GRACE_S
                io.destroy_domain(d)
            assert io.domains == {} and io.attached == {}
            b.lu.incoming.clear()
            from backing.liveupdate import _remove_state
            _remove_state(b.store)
            assert not any(b.store.pin_hook and b.store.pin_hook(ino) for ino in self.inos)
            for name in self.names:
                b.store.unlink(self.guest_dir, name)
            assert b.store.statfs().free_pages == self.free_pages  # no page leaked
            io.close()
            b.store.close()
            self.b = None
            status, findings = fsck.check_image(str(self.path))
            assert status == 0, findings
        finally:
            backing.iommu.time = self._saved_time
            if self.b is not None:
                self.b.kill()
            if hasattr(self, "path"):
                self.path.unlink(missing_ok=True)
                Path(default_path(self.path)).unlink(missing_ok=True)

    # ------------------------------------------------------------ helpers

    def _slot_pages(self, k: int) -> tuple[np.ndarray, ...]:
        s = SLOTS[k]
        n = s.length // PS
        first = s.offset // PS
        return (s.iova // PS + np.arange(n, dtype=np.int64), self.phys[s.f][first : first + n],
                np.full(n, s.write), np.full(n, self.inos[s.f], np.int64), first + np.arange(n, dtype=np.int64))

    def expect_pages(self, slots: set[int] | frozenset[int]) -> tuple[np.ndarray, ...]:
        parts = [self.slot_pages[k] for k in sorted(slots, key=lambda k: SLOTS[k].iova)]
        if not parts:
            return tuple(np.zeros(0, t) for t in (np.int64, np.int64, bool, np.int64, np.int64))
        return tuple(np.concatenate([p[i] for p in parts]) for i in range(5))

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

    def settle(self) -> None:
        """Past every grace period: the domains destroyed by the step are freed."""
        assert self.b is not None
        self.clock.now += 2 * FREE_GRACE_S
        assert self.b.fd.reap() == 0.0

    def open_vms(self) -> list[MVm]:
        return [v for v in self.vms if not v.closed]

    def restored(self) -> list[MRest]:
        return [r for s in self.incoming.values() for r in s.hwpts.values()]

    def preserved(self, vm: MVm) -> bool:
        return any(v is vm for s in self.outgoing.values() for v in s.hwpts.values())

    def ioas_frozen(self, vm: MVm) -> bool:
        """Map/unmap EBUSY: preserved by an outgoing session, or its HWPT adopted a restored
        domain whose session has not finished (a session given back must be what was preserved)."""
        return self.preserved(vm) or self.adopter_pending(vm)

    def adopter_pending(self, vm: MVm) -> bool:
        """``vm``'s HWPT took over a restored domain whose session has not finished."""
        return any(r.adopted_by is vm for r in self.restored())

    def bound(self) -> dict[int, MVm]:
        return {rid: v for v in self.vms for rid in v.devs}

    def frozen(self, f: int) -> bool:
        return any(f in s.files.values() for s in self.outgoing.values()) or any(
            f in s.files.values() for s in self.incoming.values())

    def pinned(self, f: int) -> bool:
        """An IOAS area or a domain maps a page of file ``f``."""
        areas = any(SLOTS[k].f == f for v in self.vms if v.maps is not None for k in v.maps)
        return areas or any(SLOTS[k].f == f for d in self.doms for k in d.maps)

    def new_did(self) -> int:
        used = {d.did for d in self.doms}
        return next(i for i in itertools.count(1) if i not in used)

    def reclaimed(self, r: MRest) -> bool:
        """Adopted with every requester on the domain attached through the adopter, or replaced."""
        on_dom = [rid for rid, d in self.att.items() if d is r.dom]
        if r.adopted_by is not None:
            return all(rid in r.adopted_by.attached for rid in on_dom)
        return not on_dom

    def pending(self, s: MIn) -> bool:
        return bool(set(s.files) - s.retrieved) or not all(self.reclaimed(r) for r in s.hwpts.values())

    def orphaned(self, d: MDom | None) -> bool:
        """``Iommufd.orphaned``: a domain left as it was by a restart that kept no session for it (the
        model's ``orphans``). Its requesters may be bound; the first attach elsewhere replaces it."""
        return d is not None and any(x is d for x in self.orphans)

    def attach_hw(self, vm: MVm, rid: int) -> None:
        """``rid`` attached to ``vm``'s HWPT; a left domain it was the last requester of is freed."""
        assert vm.dom is not None
        old = self.att.get(rid)
        orphan = old is not None and old is not vm.dom and self.orphaned(old)
        self.att[rid] = vm.dom
        vm.attached.add(rid)
        if orphan and not any(x is old for x in self.att.values()):
            event("replace: an unplanned restart's leftover domain freed")
            self.orphans = [x for x in self.orphans if x is not old]
            self.free_dom(old)

    def free_dom(self, d: MDom) -> None:
        assert not any(x is d for x in self.att.values()), f"domain {d.did} freed while attached"
        self.doms.remove(d)

    def detach_hw(self, rid: int) -> None:
        self.att.pop(rid)

    # ------------------------------------------------------------- VMs

    def open_vm(self, rids: list[int], slots: set[int], *, attach: bool = True) -> MVm:
        """A VMM: a context, IOAS 1 with ``slots``, ``rids`` bound, a HWPT for the first one bound
        (which adopts a restored domain if the model says so), every bound device attached to it
        unless not ``attach`` (a device on a restored domain then stays on it)."""
        assert self.b is not None
        vm = MVm(self.b.fd.open_context())
        self.vms.append(vm)
        assert vm.ctx.ioas_alloc() == 1
        assert vm.maps is not None
        for k in sorted(slots):
            s = SLOTS[k]
            got = self.attempt(f"ioas_map_file(slot {k})", lambda s=s: vm.ctx.ioas_map_file(
                1, self.inos[s.f], s.offset, s.length, s.iova, writeable=s.write), None)
            assert got == s.iova
            vm.maps.add(k)
        for rid in rids:
            may_bind = any(rid in r.rids and self.att.get(rid) is r.dom for r in self.restored()) \
                or self.orphaned(self.att.get(rid))
            want = errno.EBUSY if rid in self.bound() or (rid in self.att and not may_bind) else None
            got = self.attempt(f"device_bind({rid:#x})", lambda rid=rid: vm.ctx.device_bind(rid), want)
            if want is None:
                assert got == vm.next_id, f"device_bind gave id {got}, the model says {vm.next_id}"
                vm.devs[rid] = got
                vm.next_id += 1
        if not vm.devs:
            return vm
        rid0 = next(iter(vm.devs))
        adopt = next((r for r in self.restored() if r.adopted_by is None and rid0 in r.rids
                      and self.att.get(rid0) is r.dom and r.maps == frozenset(vm.maps)), None)
        hid = self.attempt("hwpt_alloc", lambda: vm.ctx.hwpt_alloc(vm.devs[rid0], 1), None)
        assert hid == vm.next_id
        vm.next_id += 1
        vm.hwpt = hid
        real = vm.ctx.hwpt(hid).domain
        if adopt is not None:
            event("adopt")
            vm.dom = adopt.dom
            adopt.adopted_by = vm
            assert real.domain_id == adopt.dom.did, f"adopted DID {real.domain_id}, preserved {adopt.dom.did}"
        else:
            vm.dom = MDom(self.new_did(), set(vm.maps))
            assert real.domain_id == vm.dom.did, f"new domain {real.domain_id}, the model says {vm.dom.did}"
            self.doms.append(vm.dom)
        for rid, dev in vm.devs.items() if attach else ():
            got = self.attempt(f"device_attach({rid:#x})", lambda dev=dev: vm.ctx.device_attach(dev, hid), None)
            assert got == hid
            if any(r.dom is self.att.get(rid) and r.dom is not vm.dom for r in self.restored()):
                event("replace: a device switched off its restored domain")
            self.attach_hw(vm, rid)
        return vm

    def release(self, vm: MVm) -> None:
        """What a closed context lets go (Context._release): all but what a session preserves;
        an adopted HWPT of an unfinished session goes back to it, its devices still attached."""
        r = next((r for r in self.restored() if r.adopted_by is vm), None)
        if r is not None:
            event("an adopter closed before finish: domain given back")
            r.adopted_by = None
            for rid in vm.attached:
                del vm.devs[rid]
            vm.attached.clear()
            vm.hwpt, vm.dom = None, None
        kept = vm.hwpt is not None and self.preserved(vm)
        for rid in list(vm.devs):
            if kept and rid in vm.attached:
                continue
            if rid in vm.attached:
                self.detach_hw(rid)
                vm.attached.discard(rid)
            del vm.devs[rid]
        if vm.hwpt is not None and not kept:
            assert vm.dom is not None and not vm.attached
            self.free_dom(vm.dom)
            vm.hwpt, vm.dom = None, None
        if not kept:
            vm.maps = None

    @rule(data=st.data())
    def vm_open(self, data: st.DataObject) -> None:
        rids = data.draw(st.lists(st.sampled_from(RIDS), min_size=1, max_size=2, unique=True), label="rids")
        slots = data.draw(st.sets(st.integers(0, len(SLOTS) - 1), min_size=1, max_size=3), label="slots")
        self.open_vm(rids, slots, attach=data.draw(st.sampled_from([True] * 4 + [False]), label="attach?"))
        self.settle()

    def pick_vm(self, data: st.DataObject) -> MVm:
        return data.draw(st.sampled_from(self.open_vms()), label="vm")

    @precondition(lambda self: self.open_vms())
    @rule(data=st.data())
    def vm_change(self, data: st.DataObject) -> None:
        """One iommufd call of a VMM: a map or an unmap (EBUSY while preserved), a detach or an attach."""
        op = data.draw(st.sampled_from([self.vm_map, self.vm_unmap, self.vm_detach, self.vm_reattach]), label="op")
        op(data)

    def vm_map(self, data: st.DataObject) -> None:
        self.map_slot(self.pick_vm(data), data.draw(st.integers(0, len(SLOTS) - 1), label="slot"))

    def map_slot(self, vm: MVm, k: int) -> None:
        if self.adopter_pending(vm):
            event("map of an adopter before finish (EBUSY)")
        s = SLOTS[k]
        assert vm.maps is not None
        want = errno.EBUSY if self.ioas_frozen(vm) else errno.EEXIST if k in vm.maps else None
        got = self.attempt(f"ioas_map_file(slot {k})", lambda: vm.ctx.ioas_map_file(
            1, self.inos[s.f], s.offset, s.length, s.iova, writeable=s.write), want)
        if want is None:
            assert got == s.iova
            vm.maps.add(k)
            if vm.dom is not None:
                vm.dom.maps.add(k)

    def vm_unmap(self, data: st.DataObject) -> None:
        vm = self.pick_vm(data)
        k = data.draw(st.integers(0, len(SLOTS) - 1), label="slot")
        s = SLOTS[k]
        assert vm.maps is not None
        want = errno.EBUSY if self.ioas_frozen(vm) else errno.ENOENT if k not in vm.maps else None
        got = self.attempt(f"ioas_unmap(slot {k})", lambda: vm.ctx.ioas_unmap(1, s.iova, s.length), want)
        if want is None:
            assert got == s.length
            vm.maps.discard(k)
            if vm.dom is not None:
                vm.dom.maps.discard(k)
        self.settle()

    def vm_detach(self, data: st.DataObject) -> None:
        if not any(v.devs for v in self.open_vms()):
            return
        vm = data.draw(st.sampled_from([v for v in self.open_vms() if v.devs]), label="vm")
        rid = data.draw(st.sampled_from(sorted(vm.devs)), label="rid")
        self.attempt(f"device_detach({rid:#x})", lambda: vm.ctx.device_detach(vm.devs[rid]), None)
        if rid in vm.attached:
            self.detach_hw(rid)
            vm.attached.discard(rid)
        self.settle()

    def vm_reattach(self, data: st.DataObject) -> None:
        if not any(v.devs and v.hwpt is not None for v in self.open_vms()):
            return
        vm = data.draw(st.sampled_from([v for v in self.open_vms() if v.devs and v.hwpt is not None]), label="vm")
        rid = data.draw(st.sampled_from(sorted(vm.devs)), label="rid")
        assert vm.hwpt is not None and vm.dom is not None
        hid = vm.hwpt
        got = self.attempt(f"device_attach({rid:#x})", lambda: vm.ctx.device_attach(vm.devs[rid], hid), None)
        assert got == hid
        self.attach_hw(vm, rid)

    @precondition(lambda self: self.open_vms())
    @rule(data=st.data())
    def vm_close(self, data: st.DataObject) -> None:
        """The VMM exits: its context closes."""
        vm = self.pick_vm(data)
        vm.ctx.close()
        vm.closed = True
        self.release(vm)
        self.settle()

    # ------------------------------------------------- outgoing sessions

    @rule(data=st.data())
    def lu_outgoing_call(self, data: st.DataObject) -> None:
        """One call on the outgoing side with arguments of any kind: create_session (names bad or
        in use), preserve_file (tokens and files in use), preserve_hwpt (ids of no HWPT, tokens in
        use, HWPTs preserved already, maps of files the session does not hold)."""
        op = data.draw(st.sampled_from([self.create_session, self.lu_preserve_file, self.lu_preserve_hwpt]),
                       label="op")
        op(data)

    def create_session(self, data: st.DataObject) -> None:
        assert self.b is not None
        name = data.draw(st.sampled_from(NAMES + BAD_NAMES), label="name")
        if name in BAD_NAMES:
            want = errno.EINVAL
        elif name in self.outgoing or name in self.incoming:
            want = errno.EEXIST
        else:
            want = None
        got = self.attempt(f"create_session({name!r})", lambda: self.b.lu.create_session(name), want)
        if want is None:
            self.outgoing[name] = MOut(got, name)

    def pick_out(self, data: st.DataObject) -> MOut:
        return data.draw(st.sampled_from(list(self.outgoing.values())), label="session")

    def preserve_file(self, s: MOut, f: int, token: int) -> None:
        assert self.b is not None
        if token in s.tokens():
            want = errno.EEXIST
        elif self.frozen(f):
            want = errno.EEXIST  # preserved already, by any session, incoming ones too
        else:
            want = None
        self.attempt(f"preserve_file({s.name!r}, f{f}, token {token})",
                     lambda: self.b.lu.preserve_file(s.real, self.inos[f], token), want)
        if want is None:
            s.files[token] = f

    def preserve_hwpt(self, s: MOut, vm: MVm, hwpt_id: int, token: int) -> None:
        assert self.b is not None
        assert vm.maps is not None
        if hwpt_id != vm.hwpt or vm.hwpt is None:
            want = errno.ENOENT
        elif token in s.tokens():
            want = errno.EEXIST
        elif self.preserved(vm):
            want = errno.EEXIST
        elif self.adopter_pending(vm):
            want = errno.EBUSY  # test_a_cancel_does_not_unfreeze_an_adopters_ioas
        elif any(SLOTS[k].f not in s.files.values() for k in vm.maps):
            want = errno.EINVAL  # a map of a file the session does not preserve
        else:
            want = None
        self.attempt(f"preserve_hwpt({s.name!r}, hwpt {hwpt_id}, token {token})",
                     lambda: self.b.lu.preserve_hwpt(s.real, vm.ctx, hwpt_id, token), want)
        event(f"preserve_hwpt {errno.errorcode[want] if want else 'ok'}")
        if want is None:
            s.hwpts[token] = vm

    def lu_preserve_file(self, data: st.DataObject) -> None:
        if not self.outgoing:
            return
        s = self.pick_out(data)
        f = data.draw(st.integers(0, 2), label="file")
        token = data.draw(st.sampled_from(TOKENS), label="token")
        self.preserve_file(s, f, token)

    def lu_preserve_hwpt(self, data: st.DataObject) -> None:
        if not (self.outgoing and self.open_vms()):
            return
        s = self.pick_out(data)
        vm = self.pick_vm(data)
        hwpt_id = data.draw(st.sampled_from([vm.hwpt or 99] * 4 + [1, 99]), label="hwpt id")
        token = data.draw(st.sampled_from(TOKENS), label="token")
        self.preserve_hwpt(s, vm, hwpt_id, token)

    def preserve_vm(self, data: st.DataObject) -> None:
        """A VMM preserving its VM, in a session of its own or an existing one: every file its
        IOAS maps, then its HWPT, each with a new token."""
        assert self.b is not None
        vm = data.draw(st.sampled_from([v for v in self.open_vms() if v.hwpt is not None]), label="vm")
        free = [n for n in NAMES if n not in self.outgoing and n not in self.incoming]
        if free and (not self.outgoing or data.draw(st.booleans(), label="new session?")):
            name = free[0]
            self.outgoing[name] = MOut(self.attempt("create_session", lambda: self.b.lu.create_session(name), None),
                                       name)
        if not self.outgoing:
            return
        s = self.pick_out(data)
        assert vm.maps is not None and vm.hwpt is not None

        def fresh() -> int:
            return next(t for t in itertools.count(1) if t not in s.tokens())

        for f in sorted({SLOTS[k].f for k in vm.maps}):
            if f not in s.files.values():
                self.preserve_file(s, f, fresh())
        self.preserve_hwpt(s, vm, vm.hwpt, fresh())

    # a preserved VM is what makes a restart interesting: thrice the weight
    @precondition(lambda self: any(v.hwpt is not None for v in self.open_vms()))
    @rule(data=st.data())
    def lu_preserve_vm(self, data: st.DataObject) -> None:
        self.preserve_vm(data)

    @precondition(lambda self: any(v.hwpt is not None for v in self.open_vms()))
    @rule(data=st.data())
    def lu_preserve_vm_2(self, data: st.DataObject) -> None:
        self.preserve_vm(data)

    @precondition(lambda self: any(v.hwpt is not None for v in self.open_vms()))
    @rule(data=st.data())
    def lu_preserve_vm_3(self, data: st.DataObject) -> None:
        self.preserve_vm(data)

    @precondition(lambda self: self.outgoing)
    @rule(data=st.data())
    def lu_cancel(self, data: st.DataObject) -> None:
        """The session fd closed: everything in it unpreserved, what closed contexts kept released."""
        assert self.b is not None
        s = self.pick_out(data)
        if data.draw(st.booleans(), label="close_session?"):
            self.b.lu.close_session(s.real)
        else:
            self.b.lu.cancel(s.real)
        del self.outgoing[s.name]
        for vm in self.vms:
            if vm.closed:
                self.release(vm)
        self.settle()

    @rule(data=st.data())
    def truncate(self, data: st.DataObject) -> None:
        """A size change of a guest file: EBUSY while preserved; shrinking EBUSY while mapped."""
        assert self.b is not None
        f = data.draw(st.integers(0, 2), label="file")
        size = data.draw(st.sampled_from([BASE[f], BASE[f] + TAIL]), label="size")
        if size == self.size[f]:
            want = None
        elif size < self.size[f] and (self.pinned(f) or self.frozen(f)):
            want = errno.EBUSY
        elif self.frozen(f):
            want = errno.EBUSY
        else:
            want = None
        self.attempt(f"truncate(f{f}, {size:#x})", lambda: self.b.store.truncate(self.inos[f], size), want)
        event(f"truncate {'EBUSY (frozen)' if want and self.frozen(f) else 'EBUSY (mapped)' if want else 'ok'}")
        if want is None:
            self.size[f] = size

    # ------------------------------------------------------------ restart

    def expected_state(self) -> list[tuple[Any, ...]]:
        out = []
        for s in self.outgoing.values():
            files = [(t, self.inos[f], self.igen[f], self.size[f]) for t, f in s.files.items()]
            hwpts = []
            for t, vm in s.hwpts.items():
                assert vm.dom is not None and vm.maps is not None
                maps = [tuple(SavedMap(SLOTS[k].iova, SLOTS[k].length, SLOTS[k].offset, self.inos[SLOTS[k].f],
                                       self.igen[SLOTS[k].f], SLOTS[k].write))
                        for k in sorted(vm.maps, key=lambda k: SLOTS[k].iova)]
                rids = sorted(rid for rid, d in self.att.items() if d is vm.dom)
                hwpts.append((t, vm.dom.did, maps, rids))
            out.append((s.name, files, hwpts))
        return out

    def translations(self) -> dict[int, tuple[np.ndarray, ...]]:
        assert self.b is not None
        return {rid: domain_pages(self.b.io.domains[d.did]) for rid, d in self.att.items()}

    @rule(data=st.data())
    def restart(self, data: st.DataObject) -> None:
        self.do_restart(data)

    @rule(data=st.data())
    def restart_2(self, data: st.DataObject) -> None:
        self.do_restart(data)

    @rule(data=st.data())
    def restart_3(self, data: st.DataObject) -> None:
        self.do_restart(data)

    def do_restart(self, data: st.DataObject) -> None:
        """reboot() (EAGAIN while incoming sessions are unfinished), then the next boot restores;
        sometimes with the image corrupted in between."""
        assert self.b is not None
        b = self.b
        if self.incoming:
            event("reboot EAGAIN")
            self.attempt("reboot", b.lu.reboot, errno.EAGAIN)
            assert not b.lu.rebooted and not b.fd.halted
            return
        state = self.attempt("reboot", b.lu.reboot, None)
        got = [(s.name, [(f.token, f.ino, f.igen, f.size) for f in s.files],
                [(h.token, h.domain_id, [tuple(m) for m in h.maps], sorted(h.rids)) for h in s.hwpts])
               for s in state.sessions]
        assert got == self.expected_state()
        kept = {vm.dom.did for s in self.outgoing.values() for vm in s.hwpts.values() if vm.dom is not None}
        drops = sorted(v.dom.did for v in self.vms if v.dom is not None and v.dom.did not in kept)
        assert (state.boot, state.domains, sorted(state.drops)) == (self.boot + 1, fmt.LU_DOMAINS_PERSISTENT, drops)
        self.boot += 1
        raw_len = len(lustate.encode(state))
        # the kernel is gone: every call ESHUTDOWN, nothing released
        for what, fn in [("create_session", lambda: b.lu.create_session(b"late")),
                         ("retrieve_session", lambda: b.lu.retrieve_session(b"s0")),
                         ("reboot", b.lu.reboot)]:
            self.attempt(f"{what} after reboot", fn, errno.ESHUTDOWN)
        for s in self.outgoing.values():
            self.attempt("preserve_file after reboot", lambda s=s: b.lu.preserve_file(s.real, self.inos[0], 99),
                         errno.ESHUTDOWN)
            b.lu.cancel(s.real)  # nothing: the sessions are committed
        attached = dict(b.io.attached)
        for vm in self.open_vms():
            vm.ctx.close()
        assert b.io.attached == attached and set(b.lu.outgoing) == set(self.outgoing)
        before = self.translations()
        b.close()
        self.b = None
        status, findings = fsck.check_image(str(self.path))
        assert status == 0, findings

        # the next boot's model: preserved domains stay, their devices attached; the others go
        incoming = {}
        for s in self.outgoing.values():
            hwpts = {}
            for t, vm in s.hwpts.items():
                assert vm.dom is not None and vm.maps is not None
                hwpts[t] = MRest(frozenset(vm.maps), frozenset(r for r, d in self.att.items() if d is vm.dom),
                                 vm.dom)
            incoming[s.name] = MIn(s.name, dict(s.files), hwpts)
        dropped = sorted((d for d in self.doms if d.did in drops), key=lambda d: d.did)
        unmappable = [(n, r) for n, s in incoming.items() for r in s.hwpts.values() if r.maps]
        growable = [(n, f) for n, s in incoming.items() for f in s.files.values()]
        roll = data.draw(st.integers(0, 19), label="corruption")
        corrupt = {15: "flip", 16: "unmap" if unmappable else "none", 17: "grow" if growable else "none",
                   18: "unmap" if unmappable else "none"}.get(roll, "none")
        victim: bytes | None = None
        if corrupt == "unmap":  # a page of a preserved domain unmapped offline
            victim, r = data.draw(st.sampled_from(unmappable), label="victim")
            k = data.draw(st.sampled_from(sorted(r.maps)), label="slot")
            page = data.draw(st.integers(0, SLOTS[k].length // PS - 1), label="page")
            st_ = Store.open(self.path)
            io = Iommu.open(st_, default_path(self.path))
            io.domains[r.dom.did].unmap(SLOTS[k].iova + page * PS, PS)
            io.close()
            st_.close()
        elif corrupt == "grow":  # a preserved file grown by a page offline
            victim, f = data.draw(st.sampled_from(growable), label="victim")
            st_ = Store.open(self.path)
            io = Iommu.open(st_, default_path(self.path))
            st_.truncate(self.inos[f], self.size[f] + PS)
            self.size[f] += PS
            io.close()
            st_.close()
        elif corrupt == "flip":
            off = data.draw(st.integers(0, raw_len - 1).filter(lambda o: o not in UNCHECKED_HEADER), label="byte")
            bit = data.draw(st.integers(0, 7), label="bit")
            st_ = Store.open(self.path)
            ino = st_.lookup(st_.lookup(fmt.ROOT_INO, fmt.IOMMU_DIR_NAME), fmt.LU_STATE_NAME)
            st_.image[int(st_.image_pages(ino)[0]) * PS + off] ^= 1 << bit
            st_.close()

        event(f"restart, corruption {corrupt}")
        event(f"restart with {sum(len(s.hwpts) for s in incoming.values())} preserved HWPTs")
        self.b = b = Boot(self.path)
        self.restarts += 1
        self.vms, self.outgoing, self.finished = [], {}, []
        expect: list[str] = []
        if corrupt == "flip":
            # nothing can say which domain is whose: every session lost, every domain freed
            self.incoming, self.refused = {}, set()
            expect.append("live-update state refused: ")
            self.free_unclaimed([(d, "named by a live-update state that was refused") for d in self.doms], expect)
            self.boot = 0  # the counter went with the state
        else:
            self.incoming, self.refused = {}, set()
            for name, s in incoming.items():
                if name == victim:
                    self.refused.add(name)
                    expect.append(f"session {name.decode()} refused: ")
                else:
                    self.incoming[name] = s
            self.free_unclaimed([(r.dom, self.held_by_none(incoming)) for n in self.refused
                                 for r in incoming[n].hwpts.values()] + [(d, "not preserved") for d in dropped], expect)
        self.check_findings(b.findings, expect)
        assert b.lu.boot == self.boot
        for rid, pages in before.items():  # a preserved device's translations did not change
            d = self.att.get(rid)
            if d is not None and corrupt != "flip":
                for w, g in zip(pages, domain_pages(b.io.domains[d.did])):
                    assert np.array_equal(w, g), f"requester {rid:#x}: translations changed across the restart"
        for name in self.refused:
            self.attempt("retrieve_session of a refused session", lambda name=name: b.lu.retrieve_session(name),
                         errno.ENOENT)

    def held_by_none(self, incoming: dict[bytes, MIn]) -> str:
        """Why a refused session's domain is freed (``LiveUpdate._free_unclaimed``)."""
        names = ", ".join(n.decode() for n in incoming if n in self.refused)
        return f"held by no restored session (refused: {names})"

    def free_unclaimed(self, frees: list[tuple[MDom, str]], expect: list[str]) -> None:
        """The domains a restore frees, by DID, each after blocking its requesters."""
        for d, why in sorted(frees, key=lambda x: x[0].did):
            for rid in sorted(x for x, dd in self.att.items() if dd is d):
                expect.append(f"requester {fmt.requester_name(rid)} blocked: its domain {d.did} was {why}")
                self.detach_hw(rid)
            expect.append(f"domain {d.did} freed: {why}")
            self.free_dom(d)

    @staticmethod
    def check_findings(got: list[str], expect: list[str]) -> None:
        assert len(got) == len(expect), f"findings {got}, the model says {expect}"
        for g, e in zip(got, expect):
            assert g.startswith(e) if e.endswith(": ") else g == e, f"finding {g!r}, the model says {e!r}"

    @precondition(lambda self: self.incoming)
    @rule()
    def kill_restart(self) -> None:
        """A restart before the incoming sessions finished (no reboot(): the daemon is killed):
        they restore again, each one whose requesters all stay attached to its domain."""
        assert self.b is not None
        known = {id(r.dom) for r in self.restored()} | {id(d) for d in self.orphans}
        if not all(id(d) in known for d in self.doms):
            event("kill skipped")
            return  # a domain of this boot would be left behind, owned by no one
        event("kill before finish")
        before = self.translations()
        self.b.kill()
        self.b = None
        status, findings = fsck.check_image(str(self.path))
        assert status == 0, findings
        self.b = b = Boot(self.path)
        self.restarts += 1
        self.vms, self.outgoing, self.finished = [], {}, []
        incoming, self.incoming, self.refused = self.incoming, {}, set()
        expect: list[str] = []
        for name, s in incoming.items():
            if all(self.att.get(rid) is r.dom for r in s.hwpts.values() for rid in r.rids):
                self.incoming[name] = MIn(name, s.files, {t: dataclasses.replace(r, adopted_by=None)
                                                          for t, r in s.hwpts.items()})
                continue
            event("kill: session refused (a requester left its domain)")
            self.refused.add(name)  # a requester was detached from its domain: not what was preserved
            expect.append(f"session {name.decode()} refused: ")
        self.free_unclaimed([(r.dom, self.held_by_none(incoming)) for n in self.refused
                             for r in incoming[n].hwpts.values()], expect)
        self.check_findings(b.findings, expect)
        assert b.lu.boot == self.boot
        for rid, pages in before.items():
            d = self.att.get(rid)
            if d is not None:
                for w, g in zip(pages, domain_pages(b.io.domains[d.did])):
                    assert np.array_equal(w, g), f"requester {rid:#x}: translations changed across the restart"

    # ------------------------------------------------- incoming sessions

    @rule(data=st.data())
    def lu_incoming_call(self, data: st.DataObject) -> None:
        """retrieve_session (unknown, refused, retrieved already) or retrieve_file (unknown tokens)."""
        op = data.draw(st.sampled_from([self.retrieve_session, self.retrieve_file]), label="op")
        op(data)

    def retrieve_session(self, data: st.DataObject) -> None:
        assert self.b is not None
        name = data.draw(st.sampled_from(sorted(set(self.incoming) | self.refused | {b"s1", b"nope"})), label="name")
        s = self.incoming.get(name)
        want = errno.ENOENT if s is None else errno.EBUSY if s.open else None
        got = self.attempt(f"retrieve_session({name!r})", lambda: self.b.lu.retrieve_session(name), want)
        if want is None:
            assert s is not None
            s.real, s.open = got, True

    def open_in(self) -> list[MIn]:
        return [s for s in self.incoming.values() if s.open]

    def retrieve_file(self, data: st.DataObject) -> None:
        assert self.b is not None
        if not self.open_in():
            return
        s = data.draw(st.sampled_from(self.open_in()), label="session")
        token = data.draw(st.sampled_from(sorted(set(s.files) | set(s.hwpts) | {99})), label="token")
        want = None if token in s.files else errno.ENOENT
        got = self.attempt(f"retrieve_file({s.name!r}, {token})", lambda: self.b.lu.retrieve_file(s.real, token),
                           want)
        if want is None:
            f = s.files[token]
            assert (got.ino, got.igen, got.size) == (self.inos[f], self.igen[f], self.size[f])
            s.retrieved.add(token)

    @precondition(lambda self: any(s.hwpts for s in self.incoming.values()))
    @rule(data=st.data())
    def rebuild(self, data: st.DataObject) -> None:
        self.do_rebuild(data)

    @precondition(lambda self: any(s.hwpts for s in self.incoming.values()))
    @rule(data=st.data())
    def rebuild_2(self, data: st.DataObject) -> None:
        self.do_rebuild(data)

    @precondition(lambda self: any(s.hwpts for s in self.incoming.values()))
    @rule(data=st.data())
    def rebuild_3(self, data: st.DataObject) -> None:
        self.do_rebuild(data)

    def do_rebuild(self, data: st.DataObject) -> None:
        """The VMM after the restart: its session and files retrieved, then a VM with exactly the
        preserved maps (adopt) or other ones (replace), its requesters (mostly all) bound."""
        assert self.b is not None
        s = data.draw(st.sampled_from([s for s in self.incoming.values() if s.hwpts]), label="session")
        if not s.open:
            s.real = self.attempt(f"retrieve_session({s.name!r})", lambda: self.b.lu.retrieve_session(s.name), None)
            s.open = True
        for t in s.files:
            self.attempt(f"retrieve_file({t})", lambda t=t: self.b.lu.retrieve_file(s.real, t), None)
            s.retrieved.add(t)
        r = data.draw(st.sampled_from(list(s.hwpts.values())), label="hwpt")
        slots = set(r.maps)
        how = data.draw(st.sampled_from(["adopt", "adopt", "replace"]), label="how")
        if how == "replace":
            slots ^= {data.draw(st.integers(0, len(SLOTS) - 1), label="slot")}
            if not slots:
                slots = {0}
        rids = sorted(r.rids) or [RIDS[0]]
        if data.draw(st.integers(0, 4), label="rid subset?") == 4:
            rids = data.draw(st.lists(st.sampled_from(RIDS), min_size=1, max_size=2, unique=True), label="rids")
        vm = self.open_vm(rids, slots, attach=data.draw(st.sampled_from([True] * 4 + [False]), label="attach?"))
        if data.draw(st.sampled_from([False] * 3 + [True]), label="map at once?"):
            self.map_slot(vm, data.draw(st.integers(0, len(SLOTS) - 1), label="slot"))  # EBUSY if it adopted
        event(f"rebuild {how}: " + ("adopted" if r.adopted_by is vm else "new domain" if vm.dom else "no device bound"))
        self.settle()
        if not self.pending(s) and data.draw(st.booleans(), label="finish now?"):
            self.finish(s, closing=False)

    def finish(self, s: MIn, *, closing: bool) -> None:
        assert self.b is not None and s.real is not None
        want = errno.EBUSY if self.pending(s) else None
        event(f"finish {'EBUSY' if want else 'ok'}{' (close)' if closing else ''}")
        if closing:  # the session fd closed: the kernel tries to finish it
            self.b.lu.close_session(s.real)
            s.open = False
            if self.incoming.get(s.name) is not s or want is not None:
                return
        else:
            self.attempt(f"finish({s.name!r})", lambda: self.b.lu.finish(s.real), want)
            if want is not None:
                return
        del self.incoming[s.name]
        if not closing:
            self.finished.append(s.real)
        for r in s.hwpts.values():
            if r.adopted_by is None:
                self.free_dom(r.dom)  # replaced (or no device left): the restored domain goes
        self.settle()

    @precondition(lambda self: self.open_in() or self.finished)
    @rule(data=st.data())
    def lu_finish(self, data: st.DataObject) -> None:
        self.do_finish(data)

    @precondition(lambda self: self.open_in())
    @rule(data=st.data())
    def lu_finish_2(self, data: st.DataObject) -> None:
        self.do_finish(data)

    @precondition(lambda self: self.open_in())
    @rule(data=st.data())
    def lu_finish_3(self, data: st.DataObject) -> None:
        self.do_finish(data)

    def do_finish(self, data: st.DataObject) -> None:
        assert self.b is not None
        choices: list[MIn | IncomingSession] = [*self.open_in(), *self.finished]
        s = data.draw(st.sampled_from(choices), label="session")
        if isinstance(s, IncomingSession):
            self.attempt("finish of a finished session", lambda: self.b.lu.finish(s), errno.ENOENT)
            return
        self.finish(s, closing=data.draw(st.sampled_from([False, False, True]), label="by closing the fd?"))


    # --------------------------------------------------------- invariants

    @invariant()
    def hardware_is_the_model(self) -> None:
        """Context entries, domains and their translations, page by page and through the walker."""
        if self.b is None:
            return
        io = self.b.io
        assert io.attached == {rid: d.did for rid, d in self.att.items()}
        assert set(io.domains) == {d.did for d in self.doms}, "a domain the model does not know (or lost)"
        assert len({d.did for d in self.doms}) == len(self.doms)
        for d in self.doms:
            got = domain_pages(io.domains[d.did])
            for name, w, g in zip(("iova", "phys", "write", "ino", "file page"), self.expect_pages(d.maps), got):
                assert np.array_equal(w, g), f"domain {d.did}: the {name} of its pages differ from {sorted(d.maps)}"
        if io.regs is None or not io.regs.enabled:
            return
        for rid, d in self.att.items():
            if not d.maps:
                continue
            ks = sorted(d.maps)
            iovas = [SLOTS[k].iova for k in ks] + [SLOTS[k].iova + SLOTS[k].length - PS for k in ks]
            expect = [int(self.slot_pages[k][1][0]) * PS for k in ks] + [int(self.slot_pages[k][1][-1]) * PS
                                                                       for k in ks]
            phys, faults = io.translate(rid >> 8, (rid >> 3) & 31, rid & 7, iovas)
            assert faults.tolist() == [0] * len(iovas) and phys.tolist() == expect, f"requester {rid:#x}"

    @invariant()
    def sessions_and_files_are_the_model(self) -> None:
        if self.b is None:
            return
        b = self.b
        assert list(b.lu.outgoing) == list(self.outgoing)
        assert list(b.lu.incoming) == list(self.incoming)
        assert set(b.lu.refused) == self.refused
        for name, s in self.incoming.items():
            assert b.lu.incoming[name].open == s.open
        for f, ino in enumerate(self.inos):
            assert b.lu.frozen(ino) == self.frozen(f), f"file f{f} frozen: {b.lu.frozen(ino)}"
            assert b.store.getattr(ino).size == self.size[f]
        assert {rid: id(c) for rid, c in b.fd.bound.items()} == {rid: id(v.ctx) for rid, v in self.bound().items()}
        for vm in self.vms:
            real = vm.ctx.objects.get(1)
            assert (real is not None) == (vm.maps is not None), "the IOAS is kept exactly when the model says"
            if real is not None:
                assert real.frozen == self.ioas_frozen(vm)
                assert sorted(a.iova for a in real.areas) == sorted(SLOTS[k].iova for k in vm.maps or ())
        state = _read_state(b.store)
        assert ([s.name for s in state.sessions] if state is not None else []) == list(self.incoming)
        live = {id(v.ctx) for v in self.vms if not v.closed or v.maps is not None or v.devs or v.hwpt is not None}
        assert {id(c) for c in b.fd.contexts} == live, "a context kept (or dropped) against the model"


LiveUpdateMachine.TestCase.settings = settings(
    max_examples=30, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
)
TestLiveUpdateAgainstModel = LiveUpdateMachine.TestCase


# ------------------------------------------------- bugs the machine found
#
# As regression tests (the machine covers them too).

RID, RID2 = RIDS[0], RIDS[1]


@pytest.fixture
def clock() -> Iterator[Clock]:
    """The grace periods on a fake clock (no real second-long waits)."""
    saved, c = backing.iommu.time, Clock()
    backing.iommu.time = c  # type: ignore[assignment]
    yield c
    backing.iommu.time = saved


@pytest.fixture
def boots() -> Iterator[list[Boot]]:
    opened: list[Boot] = []
    yield opened
    for b in opened:
        with contextlib.suppress(Exception):
            b.kill()


def _guest(b: Boot, name: bytes, size: int) -> int:
    ino = b.store.create(b.store.lookup(fmt.ROOT_INO, fmt.GUEST_DIR_NAME), name, 0o644, 0, 0)
    b.store.truncate(ino, size)
    return ino


def _vm(b: Boot, ino: int, rids: list[int], *, attach: bool = True) -> tuple[Context, int, list[int]]:
    """IOAS 1 mapping all of ``ino`` at 1 GiB, ``rids`` bound, a HWPT for the first, all attached."""
    ctx = b.fd.open_context()
    ioas = ctx.ioas_alloc()
    ctx.ioas_map_file(ioas, ino, 0, b.store.getattr(ino).size, 1 << 30, writeable=True)
    devs = [ctx.device_bind(rid) for rid in rids]
    hwpt = ctx.hwpt_alloc(devs[0], ioas)
    for d in devs if attach else []:
        ctx.device_attach(d, hwpt)
    return ctx, hwpt, devs


def _preserved(boots: list[Boot], path: Path, rids: list[int]) -> tuple[Boot, int, int, list[tuple[int, int, int]]]:
    """A VM preserved in session vm0 (file token 1, HWPT token 2), rebooted and restored.
    Returns the new boot, the file, the preserved DID and the first requester's translations."""
    b = Boot(path)
    boots.append(b)
    ino = _guest(b, b"vm0", 2 * MiB)
    ctx, hwpt, _ = _vm(b, ino, rids)
    s = b.lu.create_session(b"vm0")
    b.lu.preserve_file(s, ino, 1)
    b.lu.preserve_hwpt(s, ctx, hwpt, 2)
    did = ctx.hwpt(hwpt).domain.domain_id
    before = _mappings(b, rids[0])
    b.lu.reboot()
    b.close()
    b = Boot(path)
    boots.append(b)
    assert list(b.lu.incoming) == [b"vm0"] and b.io.attached.get(rids[0]) == did
    return b, ino, did, before


def _mappings(b: Boot, rid: int) -> list[tuple[int, int, int]]:
    d = b.io.domains[b.io.attached[rid]]
    return [(m.iova, m.phys_addr, m.length) for m in d.mappings()]


def test_an_adopter_that_remaps_before_finish_gives_back_a_changed_domain(
        make_image: Callable[..., Path], boots: list[Boot], clock: Clock) -> None:
    path = make_image("64M")
    b, ino, did, before = _preserved(boots, path, [RID])
    s = b.lu.retrieve_session(b"vm0")
    b.lu.retrieve_file(s, 1)
    ctx, hwpt, _ = _vm(b, ino, [RID])
    assert ctx.hwpt(hwpt).domain.domain_id == did  # adopted
    with contextlib.suppress(StoreError):  # EBUSY until finish would be one fix
        ctx.ioas_map_file(1, ino, 0, PS, 2 << 30, writeable=True)
    ctx.close()  # before finish: the domain goes back to the session
    assert _mappings(b, RID) == before, "the session holds a domain that no longer translates what was preserved"
    ctx2, hwpt2, _ = _vm(b, ino, [RID])  # the next VMM adopts it, its IOAS mapping only the file at 1 GiB
    assert [(m.iova, m.length) for m in ctx2.hwpt(hwpt2).domain.mappings()] == [(1 << 30, 2 * MiB)]


def test_a_cancel_does_not_unfreeze_an_adopters_ioas(
        make_image: Callable[..., Path], boots: list[Boot], clock: Clock) -> None:
    path = make_image("64M")
    b = Boot(path)
    boots.append(b)
    ino = _guest(b, b"vm0", MiB)
    ctx = b.fd.open_context()
    ioas = ctx.ioas_alloc()
    hwpt = ctx.hwpt_alloc(dev := ctx.device_bind(RID), ioas)
    ctx.device_attach(dev, hwpt)
    b.lu.preserve_hwpt(b.lu.create_session(b"vm0"), ctx, hwpt, 1)  # a device with no DMA maps yet
    did = ctx.hwpt(hwpt).domain.domain_id
    b.lu.reboot()
    b.close()
    b = Boot(path)
    boots.append(b)
    ctx2 = b.fd.open_context()
    ioas2 = ctx2.ioas_alloc()
    hwpt2 = ctx2.hwpt_alloc(dev2 := ctx2.device_bind(RID), ioas2)
    ctx2.device_attach(dev2, hwpt2)
    assert ctx2.hwpt(hwpt2).domain.domain_id == did and ctx2.ioas(ioas2).frozen  # adopted, frozen until finish
    s2 = b.lu.create_session(b"next")
    with pytest.raises(StoreError) as refused:  # until vm0 finished: a cancel could unfreeze it
        b.lu.preserve_hwpt(s2, ctx2, hwpt2, 1)
    assert refused.value.errno == errno.EBUSY
    b.lu.cancel(s2)
    with contextlib.suppress(StoreError):  # EBUSY: the adoption still holds the IOAS
        ctx2.ioas_map_file(ioas2, ino, 0, PS, 1 << 30, writeable=True)
    ctx2.close()  # before finish: the domain goes back to vm0
    assert b.io.attached == {RID: did} and b"vm0" in b.lu.incoming
    assert b.io.domains[did].mappings() == [], "vm0 holds a domain that translates what it never preserved"


def test_finish_waits_for_an_adopted_domains_device_to_be_attached_through_the_adopter(
        make_image: Callable[..., Path], boots: list[Boot], clock: Clock) -> None:
    """(Found by this machine: finish used to count the HWPT as reclaimed, and the domain was then
    left attached with no owner.) EBUSY until the device is attached through the adopter; a close
    before that gives the domain back to the session, still attached."""
    path = make_image("64M")
    b, ino, did, _ = _preserved(boots, path, [RID])
    s = b.lu.retrieve_session(b"vm0")
    b.lu.retrieve_file(s, 1)
    ctx, hwpt, _ = _vm(b, ino, [RID], attach=False)
    assert ctx.hwpt(hwpt).domain.domain_id == did  # adopted; RID still attached to it, as it was
    with pytest.raises(StoreError) as exc:
        b.lu.finish(s)
    assert exc.value.errno == errno.EBUSY
    ctx.close()
    assert b.io.attached == {RID: did} and b"vm0" in b.lu.incoming


def test_finish_leaves_no_requester_ownerless_on_an_adopted_domain(
        make_image: Callable[..., Path], boots: list[Boot], clock: Clock) -> None:
    path = make_image("64M")
    b, ino, did, _ = _preserved(boots, path, [RID, RID2])  # one HWPT, two devices
    s = b.lu.retrieve_session(b"vm0")
    b.lu.retrieve_file(s, 1)
    ctx, hwpt, _ = _vm(b, ino, [RID])  # the VMM reclaims it with one device first
    assert ctx.hwpt(hwpt).domain.domain_id == did and b.io.attached[RID2] == did
    try:
        b.lu.finish(s)
    except StoreError as exc:  # EBUSY until RID2 is reclaimed too would be one fix
        assert exc.errno == errno.EBUSY
        ctx.device_attach(ctx.device_bind(RID2), hwpt)
        b.lu.finish(s)
    if RID2 not in b.fd.bound:
        ctx.device_attach(ctx.device_bind(RID2), hwpt)  # the VMM's second device, bound after finish
    ctx.close()
    clock.now += 10 * FREE_GRACE_S
    assert b.fd.reap() == 0.0
    assert b.io.attached == {} and b.io.domains == {}


@pytest.mark.parametrize("field", ["boot", "domains"])
def test_a_flipped_bit_of_the_state_header_is_noticed(make_image: Callable[..., Path], boots: list[Boot],
                                                      field: str) -> None:
    path = make_image("64M")
    b = Boot(path)
    boots.append(b)
    s = b.lu.create_session(b"vm0")
    b.lu.preserve_file(s, _guest(b, b"vm0", MiB), 1)  # a session of files only
    b.lu.reboot()
    ino = b.store.lookup(b.store.lookup(fmt.ROOT_INO, fmt.IOMMU_DIR_NAME), fmt.LU_STATE_NAME)
    b.store.image[int(b.store.image_pages(ino)[0]) * PS + fmt.LU_HEADER_DTYPE.fields[field][1]] ^= 1
    b.close()
    status, findings = fsck.check_image(str(path))
    b2 = Boot(path)
    boots.append(b2)
    assert status == 1, "fsck finds nothing wrong with the state"
    assert b"vm0" not in b2.lu.incoming and b2.findings, "the corrupt state was restored without a finding"
