"""The Store queries the daemon reads it through (no raw tables): parent, is_orphan,
extents_by_page, image_span(guest_only=), stamp_write(granularity_ns=)."""

from __future__ import annotations

import errno
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from backing import format as fmt
from backing.errors import StoreError
from backing.store import Store

PS = fmt.PAGE_SIZE
MiB = 1 << 20
ROOT = fmt.ROOT_INO


@pytest.fixture
def store(image: Path) -> Iterator[Store]:
    s = Store.open(image)
    yield s
    s.close()


def gm(s: Store) -> int:
    return s.lookup(ROOT, fmt.GUEST_DIR_NAME)


def new_file(s: Store, parent: int, name: bytes, size: int) -> int:
    ino = s.create(parent, name, 0o600, 0, 0)
    s.truncate(ino, size)
    return ino


def test_parent_is_the_directory_of_the_name_and_the_root_above_the_tree(store: Store) -> None:
    vm = store.mkdir(gm(store), b"vm0", 0o755, 0, 0)
    f = new_file(store, vm, b"ram", PS)
    assert (store.parent(f), store.parent(vm), store.parent(gm(store)), store.parent(ROOT)) == (vm, gm(store), ROOT,
                                                                                                 ROOT)
    store.unlink(vm, b"ram", keep_open=True)
    assert store.parent(f) == ROOT  # an orphan has no name
    store.release_orphan(f)
    with pytest.raises(StoreError) as e:
        store.parent(f)
    assert e.value.errno == errno.ENOENT


def test_is_orphan_only_between_an_unlink_kept_open_and_the_release(store: Store) -> None:
    f = new_file(store, gm(store), b"vm0", PS)
    assert not store.is_orphan(f)
    store.unlink(gm(store), b"vm0", keep_open=True)
    assert store.is_orphan(f)
    store.release_orphan(f)
    assert not store.is_orphan(f)
    assert not any(store.is_orphan(i) for i in (0, -1, store.geometry.inode_count, 1 << 40))


def test_extents_by_page_is_every_extent_once_sorted_and_read_only(store: Store) -> None:
    a = new_file(store, gm(store), b"a", 2 * PS)
    new_file(store, gm(store), b"b", 3 * MiB)
    store.truncate(a, 5 * PS)  # a second extent for a
    first, end, ino, file_page = store.extents_by_page()
    assert first.dtype == end.dtype == file_page.dtype == np.int64 and ino.dtype == np.uint32
    assert np.all(np.diff(first) > 0) and np.all(first[1:] >= end[:-1])  # sorted, disjoint
    got = set(zip(first.tolist(), end.tolist(), ino.tolist(), file_page.tolist()))
    want = set()
    for parent in (gm(store), store.lookup(ROOT, fmt.IOMMU_DIR_NAME)):
        for _, i in store.children(parent):
            want |= {(e.page, e.page + e.length // PS, i, e.file_offset // PS) for e in store.extents(i)}
    assert got == want
    with pytest.raises(ValueError):
        first[0] = 0  # the store's own index
    store.truncate(a, 0)
    assert a not in store.extents_by_page()[2].tolist()


def test_image_span_guest_only_leaves_iommu_files_to_the_general_path(store: Store) -> None:
    f = new_file(store, gm(store), b"vm0", 2 * PS)
    root = store.lookup(store.lookup(ROOT, fmt.IOMMU_DIR_NAME), fmt.ROOT_PGTABLES_NAME)
    assert store.image_span(root, 0, PS) == (store.extents(root)[0].page * PS, PS)
    assert store.image_span(root, 0, PS, guest_only=True) is None
    assert store.image_span(f, 10, 100, guest_only=True) == (store.extents(f)[0].page * PS + 10, 100)
    assert store.image_span(gm(store), 0, PS, guest_only=True) is None


def test_stamp_write_within_the_granularity_leaves_the_times_alone(store: Store) -> None:
    f = new_file(store, gm(store), b"vm0", PS)
    t0, c0 = store.getattr(f).mtime_ns, store.getattr(f).ctime_ns
    store.stamp_write(f, t0 + 3, granularity_ns=4)
    assert (store.getattr(f).mtime_ns, store.getattr(f).ctime_ns) == (t0, c0)
    store.stamp_write(f, t0 + 4, granularity_ns=4)  # old enough
    assert (store.getattr(f).mtime_ns, store.getattr(f).ctime_ns) == (t0 + 4, t0 + 4)
    store.stamp_write(f, t0, granularity_ns=4)  # mtime ahead of the clock: replaced
    assert store.getattr(f).mtime_ns == t0
    store.stamp_write(f, t0)  # no granularity: always
    assert store.getattr(f).mtime_ns == t0
