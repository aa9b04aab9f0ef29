"""``Domain.map_file``: a range of a guest-RAM file mapped at an IOVA in one call, split at the
file's extents, all or nothing (the call behind IOAS_MAP_FILE)."""

from __future__ import annotations

import errno
from collections.abc import Callable
from pathlib import Path

import pytest

from backing import format as fmt
from backing.errors import StoreError
from backing.fsck import check_image
from backing.iommu import Domain, Iommu
from backing.store import Store

PS = fmt.PAGE_SIZE
MiB = 1 << 20
GiB = 1 << 30
ROOT = fmt.ROOT_INO


@pytest.fixture
def image(make_image: Callable[..., Path]) -> Path:
    return make_image(128 * MiB)


def guest(store: Store, name: bytes, size: int) -> int:
    ino = store.create(store.lookup(ROOT, b"guest_mem"), name, 0o600, 0, 0)
    store.truncate(ino, size)
    return ino


def two_extent_guest(store: Store, head: int = 2 * PS, tail: int = 2 * PS) -> int:
    """A guest file of ``head + tail`` bytes in two extents that are not physically contiguous."""
    a = guest(store, b"two", head)
    # takes the pages after a's first extent: whole 2 MiB chunks go to whole-chunk requests
    guest(store, b"spacer", 2 * MiB if head % (2 * MiB) == 0 else PS)
    store.truncate(a, head + tail)
    ext = store.extents(a)
    assert len(ext) == 2 and ext[0].phys_addr + ext[0].length != ext[1].phys_addr
    return a


def state(d: Domain) -> tuple[object, ...]:
    """Everything a map could change: every reachable table entry, the mappings, pins, pool use."""
    levels, problems = d.walk()
    assert not problems
    entries = [(lv.where.tolist(), lv.entries.tolist()) for lv in levels]
    return entries, d.mappings(), dict(d.pins), dict(d.iommu.attached), d.table_pages


def errno_of(fn: Callable[[], object]) -> int:
    with pytest.raises(StoreError) as e:
        fn()
    return e.value.errno


def test_a_range_spanning_two_extents_maps_each_piece_at_its_own_physical_address(
        io: Iommu, store: Store, image: Path) -> None:
    f = two_extent_guest(store)
    e0, e1 = store.extents(f)
    d = io.create_domain()
    d.map_file(f, PS, 2 * PS, 0x40000, write=False)  # the last page of one extent, the first of the next
    assert d.translate_soft(0x40000) == e0.phys_addr + PS
    assert d.translate_soft(0x41000) == e1.phys_addr
    assert d.translate_soft(0x42000) is None and d.translate_soft(0x3F000) is None
    assert [(m.iova, m.phys_addr, m.length, m.write, m.ino, m.file_offset) for m in d.mappings()] == [
        (0x40000, e0.phys_addr + PS, PS, False, f, PS), (0x41000, e1.phys_addr, PS, False, f, 2 * PS)]
    assert d.pins == {f: 2}
    assert errno_of(lambda: store.truncate(f, 0)) == errno.EBUSY
    io.close()
    store.close()
    assert check_image(image) == (0, [])


def test_an_aligned_piece_still_gets_2m_leaves(io: Iommu, store: Store) -> None:
    f = two_extent_guest(store, head=2 * MiB, tail=4 * MiB)
    e1 = store.extents(f)[1]
    d = io.create_domain()
    d.map_file(f, 0, 6 * MiB, 0)
    levels, _ = d.walk()
    # both extents are whole 2 MiB chunks (the allocator's rule for whole 2 MiB ranges of a file)
    assert all(e.phys_addr % (2 * MiB) == 0 for e in store.extents(f))
    assert (int(levels[2].leaf.sum()), int(levels[3].leaf.sum())) == (3, 0)
    assert d.translate_soft(2 * MiB + 0x1234) == e1.phys_addr + 0x1234
    assert d.pins == {f: 6 * MiB // PS}


def test_a_refused_second_piece_unmaps_the_first_so_tables_and_pins_are_as_before(io: Iommu, store: Store) -> None:
    f = two_extent_guest(store)
    other = guest(store, b"other", MiB)
    d = io.create_domain()
    # the second piece would land at IOVA 512 GiB, the first just below it, in another SL-PML4 slot:
    # the first piece builds a new SL-PDPT, SL-PD and SL-PT, which the rollback must take down again
    boundary = 512 * GiB
    d.map(boundary, store.extents(other)[0].phys_addr, PS)
    before = state(d)
    pml4e0 = int(store.image_u64[d.pml4_page * 512])
    assert errno_of(lambda: d.map_file(f, 0, 4 * PS, boundary - 2 * PS)) == errno.EEXIST
    assert state(d) == before
    assert int(store.image_u64[d.pml4_page * 512]) == pml4e0 == 0
    assert d.translate_soft(boundary - 2 * PS) is None
    assert not io.pinned(f) and d.pins == {other: 1}
    store.truncate(f, 0)  # not pinned: the rollback gave the pin back


def test_a_refused_piece_in_the_same_tables_leaves_them_as_before(io: Iommu, store: Store) -> None:
    f = two_extent_guest(store)
    d = io.create_domain()
    d.map(0x12000, store.extents(guest(store, b"other", MiB))[0].phys_addr, PS)
    before = state(d)
    assert errno_of(lambda: d.map_file(f, 0, 4 * PS, 0x10000)) == errno.EEXIST  # the 2nd piece starts at 0x12000
    assert state(d) == before


@pytest.mark.parametrize("offset, length, iova, words", [
    (0x800, PS, 0, "offset"),
    (0, 0x1800, 0, "length"),
    (0, PS, 0x10, "iova"),
    (-PS, PS, 0, "negative"),
    (0, -PS, 0, "negative"),
    (0, PS, -PS, "negative"),
    (0, 0, 0, "maps nothing"),
    (0, 5 * PS, 0, "has no bytes"),
    (4 * PS, PS, 0, "has no bytes"),
    (0, 2 * PS, (1 << 48) - PS, "48-bit"),
    (0, PS, 1 << 48, "48-bit"),
])
def test_each_bad_argument_is_einval_and_changes_nothing(io: Iommu, store: Store, offset: int, length: int,
                                                         iova: int, words: str) -> None:
    f = two_extent_guest(store)
    d = io.create_domain()
    before = state(d)
    with pytest.raises(StoreError) as e:
        d.map_file(f, offset, length, iova)
    assert e.value.errno == errno.EINVAL and words in e.value.message
    assert state(d) == before


def test_only_a_guest_ram_file_can_be_mapped(io: Iommu, store: Store) -> None:
    d = io.create_domain()
    gm = store.lookup(ROOT, b"guest_mem")
    for ino in (gm, io.root_ino, d.ino, 999, 0):  # a directory, IOMMU files, no inode at all
        assert errno_of(lambda ino=ino: d.map_file(ino, 0, PS, 0)) == errno.EINVAL
    assert d.mappings() == [] and d.pins == {}
