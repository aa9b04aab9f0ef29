"""The hardware's caches (backing.iotlb.TranslationCache) against the driver's invalidations.

Each test fills a cache the way a device does (it translates), makes a
change through the driver, polls, and compares ``translate`` with a fresh
walk of the tables: equal when the driver posted what the change needs.
Where a test drops one posting call (monkeypatched away) the cache shows the
stale translation a real machine would -- so the comparison is not vacuous.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from backing import ephemeral as ephemeral_mod
from backing import format as fmt
from backing import walker
from backing.iommu import Domain, Iommu
from backing.iommufd import Iommufd
from backing.iotlb import TranslationCache
from backing.liveupdate import LiveUpdate
from backing.regs import Regs, default_path
from backing.store import Store

MiB = 1 << 20
PS = fmt.PAGE_SIZE
BDF = (0, 3, 0)
SID = fmt.requester_id(*BDF)
U64 = np.uint64


@pytest.fixture
def image(make_image: Callable[..., Path]) -> Path:
    return make_image("64M")


@pytest.fixture
def vm0(store: Store) -> int:
    """A 16 MiB guest file in one 2 MiB aligned extent."""
    ino = store.create(store.lookup(fmt.ROOT_INO, fmt.GUEST_DIR_NAME), b"vm0", 0o600, 0, 0)
    store.truncate(ino, 16 * MiB)
    return ino


@pytest.fixture
def base(store: Store, vm0: int) -> int:
    (e,) = store.extents(vm0)
    assert e.phys_addr % (2 * MiB) == 0
    return e.phys_addr


def device_cache(image: Path) -> Iterator[TranslationCache]:
    """A cache as a device process makes it: the image, the ephemeral memory (if there is one)
    and the register block mapped by itself, nothing asked of the daemon."""
    u64, base, npages = walker.open_image(image)
    eph = ephemeral_mod.default_path(image)
    region = walker.open_ephemeral(eph) if Path(eph).exists() else None
    with Regs.open(default_path(image), create=False) as regs:
        yield TranslationCache(u64, base, npages, regs, region)


@pytest.fixture
def cache(io: Iommu, image: Path) -> Iterator[TranslationCache]:
    yield from device_cache(image)


@pytest.fixture
def dom(io: Iommu, base: int) -> Domain:
    d = io.create_domain()
    d.map(0, base, 4 * MiB)  # 2 MiB leaves
    d.map(8 * MiB, base + 4 * MiB, 16 * PS)  # 4 KiB leaves
    d.map(16 * MiB, base + 5 * MiB, 4 * PS, write=False)
    d.attach(*BDF)
    io.enable()
    return d


PROBES = np.array([0, 5 * PS + 7, 2 * MiB + 3, 4 * MiB - 1, 8 * MiB, 8 * MiB + 15 * PS + 9, 16 * MiB + 1], U64)


def fresh(io: Iommu, iovas: np.ndarray, write: bool = False) -> tuple[list[int], list[int]]:
    phys, fault = io.translate(*BDF, iovas, write)
    return phys.tolist(), fault.tolist()


def cached(cache: TranslationCache, iovas: np.ndarray, write: bool = False) -> tuple[list[int], list[int]]:
    phys, fault, _hit = cache.translate(SID, iovas, write)
    return phys.tolist(), fault.tolist()


def agrees(cache: TranslationCache, io: Iommu, iovas: np.ndarray = PROBES) -> bool:
    """Poll, then: does the cache translate ``iovas`` as a fresh walk, for reads and writes?"""
    cache.poll()
    return all(cached(cache, iovas, w) == fresh(io, iovas, w) for w in (False, True))


def drop(monkeypatch: pytest.MonkeyPatch, *names: str) -> None:
    """Make the driver forget to post these invalidations."""
    for name in names:
        monkeypatch.setattr(Iommu, name, lambda self, *a: None)


# ------------------------------------------------------------ the cache itself


def test_a_second_translation_of_the_same_buffer_is_served_from_the_iotlb(
        io: Iommu, dom: Domain, cache: TranslationCache, base: int) -> None:
    iovas = np.array([8 * MiB, 8 * MiB + PS + 5], U64)
    first = cache.translate(SID, iovas, True)
    again = cache.translate(SID, iovas, True)
    assert first[2].tolist() == [False, False] and again[2].tolist() == [True, True]
    assert again[0].tolist() == [base + 4 * MiB, base + 4 * MiB + PS + 5] == first[0].tolist()
    s = cache.statistics()
    assert (s["hits"], s["misses"], s["walks"], s["context_misses"], s["context_hits"]) == (2, 2, 1, 1, 1)


def test_a_1m_dma_inside_a_2m_leaf_is_one_entry_and_one_walk(
        io: Iommu, dom: Domain, cache: TranslationCache, base: int) -> None:
    iovas = np.arange(256, dtype=U64) * U64(PS)  # 256 pages of 4 KiB
    phys, fault, hit = cache.translate(SID, iovas, True)
    assert not fault.any() and phys.tolist() == (iovas + U64(base)).tolist()
    assert cache.statistics()["iotlb_entries"] == 1 and cache.statistics()["walks"] == 1
    phys2, _f, hit2 = cache.translate(SID, iovas + U64(512 * 1024), True)  # the same leaf
    assert hit2.all() and phys2.tolist() == (iovas + U64(base + 512 * 1024)).tolist()


def test_faults_are_not_cached(io: Iommu, dom: Domain, cache: TranslationCache, base: int) -> None:
    iova = np.array([1 << 30], U64)
    assert cached(cache, iova) == ([0], [fmt.FR_READ])
    seq = io.regs.iq_tail if io.regs else 0
    dom.map(1 << 30, base + 8 * MiB, PS)  # fills a not-present entry: posts nothing
    assert io.regs is not None and io.regs.iq_tail == seq
    assert cached(cache, iova) == ([base + 8 * MiB], [0])


def test_a_write_to_a_page_cached_for_reads_is_walked_and_faults(
        io: Iommu, dom: Domain, cache: TranslationCache, base: int) -> None:
    iova = np.array([16 * MiB], U64)
    assert cached(cache, iova) == ([base + 5 * MiB], [0])
    phys, fault, hit = cache.translate(SID, iova, True)
    assert (phys.tolist(), fault.tolist(), hit.tolist()) == ([0], [fmt.FR_WRITE], [False])
    assert io.regs is not None and io.regs.faults()[-1].reason == fmt.FR_WRITE  # logged, as the walker does


def test_per_request_write_flags_are_checked_against_the_cached_rights(
        io: Iommu, dom: Domain, cache: TranslationCache, base: int) -> None:
    iovas = np.array([16 * MiB, 16 * MiB, 8 * MiB], U64)
    cache.translate(SID, iovas, False)  # filled by reads
    phys, fault, hit = cache.translate(SID, iovas, np.array([False, True, True]))
    assert fault.tolist() == [0, fmt.FR_WRITE, 0] and hit.tolist() == [True, False, True]
    assert phys.tolist() == [base + 5 * MiB, 0, base + 4 * MiB]


def test_translation_disabled_serves_nothing_from_the_caches(io: Iommu, dom: Domain, cache: TranslationCache) -> None:
    cache.translate(SID, PROBES)
    io.regs.disable()  # type: ignore[union-attr] - the register alone: no invalidation posted
    phys, fault, hit = cache.translate(SID, PROBES)
    assert not hit.any() and fault.tolist() == [fmt.FR_TRANSLATION_DISABLED] * PROBES.size


def test_a_page_selective_invalidation_drops_a_superpage_it_overlaps(
        io: Iommu, dom: Domain, cache: TranslationCache) -> None:
    assert io.regs is not None
    cache.translate(SID, np.array([0, 2 * MiB], U64))  # two 2 MiB entries
    io.regs.invalidate_iotlb(fmt.INV_G_PAGE, did=dom.domain_id, addr=2 * MiB + 5 * PS, am=0)
    cache.poll()
    _p, _f, hit = cache.translate(SID, np.array([0, 2 * MiB + 9 * PS], U64))
    assert hit.tolist() == [True, False]


def test_a_domain_selective_invalidation_drops_only_that_domain(
        io: Iommu, dom: Domain, cache: TranslationCache, base: int) -> None:
    assert io.regs is not None
    other = io.create_domain()
    other.map(0, base, 2 * MiB)
    other.attach(0, 4, 0)
    sid2 = fmt.requester_id(0, 4, 0)
    cache.translate(SID, PROBES[:1])
    cache.translate(sid2, PROBES[:1])
    cache.poll()
    io.regs.invalidate_iotlb(fmt.INV_G_DOMAIN, did=other.domain_id)
    cache.poll()
    assert cache.translate(SID, PROBES[:1])[2].tolist() == [True]
    assert cache.translate(sid2, PROBES[:1])[2].tolist() == [False]
    assert cache.statistics()["inv_iotlb_domain"] == 1


def test_an_overrun_flushes_everything(io: Iommu, dom: Domain, cache: TranslationCache) -> None:
    assert io.regs is not None
    cache.translate(SID, PROBES)
    cache.poll()
    for _ in range(fmt.INV_QUEUE_ENTRIES + 1):
        io.regs.invalidate_context(fmt.INV_G_DEVICE, did=99, sid=0x100)  # nothing this cache holds
    assert cache.poll() == fmt.INV_QUEUE_ENTRIES + 1
    s = cache.statistics()
    assert (s["overruns"], s["iotlb_entries"], s["context_entries"]) == (1, 0, 0)


def test_the_cache_holds_until_told_and_a_poll_is_all_it_takes(
        io: Iommu, dom: Domain, cache: TranslationCache, base: int) -> None:
    iova = np.array([8 * MiB + 3 * PS], U64)
    assert cached(cache, iova) == ([base + 4 * MiB + 3 * PS], [0])
    dom.unmap(8 * MiB + 3 * PS, PS)
    assert cached(cache, iova) == ([base + 4 * MiB + 3 * PS], [0])  # not polled yet: the old one
    cache.poll()
    assert cached(cache, iova) == ([0], [fmt.FR_READ])


# ------------------------------------------------------------ every driver path


def test_unmap_leaves_no_stale_translation(io: Iommu, dom: Domain, cache: TranslationCache) -> None:
    assert agrees(cache, io)
    dom.unmap(8 * MiB + PS, 3 * PS)
    dom.unmap(2 * MiB + 5 * PS, PS)  # splits a 2 MiB leaf the cache holds
    assert agrees(cache, io)


def test_unmap_without_its_invalidation_is_seen_stale(io: Iommu, dom: Domain, cache: TranslationCache,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    assert agrees(cache, io)
    drop(monkeypatch, "_flush_iotlb_psi")
    dom.unmap(8 * MiB, PS)
    assert not agrees(cache, io)


def test_a_hitless_replace_leaves_no_stale_translation(io: Iommu, dom: Domain, cache: TranslationCache,
                                                       base: int) -> None:
    new = io.create_domain()
    new.map(0, base + 8 * MiB, 4 * MiB)  # the same IOVAs, other pages
    assert agrees(cache, io)
    new.attach(*BDF, replace=True)
    assert agrees(cache, io)
    assert cached(cache, PROBES[:1]) == ([base + 8 * MiB], [0])


def test_a_replace_without_the_context_invalidation_is_seen_stale(
        io: Iommu, dom: Domain, cache: TranslationCache, base: int, monkeypatch: pytest.MonkeyPatch) -> None:
    new = io.create_domain()
    new.map(0, base + 8 * MiB, 4 * MiB)
    assert agrees(cache, io)
    drop(monkeypatch, "_flush_context_device")
    new.attach(*BDF, replace=True)
    assert not agrees(cache, io)


def test_detach_leaves_no_stale_translation(io: Iommu, dom: Domain, cache: TranslationCache) -> None:
    assert agrees(cache, io)
    dom.detach(*BDF)
    assert agrees(cache, io)
    assert cached(cache, PROBES[:1])[1] == [fmt.FR_CONTEXT_NOT_PRESENT]


def test_a_freed_domain_whose_did_and_pages_are_reused_leaves_no_stale_translation(
        io: Iommu, dom: Domain, cache: TranslationCache, base: int) -> None:
    did = dom.domain_id
    assert agrees(cache, io)
    dom.detach(*BDF)
    dom._quiet_after = 0.0  # no walk of this test is inside
    io.destroy_domain(dom)
    again = io.create_domain()
    assert again.domain_id == did
    again.map(0, base + 8 * MiB, 4 * MiB)
    again.map(8 * MiB, base, 16 * PS)
    again.attach(*BDF)
    assert agrees(cache, io)


def test_a_freed_domain_without_its_iotlb_invalidations_is_seen_stale_through_its_reused_did(
        io: Iommu, dom: Domain, cache: TranslationCache, base: int, monkeypatch: pytest.MonkeyPatch) -> None:
    assert agrees(cache, io)
    drop(monkeypatch, "_flush_iotlb_dsi")  # detach's and the free's
    dom.detach(*BDF)
    dom._quiet_after = 0.0
    io.destroy_domain(dom)
    again = io.create_domain()
    again.map(0, base + 8 * MiB, 4 * MiB)
    again.attach(*BDF)
    assert not agrees(cache, io)


# ------------------------------------------------------------ live update


class Boot:
    """One daemon's kernel state; ``restore`` left to the test (the device runs meanwhile)."""

    def __init__(self, image: Path, mode: str = "persistent") -> None:
        eph = mode == "ephemeral"
        self.store = Store.open(image)
        self.io = Iommu.open(self.store, default_path(image),
                             ephemeral=ephemeral_mod.default_path(image) if eph else None)
        self.fd = Iommufd(self.store, self.io, ephemeral=eph)
        self.lu = LiveUpdate(self.store, self.fd, mode=mode)

    def kill(self) -> None:
        self.io.close()
        self.store.close()

    def vm(self, size: int = 8 * MiB, iova: int = 1 << 30) -> tuple[int, int]:
        """A VMM's guest file in an IOAS, a HWPT, the device attached; preserved in session vm0.
        Returns (ino, HWPT's DID)."""
        st = self.store
        ino = st.create(st.lookup(fmt.ROOT_INO, fmt.GUEST_DIR_NAME), b"vm0", 0o644, 0, 0)
        st.truncate(ino, size)
        ctx = self.fd.open_context()
        ioas = ctx.ioas_alloc()
        ctx.ioas_map_file(ioas, ino, 0, size, iova, writeable=True)
        dev = ctx.device_bind(SID)
        hwpt = ctx.hwpt_alloc(dev, ioas)
        ctx.device_attach(dev, hwpt)
        s = self.lu.create_session(b"vm0")
        self.lu.preserve_file(s, ino, 1)
        self.lu.preserve_hwpt(s, ctx, hwpt, 2)
        return ino, ctx.hwpt(hwpt).domain.domain_id


VM_PROBES = (1 << 30) + np.array([0, PS + 3, 2 * MiB + 5, 8 * MiB - 1], U64)


def test_the_ephemeral_reboot_switches_the_device_to_the_fixed_copy_with_nothing_stale(
        image: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    b = Boot(image, "ephemeral")
    _ino, did = b.vm()
    assert b.io.domains[did].ephemeral
    for c in device_cache(image):
        assert agrees(c, b.io, VM_PROBES)
        b.lu.reboot()  # copy into a fixed domain in the image, switch the device to it
        fixed = b.io.attached[SID]
        assert fixed != did and not b.io.domains[fixed].ephemeral
        c.poll()
        phys, fault, hit = c.translate(SID, VM_PROBES, True)
        assert not hit.any(), "a translation of the ephemeral domain was served after the switch"
        assert c.cached_context(SID) == (fixed, b.io.domains[fixed].pml4_phys)
        assert (phys.tolist(), fault.tolist()) == fresh(b.io, VM_PROBES, True)
        b.kill()  # the kexec: ephemeral memory poisoned by the next open
        b2 = Boot(image, "ephemeral")
        c.set_ephemeral(walker.open_ephemeral(ephemeral_mod.default_path(image)))
        b2.lu.restore()
        assert agrees(c, b2.io, VM_PROBES)
        assert cached(c, VM_PROBES[:1], True)[1] == [0]
        b2.fd.close()
        b2.kill()


def test_the_ephemeral_reboot_without_the_context_invalidation_keeps_walking_the_ephemeral_tables(
        image: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    b = Boot(image, "ephemeral")
    _ino, did = b.vm()
    for c in device_cache(image):
        assert agrees(c, b.io, VM_PROBES)
        drop(monkeypatch, "_flush_context_device")
        b.lu.reboot()
        c.poll()
        c.translate(SID, VM_PROBES, True)
        cached_did = c.cached_context(SID)
        assert cached_did is not None and cached_did[0] == did  # still walking the ephemeral tables
        b.kill()


def test_restore_blocking_a_refused_session_leaves_no_stale_translation(image: Path) -> None:
    b = Boot(image)
    _ino, did = b.vm()
    b.lu.reboot()
    b.kill()
    st = Store.open(image)  # between the boots the domain changed: the session is refused
    with Iommu.open(st, default_path(image)) as io:
        io.domains[did].unmap(1 << 30, PS)
    st.close()
    b2 = Boot(image)
    for c in device_cache(image):
        probes = VM_PROBES[1:]  # mapped still, until restore blocks the device
        assert agrees(c, b2.io, probes) and cached(c, probes, True)[1] == [0] * probes.size
        b2.lu.restore()
        assert SID not in b2.io.attached and did not in b2.io.domains
        assert agrees(c, b2.io, probes)
        assert cached(c, probes, True)[1] == [fmt.FR_CONTEXT_NOT_PRESENT] * probes.size
    b2.fd.close()
    b2.kill()


def test_restore_blocking_without_its_invalidations_is_seen_stale(
        image: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    b = Boot(image)
    _ino, did = b.vm()
    b.lu.reboot()
    b.kill()
    st = Store.open(image)
    with Iommu.open(st, default_path(image)) as io:
        io.domains[did].unmap(1 << 30, PS)
    st.close()
    b2 = Boot(image)
    for c in device_cache(image):
        assert agrees(c, b2.io, VM_PROBES[1:])
        drop(monkeypatch, "_flush_context_device", "_flush_iotlb_dsi")
        b2.lu.restore()
        assert not agrees(c, b2.io, VM_PROBES[1:])
    b2.fd.close()
    b2.kill()
