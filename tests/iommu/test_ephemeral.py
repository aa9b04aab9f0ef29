"""Ephemeral memory (backing.ephemeral) and the domains whose tables live there: the file and
its allocator, the same translations as an image domain, copies both ways, hitless replaces
between the kinds, poison, what an open after a restart does, pins, fsck, another process."""

from __future__ import annotations

import errno
import logging
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from iommu_helpers import entry_where

from backing import ephemeral, vtd, walker
from backing import format as fmt
from backing.ephemeral import POISON, EphemeralMemory
from backing.errors import FormatError, StoreError
from backing.fsck import check_image
from backing.iommu import Domain, Iommu
from backing.regs import Regs, default_path
from backing.store import Store

PS = fmt.PAGE_SIZE
MiB = 1 << 20
GiB = 1 << 30
ROOT = fmt.ROOT_INO
EPH = (0, 5, 0)  #: the requester attached to the ephemeral domain
IMG = (0, 6, 0)  #: ... and to the image domain


@pytest.fixture
def image(make_image: Callable[..., Path]) -> Path:
    return make_image(128 * MiB)


def errno_of(fn: Callable[[], object]) -> int:
    with pytest.raises(StoreError) as e:
        fn()
    return e.value.errno


def guest(store: Store, name: bytes, size: int) -> int:
    ino = store.create(store.lookup(ROOT, b"guest_mem"), name, 0o600, 0, 0)
    store.truncate(ino, size)
    return ino


def phys(store: Store, ino: int, offset: int = 0) -> int:
    for e in store.extents(ino):
        if e.file_offset <= offset < e.file_offset + e.length:
            return e.phys_addr + offset - e.file_offset
    raise AssertionError("offset beyond the file")


def mem_of(io: Iommu) -> EphemeralMemory:
    assert io.ephemeral is not None
    return io.ephemeral


def table_pages_of(dom: Domain) -> np.ndarray:
    levels, problems = dom.walk()
    assert problems == []
    return np.concatenate([lv.tables for lv in levels])


def leaves(dom: Domain) -> list[tuple[int, ...]]:
    """Every leaf as (iova page, pfn, pages, writable), by IOVA: the tree's shape, not only
    the coalesced translations."""
    return list(zip(*(a.tolist() for a in vtd.leaf_ranges(dom.walk()[0]))))


def xlate(io: Iommu, rid: tuple[int, int, int], iovas: np.ndarray, write: bool = False,
          ) -> tuple[np.ndarray, np.ndarray]:
    return io.translate(*rid, iovas, write)


@pytest.fixture
def vm0(store: Store) -> int:
    return guest(store, b"vm0", 32 * MiB)


def map_same(dom: Domain, store: Store, vm: int) -> None:
    """2 MiB leaves, 4 KiB leaves, read-only pages, a superpage split by an unmap."""
    dom.map(0, phys(store, vm), 8 * MiB)
    dom.map(64 * MiB + PS, phys(store, vm, 8 * MiB), 300 * PS)
    dom.map(1 << 40, phys(store, vm, 16 * MiB), 4 * MiB, write=False)
    dom.unmap(3 * MiB + 5 * PS, 7 * PS)  # splits a 2 MiB leaf


# ------------------------------------------------------------------ the file


def test_a_new_file_holds_its_header_and_is_sparse(tmp_path: Path) -> None:
    path = tmp_path / "m.ephemeral"
    with EphemeralMemory.open(path, base_phys=8 * GiB, npages=1024) as mem:
        hdr = mem.header[0]
        assert bytes(hdr["magic"]) == ephemeral.EPHEMERAL_MAGIC and int(hdr["version"]) == 1
        assert (int(hdr["page_size"]), int(hdr["base_phys"]), int(hdr["npages"])) == (PS, 8 * GiB, 1024)
        assert mem.boot_id == 0 and mem.u64.size == 1024 * 512
    st = os.stat(path)
    assert st.st_size == 1025 * PS and st.st_blocks * 512 <= 64 * 1024


def test_the_default_base_is_the_first_gib_boundary_above_the_image(store: Store) -> None:
    g = store.geometry
    end = g.base_phys + g.npages * PS
    base = ephemeral.default_base(g)
    assert base % GiB == 0 and end < base <= end + GiB


def test_poison_fills_every_page_with_ones_and_forgets_every_allocation(tmp_path: Path) -> None:
    with EphemeralMemory.open(tmp_path / "m", base_phys=8 * GiB, npages=64) as mem:
        mem.alloc(10)
        mem.poison()
        assert (mem.u64 == np.uint64(POISON)).all()
        assert mem.free_pages == 64 and mem.boot_id == 1
        assert bytes(mem.header[0]["magic"]) == ephemeral.EPHEMERAL_MAGIC


def test_alloc_takes_the_lowest_free_pages_and_enomem_takes_nothing(tmp_path: Path) -> None:
    with EphemeralMemory.open(tmp_path / "m", base_phys=8 * GiB, npages=64) as mem:
        assert mem.alloc(3).tolist() == [0, 1, 2]
        mem.free(np.array([1]))
        assert mem.alloc(2).tolist() == [1, 3]
        assert errno_of(lambda: mem.alloc(61)) == errno.ENOMEM
        assert mem.free_pages == 60


def test_free_poisons_the_pages_and_refuses_a_page_not_in_use(tmp_path: Path) -> None:
    with EphemeralMemory.open(tmp_path / "m", base_phys=8 * GiB, npages=64) as mem:
        pages = mem.alloc(2)
        mem.tables[pages] = 0
        mem.free(pages[:1])
        assert (mem.tables[0] == np.uint64(POISON)).all() and not mem.tables[1].any()
        with pytest.raises(ValueError):
            mem.free(np.array([0]))


def test_a_file_that_is_not_ephemeral_memory_is_refused_and_left_alone(image: Path) -> None:
    before = image.read_bytes()[:PS]
    with pytest.raises(FormatError):
        EphemeralMemory.open(image, base_phys=64 * GiB)
    assert image.read_bytes()[:PS] == before


def test_a_second_writer_is_ebusy(tmp_path: Path) -> None:
    with EphemeralMemory.open(tmp_path / "m", base_phys=8 * GiB, npages=64):
        assert errno_of(lambda: EphemeralMemory.open(tmp_path / "m", base_phys=8 * GiB)) == errno.EBUSY


def test_a_reopen_never_shrinks_the_file(tmp_path: Path) -> None:
    EphemeralMemory.open(tmp_path / "m", base_phys=8 * GiB, npages=256).close()
    with EphemeralMemory.open(tmp_path / "m", base_phys=8 * GiB, npages=64) as mem:
        assert mem.npages == 256
    with EphemeralMemory.open(tmp_path / "m", npages=512) as mem:
        assert (mem.npages, mem.base_phys) == (512, 8 * GiB)


def test_a_read_only_open_takes_everything_from_the_header_and_changes_nothing(tmp_path: Path) -> None:
    with EphemeralMemory.open(tmp_path / "m", base_phys=8 * GiB, npages=64) as rw:
        rw.poison()
        with EphemeralMemory.open(tmp_path / "m", read_only=True) as ro:
            assert (ro.base_phys, ro.npages, ro.boot_id) == (8 * GiB, 64, 1)
            assert errno_of(ro.poison) == errno.EROFS and errno_of(lambda: ro.alloc(1)) == errno.EROFS


def test_memory_overlapping_the_image_is_einval(store: Store, image: Path, tmp_path: Path) -> None:
    g = store.geometry
    with EphemeralMemory.open(tmp_path / "m", base_phys=g.base_phys + g.npages * PS - PS, npages=64) as mem:
        assert errno_of(lambda: Iommu.open(store, ephemeral=mem)) == errno.EINVAL


# ------------------------------------------------------ domains in ephemeral memory


def test_an_ephemeral_domain_maps_and_translates_as_an_image_domain(eio: Iommu, store: Store, vm0: int) -> None:
    img, eph = eio.create_domain(), eio.create_domain(ephemeral=True)
    for d in (img, eph):
        map_same(d, store, vm0)
    assert eph.mappings() == img.mappings() and leaves(eph) == leaves(img)
    img.attach(*IMG)
    eph.attach(*EPH)
    eio.enable()
    iovas = np.random.default_rng(1).integers(0, 80 * MiB, 20000).astype(np.uint64)
    iovas = np.concatenate([iovas, np.arange(1 << 40, (1 << 40) + 4 * MiB, 4099, dtype=np.uint64)])
    for write in (False, True):
        want = xlate(eio, IMG, iovas, write)
        assert (want[1] == 0).any() and (want[1] != 0).any()
        got = xlate(eio, EPH, iovas, write)
        assert (got[0] == want[0]).all() and (got[1] == want[1]).all()
    for iova in (0, 3 * MiB + 5 * PS, 64 * MiB + PS, 1 << 40):
        assert eph.translate_soft(iova) == img.translate_soft(iova)


def test_an_ephemeral_domain_uses_1g_leaves(make_image: Callable[..., Path]) -> None:
    path = make_image("3G", name="big.img")
    with Store.open(path) as s, Iommu.open(s, ephemeral=ephemeral.default_path(path)) as io:
        vm = guest(s, b"vm", 2 * GiB)
        p = phys(s, vm)
        img, eph = io.create_domain(), io.create_domain(ephemeral=True)
        for d in (img, eph):
            d.map(p, p, 2 * GiB)  # IOVA = GPA: one aligned GiB inside
        assert int(eph.walk()[0][1].leaf.sum()) == 1
        assert leaves(eph) == leaves(img) and eph.mappings() == img.mappings()


def test_ephemeral_tables_take_no_image_page(eio: Iommu, store: Store, vm0: int) -> None:
    before = store.statfs()
    d = eio.create_domain(ephemeral=True)
    map_same(d, store, vm0)
    after = store.statfs()
    assert (after.table_pages, after.free_pages) == (before.table_pages, before.free_pages)
    mem = mem_of(eio)
    assert mem.base_phys <= d.pml4_phys < mem.end_phys
    pages = table_pages_of(d)
    assert pages.size > 4 and ((pages >= 0) & (pages < mem.npages)).all()
    assert d.ino == 0 and d.path == f"ephemeral/dom-{d.domain_id}"
    assert [n for n, _ in store.children(eio.iommu_dir) if n.startswith(b"dom-")] == []


def test_image_and_ephemeral_domains_share_one_did_space(eio: Iommu) -> None:
    a, b, c = eio.create_domain(), eio.create_domain(ephemeral=True), eio.create_domain()
    assert [a.domain_id, b.domain_id, c.domain_id] == [1, 2, 3]
    assert errno_of(lambda: eio.create_domain(2)) == errno.EEXIST
    assert errno_of(lambda: eio.create_domain(1, ephemeral=True)) == errno.EEXIST


def test_an_ephemeral_domain_needs_ephemeral_memory(io: Iommu) -> None:
    assert errno_of(lambda: io.create_domain(ephemeral=True)) == errno.ENODEV


def test_a_full_ephemeral_memory_is_enomem_and_the_map_changes_nothing(store: Store, vm0: int,
                                                                       tmp_path: Path) -> None:
    base = ephemeral.default_base(store.geometry)
    with EphemeralMemory.open(tmp_path / "small", base_phys=base, npages=66) as mem, \
            Iommu.open(store, ephemeral=mem) as io:
        d = io.create_domain(ephemeral=True)  # takes 65 of the 66 pages: SL-PML4 and a pool of 64
        for k in range(21):  # three new tables each: 63 of the pool's 64
            d.map(k << 39, phys(store, vm0), PS)
        before = (d.mappings(), d.table_pages, io.pinned_pages(vm0), mem.free_pages)
        assert errno_of(lambda: d.map(21 << 39, phys(store, vm0), PS)) == errno.ENOMEM
        assert (d.mappings(), d.table_pages, io.pinned_pages(vm0), mem.free_pages) == before


def test_an_ephemeral_domain_pins_the_guest_files_it_maps(eio: Iommu, store: Store, vm0: int) -> None:
    d = eio.create_domain(ephemeral=True)
    d.map(0, phys(store, vm0), 2 * MiB + 3 * PS)
    assert eio.pinned(vm0) and eio.pinned_pages(vm0) == 515
    assert errno_of(lambda: store.truncate(vm0, 0)) == errno.EBUSY
    assert errno_of(lambda: store.unlink(store.lookup(ROOT, b"guest_mem"), b"vm0")) == errno.EBUSY
    d.unmap(0, 2 * MiB)
    assert eio.pinned_pages(vm0) == 3
    eio.destroy_domain(d)
    assert not eio.pinned(vm0)
    store.truncate(vm0, 0)


def test_destroy_gives_every_page_back_poisoned(eio: Iommu, store: Store, vm0: int) -> None:
    mem = mem_of(eio)
    free_before = mem.free_pages
    d = eio.create_domain(ephemeral=True)
    map_same(d, store, vm0)
    pages = d.memory.pages.copy()
    d.attach(*EPH)
    d.detach(*EPH)
    eio.destroy_domain(d)  # after the grace period
    assert mem.free_pages == free_before
    assert (mem.tables[pages] == np.uint64(POISON)).all()
    assert errno_of(lambda: d.map(0, phys(store, vm0), PS)) == errno.ENOENT


def test_freed_ephemeral_tables_are_reused_only_after_the_grace_period(eio: Iommu, store: Store, vm0: int,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from backing import iommu as iommu_mod

    monkeypatch.setattr(iommu_mod, "FREE_GRACE_S", 0.2)
    d = eio.create_domain(ephemeral=True)
    d.map(0, phys(store, vm0), PS)
    first = set(table_pages_of(d).tolist())
    d.unmap(0, PS)
    d.map(1 << 39, phys(store, vm0), PS)
    assert set(table_pages_of(d).tolist()) & first == {d.pml4_page}


# ------------------------------------------------------------------- copies


def test_a_copy_of_an_ephemeral_domain_into_the_image_is_saved_and_translates_identically(
        eio: Iommu, store: Store, vm0: int) -> None:
    eph = eio.create_domain(ephemeral=True)
    map_same(eph, store, vm0)
    saved = eio.copy_domain(eph)
    assert not saved.ephemeral and saved.flags & fmt.DOMF_SAVED
    assert store.lookup(eio.iommu_dir, f"dom-{saved.domain_id}".encode()) == saved.ino
    assert saved.mappings() == eph.mappings() and leaves(saved) == leaves(eph)
    assert eio.pinned_pages(vm0) == 2 * sum(m.length for m in eph.mappings()) // PS
    assert check_image(store.path) == (0, [])


def test_a_copy_of_an_image_domain_into_ephemeral_memory_translates_identically(
        eio: Iommu, store: Store, vm0: int) -> None:
    saved = eio.create_domain(flags=fmt.DOMF_SAVED)
    map_same(saved, store, vm0)
    back = eio.copy_domain(saved, ephemeral=True)
    assert back.ephemeral and back.flags == 0
    assert back.mappings() == saved.mappings() and leaves(back) == leaves(saved)
    pages = table_pages_of(back)
    assert (pages < mem_of(eio).npages).all()
    saved.attach(*IMG)
    back.attach(*EPH)
    eio.enable()
    iovas = np.arange(0, 80 * MiB, 3 * PS + 17, dtype=np.uint64)
    a, b = xlate(eio, IMG, iovas), xlate(eio, EPH, iovas)
    assert (a[0] == b[0]).all() and (a[1] == b[1]).all() and (a[1] == 0).any()


def test_copy_into_an_attached_ephemeral_domain(eio: Iommu, store: Store, vm0: int) -> None:
    src = eio.create_domain()
    map_same(src, store, vm0)
    dst = eio.create_domain(ephemeral=True)
    dst.attach(*EPH)
    eio.copy_into(src, dst)
    assert dst.mappings() == src.mappings()


# ------------------------------------------------------------ attach, replace


class RecordingStores:
    """Stands in for ``store.image_u64`` (where context entries are): after each store, ``after``."""

    def __init__(self, real: np.ndarray, after: Callable[[], None]) -> None:
        self.real, self.after, self.stores = real, after, 0

    def __getitem__(self, key: object) -> object:
        return self.real[key]

    def __setitem__(self, key: object, value: object) -> None:
        self.real[key] = value
        self.stores += 1
        self.after()

    def __getattr__(self, name: str) -> object:
        return getattr(self.real, name)


@pytest.fixture
def pair(eio: Iommu, store: Store, vm0: int) -> Iterator[tuple[Domain, Domain]]:
    """An ephemeral and an image domain mapping the same, nothing attached, translation on."""
    eph, img = eio.create_domain(ephemeral=True), eio.create_domain()
    for d in (eph, img):
        map_same(d, store, vm0)
    eio.enable()
    yield eph, img


@pytest.mark.parametrize("first", ["ephemeral", "image"])
def test_a_replacing_attach_between_the_kinds_never_faults(eio: Iommu, store: Store, pair: tuple[Domain, Domain],
                                                           first: str) -> None:
    eph, img = pair
    old, new = (eph, img) if first == "ephemeral" else (img, eph)
    old.attach(*EPH)
    iovas = np.arange(0, 8 * MiB, 64 * 1024, dtype=np.uint64)
    want, faults = xlate(eio, EPH, iovas)
    assert not faults.any()
    mem = mem_of(eio)

    def check() -> None:
        g = store.geometry
        assert eio.regs is not None
        got, fault = walker.translate(real, g.base_phys, g.npages, eio.regs, fmt.requester_id(*EPH), iovas,
                                      ephemeral=mem.region())
        assert not fault.any(), f"a store left the device faulting: {sorted(set(fault.tolist()))}"
        assert (got == want).all()

    real = store.image_u64
    rec = RecordingStores(real, check)
    store.image_u64 = rec  # type: ignore[assignment]
    try:
        new.attach(*EPH, replace=True)
    finally:
        store.image_u64 = real
    assert rec.stores >= 2 and eio.attached[fmt.requester_id(*EPH)] == new.domain_id


def test_a_freeze_switch_killed_between_its_two_stores_ends_on_the_saved_domain(
        eio: Iommu, store: Store, pair: tuple[Domain, Domain], image: Path) -> None:
    eph, img = pair
    eph.attach(*EPH)
    real = store.image_u64

    class Killed(Exception):
        pass

    def kill() -> None:
        raise Killed

    store.image_u64 = RecordingStores(real, kill)  # type: ignore[assignment]
    try:
        with pytest.raises(Killed):
            img.attach(*EPH, replace=True)
    finally:
        store.image_u64 = real
    assert check_image(image) == (0, [])  # the old DID is the ephemeral domain's: a crash state
    reopened = Iommu.open(store)
    try:
        assert reopened.attached == {fmt.requester_id(*EPH): img.domain_id}
        _sid, _ct, where = reopened._context_where(*EPH)
        assert vtd.context_entry_fields(int(real[where]), int(real[where + 1]))["DID"] == img.domain_id
    finally:
        reopened.close()


# ------------------------------------------------------------------ faults


def test_poison_makes_every_walk_through_ephemeral_tables_fault(eio: Iommu, store: Store,
                                                                pair: tuple[Domain, Domain]) -> None:
    eph, _img = pair
    eph.attach(*EPH)
    iovas = np.concatenate([np.arange(0, 80 * MiB, 4 * PS, dtype=np.uint64),
                            np.arange(1 << 40, (1 << 40) + 4 * MiB, PS, dtype=np.uint64)])
    assert (xlate(eio, EPH, iovas)[1] == 0).any()
    mem_of(eio).poison()
    for write in (False, True):
        got, fault = xlate(eio, EPH, iovas, write)
        assert (fault == fmt.FR_PT_RSVD).all() and not got.any()
    assert errno_of(lambda: eph.unmap(0, PS)) == errno.ENOENT  # its tables are gone
    eph.detach(*EPH)
    eio.destroy_domain(eph)
    assert eph.domain_id not in eio.domains


def test_a_pointer_into_neither_memory_faults(eio: Iommu, store: Store, pair: tuple[Domain, Domain]) -> None:
    eph, _img = pair
    eph.attach(*EPH)
    mem, g = mem_of(eio), store.geometry
    hole = g.base_phys + g.npages * PS  # past the image, below the ephemeral memory
    assert hole < mem.base_phys
    w = entry_where(store, eph, 0, 1)
    mem.u64[w] = np.uint64(mem.end_phys | vtd.RW)  # the SL-PDPE points just past the memory
    assert xlate(eio, EPH, np.array([0, 5 * PS], np.uint64))[1].tolist() == [fmt.FR_NEXT_PT_INVALID] * 2
    mem.u64[w] = np.uint64(hole | vtd.RW)
    assert xlate(eio, EPH, np.array([0], np.uint64))[1].tolist() == [fmt.FR_NEXT_PT_INVALID]
    _sid, _ct, where = eio._context_where(*EPH)
    store.image_u64[where] = np.uint64(vtd.context_entry(hole, eph.domain_id)[0])
    assert xlate(eio, EPH, np.array([0], np.uint64))[1].tolist() == [fmt.FR_NEXT_PT_INVALID]


def test_one_walk_reads_tables_in_both_memories(eio: Iommu, store: Store, vm0: int) -> None:
    # hardware walks any RAM: an image SL-PML4 whose entry 0 points at an ephemeral SL-PDPT
    # (pkfuse never writes such a tree; fsck would report it) -- one batch, both memories at a level
    eph, img = eio.create_domain(ephemeral=True), eio.create_domain()
    eph.map(0, phys(store, vm0), 4 * MiB)
    img.map(1 << 39, phys(store, vm0, 8 * MiB), 4 * MiB)
    store.image_u64[img.pml4_page * 512] = eph.memory.u64[eph.pml4_page * 512]
    img.attach(*IMG)
    eio.enable()
    iovas = np.array([5 * PS + 1, (1 << 39) + 5 * PS + 1, 3 * MiB, (1 << 39) + 3 * MiB], np.uint64)
    got, fault = xlate(eio, IMG, iovas)
    assert fault.tolist() == [0] * 4
    assert got.tolist() == [phys(store, vm0, 5 * PS) + 1, phys(store, vm0, 8 * MiB + 5 * PS) + 1,
                            phys(store, vm0, 3 * MiB), phys(store, vm0, 11 * MiB)]


def test_without_the_ephemeral_region_a_walk_into_it_faults(eio: Iommu, store: Store,
                                                            pair: tuple[Domain, Domain]) -> None:
    eph, _img = pair
    eph.attach(*EPH)
    g = store.geometry
    assert eio.regs is not None
    _p, fault = walker.translate(store.image_u64, g.base_phys, g.npages, eio.regs, fmt.requester_id(*EPH),
                                 np.array([0], np.uint64))
    assert fault.tolist() == [fmt.FR_NEXT_PT_INVALID]


# ------------------------------------------------------------------ restart


def restart_with_both_attached(image: Path) -> tuple[int, int]:
    """A daemon's life: an image and an ephemeral domain, both attached; then it stops without
    detaching anything (what a restart finds). Returns (image DID, ephemeral DID)."""
    with Store.open(image) as s:
        with Iommu.open(s, default_path(image), ephemeral=ephemeral.default_path(image)) as io:
            vm = guest(s, b"vm0", 16 * MiB)
            img, eph = io.create_domain(), io.create_domain(ephemeral=True)
            for d in (img, eph):
                d.map(0, phys(s, vm), 16 * MiB)
            img.attach(*IMG)
            eph.attach(*EPH)
            io.enable()
            return img.domain_id, eph.domain_id


def test_open_after_a_restart_clears_context_entries_into_ephemeral_memory_and_keeps_image_domains(
        image: Path, caplog: pytest.LogCaptureFixture) -> None:
    img_did, eph_did = restart_with_both_attached(image)
    boot = EphemeralMemory.open(ephemeral.default_path(image), read_only=True)
    boot_before = boot.boot_id
    boot.close()
    caplog.set_level(logging.WARNING, logger="backing.iommu")
    with Store.open(image) as s, Iommu.open(s, default_path(image), ephemeral=ephemeral.default_path(image)) as io:
        assert io.attached == {fmt.requester_id(*IMG): img_did}
        assert list(io.stale_entries) == [fmt.requester_id(*EPH)] and sorted(io.domains) == [img_did]
        assert "00:05.0" in caplog.text and "cleared" in caplog.text and f"DID {eph_did}" in caplog.text
        _sid, _ct, where = io._context_where(*EPH)
        assert not s.image_u64[where : where + 2].any()
        assert xlate(io, EPH, np.array([0], np.uint64))[1].tolist() == [fmt.FR_CONTEXT_NOT_PRESENT]
        assert xlate(io, IMG, np.array([0, MiB], np.uint64))[1].tolist() == [0, 0]
        mem = mem_of(io)
        assert mem.boot_id == boot_before + 1 and (mem.u64 == np.uint64(POISON)).all()
        again = io.create_domain(ephemeral=True)  # fresh memory, the freed DID
        assert again.domain_id == eph_did
    assert check_image(image) == (0, [])


def test_a_persistent_open_clears_them_too(image: Path) -> None:
    restart_with_both_attached(image)
    with Store.open(image) as s, Iommu.open(s) as io:  # no ephemeral memory this boot
        assert list(io.stale_entries) == [fmt.requester_id(*EPH)] and fmt.requester_id(*EPH) not in io.attached


def test_a_read_only_open_reports_them_and_changes_nothing(image: Path) -> None:
    restart_with_both_attached(image)
    before = image.read_bytes()
    eph_before = Path(ephemeral.default_path(image)).read_bytes()
    with Store.open(image, read_only=True) as s, \
            Iommu.open(s, ephemeral=ephemeral.default_path(image)) as io:
        sid = fmt.requester_id(*EPH)
        assert io.attached[sid] == -1 and sid in io.stale_entries
        assert io.ephemeral is not None and io.ephemeral.read_only
    assert image.read_bytes() == before and Path(ephemeral.default_path(image)).read_bytes() == eph_before


def test_fsck_accepts_a_context_entry_into_ephemeral_memory(eio: Iommu, store: Store,
                                                            pair: tuple[Domain, Domain], image: Path) -> None:
    eph, _img = pair
    eph.attach(*EPH)
    assert check_image(image) == (0, [])


_CHILD = textwrap.dedent("""
    import sys, time
    from backing import ephemeral, format as fmt
    from backing.iommu import Iommu
    from backing.regs import default_path
    from backing.store import Store
    image = sys.argv[1]
    s = Store.open(image)
    io = Iommu.open(s, default_path(image), ephemeral=ephemeral.default_path(image))
    vm = s.create(s.lookup(fmt.ROOT_INO, b"guest_mem"), b"vm0", 0o600, 0, 0)
    s.truncate(vm, 8 << 20)
    d = io.create_domain(ephemeral=True)
    d.map(0, s.extents(vm)[0].phys_addr, 8 << 20)
    d.attach(0, 5, 0)
    io.enable()
    print("ready", flush=True)
    time.sleep(60)
""")


def test_a_daemon_killed_with_an_ephemeral_domain_attached_leaves_what_open_clears(image: Path) -> None:
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(image)], stdout=subprocess.PIPE,
                             cwd=Path(__file__).resolve().parents[2])
    try:
        assert child.stdout is not None and child.stdout.readline() == b"ready\n"
        # the device keeps translating through the dead daemon's ephemeral tables until the open
        u64, base, npages = walker.open_image(image)
        with Regs.open(default_path(image)) as regs:
            _p, fault = walker.translate(u64, base, npages, regs, fmt.requester_id(*EPH), np.array([0], np.uint64),
                                         ephemeral=walker.open_ephemeral(ephemeral.default_path(image)))
            assert fault.tolist() == [0]
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    assert check_image(image) == (0, [])
    with Store.open(image) as s, Iommu.open(s, default_path(image), ephemeral=ephemeral.default_path(image)) as io:
        assert io.attached == {} and list(io.stale_entries) == [fmt.requester_id(*EPH)]
        assert not io.pinned(s.lookup(s.lookup(ROOT, b"guest_mem"), b"vm0"))
    assert check_image(image) == (0, [])


# ------------------------------------------------------------ another process


def _translate_elsewhere(image: str, eph: str, regs_path: str, sid: int, out: str) -> None:
    u64, base, npages = walker.open_image(image)
    region = walker.open_ephemeral(eph)
    with Regs.open(regs_path) as regs:
        p, f = walker.translate(u64, base, npages, regs, sid, np.arange(0, 80 * MiB, 7 * PS, dtype=np.uint64),
                                ephemeral=region)
    np.savez(out, phys=p, fault=f)


def test_a_walker_in_another_process_reads_both_files_read_only(eio: Iommu, store: Store, image: Path,
                                                                pair: tuple[Domain, Domain], tmp_path: Path) -> None:
    eph, _img = pair
    eph.attach(*EPH)
    out = tmp_path / "seen.npz"
    ctx = multiprocessing.get_context("fork")
    child = ctx.Process(target=_translate_elsewhere, args=(str(image), ephemeral.default_path(image),
                                                           default_path(image), fmt.requester_id(*EPH), str(out)))
    child.start()
    child.join(60)
    assert child.exitcode == 0
    seen = np.load(out)
    want = xlate(eio, EPH, np.arange(0, 80 * MiB, 7 * PS, dtype=np.uint64))
    assert (seen["phys"] == want[0]).all() and (seen["fault"] == want[1]).all() and (want[1] == 0).any()
