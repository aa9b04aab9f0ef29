"""The domain API (backing.iommu): map/unmap against a model, superpages, refusals, pins,
attach/detach, copy, destroy, persistence and a kill in the middle of mapping."""

from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backing import format as fmt
from backing import iommu as iommu_mod
from backing import vtd
from backing.errors import FormatError, StoreError
from backing.fsck import check_image
from backing.iommu import Domain, Iommu
from backing.mkfs import mkfs
from backing.store import Store

PS = fmt.PAGE_SIZE
MiB = 1 << 20
GiB = 1 << 30
ROOT = fmt.ROOT_INO


def errno_of(fn: Callable[[], object]) -> int:
    with pytest.raises(StoreError) as e:
        fn()
    return e.value.errno


def guest(store: Store, name: bytes, size: int) -> int:
    ino = store.create(store.lookup(ROOT, b"guest_mem"), name, 0o600, 0, 0)
    store.truncate(ino, size)
    return ino


def phys(store: Store, ino: int, offset: int = 0) -> int:
    """Physical address of byte ``offset`` of file ``ino``."""
    for e in store.extents(ino):
        if e.file_offset <= offset < e.file_offset + e.length:
            return e.phys_addr + offset - e.file_offset
    raise AssertionError("offset beyond the file")


def expand(dom: Domain) -> dict[int, tuple[int, bool]]:
    """IOVA page -> (pfn, writable), from the coalesced mappings."""
    out = {}
    for m in dom.mappings():
        for i in range(m.length // PS):
            out[(m.iova >> 12) + i] = ((m.phys_addr >> 12) + i, m.write)
    return out


def leaf_levels(dom: Domain) -> dict[int, int]:
    """Number of leaves at each level of the tree."""
    levels, problems = dom.walk()
    assert not problems
    return {lvl: int(lv.leaf.sum()) for lvl, lv in enumerate(levels)}


@pytest.fixture
def image(make_image: Callable[..., Path]) -> Path:
    return make_image(128 * MiB)


@pytest.fixture
def vm0(store: Store) -> int:
    return guest(store, b"vm0", 32 * MiB)


# ------------------------------------------------------------------ creation


def test_create_domain_makes_a_read_only_domain_file_with_header_and_pml4(io: Iommu, store: Store) -> None:
    d = io.create_domain()
    assert d.domain_id == 1 and d.path == "iommu/dom-1"
    ino = store.lookup(io.iommu_dir, b"dom-1")
    attr = store.getattr(ino)
    assert attr.kind == fmt.KIND_IOMMU_DOMAIN and attr.mode & 0o777 == 0o444
    hdr = store.image[store.extents(ino)[0].page * PS :][: fmt.DOMAIN_HEADER_DTYPE.itemsize].view(fmt.DOMAIN_HEADER_DTYPE)[0]
    assert bytes(hdr["magic"]) == fmt.DOMAIN_MAGIC and bytes(hdr["compatible"]) == fmt.DOMAIN_COMPATIBLE
    assert int(hdr["domain_id"]) == 1 and int(hdr["pml4_file_page"]) == 1
    assert d.table_pages == 1


def test_create_domain_with_a_taken_id_is_eexist(io: Iommu) -> None:
    io.create_domain(7)
    assert errno_of(lambda: io.create_domain(7)) == errno.EEXIST
    assert io.create_domain().domain_id == 1


def test_domain_id_zero_or_beyond_16_bits_is_einval(io: Iommu) -> None:
    assert errno_of(lambda: io.create_domain(0)) == errno.EINVAL
    assert errno_of(lambda: io.create_domain(1 << 16)) == errno.EINVAL


# ------------------------------------------------------------------- mapping


def test_map_then_mappings_lists_one_coalesced_range_with_file_offset(io: Iommu, store: Store, vm0: int) -> None:
    d = io.create_domain()
    d.map(0x10000, phys(store, vm0, 0x3000), 5 * PS, write=False)
    (m,) = d.mappings()
    assert (m.iova, m.phys_addr, m.length, m.write) == (0x10000, phys(store, vm0, 0x3000), 5 * PS, False)
    assert (m.ino, m.file_offset, m.path) == (vm0, 0x3000, "guest_mem/vm0")


def test_aligned_2m_ranges_use_2m_leaves(io: Iommu, store: Store, vm0: int) -> None:
    d = io.create_domain()
    d.map(4 * MiB, phys(store, vm0), 8 * MiB)
    assert leaf_levels(d) == {0: 0, 1: 0, 2: 4, 3: 0}


def test_unaligned_head_and_tail_use_4k_leaves_around_2m_leaves(io: Iommu, store: Store, vm0: int) -> None:
    d = io.create_domain()
    d.map(2 * MiB - 3 * PS, phys(store, vm0, 2 * MiB - 3 * PS), 4 * MiB + 5 * PS)
    assert leaf_levels(d) == {0: 0, 1: 0, 2: 2, 3: 3 + 2}
    assert d.mappings()[0].length == 4 * MiB + 5 * PS


def test_iova_and_phys_aligned_differently_use_only_4k_leaves(io: Iommu, store: Store, vm0: int) -> None:
    d = io.create_domain()
    d.map(2 * MiB, phys(store, vm0, PS), 2 * MiB)
    assert leaf_levels(d)[2] == 0 and leaf_levels(d)[3] == 512


def test_1g_aligned_range_uses_a_1g_leaf(tmp_path: Path) -> None:
    img = tmp_path / "big.img"
    mkfs(img, 3 * GiB)  # sparse
    with Store.open(img) as s:
        g = guest(s, b"vm0", 2 * GiB)
        with Iommu.open(s) as io:
            d = io.create_domain()
            base = phys(s, g)
            first_1g = -(-base // GiB) * GiB
            d.map(GiB, first_1g, GiB)
            assert leaf_levels(d) == {0: 0, 1: 1, 2: 0, 3: 0}
            assert d.translate_soft(GiB + 0x1234) == first_1g + 0x1234
            assert d.translate_soft((1 << 48) + GiB) is None  # not the 48-bit IOVA's translation
            # unmapping one page in its middle splits it: 1 GiB -> 2 MiB leaves -> 4 KiB leaves
            assert d.unmap(GiB + 300 * MiB + PS, PS) == PS
            assert leaf_levels(d) == {0: 0, 1: 0, 2: 511, 3: 511}
            assert d.translate_soft(GiB + 300 * MiB + PS) is None
            for off in (0, 300 * MiB, 300 * MiB + 2 * PS, GiB - 1):
                assert d.translate_soft(GiB + off) == first_1g + off
            assert sum(m.length for m in d.mappings()) == GiB - PS


def test_map_over_a_mapped_page_is_eexist_and_changes_nothing(io: Iommu, store: Store, vm0: int) -> None:
    d = io.create_domain()
    d.map(0x100000, phys(store, vm0), 4 * PS)
    before = (expand(d), d.table_pages)
    assert errno_of(lambda: d.map(0x100000 - 8 * PS, phys(store, vm0, 64 * PS), 9 * PS)) == errno.EEXIST
    assert (expand(d), d.table_pages) == before


def test_map_inside_a_2m_leaf_is_eexist(io: Iommu, store: Store, vm0: int) -> None:
    d = io.create_domain()
    d.map(0, phys(store, vm0), 2 * MiB)
    assert errno_of(lambda: d.map(0x5000, phys(store, vm0, 4 * MiB), PS)) == errno.EEXIST


@pytest.mark.parametrize("iova, length", [(0x800, PS), (0, 0x1800), (0, 0), (-PS, PS),
                                          ((1 << 48) - PS, 2 * PS), (1 << 48, PS)])
def test_map_of_a_misaligned_or_too_wide_range_is_einval(io: Iommu, store: Store, vm0: int, iova: int, length: int) -> None:
    d = io.create_domain()
    assert errno_of(lambda: d.map(iova, phys(store, vm0), length)) == errno.EINVAL


def test_map_of_a_misaligned_physical_address_is_einval(io: Iommu, store: Store, vm0: int) -> None:
    d = io.create_domain()
    assert errno_of(lambda: d.map(0, phys(store, vm0) + 8, PS)) == errno.EINVAL


def test_map_to_metadata_is_efault(io: Iommu, store: Store) -> None:
    d = io.create_domain()
    assert errno_of(lambda: d.map(0, store.geometry.base_phys, PS)) == errno.EFAULT


def test_map_to_the_root_table_is_efault(io: Iommu) -> None:
    d = io.create_domain()
    assert errno_of(lambda: d.map(0, io.root_table_phys, PS)) == errno.EFAULT


def test_map_to_a_domains_own_table_pages_is_efault(io: Iommu) -> None:
    d = io.create_domain()
    assert errno_of(lambda: d.map(0, d.pml4_phys, PS)) == errno.EFAULT


def test_map_to_free_pages_is_efault(io: Iommu, store: Store) -> None:
    d = io.create_domain()
    last = store.geometry.phys_addr(store.geometry.npages - 1)
    assert errno_of(lambda: d.map(0, last, PS)) == errno.EFAULT


def test_map_running_past_the_end_of_a_guest_file_is_efault(io: Iommu, store: Store, vm0: int) -> None:
    d = io.create_domain()
    assert errno_of(lambda: d.map(0, phys(store, vm0, 32 * MiB - PS), 2 * PS)) == errno.EFAULT
    assert d.mappings() == []


def test_map_outside_the_image_is_efault(io: Iommu, store: Store) -> None:
    d = io.create_domain()
    assert errno_of(lambda: d.map(0, store.geometry.phys_addr(store.geometry.npages), PS)) == errno.EFAULT
    assert errno_of(lambda: d.map(0, 0, PS)) == errno.EFAULT


def test_one_mapping_may_span_two_guest_files(io: Iommu, store: Store) -> None:
    a = guest(store, b"a", 2 * MiB)
    b = guest(store, b"b", 2 * MiB)
    if phys(store, b) != phys(store, a) + 2 * MiB:
        pytest.skip("allocator did not place the files next to each other")
    d = io.create_domain()
    d.map(0, phys(store, a, MiB), 2 * MiB)
    assert [(m.ino, m.file_offset, m.length) for m in d.mappings()] == [(a, MiB, MiB), (b, 0, MiB)]
    assert io.pinned(a) and io.pinned(b)


# ----------------------------------------------------------------- unmapping


def test_unmap_returns_the_bytes_unmapped_and_skips_holes(io: Iommu, store: Store, vm0: int) -> None:
    d = io.create_domain()
    d.map(0, phys(store, vm0), 4 * PS)
    d.map(8 * PS, phys(store, vm0, 8 * PS), 4 * PS)
    assert d.unmap(2 * PS, 8 * PS) == 4 * PS
    assert sorted(expand(d)) == [0, 1, 10, 11]


def test_unmap_of_part_of_a_2m_leaf_splits_it_and_keeps_the_rest(io: Iommu, store: Store, vm0: int) -> None:
    d = io.create_domain()
    base = phys(store, vm0)
    d.map(0, base, 4 * MiB)
    assert d.unmap(MiB, PS) == PS
    got = expand(d)
    assert len(got) == 1024 - 1 and (MiB >> 12) not in got
    assert got[(MiB >> 12) + 1] == ((base + MiB + PS) >> 12, True)
    assert leaf_levels(d) == {0: 0, 1: 0, 2: 1, 3: 511}


def test_unmap_of_everything_frees_every_table_but_the_pml4(io: Iommu, store: Store, vm0: int) -> None:
    d = io.create_domain()
    d.map(0x7F0000000, phys(store, vm0, PS), 8 * MiB)
    assert d.table_pages > 1
    d.unmap(0, 1 << 48)
    assert d.table_pages == 1 and d.mappings() == []
    assert not store.image_u64[d.pml4_page * 512 :][:512].any()


def test_freed_table_pages_are_reused_only_after_the_grace_period(io: Iommu, store: Store, vm0: int,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(iommu_mod, "FREE_GRACE_S", 0.2)
    d = io.create_domain()
    d.map(0, phys(store, vm0), PS)
    used_before = {int(p) for lv in d.walk()[0] for p in lv.tables}
    d.unmap(0, PS)
    d.map(1 << 39, phys(store, vm0), PS)  # needs three new tables
    used_now = {int(p) for lv in d.walk()[0] for p in lv.tables}
    assert used_now & used_before == {d.pml4_page}
    time.sleep(0.25)
    d.unmap(1 << 39, PS)
    time.sleep(0.25)
    d.map(0, phys(store, vm0), PS)
    assert {int(p) for lv in d.walk()[0] for p in lv.tables} & (used_before | used_now) - {d.pml4_page}


# -------------------------------------------------------- property: dict model

IOVA_PAGES = 3 * 512  # 6 MiB of IOVA space: room for 2 MiB leaves and overlaps
GUEST_PAGES = 4 * 512

op_map = st.tuples(st.just("map"), st.integers(0, IOVA_PAGES - 1), st.integers(1, 700),
                   st.integers(0, GUEST_PAGES - 1), st.booleans(), st.booleans())
op_unmap = st.tuples(st.just("unmap"), st.integers(0, IOVA_PAGES - 1), st.integers(1, 900))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(st.one_of(op_map, op_unmap), min_size=1, max_size=12))
def test_map_unmap_translate_agree_with_a_dict_model(io: Iommu, store: Store, ops: list[tuple]) -> None:
    if not io.domains:
        g = guest(store, b"model", GUEST_PAGES * PS)
        d = io.create_domain()
        d.attach(0, 5, 1)
        io.enable()
    d = io.domains[1]
    g = store.lookup(store.lookup(ROOT, b"guest_mem"), b"model")
    d.unmap(0, 1 << 48)
    assert d.table_pages == 1  # nothing leaked by the previous example
    base_pfn = phys(store, g) >> 12
    model: dict[int, tuple[int, bool]] = {}
    for op in ops:
        if op[0] == "map":
            _, iova, n, gp, align, write = op
            if align:  # steer towards 2 MiB leaves: aligned alike in IOVA and phys
                iova, gp, n = iova // 512 * 512, gp // 512 * 512, max(n, 512)
            n = min(n, GUEST_PAGES - gp, IOVA_PAGES - iova)
            if n <= 0:
                continue
            want = {iova + i: (base_pfn + gp + i, write) for i in range(n)}
            if model.keys() & want.keys():
                with pytest.raises(StoreError) as e:
                    d.map(iova * PS, (base_pfn + gp) * PS, n * PS, write=write)
                assert e.value.errno == errno.EEXIST
            else:
                d.map(iova * PS, (base_pfn + gp) * PS, n * PS, write=write)
                model.update(want)
                if (base_pfn + gp - iova) % 512 == 0:  # every 2 MiB slot inside is one SL-PDE leaf
                    lv = d.walk()[0][2]
                    leaves = set(lv.slots[lv.leaf].tolist())
                    assert set(range(-(-iova // 512), (iova + n) // 512)) <= leaves
        else:
            _, iova, n = op
            gone = [p for p in range(iova, iova + n) if p in model]
            assert d.unmap(iova * PS, n * PS) == len(gone) * PS
            for p in gone:
                del model[p]
        assert expand(d) == model
        levels, problems = d.walk()
        assert not problems
        for lv in levels[1:]:  # no empty table is left reachable below the SL-PML4
            assert store.image_u64.reshape(-1, 512)[lv.tables].any(axis=1).all()
    # the hardware walker agrees, for reads and writes, on every page of the space
    iovas = np.arange(IOVA_PAGES + 8, dtype=np.uint64) * np.uint64(PS) + np.uint64(0x123)
    for write in (False, True):
        got, fault = io.translate(0, 5, 1, iovas, write)
        for i in range(iovas.size):
            entry = model.get(i)
            if entry is None or (write and not entry[1]):
                assert fault[i] == (fmt.FR_WRITE if write else fmt.FR_READ) and got[i] == 0
            else:
                assert fault[i] == 0 and int(got[i]) == entry[0] * PS + 0x123
    # a mapped guest file is pinned exactly while the model maps it
    assert io.pinned(g) == bool(model)
    assert io.pinned_pages(g) == len(model)


# ---------------------------------------------------------------------- pins


def test_mapped_guest_file_cannot_be_truncated_down_or_unlinked(io: Iommu, store: Store, vm0: int) -> None:
    d = io.create_domain()
    d.map(0, phys(store, vm0, 4 * MiB), PS)
    gm = store.lookup(ROOT, b"guest_mem")
    assert errno_of(lambda: store.truncate(vm0, 16 * MiB)) == errno.EBUSY
    assert errno_of(lambda: store.unlink(gm, b"vm0")) == errno.EBUSY
    store.truncate(vm0, 64 * MiB)  # growing is fine: the mapped pages stay put


def test_a_mapped_guest_file_cannot_be_replaced_by_rename(io: Iommu, store: Store, vm0: int) -> None:
    io.create_domain().map(0, phys(store, vm0), PS)
    gm = store.lookup(ROOT, b"guest_mem")
    guest(store, b"other", PS)
    assert errno_of(lambda: store.rename(gm, b"other", gm, b"vm0")) == errno.EBUSY
    store.rename(gm, b"vm0", gm, b"vm0-renamed")  # moving the name frees nothing: allowed


def test_unmapping_releases_the_pin(io: Iommu, store: Store, vm0: int) -> None:
    d = io.create_domain()
    d.map(0, phys(store, vm0), 2 * MiB + PS)
    d.unmap(0, 2 * MiB)
    assert io.pinned(vm0)
    d.unmap(2 * MiB, PS)
    assert not io.pinned(vm0)
    store.truncate(vm0, 0)
    store.unlink(store.lookup(ROOT, b"guest_mem"), b"vm0")


def test_a_file_mapped_by_two_domains_stays_pinned_until_both_unmap(io: Iommu, store: Store, vm0: int) -> None:
    a, b = io.create_domain(), io.create_domain()
    a.map(0, phys(store, vm0), PS)
    b.map(0, phys(store, vm0), PS)
    a.unmap(0, PS)
    assert io.pinned(vm0)
    b.unmap(0, PS)
    assert not io.pinned(vm0)


def test_pins_come_back_when_the_image_is_reopened(image: Path) -> None:
    with Store.open(image) as s:
        g = guest(s, b"vm0", 4 * MiB)
        with Iommu.open(s) as io:
            io.create_domain().map(0, phys(s, g, MiB), 3 * PS)
    with Store.open(image) as s, Iommu.open(s) as io:
        assert io.pinned_pages(g) == 3
        assert errno_of(lambda: s.truncate(g, 0)) == errno.EBUSY


def test_close_puts_back_the_pin_hook_installed_before_open(store: Store, vm0: int) -> None:
    store.pin_hook = lambda ino: ino == vm0  # another holder of pins, installed first
    Iommu.open(store).close()
    assert errno_of(lambda: store.unlink(store.lookup(ROOT, b"guest_mem"), b"vm0")) == errno.EBUSY


def test_close_leaves_a_pin_hook_installed_after_open_alone(store: Store, vm0: int) -> None:
    io = Iommu.open(store)
    store.pin_hook = lambda ino: ino == vm0
    io.close()
    assert errno_of(lambda: store.unlink(store.lookup(ROOT, b"guest_mem"), b"vm0")) == errno.EBUSY


def test_closing_nested_iommus_in_reverse_order_restores_each_hook(store: Store, vm0: int) -> None:
    outer = Iommu.open(store)
    outer.create_domain().map(0, phys(store, vm0), PS)
    inner = Iommu.open(store)  # loads the same domain; outer's hook is the one before it
    inner.close()
    assert store.pin_hook == outer.pinned
    outer.close()
    assert store.pin_hook is None
    store.unlink(store.lookup(ROOT, b"guest_mem"), b"vm0")  # no pins left installed


@pytest.mark.parametrize("per_run", [True, False], ids=["lookups per run", "lookups per page"])
def test_pins_counted_at_open_equal_those_counted_while_mapping(image: Path, monkeypatch: pytest.MonkeyPatch,
                                                                per_run: bool) -> None:
    monkeypatch.setattr(iommu_mod, "_RUN_LOOKUP_PAGES", 1 if per_run else 1 << 40)
    with Store.open(image) as s:
        a, b = guest(s, b"a", 4 * MiB), guest(s, b"b", 4 * MiB)
        assert phys(s, b) == phys(s, a, 4 * MiB - PS) + PS  # a run of frames can cross from a into b
        with Iommu.open(s) as io:
            d = io.create_domain()
            d.map(PS, phys(s, a), 3 * MiB)  # 4 KiB leaves: IOVA and phys aligned differently
            d.map(64 * MiB + PS, phys(s, a, 4 * MiB - 3 * PS), 5 * PS)  # a's last 3 pages, b's first 2
            for i in range(6):  # single pages of a and b, alternating
                d.map(128 * MiB + i * PS, phys(s, (a, b)[i % 2], 2 * MiB + i * PS), PS)
            d.map(1 << 30, phys(s, b, 2 * MiB), 2 * MiB)  # and a 2 MiB leaf
            expected = (io.pinned_pages(a), io.pinned_pages(b))
    assert expected == (3 * 256 + 3 + 3, 2 + 3 + 512)
    with Store.open(image) as s, Iommu.open(s) as io:
        assert (io.pinned_pages(a), io.pinned_pages(b)) == expected


# ---------------------------------------------------------- attach / detach


def context_entry(store: Store, io: Iommu, bus: int, dev: int, fn: int) -> tuple[int, int]:
    where = int(io.root_pages[1 + bus]) * 512 + ((dev << 3) | fn) * 2
    return int(store.image_u64[where]), int(store.image_u64[where + 1])


def test_attach_writes_the_context_entry_and_the_root_entry(io: Iommu, store: Store) -> None:
    d = io.create_domain(9)
    d.attach(0x3A, 2, 1)
    f = vtd.context_entry_fields(*context_entry(store, io, 0x3A, 2, 1))
    assert f == {"P": 1, "FPD": 0, "TT": fmt.CE_TT_UNTRANSLATED, "SLPTPTR": d.pml4_phys, "AW": fmt.CE_AW_48,
                 "DID": 9, "rsvd_lo": 0, "rsvd_hi": 0}
    re = int(store.image_u64[int(io.root_pages[0]) * 512 + 0x3A * 2])
    assert re == store.geometry.phys_addr(int(io.root_pages[1 + 0x3A])) | fmt.RE_LO_P
    assert d.attached == [fmt.requester_id(0x3A, 2, 1)]


def test_detach_clears_the_context_entry(io: Iommu, store: Store) -> None:
    d = io.create_domain()
    d.attach(1, 2, 3)
    d.detach(1, 2, 3)
    assert context_entry(store, io, 1, 2, 3) == (0, 0)
    assert d.attached == []
    assert errno_of(lambda: d.detach(1, 2, 3)) == errno.ENOENT


def test_attaching_a_requester_owned_by_another_domain_is_ebusy_unless_replacing(io: Iommu, store: Store) -> None:
    a, b = io.create_domain(), io.create_domain()
    a.attach(0, 1, 0)
    assert errno_of(lambda: b.attach(0, 1, 0)) == errno.EBUSY
    b.attach(0, 1, 0, replace=True)
    assert vtd.context_entry_fields(*context_entry(store, io, 0, 1, 0))["DID"] == b.domain_id
    assert a.attached == [] and b.attached == [fmt.requester_id(0, 1, 0)]


def test_requester_out_of_range_is_einval(io: Iommu) -> None:
    d = io.create_domain()
    assert errno_of(lambda: d.attach(256, 0, 0)) == errno.EINVAL
    assert errno_of(lambda: d.attach(0, 32, 0)) == errno.EINVAL
    assert errno_of(lambda: d.attach(0, 0, 8)) == errno.EINVAL


def test_attachments_survive_reopen(image: Path) -> None:
    with Store.open(image) as s, Iommu.open(s) as io:
        io.create_domain(4).attach(0x10, 0, 2)
    with Store.open(image) as s, Iommu.open(s) as io:
        assert io.domain(4).attached == [fmt.requester_id(0x10, 0, 2)]


# --------------------------------------------------------------- destroy / copy


def test_destroy_of_an_attached_domain_is_ebusy(io: Iommu) -> None:
    d = io.create_domain()
    d.attach(0, 3, 0)
    assert errno_of(lambda: io.destroy_domain(d)) == errno.EBUSY


def test_destroy_frees_every_page_and_unpins(io: Iommu, store: Store, vm0: int) -> None:
    free_before = store.statfs().free_pages
    d = io.create_domain()
    d.map(0, phys(store, vm0), 8 * MiB + 3 * PS)
    io.destroy_domain(d)
    assert store.statfs().free_pages == free_before
    assert not io.pinned(vm0)
    assert errno_of(lambda: store.lookup(io.iommu_dir, b"dom-1")) == errno.ENOENT


def test_a_destroyed_domain_object_refuses_every_change_with_enoent(io: Iommu, store: Store, vm0: int) -> None:
    d = io.create_domain()
    io.destroy_domain(d)
    again = io.create_domain()  # the same DID, on pages that may include d's old ones
    guest(store, b"reuse", 8 * MiB)  # d's freed pages go to a guest file's data
    assert errno_of(lambda: d.map(0, phys(store, vm0), PS)) == errno.ENOENT
    assert errno_of(lambda: d.unmap(0, PS)) == errno.ENOENT
    assert errno_of(lambda: d.attach(0, 1, 0)) == errno.ENOENT
    assert errno_of(lambda: d.copy_to(again)) == errno.ENOENT
    assert errno_of(lambda: io.destroy_domain(d)) == errno.ENOENT
    assert again.domain_id == d.domain_id and again.attached == [] and again.mappings() == []


class VirtualClock:
    """``time`` as backing.iommu sees it: ``sleep`` advances ``monotonic`` at once, after
    running ``on_sleep`` in the sleeping thread (where a test observes or interferes)."""

    def __init__(self, on_sleep: Callable[[float], None] = lambda s: None) -> None:
        self.on_sleep = on_sleep
        self.offset = 0.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return time.monotonic() + self.offset

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.on_sleep(seconds)
        self.offset += seconds


def detached_domain(io: Iommu) -> Domain:
    """A domain just detached: destroying it must wait out the grace period."""
    d = io.create_domain()
    d.attach(0, 3, 0)
    d.detach(0, 3, 0)
    return d


def test_destroy_waits_out_the_grace_period_without_holding_the_store_lock(
        io: Iommu, store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    sleeping, other_done, destroyed = threading.Event(), threading.Event(), threading.Event()

    def on_sleep(_s: float) -> None:
        sleeping.set()
        other_done.wait(timeout=5)  # bounded only so that a lock-holding sleep fails, not hangs

    monkeypatch.setattr(iommu_mod, "time", VirtualClock(on_sleep))
    d = detached_domain(io)
    errors: list[BaseException] = []

    def destroy() -> None:
        try:
            io.destroy_domain(d)
        except BaseException as exc:
            errors.append(exc)
        finally:
            destroyed.set()

    t = threading.Thread(target=destroy)
    t.start()
    assert sleeping.wait(timeout=10)
    store.create(ROOT, b"meanwhile", 0o644, 0, 0)  # another request, during the wait
    store.getattr(ROOT)
    destroy_had_returned = destroyed.is_set()
    other_done.set()
    t.join()
    assert not destroy_had_returned
    assert not errors and d.domain_id not in io.domains


def test_destroy_unlinks_only_once_the_grace_period_has_passed(io: Iommu, store: Store,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    still_there: list[bool] = []
    clock = VirtualClock(lambda s: still_there.append(store.lookup(io.iommu_dir, b"dom-1") > 0))
    monkeypatch.setattr(iommu_mod, "time", clock)
    d = detached_domain(io)
    io.destroy_domain(d)
    assert still_there and all(still_there)
    assert clock.monotonic() >= d._quiet_after
    assert errno_of(lambda: store.lookup(io.iommu_dir, b"dom-1")) == errno.ENOENT


def test_destroy_is_ebusy_if_the_domain_is_attached_again_during_its_wait(io: Iommu,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    d = detached_domain(io)
    monkeypatch.setattr(iommu_mod, "time", VirtualClock(lambda s: d.attach(0, 4, 0) if not d.attached else None))
    assert errno_of(lambda: io.destroy_domain(d)) == errno.EBUSY
    assert io.domain(d.domain_id) is d and d.attached == [fmt.requester_id(0, 4, 0)]


def test_try_destroy_returns_the_seconds_left_and_changes_nothing_until_they_pass(
        io: Iommu, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = VirtualClock()
    monkeypatch.setattr(iommu_mod, "time", clock)
    d = detached_domain(io)
    left = io.try_destroy_domain(d)
    assert 0 < left <= iommu_mod.FREE_GRACE_S
    assert io.domain(d.domain_id) is d
    clock.sleep(left)
    assert io.try_destroy_domain(d) == 0.0
    assert d.domain_id not in io.domains


def test_a_failed_copy_removes_its_half_made_copy_even_under_the_callers_lock(io: Iommu, store: Store,
                                                                              vm0: int) -> None:
    src = io.create_domain()
    src.map(0, phys(store, vm0), PS)
    store.image_u64[src.pml4_page * 512] = (1 << 40) | vtd.RW  # a table outside the pool
    with store.lock:  # re-entrant: copy_domain's cleanup destroys with the lock held
        with pytest.raises(FormatError):
            io.copy_domain(src)
    assert sorted(io.domains) == [src.domain_id]
    assert [n for n, _ in store.children(io.iommu_dir) if n.startswith(b"dom-")] == [b"dom-1"]


def test_copy_domain_translates_identically_with_its_own_tables(io: Iommu, store: Store, vm0: int) -> None:
    src = io.create_domain()
    src.map(0, phys(store, vm0), 4 * MiB)
    src.map(0x40000000, phys(store, vm0, 5 * PS), 17 * PS, write=False)
    src.unmap(MiB, PS)
    dst = io.copy_domain(src)
    assert expand(dst) == expand(src)
    src_tables = {int(p) for lv in src.walk()[0] for p in lv.tables}
    dst_tables = {int(p) for lv in dst.walk()[0] for p in lv.tables}
    assert not src_tables & dst_tables and len(src_tables) == len(dst_tables)
    assert dst.flags & fmt.DOMF_SAVED
    src.unmap(0, 1 << 48)
    io.destroy_domain(src)
    assert io.pinned(vm0)  # the copy still maps it


# ---------------------------------------------------------------- persistence


def test_mappings_and_tables_survive_close_and_reopen(image: Path) -> None:
    with Store.open(image) as s:
        g = guest(s, b"vm0", 16 * MiB)
        with Iommu.open(s) as io:
            d = io.create_domain(3)
            d.map(0, phys(s, g), 6 * MiB)
            d.map(0x8000_0000, phys(s, g, 8 * MiB + PS), 33 * PS, write=False)
            d.unmap(MiB, 2 * PS)
            before = (expand(d), d.table_pages, d.file_pages)
    with Store.open(image) as s, Iommu.open(s) as io:
        d = io.domain(3)
        assert (expand(d), d.table_pages, d.file_pages) == before


def test_reopen_rebuilds_the_pool_so_unreachable_pages_are_free(image: Path) -> None:
    with Store.open(image) as s:
        g = guest(s, b"vm0", 4 * MiB)
        with Iommu.open(s) as io:
            d = io.create_domain()
            d.map(0, phys(s, g), PS)
            d.map(1 << 40, phys(s, g, PS), PS)
            d.unmap(1 << 40, PS)  # three tables freed (held for the grace period)
            assert d.table_pages == 4
    with Store.open(image) as s, Iommu.open(s) as io:
        assert io.domain(1).table_pages == 4


def test_a_domain_of_an_unknown_format_is_refused_by_name(image: Path) -> None:
    with Store.open(image) as s, Iommu.open(s) as io:
        d = io.create_domain(2)
        off = int(d._pages[0]) * PS + fmt.DOMAIN_HEADER_DTYPE.fields["compatible"][1]
        s.image[off : off + 23] = np.frombuffer(b"intel,vtd-legacy-sl4-v9", np.uint8)
    with Store.open(image) as s:
        with pytest.raises(FormatError) as e:
            Iommu.open(s)
        assert "iommu/dom-2" in str(e.value) and "vtd-legacy-sl4-v9" in str(e.value)


def test_a_malformed_tree_refuses_that_domain_alone_blocks_its_device_and_removes_it(image: Path) -> None:
    with Store.open(image) as s, Iommu.open(s) as io:
        g = guest(s, b"vm0", 4 * MiB)
        d = io.create_domain(6)
        d.map(0, phys(s, g), PS)
        d.attach(0, 3, 0)
        other = io.create_domain(7)
        other.map(0, phys(s, g, PS), PS)
        other.attach(0, 4, 0)
        where = d.pml4_page * 512 + 1
        s.image_u64[where] = s.image_u64[d.pml4_page * 512]  # two PML4Es share a PDPT
    with Store.open(image) as s, Iommu.open(s) as io:
        [finding] = [f for f in io.refused if f.structure.startswith("iommu/dom-6")]
        assert finding.offset == where * 8 and "another entry also uses" in finding.problem
        assert 6 not in io.domains and errno_of(lambda: s.lookup(io.iommu_dir, b"dom-6")) == errno.ENOENT
        assert io.attached == {fmt.requester_id(0, 4, 0): 7}  # 00:03.0 blocked, 00:04.0 untouched
        assert any("context entry 00:03.0" in f.structure and "dom-6" in f.problem for f in io.refused)
    assert check_image(image) == (0, [])


def test_a_domain_left_half_made_by_a_kill_is_removed_at_open(image: Path) -> None:
    with Store.open(image) as s:
        ino = s.create(s.lookup(ROOT, b"iommu"), b"dom-5", 0o444, 0, 0, kind=fmt.KIND_IOMMU_DOMAIN)
        s.grow(ino, 10)  # killed before the header was written
    with Store.open(image) as s, Iommu.open(s) as io:
        assert io.domains == {}
        assert errno_of(lambda: s.lookup(io.iommu_dir, b"dom-5")) == errno.ENOENT


def test_a_domain_file_whose_name_was_corrupted_is_refused_not_removed(image: Path) -> None:
    with Store.open(image) as s, Iommu.open(s) as io:
        g = guest(s, b"vm0", MiB)
        d = io.create_domain(2)
        d.map(0, phys(s, g), PS)
        d.attach(0, 3, 0)  # its tables are live: removing the file would free them under DMA
        ino = s.lookup(io.iommu_dir, b"dom-2")
        s.dentries["name"][ino] = b"dox-2"
    with Store.open(image) as s:
        with pytest.raises(FormatError) as e:
            Iommu.open(s)
        assert "iommu/dox-2" in str(e.value)
        assert s.lookup(s.lookup(ROOT, b"iommu"), b"dox-2") == ino


# --------------------------------------------------------------- kill mid-map

CHUNK_PAGES = 1000  # not a multiple of 512: 4 KiB and 2 MiB leaves mixed


def _mapper_child(image: Path, wfd: int, seed: int) -> None:
    """Map and unmap chunks forever, reporting each completed op on ``wfd``."""
    rnd = random.Random(seed)
    s = Store.open(image)
    io = Iommu.open(s)
    d = io.domains.get(1) or io.create_domain(1)
    g = s.lookup(s.lookup(ROOT, b"guest_mem"), b"vm0")
    base = phys(s, g)
    k = 0
    while True:
        d.map(k * 8 * MiB + (k % 3) * 2 * MiB, base + (k % 5) * 4 * MiB, CHUNK_PAGES * PS, write=bool(k % 2))
        os.write(wfd, b"M%d\n" % k)
        if k % 4 == 1:  # root/context entry stores are cut by the kill too
            d.attach(0, 2, k % 8 // 4)
        elif k % 4 == 3:
            d.detach(0, 2, k % 8 // 4)
        if k >= 2 and rnd.random() < 0.5:
            j = k - 2
            d.unmap(j * 8 * MiB + (j % 3) * 2 * MiB, CHUNK_PAGES * PS)
            os.write(wfd, b"U%d\n" % j)
        k += 1


@pytest.mark.parametrize("seed", range(8))
def test_kill_while_mapping_leaves_every_translation_old_or_new(image: Path, seed: int) -> None:
    with Store.open(image) as s:
        guest(s, b"vm0", 32 * MiB)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.close(r)
            _mapper_child(image, w, seed)
        finally:
            os._exit(1)
    os.close(w)
    # The kill comes once the child has been SEEN to finish a random number of maps, then at a random
    # instant of the ops after it: a sleep instead (as before) could end before a busy machine had
    # run the child at all, and the test then failed for want of progress.
    rnd = random.Random(seed)
    target = 1 + rnd.randrange(12)
    data = b""
    reaped = False
    try:
        while data.count(b"M") < target:
            chunk = os.read(r, 65536)
            assert chunk, "the child exited before the kill"
            data += chunk
        time.sleep(rnd.random() * 0.003)  # where the kill lands, not a wait for progress
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        reaped = True
        while chunk := os.read(r, 65536):
            data += chunk
    finally:
        os.close(r)
        if not reaped:  # a failure above must not leave the child mapping forever
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    done = [line for line in data.decode().split("\n") if line]
    mapped = {int(x[1:]) for x in done if x[0] == "M"}
    unmapped = {int(x[1:]) for x in done if x[0] == "U"}
    assert mapped, "the child made no progress before the kill"
    in_flight = {max(mapped) + 1, max(mapped) - 2}  # the next map, or the unmap after the last map
    assert check_image(image) == (0, [])  # tables included, before any repair at open
    with Store.open(image) as s, Iommu.open(s) as io:
        d = io.domain(1)
        assert d.walk()[1] == []
        got = expand(d)
        base_pfn = phys(s, s.lookup(s.lookup(ROOT, b"guest_mem"), b"vm0")) >> 12
        for k in range(max(mapped) + 2):
            start = (k * 8 * MiB + (k % 3) * 2 * MiB) >> 12
            new = {start + i: (base_pfn + (k % 5) * 1024 + i, bool(k % 2)) for i in range(CHUNK_PAGES)}
            now = {p: got.get(p) for p in new}
            if k in in_flight:
                assert all(v is None or v == new[p] for p, v in now.items())
            elif k in mapped and k not in unmapped:
                assert now == new
            else:
                assert all(v is None for v in now.values())
        # no leak: unmapping everything leaves only the SL-PML4 in use
        pinned = io.pinned_pages(s.lookup(s.lookup(ROOT, b"guest_mem"), b"vm0"))
        assert pinned == len(got)
        d.unmap(0, 1 << 48)
        assert d.table_pages == 1


# ------------------------------------------------------------------------ CLI


def pk(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pkfuse", "iommu", *map(str, args)], capture_output=True,
                          text=True, timeout=60, check=False)


def test_cli_programs_a_domain_that_the_walker_then_translates(image: Path) -> None:
    with Store.open(image) as s:
        base = phys(s, guest(s, b"vm0", 4 * MiB))
    assert pk("create", image).stdout == "iommu/dom-1: DID 1\n"
    out = pk("map", image, 1, "--iova", "0x200000", "--length", "2M", "--file", "guest_mem/vm0", "--offset", "2M")
    assert out.returncode == 0 and "rw guest_mem/vm0+0x200000" in out.stdout
    assert pk("map", image, 1, "--iova", "0", "--length", "8K", "--phys", hex(base), "--ro").returncode == 0
    assert pk("attach", image, 1, "00:03.0").returncode == 0
    assert pk("enable", image).returncode == 0
    t = pk("translate", image, "00:03.0", "0x200010", "0x1008", "0x5000")
    assert t.returncode == 3  # one of them faulted
    assert t.stdout.splitlines() == [f"0x200010 -> {base + 2 * MiB + 0x10:#x}", f"0x1008 -> {base + 0x1008:#x}",
                                     "0x5000: fault 0x06 (PTE Read access is not set)"]
    assert "00:03.0 read iova 0x5000" in pk("faults", image).stdout
    listing = pk("list", image).stdout
    assert "iommu/dom-1: DID 1" in listing and "attached 00:03.0" in listing
    assert f"0x000000000000-0x000000001fff -> {base:#014x}-{base + 0x1fff:#014x} r- guest_mem/vm0+0x0" in listing
    assert check_image(image) == (0, [])


def test_cli_refusals_are_one_line_without_traceback(image: Path) -> None:
    with Store.open(image) as s:
        guest(s, b"vm0", MiB)
    assert pk("create", image).returncode == 0 and pk("enable", image).returncode == 0
    for args in (("map", image, 1, "--iova", "0", "--length", "4K", "--phys", "0x100000000"),
                 ("map", image, 1, "--iova", "0", "--length", "0", "--file", "guest_mem/vm0"),
                 ("translate", image, "00:03.0", hex(1 << 64)),
                 ("destroy", image, 9), ("attach", image, 1, "1:2:3")):
        r = pk(*args)
        assert r.returncode in (1, 2) and len(r.stderr.splitlines()) == 1 and "Traceback" not in r.stderr, r
        assert r.stderr.startswith(f"pkfuse iommu {args[0]}: error: ")


def test_cli_refuses_to_change_an_image_a_daemon_holds(image: Path) -> None:
    with Store.open(image):
        r = pk("create", image)
    assert r.returncode == 1 and "in use" in r.stderr


def test_a_bad_register_file_does_not_stop_the_pins(image: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.regs"
    bad.write_bytes(b"not registers" * 1000)
    with Store.open(image) as s:
        g = guest(s, b"vm0", MiB)
        with Iommu.open(s) as io:
            io.create_domain().map(0, phys(s, g), PS)
    with Store.open(image) as s, Iommu.open(s, str(bad)) as io:
        assert io.regs is None and "not a pkfuse register block" in io.regs_error
        assert errno_of(lambda: s.truncate(g, 0)) == errno.EBUSY


def test_save_restore_switches_a_requester_to_a_copy_without_changing_translations(io: Iommu, store: Store,
                                                                                   vm0: int) -> None:
    live = io.create_domain()
    live.map(0, phys(store, vm0), 6 * MiB + 3 * PS)
    live.map(1 << 40, phys(store, vm0, 8 * MiB), 2 * MiB, write=False)
    live.attach(0, 7, 0)
    io.enable()
    iovas = np.concatenate([np.arange(0, 7 * MiB, 0x1F00), (1 << 40) + np.arange(0, 2 * MiB, 0x3300)]).astype(np.uint64)
    before = [io.translate(0, 7, 0, iovas, w) for w in (False, True)]
    mapped = (iovas < 6 * MiB + 3 * PS) | (iovas >= 1 << 40)
    assert not before[0][1][mapped].any() and before[0][1][~mapped].all()  # a switch to all-faults fails
    saved = io.copy_domain(live)
    saved.attach(0, 7, 0, replace=True)  # the atomic switch of the save/restore flow
    after = [io.translate(0, 7, 0, iovas, w) for w in (False, True)]
    for (p0, f0), (p1, f1) in zip(before, after):
        assert (p0 == p1).all() and (f0 == f1).all()
    assert live.attached == [] and saved.attached == [fmt.requester_id(0, 7, 0)]


def test_a_read_only_store_refuses_every_change_with_erofs(image: Path) -> None:
    with Store.open(image) as s:
        g = guest(s, b"vm0", MiB)
        with Iommu.open(s) as io:
            io.create_domain().map(0, phys(s, g), PS)
    with Store.open(image, read_only=True) as s, Iommu.open(s) as io:
        d = io.domain(1)
        assert len(d.mappings()) == 1
        assert errno_of(lambda: d.map(PS, phys(s, g, PS), PS)) == errno.EROFS
        assert errno_of(lambda: d.unmap(0, PS)) == errno.EROFS
        assert errno_of(lambda: d.attach(0, 1, 0)) == errno.EROFS
        assert errno_of(lambda: io.create_domain()) == errno.EROFS
