"""The hardware walker (backing.walker): each fault as VT-d reports it, the fault log,
garbage tables, another process's read-only view, and a walker running while the
tables change under load."""

from __future__ import annotations

import multiprocessing
import os
import random
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from iommu_helpers import entry_where

from backing import format as fmt
from backing import regs as regs_mod
from backing import walker
from backing.errors import FormatError
from backing.iommu import Domain, Iommu
from backing.regs import Regs
from backing.store import Store

PS = fmt.PAGE_SIZE
MiB = 1 << 20
ROOT = fmt.ROOT_INO
BUS, DEV, FN = 0, 4, 0
SID = fmt.requester_id(BUS, DEV, FN)


@pytest.fixture
def image(make_image: Callable[..., Path]) -> Path:
    return make_image(96 * MiB)


@pytest.fixture
def base(store: Store) -> int:
    """Physical address of a 48 MiB guest file (2 MiB aligned)."""
    ino = store.create(store.lookup(ROOT, b"guest_mem"), b"vm0", 0o600, 0, 0)
    store.truncate(ino, 48 * MiB)
    (e,) = store.extents(ino)
    assert e.phys_addr % (2 * MiB) == 0
    return e.phys_addr


@pytest.fixture
def dom(io: Iommu, base: int) -> Domain:
    d = io.create_domain()
    d.map(0, base, 4 * MiB)  # 2 MiB leaves
    d.map(8 * MiB, base + PS, 8 * PS)  # 4 KiB leaves
    d.map(16 * MiB, base + 8 * MiB, 4 * PS, write=False)
    d.attach(BUS, DEV, FN)
    io.enable()
    return d


def xlate(io: Iommu, iovas: list[int], write: bool = False, sid: tuple[int, int, int] = (BUS, DEV, FN),
          ) -> tuple[list[int], list[int]]:
    p, f = io.translate(*sid, np.array(iovas, np.uint64), write)
    return [int(x) for x in p], [int(x) for x in f]


# ---------------------------------------------------------------- translation


def test_2m_and_4k_leaves_translate_with_the_page_offset(io: Iommu, dom: Domain, base: int) -> None:
    phys, fault = xlate(io, [0, 0x1F_FFFF, 3 * MiB + 0x123, 8 * MiB + 7, 8 * MiB + 7 * PS + 0xFFF])
    assert fault == [0] * 5
    assert phys == [base, base + 0x1F_FFFF, base + 3 * MiB + 0x123, base + PS + 7, base + 8 * PS + 0xFFF]


def test_read_only_page_reads_and_faults_on_write(io: Iommu, dom: Domain, base: int) -> None:
    assert xlate(io, [16 * MiB + 5])[1] == [0]
    assert xlate(io, [16 * MiB + 5], write=True) == ([0], [fmt.FR_WRITE])


def test_unmapped_iova_faults_as_the_missing_access_right(io: Iommu, dom: Domain) -> None:
    assert xlate(io, [5 * MiB])[1] == [fmt.FR_READ]
    assert xlate(io, [5 * MiB], write=True)[1] == [fmt.FR_WRITE]
    assert xlate(io, [1 << 40])[1] == [fmt.FR_READ]  # no PDPT there at all


def test_per_request_write_flags(io: Iommu, dom: Domain) -> None:
    _, f = io.translate(BUS, DEV, FN, np.array([16 * MiB, 16 * MiB], np.uint64), np.array([False, True]))
    assert f.tolist() == [0, fmt.FR_WRITE]


def test_iova_beyond_48_bits_is_addr_beyond_aw(io: Iommu, dom: Domain) -> None:
    assert xlate(io, [1 << 48, (1 << 64) - 1])[1] == [fmt.FR_ADDR_BEYOND_AW] * 2


def test_translation_disabled_blocks_everything(io: Iommu, dom: Domain) -> None:
    io.disable()
    assert xlate(io, [0])[1] == [fmt.FR_TRANSLATION_DISABLED]


def test_root_table_address_outside_memory_is_invalid(io: Iommu, dom: Domain) -> None:
    assert io.regs is not None
    io.regs.set_root_table(0x1000)
    assert xlate(io, [0])[1] == [fmt.FR_ROOT_TABLE_INVALID]


def test_bus_without_root_entry_faults_root_not_present(io: Iommu, dom: Domain) -> None:
    assert xlate(io, [0], sid=(BUS + 1, DEV, FN))[1] == [fmt.FR_ROOT_NOT_PRESENT]


def test_device_without_context_entry_faults_context_not_present(io: Iommu, dom: Domain) -> None:
    assert xlate(io, [0], sid=(BUS, DEV + 1, FN))[1] == [fmt.FR_CONTEXT_NOT_PRESENT]


def test_reserved_bit_in_root_entry(io: Iommu, store: Store, dom: Domain) -> None:
    store.image_u64[int(io.root_pages[0]) * 512 + BUS * 2] |= np.uint64(1 << 4)
    assert xlate(io, [0])[1] == [fmt.FR_ROOT_RSVD]


def context_where(io: Iommu) -> int:
    return int(io.root_pages[1 + BUS]) * 512 + ((DEV << 3) | FN) * 2


@pytest.mark.parametrize("word, bits", [(0, 1 << 8), (1, 1 << 7), (1, 1 << 40)])
def test_reserved_bit_in_context_entry(io: Iommu, store: Store, dom: Domain, word: int, bits: int) -> None:
    store.image_u64[context_where(io) + word] |= np.uint64(bits)
    assert xlate(io, [0])[1] == [fmt.FR_CONTEXT_RSVD]


def test_pass_through_translation_type_is_an_invalid_context_entry(io: Iommu, store: Store, dom: Domain) -> None:
    store.image_u64[context_where(io)] |= np.uint64(fmt.CE_TT_PASSTHROUGH << fmt.CE_LO_TT_SHIFT)
    assert xlate(io, [0])[1] == [fmt.FR_CONTEXT_INVALID]


def test_39_bit_address_width_is_an_invalid_context_entry(io: Iommu, store: Store, dom: Domain) -> None:
    w = context_where(io) + 1
    store.image_u64[w] = (store.image_u64[w] & ~np.uint64(7)) | np.uint64(fmt.CE_AW_39)
    assert xlate(io, [0])[1] == [fmt.FR_CONTEXT_INVALID]


def test_fault_processing_disable_blocks_without_logging(io: Iommu, store: Store, dom: Domain) -> None:
    assert io.regs is not None
    store.image_u64[context_where(io)] |= np.uint64(fmt.CE_LO_FPD)
    before = io.regs.fault_seq
    assert xlate(io, [5 * MiB])[1] == [fmt.FR_READ]
    assert io.regs.fault_seq == before


@pytest.mark.parametrize("iova, level, bits", [
    (8 * MiB, 3, 1 << 62),  # TM: reserved without Device-TLB support
    (8 * MiB, 1, 1 << 62),  # bit 62 in a non-leaf PDPE
    (0, 2, 1 << 62),  # bit 62 in a 2 MiB leaf
    (0, 2, 1 << 12),  # inside a 2 MiB leaf's address
    (8 * MiB, 2, 1 << 11),  # bit 11 in a non-leaf PDE
    (8 * MiB, 3, fmt.SL_SNP),  # SNP in a 4 KiB leaf: no snoop control (ECAP.SC) reported
    (0, 2, fmt.SL_SNP),  # ... nor in a 2 MiB leaf
    (8 * MiB, 0, 1 << 11),  # bit 11 in a PML4E
    (0, 0, fmt.SL_PS),  # PS in a PML4E
])
def test_reserved_bits_in_second_level_entries(io: Iommu, store: Store, dom: Domain, iova: int, level: int,
                                               bits: int) -> None:
    store.image_u64[entry_where(store, dom, iova, level)] |= np.uint64(bits)
    assert xlate(io, [iova])[1] == [fmt.FR_PT_RSVD]


@pytest.mark.parametrize("level", [0, 1, 2, 3])
@pytest.mark.parametrize("bits", [1 << 63, 1 << 61, 1 << 55, 1 << 10, fmt.SL_X])
def test_bits_hardware_ignores_do_not_fault(io: Iommu, store: Store, dom: Domain, level: int, bits: int) -> None:
    before = xlate(io, [8 * MiB + 0x123])
    store.image_u64[entry_where(store, dom, 8 * MiB, level)] |= np.uint64(bits)
    assert xlate(io, [8 * MiB + 0x123]) == before and before[1] == [0]


@pytest.mark.parametrize("level", [0, 1, 2])
@pytest.mark.parametrize("bits", [0b1111 << 3, 1 << 3, 1 << 6])
def test_bits_6_3_of_a_non_leaf_entry_are_ignored(io: Iommu, store: Store, dom: Domain, level: int,
                                                  bits: int) -> None:
    before = xlate(io, [8 * MiB + 0x123], write=True)
    store.image_u64[entry_where(store, dom, 8 * MiB, level)] |= np.uint64(bits)
    assert xlate(io, [8 * MiB + 0x123], write=True) == before and before[1] == [0]


@pytest.mark.parametrize("write", [False, True])
def test_x_of_a_2m_leaf_is_ignored(io: Iommu, store: Store, dom: Domain, write: bool) -> None:
    before = xlate(io, [MiB + 0x456], write=write)
    store.image_u64[entry_where(store, dom, 0, 2)] |= np.uint64(fmt.SL_X)
    assert xlate(io, [MiB + 0x456], write=write) == before and before[1] == [0]


def test_bit_7_of_a_pte_is_ignored_not_a_page_size(io: Iommu, store: Store, dom: Domain) -> None:
    before = xlate(io, [8 * MiB + 0x123], write=True)
    store.image_u64[entry_where(store, dom, 8 * MiB, 3)] |= np.uint64(1 << 7)
    assert xlate(io, [8 * MiB + 0x123], write=True) == before and before[1] == [0]


def test_bit_61_of_a_superpage_leaf_does_not_leak_into_the_address(io: Iommu, store: Store, dom: Domain) -> None:
    before = xlate(io, [MiB + 0x456])
    store.image_u64[entry_where(store, dom, 0, 2)] |= np.uint64(1 << 61)
    assert xlate(io, [MiB + 0x456]) == before and before[1] == [0]


def test_write_needs_w_at_every_level(io: Iommu, store: Store, dom: Domain) -> None:
    store.image_u64[entry_where(store, dom, 8 * MiB, 2)] &= ~np.uint64(fmt.SL_W)
    assert xlate(io, [8 * MiB])[1] == [0]
    assert xlate(io, [8 * MiB], write=True)[1] == [fmt.FR_WRITE]


def test_table_pointer_outside_memory_faults_not_indexerror(io: Iommu, store: Store, dom: Domain) -> None:
    store.image_u64[entry_where(store, dom, 8 * MiB, 1)] = np.uint64((1 << 51) | 3)
    store.image_u64[entry_where(store, dom, 0, 0)] = np.uint64(0x1000 | 3)  # below base_phys
    assert xlate(io, [8 * MiB, 0])[1] == [fmt.FR_NEXT_PT_INVALID] * 2


# ------------------------------------------------------------------ fault log


def test_faults_are_logged_with_requester_iova_reason_and_type(io: Iommu, dom: Domain) -> None:
    assert io.regs is not None
    io.regs.clear_faults()
    xlate(io, [5 * MiB + 3], write=True)
    (f,) = io.regs.faults()
    assert (f.seq, f.iova, f.source_id, f.reason, f.write) == (1, 5 * MiB + 3, SID, fmt.FR_WRITE, True)
    assert "00:04.0 write iova 0x500003" in str(f)


def test_the_fault_log_is_a_ring_of_the_newest_entries(io: Iommu, dom: Domain) -> None:
    assert io.regs is not None
    io.regs.clear_faults()
    n = fmt.FAULT_LOG_ENTRIES
    xlate(io, [(1 << 40) + i * PS for i in range(n + 10)])
    faults = io.regs.faults()
    assert io.regs.fault_seq == n + 10 and len(faults) == n
    assert [f.seq for f in faults] == list(range(11, n + 11))
    assert faults[-1].iova == (1 << 40) + (n + 9) * PS


def test_registers_survive_closing_and_reopening(io: Iommu, dom: Domain, image: Path) -> None:
    assert io.regs is not None
    xlate(io, [5 * MiB])
    seq, rt = io.regs.fault_seq, io.regs.rtaddr
    with Regs.open(regs_mod.default_path(image), create=False) as again:
        assert (again.enabled, again.rtaddr, again.fault_seq) == (True, rt, seq)


def test_enable_without_root_table_is_refused(tmp_path: Path) -> None:
    with Regs.open(tmp_path / "r.regs") as r:
        assert not r.enabled and r.rtaddr == 0
        with pytest.raises(ValueError):
            r.enable()


@pytest.mark.parametrize("size", [100, fmt.REGS_DTYPE.fields["layout"][1], fmt.REGS_V1_BYTES - 8])
def test_a_register_file_too_short_for_the_block_is_a_format_error(tmp_path: Path, size: int) -> None:
    path = tmp_path / "short.regs"
    path.write_bytes(fmt.REGS_MAGIC + bytes(size - 8))
    with pytest.raises(FormatError) as e:
        Regs.open(path, create=False)
    assert str(path) in str(e.value)


# -------------------------------------------------------------- other process


def test_a_read_only_mapping_of_the_image_translates_the_same(io: Iommu, dom: Domain, image: Path) -> None:
    u64, base_phys, npages = walker.open_image(image)
    assert io.regs is not None
    iovas = np.arange(0, 20 * MiB, 0x3000, dtype=np.uint64)
    a = io.translate(BUS, DEV, FN, iovas, True)
    b = walker.translate(u64, base_phys, npages, io.regs, SID, iovas, True)
    assert (a[0] == b[0]).all() and (a[1] == b[1]).all()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(garbage=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 511), st.integers(0, (1 << 64) - 1)),
                        min_size=1, max_size=20),
       iovas=st.lists(st.integers(0, (1 << 49)), min_size=1, max_size=50))
def test_garbage_tables_give_faults_or_addresses_in_memory_never_exceptions(
        io: Iommu, store: Store, dom: Domain, garbage: list[tuple[int, int, int]], iovas: list[int]) -> None:
    levels, _ = dom.walk()
    saved = {}
    for level, idx, value in garbage:
        tables = levels[level].tables
        if not tables.size:
            continue
        where = int(tables[idx % tables.size]) * 512 + idx
        saved.setdefault(where, int(store.image_u64[where]))
        store.image_u64[where] = np.uint64(value)
    try:
        phys, fault = io.translate(BUS, DEV, FN, np.array(iovas, np.uint64), bool(iovas[0] & 1))
        g = store.geometry
        ok = fault == 0
        assert ((phys[ok] >= g.base_phys) & (phys[ok] < g.base_phys + g.size)).all()
        assert (phys[~ok] == 0).all()
    finally:
        for where, value in saved.items():
            store.image_u64[where] = np.uint64(value)



@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(re_word=st.integers(0, (1 << 64) - 1), ce_lo=st.integers(0, (1 << 64) - 1), ce_hi=st.integers(0, (1 << 64) - 1),
       rtaddr=st.sampled_from([None, 0, 0x1000, (1 << 52) - 0x1000]),
       iovas=st.lists(st.integers(0, 1 << 49), min_size=1))
def test_garbage_root_and_context_entries_give_faults_never_exceptions(
        io: Iommu, store: Store, dom: Domain, re_word: int, ce_lo: int, ce_hi: int, rtaddr: int | None,
        iovas: list[int]) -> None:
    assert io.regs is not None
    re_lo = int(io.root_pages[0]) * 512 + BUS * 2
    words = {re_lo: re_word | fmt.RE_LO_P, context_where(io): ce_lo | fmt.CE_LO_P, context_where(io) + 1: ce_hi}
    saved = {w: int(store.image_u64[w]) for w in words}
    old_rtaddr = io.regs.rtaddr
    try:
        for w, value in words.items():
            store.image_u64[w] = np.uint64(value)
        if rtaddr is not None:
            io.regs.set_root_table(rtaddr)
        phys, fault = io.translate(BUS, DEV, FN, np.array(iovas, np.uint64))
        g = store.geometry
        ok = fault == 0
        assert ((phys[ok] >= g.base_phys) & (phys[ok] < g.base_phys + g.size)).all()
        assert (phys[~ok] == 0).all() and set(fault[~ok].tolist()) <= set(fmt.FR_NAMES)
    finally:
        io.regs.set_root_table(old_rtaddr)
        for w, value in saved.items():
            store.image_u64[w] = np.uint64(value)


# ------------------------------------------------------ concurrent walker, load

REGIONS = 12
REGION = 4 * MiB
VARIANTS = 4


def _variant(base: int, r: int, v: int) -> tuple[int, int, int]:
    """(iova, phys, length) of variant ``v`` of region ``r``: even v aligned for 2 MiB leaves."""
    length = 2 * MiB + (r % 3) * PS
    return r * REGION, base + v * 8 * MiB + (v % 2) * PS, length


def _walk_forever(image: str, regs_path: str, stop: str, out: str, seed: int) -> None:
    """Child process: translate random batches until ``stop`` exists; save what it saw.

    (Measured: with FREE_GRACE_S = 0 this sees thousands of translations
    that were never valid -- tables reused while a batch was inside them.)"""
    u64, base_phys, npages = walker.open_image(image)  # read-only mapping of its own
    regs = Regs.open(regs_path, create=False)
    rng = np.random.default_rng(seed)
    seen = np.zeros(0, np.uint64)
    chunks = []
    batches = faults = 0
    while not os.path.exists(stop):
        # big batches widen the window between two levels' reads (a 1M batch: ~50 ms)
        iovas = rng.integers(0, REGIONS * REGION, 1 << (20 if batches % 2 else 16)).astype(np.uint64)
        phys, fault = walker.translate(u64, base_phys, npages, regs, SID, iovas, bool(batches % 2))
        ok = fault == 0
        faults += int((~ok).sum())
        bad = (phys[ok] & np.uint64(0xFFF)) != (iovas[ok] & np.uint64(0xFFF))
        assert not bad.any()
        chunks.append(((iovas[ok] >> np.uint64(12)) << np.uint64(32)) | (phys[ok] >> np.uint64(12)))
        batches += 1
        if len(chunks) == 32:
            seen = np.unique(np.concatenate([seen, *chunks]))
            chunks = []
    seen = np.unique(np.concatenate([seen, *chunks]))
    np.savez(out, pairs=seen, batches=batches, faults=faults)


def test_a_walker_in_another_process_never_sees_a_torn_or_dangling_translation(
        io: Iommu, store: Store, base: int, image: Path, tmp_path: Path) -> None:
    d = io.create_domain()
    d.attach(BUS, DEV, FN)
    io.enable()
    valid: set[int] = set()  # iova page << 32 | pfn, every pair ever mapped
    mapped: dict[int, int] = {}
    stop, out = tmp_path / "stop", tmp_path / "seen.npz"
    ctx = multiprocessing.get_context("fork")
    child = ctx.Process(target=_walk_forever, args=(str(image), regs_mod.default_path(image), str(stop), str(out), 7))
    child.start()
    rnd = random.Random(3)
    ops = 0
    try:
        deadline = time.monotonic() + 4.0
        while time.monotonic() < deadline:
            r = rnd.randrange(REGIONS)
            if r in mapped:
                iova, _, length = _variant(base, r, mapped[r])
                if rnd.random() < 0.5:  # split a superpage and leave half mapped for a while
                    d.unmap(iova + MiB, length - MiB)
                    d.unmap(iova, MiB)
                else:
                    d.unmap(iova, length)
                del mapped[r]
            else:
                v = rnd.randrange(VARIANTS)
                iova, phys, length = _variant(base, r, v)
                pages = np.arange(length // PS, dtype=np.uint64)
                valid.update((((np.uint64(iova >> 12) + pages) << np.uint64(32)) | (np.uint64(phys >> 12) + pages)).tolist())
                d.map(iova, phys, length)
                mapped[r] = v
            ops += 1
    finally:
        stop.touch()
        child.join(30)
    assert child.exitcode == 0, "the walker process failed"
    seen = np.load(out)
    pairs = set(seen["pairs"].tolist())
    assert ops > 100 and int(seen["batches"]) > 10
    assert pairs and int(seen["faults"]) > 0  # it saw both mapped and unmapped IOVAs
    assert pairs <= valid, f"{len(pairs - valid)} translations were never valid, e.g. {sorted(pairs - valid)[:3]}"
