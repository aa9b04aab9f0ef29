"""GuestMemory without a mount: a plain file as guest RAM, extents checked and merged, phys_addr."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from pkfuse.vmm.memory import PAGE_SIZE, Extent, GuestMemory, GuestMemoryError, _check_extents, _merge

PS = PAGE_SIZE
MiB = 1 << 20


@pytest.fixture
def plain(tmp_path: Path) -> Iterator[int]:
    """A 16 MiB plain file standing for an image, open read-write."""
    fd = os.open(tmp_path / "plain.img", os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, 16 * MiB)
    yield fd
    os.close(fd)


def test_of_file_is_one_extent_over_the_whole_file(plain: int) -> None:
    with GuestMemory.of_file(plain, 4 * MiB) as mem:
        assert mem.extents == [Extent(0, 0, 4 * MiB)] and mem.size == 4 * MiB
        mem.array[:4] = [1, 2, 3, 4]
        assert os.pread(plain, 4, 0) == b"\x01\x02\x03\x04"


def test_a_store_through_each_extent_lands_at_its_image_offset(plain: int) -> None:
    extents = [Extent(0, 8 * MiB, 2 * MiB), Extent(2 * MiB, 0, 2 * MiB), Extent(4 * MiB, 12 * MiB, PS)]
    with GuestMemory(plain, extents, 4 * MiB + PS) as mem:
        for i, e in enumerate(extents):
            mem.view[e.file_offset + 7] = 0xA0 + i
        for i, e in enumerate(extents):
            assert os.pread(plain, 1, e.image_offset + 7) == bytes([0xA0 + i])


def test_the_range_reads_what_the_image_holds(plain: int) -> None:
    os.pwrite(plain, b"image", 8 * MiB + 100)
    with GuestMemory(plain, [Extent(0, 8 * MiB, 2 * MiB)], 2 * MiB) as mem:
        assert bytes(mem.view[100:105]) == b"image"


def test_a_read_only_view_sees_stores_made_through_the_image_and_refuses_its_own(tmp_path: Path, plain: int) -> None:
    ro = os.open(tmp_path / "plain.img", os.O_RDONLY)
    try:
        with GuestMemory(ro, [Extent(0, 8 * MiB, 2 * MiB), Extent(2 * MiB, 0, 2 * MiB)], 4 * MiB,
                         read_only=True) as view:
            os.pwrite(plain, b"later", 100)  # a store after the mapping (the guest's, elsewhere)
            assert bytes(view.array[2 * MiB + 100:2 * MiB + 105]) == b"later"
            with pytest.raises(ValueError, match="read-only"):
                view.array[0] = 1
            with pytest.raises(TypeError):
                view.view[0] = 1
    finally:
        os.close(ro)


def test_address_array_and_view_are_the_same_bytes(plain: int) -> None:
    with GuestMemory.of_file(plain, 2 * MiB) as mem:
        mem.array[PS] = 0x5A
        assert mem.view[PS] == 0x5A
        assert mem.array.ctypes.data == mem.address


def test_extents_given_out_of_order_are_sorted(plain: int) -> None:
    with GuestMemory(plain, [Extent(2 * MiB, 0, 2 * MiB), Extent(0, 4 * MiB, 2 * MiB)], 4 * MiB) as mem:
        assert mem.extents == [Extent(0, 4 * MiB, 2 * MiB), Extent(2 * MiB, 0, 2 * MiB)]


def test_a_structured_array_of_extents_is_accepted(plain: int) -> None:
    dtype = np.dtype([("file_offset", "<u8"), ("image_offset", "<u8"), ("length", "<u8")])
    arr = np.array([(0, 2 * MiB, 2 * MiB)], dtype)
    with GuestMemory(plain, arr, 2 * MiB) as mem:
        assert mem.extents == [Extent(0, 2 * MiB, 2 * MiB)]


def test_runs_contiguous_in_file_and_image_merge_into_one() -> None:
    assert _merge([Extent(0, 4 * MiB, MiB), Extent(MiB, 5 * MiB, MiB), Extent(2 * MiB, 0, MiB)]) == \
        [Extent(0, 4 * MiB, 2 * MiB), Extent(2 * MiB, 0, MiB)]


def test_runs_contiguous_in_the_file_only_stay_apart() -> None:
    assert len(_merge([Extent(0, 4 * MiB, MiB), Extent(MiB, 8 * MiB, MiB)])) == 2


def test_a_gap_is_refused_naming_the_extent() -> None:
    with pytest.raises(GuestMemoryError, match=r"^extent 1 starts at file offset 0x300000, expected 0x200000") as e:
        _check_extents([Extent(0, 0, 2 * MiB), Extent(3 * MiB, 4 * MiB, MiB)], 4 * MiB)
    assert "\n" not in str(e.value)


def test_an_overlap_is_refused_naming_the_extent() -> None:
    with pytest.raises(GuestMemoryError, match=r"^extent 1 starts at file offset 0x100000, expected 0x200000"):
        _check_extents([Extent(0, 0, 2 * MiB), Extent(MiB, 4 * MiB, MiB)], 2 * MiB)


def test_an_unaligned_extent_is_refused() -> None:
    with pytest.raises(GuestMemoryError, match=r"^extent 0 \(0x0, 0x800, 0x1000\) is empty or not page-aligned$"):
        _check_extents([Extent(0, 0x800, PS)], PS)


def test_an_empty_extent_is_refused() -> None:
    with pytest.raises(GuestMemoryError, match=r"^extent 1 .* is empty or not page-aligned$"):
        _check_extents([Extent(0, 0, PS), Extent(PS, PS, 0)], PS)


def test_extents_shorter_than_the_guest_are_refused() -> None:
    with pytest.raises(GuestMemoryError, match=r"^the extents cover 0x200000 bytes, the guest is 0x400000$"):
        _check_extents([Extent(0, 0, 2 * MiB)], 4 * MiB)


def test_a_refused_layout_maps_nothing(plain: int) -> None:
    with pytest.raises(GuestMemoryError):
        GuestMemory(plain, [Extent(0, 0, 2 * MiB)], 4 * MiB)


def test_phys_addr_follows_the_extent_holding_the_address(plain: int) -> None:
    base = 4 << 30
    extents = [Extent(0, 8 * MiB, 2 * MiB), Extent(2 * MiB, 0, 2 * MiB)]
    with GuestMemory(plain, extents, 4 * MiB, phys_base=base) as mem:
        assert mem.phys_addr(0) == base + 8 * MiB
        assert mem.phys_addr(2 * MiB - 1) == base + 10 * MiB - 1
        assert mem.phys_addr(2 * MiB + 5) == base + 5


def test_phys_addrs_is_phys_addr_of_each(plain: int) -> None:
    extents = [Extent(0, 8 * MiB, 2 * MiB), Extent(2 * MiB, 0, 2 * MiB), Extent(4 * MiB, 12 * MiB, PS)]
    with GuestMemory(plain, extents, 4 * MiB + PS, phys_base=4 << 30) as mem:
        gpas = np.array([0, 2 * MiB - 1, 2 * MiB, 3 * MiB + 5, 4 * MiB + PS - 1], np.uint64)
        assert mem.phys_addrs(gpas).tolist() == [mem.phys_addr(int(g)) for g in gpas]


def test_phys_addr_outside_the_guest_is_refused(plain: int) -> None:
    with GuestMemory(plain, [Extent(0, 0, 2 * MiB)], 2 * MiB, phys_base=0) as mem:
        with pytest.raises(GuestMemoryError, match="outside"):
            mem.phys_addr(2 * MiB)


def test_a_plain_file_has_no_physical_addresses(plain: int) -> None:
    with GuestMemory.of_file(plain, 2 * MiB) as mem:
        assert mem.phys_base is None
        with pytest.raises(GuestMemoryError, match="no physical addresses"):
            mem.phys_addr(0)


def test_close_twice_is_harmless(plain: int) -> None:
    mem = GuestMemory.of_file(plain, 2 * MiB)
    mem.close()
    mem.close()
    assert mem.closed
