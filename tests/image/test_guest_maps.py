"""backing.guestmmap: the kernel's mmap of a guest file -- its checks, its extents, and the pin it holds."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator

import pytest

from backing import format as fmt
from backing.errors import StoreError
from backing.guestmmap import GuestMaps, merge_runs
from backing.iommu import Iommu
from backing.store import Store

MiB = 1 << 20
PS = fmt.PAGE_SIZE


@pytest.fixture
def maps(store: Store) -> Iterator[GuestMaps]:
    m = GuestMaps(store)
    yield m
    m.close()


def guest(store: Store, name: bytes, size: int) -> int:
    ino = store.create(store.lookup(fmt.ROOT_INO, fmt.GUEST_DIR_NAME), name, 0o600, 0, 0)
    if size:
        store.truncate(ino, size)
    return ino


def errno_of(fn: object) -> int:
    with pytest.raises(StoreError) as e:
        fn()  # type: ignore[operator]
    return e.value.errno


def test_extents_are_image_offsets_of_the_files_pages(store: Store, maps: GuestMaps) -> None:
    ino = guest(store, b"vm0", 4 * MiB)
    m = maps.mmap("conn", ino, os.O_RDWR)
    assert m.length == 4 * MiB and m.phys_base == store.geometry.base_phys
    pages = store.image_pages(ino)
    for e in m.extents.tolist():
        fo, io, n = e
        assert (pages[fo // PS: (fo + n) // PS] * PS == range(io, io + n, PS)).all()
    assert int(m.extents["length"].sum()) == 4 * MiB


def test_scattered_runs_stay_separate_and_sorted(store: Store, maps: GuestMaps) -> None:
    a, b = guest(store, b"a", 0), guest(store, b"b", 0)
    for i in range(1, 4):  # interleaved growth: a's runs are not contiguous in the image
        store.truncate(a, i * 2 * MiB)
        store.truncate(b, i * 2 * MiB)
    m = maps.mmap("conn", a, os.O_RDWR)
    assert m.extents.size == 3
    assert m.extents["file_offset"].tolist() == [0, 2 * MiB, 4 * MiB]


def test_merge_joins_runs_contiguous_in_file_and_image() -> None:
    out = merge_runs([0, 2, 4], [10, 12, 20], [2, 2, 1])
    assert out.tolist() == [(0, 10 * PS, 4 * PS), (4 * PS, 20 * PS, PS)]


def test_a_read_only_descriptor_is_eacces(store: Store, maps: GuestMaps) -> None:
    ino = guest(store, b"vm0", 2 * MiB)
    assert errno_of(lambda: maps.mmap("c", ino, os.O_RDONLY)) == errno.EACCES


def test_a_write_only_descriptor_is_eacces(store: Store, maps: GuestMaps) -> None:
    ino = guest(store, b"vm0", 2 * MiB)
    assert errno_of(lambda: maps.mmap("c", ino, os.O_WRONLY)) == errno.EACCES


def test_an_empty_file_is_einval(store: Store, maps: GuestMaps) -> None:
    ino = guest(store, b"vm0", 0)
    assert errno_of(lambda: maps.mmap("c", ino, os.O_RDWR)) == errno.EINVAL


def test_an_iommu_file_is_einval(store: Store, io: Iommu, maps: GuestMaps) -> None:
    top = store.lookup(fmt.ROOT_INO, fmt.IOMMU_DIR_NAME)
    root = store.lookup(top, b"root-pgtables")
    assert errno_of(lambda: maps.mmap("c", root, os.O_RDWR)) == errno.EINVAL


def test_a_directory_or_no_inode_of_the_image_is_einval(store: Store, maps: GuestMaps) -> None:
    assert errno_of(lambda: maps.mmap("c", fmt.ROOT_INO, os.O_RDWR)) == errno.EINVAL
    assert errno_of(lambda: maps.mmap("c", 1 << 32, os.O_RDWR)) == errno.EINVAL  # a .pkernfs view's number


def test_a_refused_call_pins_nothing(store: Store, maps: GuestMaps) -> None:
    ino = guest(store, b"vm0", 2 * MiB)
    errno_of(lambda: maps.mmap("c", ino, os.O_RDONLY))
    assert not maps.mapped(ino) and maps.statistics()["pins"] == 0


def test_truncate_down_of_a_mapped_file_is_ebusy(store: Store, maps: GuestMaps) -> None:
    ino = guest(store, b"vm0", 4 * MiB)
    maps.mmap("c", ino, os.O_RDWR)
    assert errno_of(lambda: store.truncate(ino, 2 * MiB)) == errno.EBUSY
    assert store.getattr(ino).size == 4 * MiB


def test_truncate_up_of_a_mapped_file_is_ebusy(store: Store, maps: GuestMaps) -> None:
    ino = guest(store, b"vm0", 4 * MiB)
    maps.mmap("c", ino, os.O_RDWR)
    assert errno_of(lambda: store.truncate(ino, 6 * MiB)) == errno.EBUSY


def test_a_write_past_the_end_of_a_mapped_file_is_ebusy(store: Store, maps: GuestMaps) -> None:
    ino = guest(store, b"vm0", 2 * MiB)
    maps.mmap("c", ino, os.O_RDWR)
    assert errno_of(lambda: store.write(ino, 2 * MiB - 1, b"xy")) == errno.EBUSY


def test_a_write_inside_a_mapped_file_works(store: Store, maps: GuestMaps) -> None:
    ino = guest(store, b"vm0", 2 * MiB)
    maps.mmap("c", ino, os.O_RDWR)
    assert store.write(ino, 100, b"in place") == 8
    assert store.read(ino, 100, 8) == b"in place"


def test_unlink_and_rename_over_a_mapped_file_are_ebusy(store: Store, maps: GuestMaps) -> None:
    gdir = store.lookup(fmt.ROOT_INO, fmt.GUEST_DIR_NAME)
    ino = guest(store, b"vm0", 2 * MiB)
    guest(store, b"other", 2 * MiB)
    maps.mmap("c", ino, os.O_RDWR)
    assert errno_of(lambda: store.unlink(gdir, b"vm0")) == errno.EBUSY
    assert errno_of(lambda: store.rename(gdir, b"other", gdir, b"vm0")) == errno.EBUSY


def test_release_of_the_holder_unpins(store: Store, maps: GuestMaps) -> None:
    ino = guest(store, b"vm0", 4 * MiB)
    maps.mmap("c", ino, os.O_RDWR)
    maps.mmap("c", ino, os.O_RDWR)
    assert maps.release("c") == 2
    store.truncate(ino, 2 * MiB)
    assert store.getattr(ino).size == 2 * MiB


def test_another_holders_pin_keeps_the_file_pinned(store: Store, maps: GuestMaps) -> None:
    ino = guest(store, b"vm0", 4 * MiB)
    maps.mmap("a", ino, os.O_RDWR)
    maps.mmap("b", ino, os.O_RDWR)
    maps.release("a")
    assert errno_of(lambda: store.truncate(ino, 0)) == errno.EBUSY
    maps.release("b")
    store.truncate(ino, 0)


def test_release_one_undoes_a_single_call(store: Store, maps: GuestMaps) -> None:
    ino = guest(store, b"vm0", 2 * MiB)
    maps.mmap("c", ino, os.O_RDWR)
    maps.release_one("c", ino)
    assert not maps.mapped(ino) and maps.held_by("c") == 0


def test_close_puts_the_previous_hook_back(store: Store) -> None:
    store.map_hook = None
    m = GuestMaps(store)
    assert store.map_hook == m.mapped
    m.close()
    assert store.map_hook is None
