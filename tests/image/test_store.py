"""The Store API, one behaviour per test: namespace errnos, allocation, data, persistence."""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from backing import format as fmt
from backing.errors import FormatError, ImageBusy, StoreError
from backing.fsck import check_image
from backing.iommu import Iommu
from backing.mkfs import mkfs
from backing.store import Extent, Store, max_file_extents

PS = fmt.PAGE_SIZE
HUGE = fmt.HUGE_PAGE
MiB = 1 << 20
ROOT = fmt.ROOT_INO


@pytest.fixture
def path(tmp_path: Path) -> Path:
    p = tmp_path / "pk.img"
    mkfs(p, 64 * MiB)
    return p


@pytest.fixture
def store(path: Path) -> Iterator[Store]:
    s = Store.open(path)
    yield s
    s.close()


def gm(s: Store) -> int:
    return s.lookup(ROOT, b"guest_mem")


def new_file(s: Store, name: bytes = b"vm0", size: int = 0, parent: int | None = None) -> int:
    ino = s.create(gm(s) if parent is None else parent, name, 0o600, 0, 0)
    if size:
        s.truncate(ino, size)
    return ino


def two_extent_file(s: Store) -> int:
    """A 4-page file in two extents: pages 0-1, then 2-3 placed after another file's page."""
    a = new_file(s, b"a", size=2 * PS)
    new_file(s, b"b", size=PS)
    s.truncate(a, 4 * PS)  # the new pages cannot follow a's first extent
    assert len(s.extents(a)) == 2
    return a


def errno_of(fn: Callable[[], object]) -> int:
    with pytest.raises(StoreError) as e:
        fn()
    return e.value.errno


def metadata(s: Store) -> bytes:
    """Every metadata byte of the image (superblock .. extent table)."""
    return s.image[: s.geometry.data_page * PS].tobytes()


def used_pages(s: Store) -> int:
    g = s.geometry
    bits = np.unpackbits(s.image[g.bitmap_page * PS :][: g.bitmap_bytes], bitorder="little")
    return int(bits[: g.npages].sum())


def image_pages(s: Store | list[Extent], ino: int = 0) -> np.ndarray:
    """The image page of each file page of ``ino`` (or of a list of extents)."""
    exts = s.extents(ino) if isinstance(s, Store) else s
    return np.concatenate([np.arange(e.page, e.page + e.length // PS) for e in exts])


# ------------------------------------------------------------------ namespace


def test_create_then_lookup_finds_the_file(store: Store) -> None:
    ino = new_file(store)
    assert store.lookup(gm(store), b"vm0") == ino
    a = store.getattr(ino)
    assert a.kind == fmt.KIND_GUEST and stat.S_ISREG(a.mode) and a.mode & 0o7777 == 0o600
    assert a.size == 0 and a.npages == 0 and a.nlink == 1


def test_mkdir_makes_a_directory_with_nlink_2(store: Store) -> None:
    d = store.mkdir(gm(store), b"vm", 0o755, 0, 0)
    a = store.getattr(d)
    assert stat.S_ISDIR(a.mode) and a.nlink == 2
    assert store.getattr(gm(store)).nlink == 3


def test_lookup_missing_is_enoent(store: Store) -> None:
    assert errno_of(lambda: store.lookup(gm(store), b"nope")) == errno.ENOENT


def test_lookup_in_a_file_is_enotdir(store: Store) -> None:
    f = new_file(store)
    assert errno_of(lambda: store.lookup(f, b"x")) == errno.ENOTDIR


def test_create_in_missing_parent_is_enoent(store: Store) -> None:
    assert errno_of(lambda: store.create(999, b"x", 0o600, 0, 0)) == errno.ENOENT


def test_create_existing_name_is_eexist(store: Store) -> None:
    new_file(store)
    assert errno_of(lambda: new_file(store)) == errno.EEXIST
    store.mkdir(gm(store), b"d", 0o755, 0, 0)
    assert errno_of(lambda: new_file(store, b"d")) == errno.EEXIST


def test_create_in_a_file_is_enotdir(store: Store) -> None:
    f = new_file(store)
    assert errno_of(lambda: store.create(f, b"x", 0o600, 0, 0)) == errno.ENOTDIR


@pytest.mark.parametrize("name", [b"", b".", b"..", b"a/b", b"a\0b"])
def test_create_bad_name_is_einval(store: Store, name: bytes) -> None:
    assert errno_of(lambda: new_file(store, name)) == errno.EINVAL


def test_name_of_name_max_bytes_is_kept_exactly(store: Store) -> None:
    name = b"n" * fmt.NAME_MAX
    ino = new_file(store, name)
    assert store.lookup(gm(store), name) == ino
    assert store.path_of(ino) == b"/guest_mem/" + name


def test_name_longer_than_name_max_is_enametoolong(store: Store) -> None:
    assert errno_of(lambda: new_file(store, b"n" * (fmt.NAME_MAX + 1))) == errno.ENAMETOOLONG


def test_unlink_removes_the_name(store: Store) -> None:
    new_file(store)
    store.unlink(gm(store), b"vm0")
    assert errno_of(lambda: store.lookup(gm(store), b"vm0")) == errno.ENOENT


def test_unlink_missing_is_enoent(store: Store) -> None:
    assert errno_of(lambda: store.unlink(gm(store), b"vm0")) == errno.ENOENT


def test_unlink_directory_is_eisdir(store: Store) -> None:
    store.mkdir(gm(store), b"d", 0o755, 0, 0)
    assert errno_of(lambda: store.unlink(gm(store), b"d")) == errno.EISDIR


def test_rmdir_removes_an_empty_directory(store: Store) -> None:
    store.mkdir(gm(store), b"d", 0o755, 0, 0)
    store.rmdir(gm(store), b"d")
    assert store.children(gm(store)) == []


def test_rmdir_non_empty_is_enotempty(store: Store) -> None:
    d = store.mkdir(gm(store), b"d", 0o755, 0, 0)
    new_file(store, parent=d)
    assert errno_of(lambda: store.rmdir(gm(store), b"d")) == errno.ENOTEMPTY


def test_rmdir_file_is_enotdir(store: Store) -> None:
    new_file(store)
    assert errno_of(lambda: store.rmdir(gm(store), b"vm0")) == errno.ENOTDIR


def test_rmdir_missing_is_enoent(store: Store) -> None:
    assert errno_of(lambda: store.rmdir(gm(store), b"d")) == errno.ENOENT


@pytest.mark.parametrize("name", [b"guest_mem", b"iommu"])
def test_top_directories_cannot_be_removed_or_renamed(store: Store, name: bytes) -> None:
    if name == b"guest_mem":  # empty, so only the rule refuses it (/iommu is not empty)
        assert errno_of(lambda: store.rmdir(ROOT, name)) == errno.EPERM
    assert errno_of(lambda: store.rename(ROOT, name, ROOT, b"other")) == errno.EPERM
    other = store.mkdir(ROOT, b"other", 0o755, 0, 0)
    want = errno.EPERM if name == b"guest_mem" else errno.ENOTEMPTY
    assert errno_of(lambda: store.rename(ROOT, b"other", ROOT, name)) == want
    assert store.lookup(ROOT, b"other") == other


def test_iommu_files_cannot_be_unlinked_renamed_or_truncated(store: Store) -> None:
    iommu = store.lookup(ROOT, b"iommu")
    rp = store.lookup(iommu, b"root-pgtables")
    assert errno_of(lambda: store.unlink(iommu, b"root-pgtables")) == errno.EPERM
    assert errno_of(lambda: store.rename(iommu, b"root-pgtables", iommu, b"x")) == errno.EPERM
    assert errno_of(lambda: store.truncate(rp, 0)) == errno.EPERM
    assert errno_of(lambda: store.write(rp, 0, b"x")) == errno.EPERM


def test_replacing_an_iommu_file_by_rename_is_eperm(store: Store) -> None:
    iommu = store.lookup(ROOT, b"iommu")
    new_file(store)
    assert errno_of(lambda: store.rename(gm(store), b"vm0", iommu, b"root-pgtables")) == errno.EPERM


def test_rename_moves_a_file_between_directories(store: Store) -> None:
    ino = new_file(store, size=PS)
    store.write(ino, 0, b"data")
    d = store.mkdir(gm(store), b"d", 0o755, 0, 0)
    assert store.rename(gm(store), b"vm0", d, b"vm1") is None
    assert store.lookup(d, b"vm1") == ino
    assert errno_of(lambda: store.lookup(gm(store), b"vm0")) == errno.ENOENT
    assert store.read(ino, 0, 4) == b"data"


def test_rename_over_a_file_replaces_and_frees_it(store: Store) -> None:
    a = new_file(store, b"a")
    b = new_file(store, b"b", size=HUGE)
    free = store.statfs().free_pages
    assert store.rename(gm(store), b"a", gm(store), b"b") == b
    assert store.lookup(gm(store), b"b") == a
    assert store.statfs().free_pages == free + HUGE // PS
    assert errno_of(lambda: store.getattr(b)) == errno.ENOENT


def test_rename_noreplace_onto_existing_is_eexist(store: Store) -> None:
    new_file(store, b"a")
    new_file(store, b"b")
    assert errno_of(lambda: store.rename(gm(store), b"a", gm(store), b"b", noreplace=True)) == errno.EEXIST


def test_rename_noreplace_onto_itself_is_eexist(store: Store) -> None:
    new_file(store, b"a")
    assert errno_of(lambda: store.rename(gm(store), b"a", gm(store), b"a", noreplace=True)) == errno.EEXIST


def test_rename_missing_source_is_enoent(store: Store) -> None:
    assert errno_of(lambda: store.rename(gm(store), b"a", gm(store), b"b")) == errno.ENOENT


def test_rename_into_missing_directory_is_enoent(store: Store) -> None:
    new_file(store, b"a")
    assert errno_of(lambda: store.rename(gm(store), b"a", 999, b"b")) == errno.ENOENT


def test_rename_file_over_directory_is_eisdir(store: Store) -> None:
    new_file(store, b"a")
    store.mkdir(gm(store), b"d", 0o755, 0, 0)
    assert errno_of(lambda: store.rename(gm(store), b"a", gm(store), b"d")) == errno.EISDIR


def test_rename_directory_over_file_is_enotdir(store: Store) -> None:
    new_file(store, b"a")
    store.mkdir(gm(store), b"d", 0o755, 0, 0)
    assert errno_of(lambda: store.rename(gm(store), b"d", gm(store), b"a")) == errno.ENOTDIR


def test_rename_directory_over_non_empty_directory_is_enotempty(store: Store) -> None:
    store.mkdir(gm(store), b"d", 0o755, 0, 0)
    e = store.mkdir(gm(store), b"e", 0o755, 0, 0)
    new_file(store, parent=e)
    assert errno_of(lambda: store.rename(gm(store), b"d", gm(store), b"e")) == errno.ENOTEMPTY


def test_rename_directory_over_empty_directory_replaces_it(store: Store) -> None:
    d = store.mkdir(gm(store), b"d", 0o755, 0, 0)
    e = store.mkdir(gm(store), b"e", 0o755, 0, 0)
    assert store.rename(gm(store), b"d", gm(store), b"e") == e
    assert store.children(gm(store)) == [(b"e", d)]


def test_rename_directory_into_itself_is_einval(store: Store) -> None:
    d = store.mkdir(gm(store), b"d", 0o755, 0, 0)
    sub = store.mkdir(d, b"sub", 0o755, 0, 0)
    assert errno_of(lambda: store.rename(gm(store), b"d", d, b"x")) == errno.EINVAL
    assert errno_of(lambda: store.rename(gm(store), b"d", sub, b"x")) == errno.EINVAL


def test_rename_to_bad_name_is_einval(store: Store) -> None:
    new_file(store, b"a")
    assert errno_of(lambda: store.rename(gm(store), b"a", gm(store), b"..")) == errno.EINVAL


def test_rename_onto_itself_changes_nothing(store: Store) -> None:
    ino = new_file(store, b"a")
    before = metadata(store)
    assert store.rename(gm(store), b"a", gm(store), b"a") is None
    assert store.lookup(gm(store), b"a") == ino
    assert metadata(store) == before


def test_rename_of_a_moved_directory_keeps_its_subtree(store: Store) -> None:
    d = store.mkdir(gm(store), b"d", 0o755, 0, 0)
    f = new_file(store, b"f", parent=d)
    store.rename(gm(store), b"d", ROOT, b"d2")
    assert store.path_of(f) == b"/d2/f"


def test_inode_numbers_are_reused_with_a_new_generation(store: Store) -> None:
    a = new_file(store)
    igen = store.getattr(a).igen
    store.unlink(gm(store), b"vm0")
    b = new_file(store)
    assert b == a and store.getattr(b).igen == igen + 1


def test_setattr_changes_mode_uid_gid_but_not_type(store: Store) -> None:
    ino = new_file(store)
    a = store.setattr(ino, mode=0o4755, uid=7, gid=8)
    assert a.mode == stat.S_IFREG | 0o4755 and a.uid == 7 and a.gid == 8


# ------------------------------------------------------------------- read-only


def test_read_only_store_refuses_every_change_with_erofs(path: Path) -> None:
    with Store.open(path) as s:
        ino = new_file(s, size=PS)
    with Store.open(path, read_only=True) as s:
        g = gm(s)
        for fn in (
            lambda: s.create(g, b"x", 0o600, 0, 0),
            lambda: s.mkdir(g, b"x", 0o755, 0, 0),
            lambda: s.unlink(g, b"vm0"),
            lambda: s.rename(g, b"vm0", g, b"x"),
            lambda: s.truncate(ino, 0),
            lambda: s.write(ino, 0, b"x"),
            lambda: s.setattr(ino, mode=0o644),
            lambda: s.grow(ino, 1),
        ):
            assert errno_of(fn) == errno.EROFS


def test_read_only_open_never_writes_the_file(path: Path) -> None:
    with Store.open(path) as s:
        ino = new_file(s, size=3 * PS)
        s.write(ino, 0, b"abc")
    digest = hashlib.sha256(path.read_bytes()).digest()
    with Store.open(path, read_only=True) as s:
        assert s.read(ino, 0, 3) == b"abc"
        s.statfs()
    assert hashlib.sha256(path.read_bytes()).digest() == digest


def test_read_only_open_maps_an_image_larger_than_ram_and_swap(tmp_path: Path) -> None:
    """The private mapping reserves no memory for copies (a real guest image outgrows RAM)."""
    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    kib = sum(int(meminfo[k].split()[0]) for k in ("MemTotal", "SwapTotal"))
    size = -(-(kib << 10) * 2 // HUGE) * HUGE
    if size > 1 << 40:
        pytest.skip("a sparse image twice RAM + swap would exceed 1 TiB")
    p = tmp_path / "big.img"
    mkfs(p, size)  # sparse: only metadata is written
    with Store.open(p, read_only=True) as s:
        assert s.statfs().total_pages == size // PS


@pytest.mark.timeout(10)
@pytest.mark.parametrize("read_only", [True, False])
def test_open_of_a_fifo_is_a_format_error_without_waiting(tmp_path: Path, read_only: bool) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(FormatError) as e:
        Store.open(fifo, read_only=read_only)
    assert e.value.structure == "image"


def test_open_of_an_empty_file_is_a_format_error_naming_the_image(tmp_path: Path) -> None:
    empty = tmp_path / "empty.img"
    empty.touch()
    with pytest.raises(FormatError) as e:
        Store.open(empty)
    assert e.value.structure == "image" and check_image(empty)[1][0].structure == "image"


@pytest.mark.parametrize("read_only", [True, False])
def test_bytes_past_the_last_page_do_not_stop_an_open(path: Path, read_only: bool) -> None:
    """fsck accepts a file longer than npages pages (a stray append); so must the store."""
    with path.open("ab") as f:
        f.write(b"xyz")
    assert check_image(path)[0] == 0
    with Store.open(path, read_only=read_only) as s:
        assert s.image.size == s.geometry.size


def test_second_read_write_open_is_image_busy(path: Path) -> None:
    with Store.open(path):
        with pytest.raises(ImageBusy):
            Store.open(path)
        with pytest.raises(ImageBusy):
            Store.open(path, read_only=True)


def test_read_only_opens_share_the_image(path: Path) -> None:
    with Store.open(path, read_only=True), Store.open(path, read_only=True) as b:
        assert gm(b)
        with pytest.raises(ImageBusy):
            Store.open(path)


# --------------------------------------------------------------- allocation


def test_truncate_up_allocates_every_page_at_once(store: Store) -> None:
    ino = new_file(store)
    store.truncate(ino, 10 * HUGE + 3 * PS)
    a = store.getattr(ino)
    assert a.size == 10 * HUGE + 3 * PS and a.npages == 10 * HUGE // PS + 3
    assert sum(e.length for e in store.extents(ino)) == a.npages * PS


def test_truncate_up_uses_2mib_aligned_extents_when_space_allows(store: Store) -> None:
    ino = new_file(store, size=8 * HUGE)
    ext = store.extents(ino)
    assert len(ext) == 1
    e = ext[0]
    assert (e.file_offset, e.length) == (0, 8 * HUGE)
    assert e.phys_addr % HUGE == 0
    assert e.phys_addr == store.geometry.base_phys + e.page * PS


def aligned_huge_ranges(s: Store, ino: int) -> tuple[int, int]:
    """(2 MiB file ranges mappable by one 2 MiB leaf, 2 MiB file ranges in total)."""
    good = total = 0
    for e in s.extents(ino):
        lo = -(-e.file_offset // HUGE) * HUGE
        for off in range(lo, e.file_offset + e.length - HUGE + 1, HUGE):
            good += (e.phys_addr + off - e.file_offset) % HUGE == 0
    total = s.getattr(ino).size // HUGE
    return good, total


@pytest.mark.parametrize("first", [5 * PS, HUGE + 3 * PS, HUGE - PS])
def test_growing_a_file_keeps_file_offsets_and_physical_addresses_2mib_congruent(store: Store, first: int) -> None:
    """A 2 MiB range of the file maps to one 2 MiB-aligned chunk (an IOMMU superpage), also after
    growing from a size that is not a multiple of 2 MiB."""
    ino = new_file(store, size=first)
    store.truncate(ino, 6 * HUGE)
    good, total = aligned_huge_ranges(store, ino)
    assert good == total - 1  # all but the range holding the first allocation's end


def test_extents_are_sorted_contiguous_in_the_file_and_disjoint_in_memory(store: Store) -> None:
    files = [new_file(store, b"f%d" % i, size=(i + 1) * 5 * PS) for i in range(6)]
    store.unlink(gm(store), b"f1")
    store.unlink(gm(store), b"f3")
    big = new_file(store, b"big", size=30 * PS + 3 * HUGE)
    seen: list[tuple[int, int]] = []
    for ino in files[::2] + [big]:
        pos = 0
        for e in store.extents(ino):
            assert e.file_offset == pos
            pos += e.length
            seen.append((e.page, e.page + e.length // PS))
        assert pos == store.getattr(ino).npages * PS
    seen.sort()
    assert all(a[1] <= b[0] for a, b in zip(seen, seen[1:]))


def test_truncate_down_frees_the_pages_past_the_end(store: Store) -> None:
    ino = new_file(store, size=4 * HUGE)
    free = store.statfs().free_pages
    store.truncate(ino, HUGE + 1)
    assert store.getattr(ino).npages == HUGE // PS + 1
    assert store.statfs().free_pages == free + 3 * HUGE // PS - 1


def test_truncate_down_keeps_the_layout_of_kept_pages(store: Store) -> None:
    ino = new_file(store, size=3 * HUGE)
    first = store.extents(ino)[0]
    store.truncate(ino, HUGE + 5 * PS)
    e = store.extents(ino)
    assert e[0].phys_addr == first.phys_addr and e[0].file_offset == 0
    assert sum(x.length for x in e) == HUGE + 5 * PS


def test_truncate_up_never_moves_existing_pages(store: Store) -> None:
    ino = new_file(store, size=5 * PS)
    before = store.extents(ino)
    new_file(store, b"other", size=PS)  # takes the page right after, forcing a new extent
    store.truncate(ino, 2 * HUGE)
    after = store.extents(ino)
    assert after[0].phys_addr == before[0].phys_addr and after[0].length >= before[0].length


def test_truncate_up_fragments_when_no_chunk_is_free(tmp_path: Path) -> None:
    p = tmp_path / "i"
    mkfs(p, 16 * MiB)
    with Store.open(p) as s:
        free = s.statfs().free_pages
        # one page in every free chunk: no whole 2 MiB chunk remains
        fillers = [new_file(s, b"f%d" % i, size=HUGE) for i in range(free // (HUGE // PS))]
        for i in range(len(fillers)):
            s.truncate(fillers[i], PS)
        want = s.statfs().free_pages
        ino = new_file(s, b"big", size=want * PS)
        assert s.statfs().free_pages == 0
        assert len(s.extents(ino)) > 1
        assert s.read(ino, 0, want * PS) == bytes(want * PS)


def test_write_past_the_end_extends_and_allocates(store: Store) -> None:
    ino = new_file(store)
    store.write(ino, 3 * PS + 10, b"xyz")
    a = store.getattr(ino)
    assert a.size == 3 * PS + 13 and a.npages == 4
    assert store.read(ino, 0, a.size) == bytes(3 * PS + 10) + b"xyz"


def test_truncate_beyond_the_image_is_efbig(store: Store) -> None:
    ino = new_file(store)
    assert errno_of(lambda: store.truncate(ino, store.geometry.size + 1)) == errno.EFBIG


def test_truncate_negative_is_einval(store: Store) -> None:
    ino = new_file(store)
    assert errno_of(lambda: store.truncate(ino, -1)) == errno.EINVAL


def test_truncate_directory_is_eisdir(store: Store) -> None:
    assert errno_of(lambda: store.truncate(gm(store), 0)) == errno.EISDIR


# ---------------------------------------------------------------------- ENOSPC


def test_enospc_when_no_space_leaves_metadata_byte_identical(store: Store) -> None:
    ino = new_file(store, size=PS)
    store.write(ino, 0, b"keep")
    before, fs = metadata(store), store.statfs()
    too_many = (fs.free_pages + 1) * PS
    assert errno_of(lambda: store.truncate(ino, PS + too_many)) == errno.ENOSPC
    assert errno_of(lambda: store.write(ino, too_many, b"x")) == errno.ENOSPC
    assert metadata(store) == before and store.statfs() == fs
    assert store.read(ino, 0, 4) == b"keep"


def test_space_can_be_used_to_the_last_page(store: Store) -> None:
    ino = new_file(store)
    free = store.statfs().free_pages
    store.truncate(ino, free * PS)
    assert store.statfs().free_pages == 0
    b = new_file(store, b"b")
    assert errno_of(lambda: store.truncate(b, 1)) == errno.ENOSPC
    store.truncate(ino, 0)
    assert store.statfs().free_pages == free


def test_enospc_when_inode_table_is_full_leaves_metadata_byte_identical(tmp_path: Path) -> None:
    p = tmp_path / "i"
    mkfs(p, 16 * MiB, inode_count=16)
    with Store.open(p) as s:
        made = 0
        while True:
            try:
                new_file(s, b"f%d" % made)
            except StoreError as exc:
                assert exc.errno == errno.ENOSPC
                break
            made += 1
        assert made == 16 - 5  # 0 unused, root, guest_mem, iommu, root-pgtables
        before, fs = metadata(s), s.statfs()
        assert fs.free_inodes == 0
        assert errno_of(lambda: s.mkdir(gm(s), b"d", 0o755, 0, 0)) == errno.ENOSPC
        assert metadata(s) == before and s.statfs() == fs


def test_enospc_when_extent_table_is_full_leaves_metadata_byte_identical(tmp_path: Path) -> None:
    p = tmp_path / "i"
    mkfs(p, 16 * MiB, extent_count=8)
    with Store.open(p) as s:
        # root-pgtables holds record 0; seven 1-page files take the other seven
        for i in range(7):
            new_file(s, b"f%d" % i, size=PS)
        assert errno_of(lambda: new_file(s, b"g", size=PS)) == errno.ENOSPC
        assert int(np.count_nonzero(s.extents_table["npages"] == 0)) == 0
        f0 = s.lookup(gm(s), b"f0")
        before, fs = metadata(s), s.statfs()
        # f0's next page belongs to f1: growing it needs a new record
        assert errno_of(lambda: s.truncate(f0, 2 * PS)) == errno.ENOSPC
        assert errno_of(lambda: s.write(f0, PS, b"x")) == errno.ENOSPC
        assert metadata(s) == before and s.statfs() == fs
        # growing the last file extends its extent in place: no record needed
        s.truncate(s.lookup(gm(s), b"f6"), 2 * PS)


def test_a_file_cannot_fragment_past_what_one_transaction_can_free(tmp_path: Path) -> None:
    """Without the bound a file of ~1400 extents here could never be unlinked (journal overflow)."""
    p = tmp_path / "i"
    mkfs(p, 16 * MiB, extent_count=3000)
    with Store.open(p) as s:
        limit = max_file_extents(s.geometry)
        a, b = new_file(s, b"a"), new_file(s, b"b")
        for n in range(1, limit + 2):  # a and b take turns: every page of a is its own extent
            try:
                s.truncate(a, n * PS)
            except StoreError as exc:
                assert exc.errno == errno.ENOSPC
                break
            s.truncate(b, n * PS)
        assert len(s.extents(a)) == limit
        before, fs = metadata(s), s.statfs()
        assert errno_of(lambda: s.write(a, limit * PS, b"x")) == errno.ENOSPC
        assert metadata(s) == before and s.statfs() == fs
        s.rename(gm(s), b"b", gm(s), b"a")  # frees the old a: one transaction
        s.unlink(gm(s), b"a")
        assert s.statfs().file_pages == 0


# ------------------------------------------------------------------ data


def test_write_then_read_round_trips(store: Store) -> None:
    ino = new_file(store, size=HUGE)
    data = np.random.default_rng(1).bytes(3 * PS + 17)
    store.write(ino, 100, data)
    assert store.read(ino, 100, len(data)) == data


def test_write_and_read_across_extents(tmp_path: Path) -> None:
    p = tmp_path / "i"
    mkfs(p, 16 * MiB)
    with Store.open(p) as s:
        a = two_extent_file(s)
        data = np.random.default_rng(2).bytes(3 * PS)
        s.write(a, PS // 2, data)
        assert s.read(a, PS // 2, len(data)) == data
        e = s.extents(a)
        img = s.image
        got = img[e[0].page * PS + PS // 2 : (e[0].page + 2) * PS].tobytes()
        assert got == data[: len(got)]


def test_empty_write_past_the_end_changes_nothing(store: Store) -> None:
    ino = new_file(store)
    store.write(ino, 0, b"abc")
    before = metadata(store)
    assert store.write(ino, 5 * PS, b"") == 0
    assert store.getattr(ino).size == 3 and metadata(store) == before


def test_read_clips_at_end_of_file(store: Store) -> None:
    ino = new_file(store)
    store.write(ino, 0, b"0123456789")
    assert store.read(ino, 5, 100) == b"56789"
    assert store.read(ino, 10, 100) == b""
    assert store.read(ino, 1000, 10) == b""


def test_bytes_past_eof_read_zero_after_shrink_and_grow(store: Store) -> None:
    ino = new_file(store)
    store.write(ino, 0, b"\xff" * (2 * PS))
    store.truncate(ino, 100)
    store.truncate(ino, 2 * PS)
    assert store.read(ino, 0, 2 * PS) == b"\xff" * 100 + bytes(2 * PS - 100)


def test_write_past_eof_inside_the_last_page_zeroes_the_gap(store: Store) -> None:
    ino = new_file(store)
    store.write(ino, 0, b"\xff" * PS)
    store.truncate(ino, 10)
    store.write(ino, 20, b"x")
    assert store.read(ino, 0, 21) == b"\xff" * 10 + bytes(10) + b"x"


def test_freed_pages_do_not_leak_into_a_new_file(store: Store) -> None:
    secret = new_file(store, b"secret", size=HUGE)
    store.write(secret, 0, b"\xa5" * HUGE)
    pages = [e.page for e in store.extents(secret)]
    store.unlink(gm(store), b"secret")
    fresh = new_file(store, b"fresh", size=HUGE)
    assert [e.page for e in store.extents(fresh)] == pages  # best fit reuses them
    assert store.read(fresh, 0, HUGE) == bytes(HUGE)


def test_freed_pages_read_zero_in_the_image(store: Store) -> None:
    ino = new_file(store, size=2 * PS)
    store.write(ino, 0, b"\x5a" * 2 * PS)
    page = store.extents(ino)[0].page
    store.truncate(ino, 0)
    assert not store.image[page * PS : (page + 2) * PS].any()


def test_read_of_a_directory_is_eisdir(store: Store) -> None:
    assert errno_of(lambda: store.read(gm(store), 0, 1)) == errno.EISDIR
    assert errno_of(lambda: store.write(gm(store), 0, b"x")) == errno.EISDIR


def test_negative_offsets_are_einval(store: Store) -> None:
    ino = new_file(store)
    assert errno_of(lambda: store.write(ino, -1, b"x")) == errno.EINVAL
    assert errno_of(lambda: store.read(ino, -1, 1)) == errno.EINVAL


def test_write_inside_the_size_stamps_mtime_and_ctime_without_a_journal_commit(store: Store) -> None:
    ino = new_file(store, size=PS)
    store.setattr(ino, mtime_ns=1)
    commits = store.journal.commits
    store.write(ino, 10, b"x")
    a = store.getattr(ino)
    assert store.journal.commits == commits
    assert a.mtime_ns == a.ctime_ns > 1


def test_stamped_times_survive_reopen(path: Path) -> None:
    with Store.open(path) as s:
        ino = new_file(s, size=PS)
        s.stamp_write(ino, 123_456_789)
    with Store.open(path) as s:
        a = s.getattr(ino)
        assert (a.mtime_ns, a.ctime_ns) == (123_456_789, 123_456_789)


def test_stamp_write_is_refused_on_a_read_only_store(path: Path) -> None:
    with Store.open(path) as s:
        ino = new_file(s, size=PS)
    with Store.open(path, read_only=True) as s:
        assert errno_of(lambda: s.stamp_write(ino, 1)) == errno.EROFS


def test_image_span_is_the_image_range_of_bytes_inside_one_extent(store: Store) -> None:
    ino = new_file(store, size=HUGE)
    page = store.extents(ino)[0].page
    assert store.image_span(ino, 100, 5000) == (page * PS + 100, 5000)
    assert store.image_span(ino, HUGE - 10, 100) == (page * PS + HUGE - 10, 10)  # clipped at the size


def test_image_span_is_none_past_the_end_or_across_extents(tmp_path: Path) -> None:
    p = tmp_path / "i"
    mkfs(p, 16 * MiB)
    with Store.open(p) as s:
        a = two_extent_file(s)
        assert s.image_span(a, 2 * PS - 1, 2) is None
        assert s.image_span(a, 4 * PS, 1) is None
        assert s.image_span(a, -1, 1) is None
        assert s.image_span(gm(s), 0, 1) is None  # a directory holds no pages


def test_extent_at_maps_an_image_page_back_to_its_file(tmp_path: Path) -> None:
    p = tmp_path / "i"
    mkfs(p, 16 * MiB)
    with Store.open(p) as s:
        a = two_extent_file(s)
        second = s.extents(a)[1]
        assert s.extent_at(second.page + 1) == (a, second.page, second.page + second.length // PS,
                                                 second.file_offset // PS)
        assert s.extent_at(s.geometry.data_page - 1) is None  # metadata: no extent
        s.truncate(a, 2 * PS)  # the second extent is freed
        assert s.extent_at(second.page) is None


def test_image_pages_lists_each_file_page_in_file_order(tmp_path: Path) -> None:
    p = tmp_path / "i"
    mkfs(p, 16 * MiB)
    with Store.open(p) as s:
        a = two_extent_file(s)
        e0, e1 = s.extents(a)
        assert s.image_pages(a).tolist() == [e0.page, e0.page + 1, e1.page, e1.page + 1]
        assert s.image_pages(gm(s)).size == 0


def test_image_span_follows_a_file_truncated_and_grown_back_to_the_same_size(store: Store) -> None:
    ino = new_file(store, size=PS)
    new_file(store, b"other", size=PS)
    store.truncate(ino, 0)
    squatter = new_file(store, b"squatter", size=PS)  # takes the freed page
    store.truncate(ino, PS)
    span = store.image_span(ino, 0, PS)
    assert span is not None and span[0] == store.extents(ino)[0].page * PS
    assert span[0] != store.extents(squatter)[0].page * PS


# ---------------------------------------------------------------------- statfs


def test_statfs_is_derived_from_the_bitmap(store: Store) -> None:
    new_file(store, b"a", size=3 * HUGE + PS)
    new_file(store, b"b", size=7 * PS)
    fs = store.statfs()
    g = store.geometry
    assert fs.total_pages == g.npages
    assert fs.free_pages == g.npages - used_pages(store)
    assert fs.metadata_pages == g.data_page
    assert fs.file_pages == 3 * HUGE // PS + 1 + 7
    assert fs.table_pages == fmt.ROOT_PGTABLES_PAGES
    assert fs.metadata_pages + fs.file_pages + fs.table_pages + fs.free_pages == fs.total_pages


def test_statfs_counts_inodes(store: Store) -> None:
    before = store.statfs()
    new_file(store)
    after = store.statfs()
    assert after.inode_count == store.geometry.inode_count - 1
    assert after.free_inodes == before.free_inodes - 1


def test_statfs_is_the_same_after_reopen(path: Path) -> None:
    with Store.open(path) as s:
        new_file(s, size=HUGE + 3 * PS)
        fs = s.statfs()
    with Store.open(path) as s:
        assert s.statfs() == fs


# ----------------------------------------------------------------- persistence


def test_tree_layout_and_data_persist_across_close_and_reopen(path: Path) -> None:
    with Store.open(path) as s:
        d = s.mkdir(gm(s), b"vm", 0o750, 1, 2)
        ino = new_file(s, b"ram", size=HUGE + PS, parent=d)
        s.write(ino, HUGE - 2, b"span")
        layout = s.extents(ino)
        attr = s.getattr(ino)
    with Store.open(path) as s:
        d2 = s.lookup(gm(s), b"vm")
        assert s.getattr(d2).mode == stat.S_IFDIR | 0o750 and s.getattr(d2).uid == 1
        ino2 = s.lookup(d2, b"ram")
        assert ino2 == ino and s.extents(ino2) == layout
        assert s.getattr(ino2) == attr
        assert s.read(ino2, HUGE - 2, 4) == b"span"


def test_files_changed_after_reopen_before_any_read_start_from_their_own_extents(path: Path) -> None:
    """Open cuts per-file extent maps lazily: the first use may be a shrink, a growth or a free."""
    with Store.open(path) as s:
        a = new_file(s, b"a", size=3 * HUGE + 5 * PS)
        b = new_file(s, b"b", size=HUGE + PS)
        new_file(s, b"c", size=2 * PS)
        new_file(s, b"d", size=3 * PS)
        new_file(s, b"e")
        s.write(a, HUGE - 2, b"kept")
        s.write(b, 0, b"bbbb")
        layout = {ino: s.extents(ino) for ino in (a, b)}
        assert len(layout[a]) == 2  # so the shrink both drops and cuts extent records
        free = s.statfs().free_pages
    with Store.open(path) as s:
        s.truncate(a, HUGE + 2)
        s.truncate(b, 2 * HUGE + PS)
        s.unlink(gm(s), b"c")
        s.rename(gm(s), b"e", gm(s), b"d")  # frees d
        chunk = HUGE // PS
        assert s.statfs().free_pages == free + (2 * chunk + 4) - chunk + 2 + 3
        assert np.array_equal(image_pages(s, a), image_pages(layout[a])[: chunk + 1])
        assert np.array_equal(image_pages(s, b)[: chunk + 1], image_pages(layout[b]))
        assert s.read(a, HUGE - 2, 4) == b"kept" and s.read(b, 0, 4) == b"bbbb"
        assert [n for n, _ in s.children(gm(s))] == [b"a", b"b", b"d"]
    assert check_image(path)[0] == 0


def test_generation_increments_per_read_write_open(path: Path) -> None:
    gens = []
    for _ in range(3):
        with Store.open(path) as s:
            gens.append(s.generation)
    with Store.open(path, read_only=True) as s:
        ro = s.generation
    assert gens == [gens[0], gens[0] + 1, gens[0] + 2] and gens[0] >= 1
    assert ro == gens[-1]


def test_close_twice_is_harmless_even_while_the_mapping_is_still_exported(path: Path) -> None:
    s = Store.open(path)
    view = memoryview(s._mm)  # a reply buffer still alive at close: the mapping cannot close
    s.close()
    other = os.open(path, os.O_RDONLY)  # may reuse the store's descriptor number
    try:
        s.close()
        os.fstat(other)  # the second close closed nothing of anyone else's
    finally:
        os.close(other)
        view.release()


def test_clean_flag_is_set_on_close_and_cleared_while_open(path: Path) -> None:
    clean_at = fmt.SUPERBLOCK_DTYPE.fields["clean"][1]
    with Store.open(path):
        assert np.fromfile(path, "<u8", 1, offset=clean_at)[0] == 0
    assert np.fromfile(path, "<u8", 1, offset=clean_at)[0] == 1


# ---------------------------------------------------------------------- orphans


def test_unlink_keep_open_leaves_an_orphan_that_still_reads(store: Store) -> None:
    ino = new_file(store, size=PS)
    store.write(ino, 0, b"still here")
    store.unlink(gm(store), b"vm0", keep_open=True)
    assert errno_of(lambda: store.lookup(gm(store), b"vm0")) == errno.ENOENT
    assert store.getattr(ino).nlink == 0
    assert store.read(ino, 0, 10) == b"still here"


def test_release_orphan_frees_its_pages(store: Store) -> None:
    free = store.statfs().free_pages
    ino = new_file(store, size=HUGE)
    store.unlink(gm(store), b"vm0", keep_open=True)
    assert store.statfs().free_pages == free - HUGE // PS
    store.release_orphan(ino)
    assert store.statfs().free_pages == free
    assert errno_of(lambda: store.getattr(ino)) == errno.ENOENT


def test_release_of_a_linked_file_is_einval(store: Store) -> None:
    ino = new_file(store)
    assert errno_of(lambda: store.release_orphan(ino)) == errno.EINVAL


def test_orphans_are_freed_at_the_next_open(path: Path) -> None:
    with Store.open(path) as s:
        free = s.statfs().free_pages
        ino = new_file(s, size=HUGE)
        s.unlink(gm(s), b"vm0", keep_open=True)
    with Store.open(path) as s:
        assert s.statfs().free_pages == free
        assert errno_of(lambda: s.getattr(ino)) == errno.ENOENT


def test_rename_over_an_open_file_keeps_it_as_an_orphan(store: Store) -> None:
    new_file(store, b"a")
    b = new_file(store, b"b", size=PS)
    store.write(b, 0, b"old")
    store.rename(gm(store), b"a", gm(store), b"b", keep_open=lambda ino: ino == b)
    assert store.read(b, 0, 3) == b"old"
    store.release_orphan(b)
    assert errno_of(lambda: store.getattr(b)) == errno.ENOENT


# ------------------------------------------------------------------------ pins


def test_an_orphan_mapped_by_a_domain_survives_a_restart(path: Path) -> None:
    """Unlinked while open, then mapped for DMA: the next open must not free its pages."""
    with Store.open(path) as s:
        io = Iommu.open(s)
        ino = new_file(s, size=HUGE)
        s.unlink(gm(s), b"vm0", keep_open=True)
        dom = io.create_domain()
        dom.map(0, s.extents(ino)[0].phys_addr, HUGE)
        s.release_orphan(ino)  # still mapped: kept
        io.close()
    with Store.open(path) as s:
        assert s.getattr(ino).nlink == 0  # not freed before the pins are known
        io = Iommu.open(s)
        assert s.getattr(ino).npages == HUGE // PS
        assert check_image(path)[0] == 0
        io.domain(dom.domain_id).unmap(0, HUGE)
        assert s.free_orphans() == 1
        assert errno_of(lambda: s.getattr(ino)) == errno.ENOENT
        io.close()
    assert check_image(path)[0] == 0


def test_iommu_open_frees_unmapped_orphans(path: Path) -> None:
    with Store.open(path) as s:
        io = Iommu.open(s)
        io.create_domain()
        free = s.statfs().free_pages
        ino = new_file(s, size=HUGE)
        s.unlink(gm(s), b"vm0", keep_open=True)
        io.close()
    with Store.open(path) as s:
        assert s.getattr(ino).nlink == 0
        Iommu.open(s).close()
        assert errno_of(lambda: s.getattr(ino)) == errno.ENOENT
        assert s.statfs().free_pages == free


def test_pinned_file_cannot_be_truncated_down_or_unlinked(store: Store) -> None:
    ino = new_file(store, size=HUGE)
    store.pin_hook = lambda i: i == ino
    assert errno_of(lambda: store.truncate(ino, 0)) == errno.EBUSY
    assert errno_of(lambda: store.unlink(gm(store), b"vm0")) == errno.EBUSY
    assert store.getattr(ino).npages == HUGE // PS
    store.truncate(ino, 2 * HUGE)  # growing keeps every mapped page where it is
    store.pin_hook = None
    store.unlink(gm(store), b"vm0")


def test_pinned_file_cannot_be_replaced_by_rename(store: Store) -> None:
    ino = new_file(store, b"a", size=PS)
    new_file(store, b"b")
    store.pin_hook = lambda i: i == ino
    assert errno_of(lambda: store.rename(gm(store), b"b", gm(store), b"a")) == errno.EBUSY


def test_pinned_file_can_be_renamed(store: Store) -> None:
    """Renaming moves a name, not a page: a domain's mappings stay valid."""
    ino = new_file(store, b"a", size=PS)
    store.pin_hook = lambda i: i == ino
    store.rename(gm(store), b"a", gm(store), b"b")
    assert store.lookup(gm(store), b"b") == ino


def test_pinned_orphan_is_kept_until_unpinned(store: Store) -> None:
    ino = new_file(store, size=PS)
    store.unlink(gm(store), b"vm0", keep_open=True)
    store.pin_hook = lambda i: i == ino
    store.release_orphan(ino)
    assert store.getattr(ino).nlink == 0
    store.pin_hook = None
    store.release_orphan(ino)
    assert errno_of(lambda: store.getattr(ino)) == errno.ENOENT


# --------------------------------------------------------------------- iommu


def test_grow_appends_zeroed_pages_to_an_iommu_file(store: Store) -> None:
    iommu = store.lookup(ROOT, b"iommu")
    dom = store.create(iommu, b"dom-1", 0o400, 0, 0, kind=fmt.KIND_IOMMU_DOMAIN)
    new = store.grow(dom, 3)
    assert sum(e.length for e in new) == 3 * PS
    assert store.getattr(dom).npages == 3 and store.getattr(dom).size == 3 * PS
    assert store.read(dom, 0, 3 * PS) == bytes(3 * PS)
    assert store.statfs().table_pages == fmt.ROOT_PGTABLES_PAGES + 3


def test_grow_by_a_negative_count_is_einval_and_changes_nothing(store: Store) -> None:
    iommu = store.lookup(ROOT, b"iommu")
    dom = store.create(iommu, b"dom-1", 0o400, 0, 0, kind=fmt.KIND_IOMMU_DOMAIN)
    store.grow(dom, 3)
    before = metadata(store)
    assert errno_of(lambda: store.grow(dom, -2)) == errno.EINVAL
    assert metadata(store) == before


def test_page_owner_names_the_file_of_each_page(store: Store) -> None:
    ino = new_file(store, size=2 * PS)
    e = store.extents(ino)[0]
    owner, kind = store.page_owner(np.array([e.page, e.page + 1, 0, store.geometry.npages - 1]))
    assert owner.tolist()[:2] == [ino, ino] and kind.tolist()[:2] == [fmt.KIND_GUEST] * 2
    assert owner[2] == 0
