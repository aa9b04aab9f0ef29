"""The Operations handlers called directly under pytest-trio, with no mount.

Each test drives the handler coroutines the way the kernel would (lookups,
opens, forgets) against a real store in tmp_path, and ends with the store
closed and a clean fsck of the image. ``RequestContext`` and
``SetattrFields`` cannot be filled in from Python, so plain objects with
the same attributes stand in for them.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pyfuse3
import pytest
import trio

from backing import format as fmt
from backing.fsck import check_image
from backing.store import Store
from pkfuse.daemon.fs import VIEW_DIR_INO, VIEW_DIR_NAME, VIEW_FILES, VIEW_INO_BASE, Operations

CTX = SimpleNamespace(uid=0, gid=0, pid=os.getpid(), umask=0o022)
MiB = 1 << 20


def fields(**set_: bool) -> SimpleNamespace:
    names = ("update_atime", "update_mtime", "update_ctime", "update_mode", "update_uid", "update_gid",
             "update_size")
    return SimpleNamespace(**{n: set_.get(n, False) for n in names})


@pytest.fixture
def store(image: Path) -> Iterator[Store]:
    s = Store.open(image)
    yield s
    s.close()
    status, findings = check_image(str(image))
    assert status == 0, [str(f) for f in findings]


@pytest.fixture
def ops(store: Store) -> Iterator[Operations]:
    o = Operations(store)
    yield o
    o.close()


async def guest_dir(ops: Operations) -> int:
    return (await ops.lookup(fmt.ROOT_INO, fmt.GUEST_DIR_NAME, CTX)).st_ino


async def new_file(ops: Operations, name: bytes, data: bytes = b"") -> tuple[int, int]:
    """Create ``guest_mem/name`` holding ``data``; returns (ino, open fh)."""
    g = await guest_dir(ops)
    fi, attr = await ops.create(g, name, stat.S_IFREG | 0o644, os.O_RDWR, CTX)
    if data:
        assert await ops.write(fi.fh, 0, data) == len(data)
    return attr.st_ino, fi.fh


async def closed_files(ops: Operations, *names: bytes) -> int:
    """Create empty ``guest_mem/<name>`` files and close them; returns guest_mem's inode."""
    for name in names:
        _, fh = await new_file(ops, name)
        await ops.release(fh)
    return await guest_dir(ops)


async def read(ops: Operations, fh: int, off: int, size: int) -> bytes:
    """A read as the kernel sees it (the handler may return a view of the image)."""
    return bytes(await ops.read(fh, off, size))


async def errno_of(coro) -> int:
    with pytest.raises(pyfuse3.FUSEError) as exc:
        await coro
    return exc.value.errno


# ------------------------------------------------------------ lookups


async def test_lookup_counts_and_forget(ops: Operations) -> None:
    g = await guest_dir(ops)
    await ops.lookup(fmt.ROOT_INO, fmt.GUEST_DIR_NAME, CTX)
    assert ops.lookups[g] == 2
    await ops.forget([(g, 2)])
    assert g not in ops.lookups


async def test_lookup_of_a_missing_name_is_enoent(ops: Operations) -> None:
    assert await errno_of(ops.lookup(await guest_dir(ops), b"nope", CTX)) == errno.ENOENT


async def test_dot_and_dotdot_lookups(ops: Operations) -> None:
    g = await guest_dir(ops)
    assert (await ops.lookup(g, b".", CTX)).st_ino == g
    assert (await ops.lookup(g, b"..", CTX)).st_ino == fmt.ROOT_INO


async def test_views_live_above_every_image_inode(ops: Operations, store: Store) -> None:
    assert VIEW_INO_BASE > store.geometry.inode_count and VIEW_INO_BASE >= 1 << 32
    d = await ops.lookup(fmt.ROOT_INO, VIEW_DIR_NAME, CTX)
    assert d.st_ino == VIEW_DIR_INO and stat.S_ISDIR(d.st_mode)
    st = await ops.lookup(VIEW_DIR_INO, b"status", CTX)
    fi = await ops.open(st.st_ino, os.O_RDONLY, CTX)
    text = (await read(ops, fi.fh, 0, 1 << 20)).decode()
    assert f"daemon_pid:               {os.getpid()}" in text
    await ops.release(fi.fh)


async def test_view_open_for_writing_is_eacces(ops: Operations) -> None:
    assert await errno_of(ops.open(VIEW_FILES[b"memmap"], os.O_WRONLY, CTX)) == errno.EACCES


# ------------------------------------------------------------- readdir


async def test_readdir_offsets_survive_creates_and_unlinks(ops: Operations) -> None:
    g = await closed_files(ops, *(b"f%d" % i for i in range(10)))
    first = list(ops.dir_entries(g, 0))[:4]
    resume = first[-1][2]
    await ops.unlink(g, b"f1", CTX)  # before the resume point
    await ops.unlink(g, b"f7", CTX)  # after it
    _, fh = await new_file(ops, b"late")
    await ops.release(fh)
    rest = [e[0] for e in ops.dir_entries(g, resume)]
    seen = [e[0] for e in first] + rest
    assert len(seen) == len(set(seen))
    assert {b"f0", b"f2", b"f3", b"f4", b"f5", b"f6", b"f8", b"f9"} <= set(seen)
    assert b"f7" not in rest


async def test_root_listing_ends_with_the_views(ops: Operations) -> None:
    names = [e[0] for e in ops.dir_entries(fmt.ROOT_INO, 0)]
    assert names == [fmt.GUEST_DIR_NAME, fmt.IOMMU_DIR_NAME, VIEW_DIR_NAME]


# ------------------------------------------------------------ file data


async def test_write_then_read_back(ops: Operations) -> None:
    data = os.urandom(3 * MiB + 5)
    ino, fh = await new_file(ops, b"vm0", data)
    assert await read(ops, fh, 0, len(data) + 100) == data
    assert await read(ops, fh, MiB, 10) == data[MiB : MiB + 10]
    assert (await ops.getattr(ino, CTX)).st_size == len(data)
    await ops.release(fh)


async def test_write_inside_the_file_lands_in_the_image_and_moves_mtime(ops: Operations, store: Store) -> None:
    ino, fh = await new_file(ops, b"vm0")
    attr = pyfuse3.EntryAttributes()
    attr.st_size = 4 * MiB
    await ops.setattr(ino, attr, fields(update_size=True), fh, CTX)
    before = (await ops.getattr(ino, CTX)).st_mtime_ns
    data = os.urandom(MiB)  # inside the file and one extent: the in-place pwrite path
    assert await ops.write(fh, MiB + 4096, data) == MiB
    (ext,) = store.extents(ino)
    assert bytes(store.image[ext.page * 4096 + MiB + 4096 :][:MiB]) == data
    assert await read(ops, fh, MiB + 4096, MiB) == data
    assert (await ops.getattr(ino, CTX)).st_mtime_ns > before
    assert (await ops.getattr(ino, CTX)).st_size == 4 * MiB
    await ops.release(fh)


async def test_a_write_moves_an_mtime_that_was_set_into_the_future(ops: Operations) -> None:
    ino, fh = await new_file(ops, b"vm0", b"x" * MiB)
    attr = pyfuse3.EntryAttributes()
    attr.st_mtime_ns = 4_000_000_000_000_000_000  # year 2096
    await ops.setattr(ino, attr, fields(update_mtime=True), fh, CTX)
    await ops.write(fh, 0, b"y" * MiB)
    assert (await ops.getattr(ino, CTX)).st_mtime_ns < 4_000_000_000_000_000_000
    await ops.release(fh)

async def test_a_read_after_regrowing_to_the_same_size_and_mtime_sees_the_new_pages(ops: Operations) -> None:
    """``cp -p a b`` twice: O_TRUNC frees b's pages, the copy allocates others, utimes restores mtime."""
    old = os.urandom(2 * MiB)
    ino, fh = await new_file(ops, b"b", old)
    mtime = (await ops.getattr(ino, CTX)).st_mtime_ns
    assert await read(ops, fh, 0, 4096) == old[:4096]
    attr = pyfuse3.EntryAttributes()
    attr.st_size = 0
    await ops.setattr(ino, attr, fields(update_size=True), fh, CTX)
    _, other_fh = await new_file(ops, b"other", b"o" * (2 * MiB))  # takes the freed pages
    new = os.urandom(2 * MiB)
    await ops.write(fh, 0, new)
    attr.st_mtime_ns = mtime
    await ops.setattr(ino, attr, fields(update_mtime=True), fh, CTX)
    assert await read(ops, fh, 0, 4096) == new[:4096]
    await ops.write(fh, 4096, b"w" * 4096)
    assert await read(ops, other_fh, 4096, 4096) == b"o" * 4096
    await ops.release(other_fh)
    await ops.release(fh)


async def test_a_write_across_the_end_extends_the_file(ops: Operations) -> None:
    ino, fh = await new_file(ops, b"vm0", b"a" * 100)
    await ops.write(fh, 50, b"b" * (MiB))
    assert (await ops.getattr(ino, CTX)).st_size == 50 + MiB
    assert await read(ops, fh, 0, 60) == b"a" * 50 + b"b" * 10
    await ops.release(fh)


async def test_truncate_through_setattr_allocates_every_page(ops: Operations) -> None:
    ino, fh = await new_file(ops, b"vm0")
    attr = pyfuse3.EntryAttributes()
    attr.st_size = 8 * MiB
    out = await ops.setattr(ino, attr, fields(update_size=True), fh, CTX)
    assert out.st_size == 8 * MiB and out.st_blocks * 512 == 8 * MiB
    await ops.release(fh)


async def test_statfs_counts_the_pool(ops: Operations, store: Store) -> None:
    s = await ops.statfs(CTX)
    assert s.f_blocks == store.geometry.npages and s.f_bsize == 4096
    _, fh = await new_file(ops, b"vm0", b"x" * (2 * MiB))
    assert (await ops.statfs(CTX)).f_bfree == s.f_bfree - 512
    await ops.release(fh)


async def test_extents_xattr_lists_physical_layout(ops: Operations, store: Store) -> None:
    ino, fh = await new_file(ops, b"vm0", b"y" * (4 * MiB))
    lines = (await ops.getxattr(ino, b"user.pkernfs.extents", CTX)).decode().splitlines()
    exts = store.extents(ino)
    assert lines == [f"{e.file_offset:#x} {e.phys_addr:#x} {e.length:#x}" for e in exts]
    assert await errno_of(ops.getxattr(ino, b"user.other", CTX)) == pyfuse3.ENOATTR
    assert await errno_of(ops.setxattr(ino, b"user.x", b"1", CTX)) == errno.ENOTSUP
    await ops.release(fh)


# ----------------------------------------------------------- orphans


async def test_unlinked_open_file_lives_until_release(ops: Operations, store: Store) -> None:
    free = store.statfs().free_pages
    ino, fh = await new_file(ops, b"vm0", b"z" * MiB)
    g = await guest_dir(ops)
    await ops.forget([(ino, 1)])  # the kernel dropped its entry; only the handle holds it
    await ops.unlink(g, b"vm0", CTX)
    assert await read(ops, fh, 0, 4) == b"zzzz"
    assert store.statfs().free_pages == free - 256
    await ops.release(fh)
    assert store.statfs().free_pages == free
    assert await errno_of(ops.getattr(ino, CTX)) == errno.ENOENT


async def test_unlinked_file_the_kernel_still_knows_is_freed_at_forget(ops: Operations, store: Store) -> None:
    free = store.statfs().free_pages
    ino, fh = await new_file(ops, b"vm0", b"z" * MiB)
    await ops.release(fh)
    await ops.unlink(await guest_dir(ops), b"vm0", CTX)
    assert store.statfs().free_pages == free - 256  # lookup count 1: still an inode
    await ops.forget([(ino, 1)])
    assert store.statfs().free_pages == free


async def test_renaming_over_an_open_file_keeps_it_until_release(ops: Operations, store: Store) -> None:
    g = await guest_dir(ops)
    old, old_fh = await new_file(ops, b"old", b"o" * 4096)
    new, new_fh = await new_file(ops, b"new", b"n" * 4096)
    await ops.release(new_fh)
    await ops.rename(g, b"new", g, b"old", 0, CTX)
    assert await read(ops, old_fh, 0, 1) == b"o"
    assert (await ops.lookup(g, b"old", CTX)).st_ino == new
    await ops.forget([(old, 1)])
    await ops.release(old_fh)
    assert await errno_of(ops.getattr(old, CTX)) == errno.ENOENT


async def test_forget_all_frees_every_orphan(ops: Operations, store: Store) -> None:
    free = store.statfs().free_pages
    ino, fh = await new_file(ops, b"vm0", b"q" * MiB)
    await ops.unlink(await guest_dir(ops), b"vm0", CTX)
    ops.forget_all()
    assert store.statfs().free_pages == free


# ------------------------------------------------------------- refusals


async def test_rename_exchange_is_einval(ops: Operations) -> None:
    g = await closed_files(ops, b"a", b"b")
    assert await errno_of(ops.rename(g, b"a", g, b"b", pyfuse3.RENAME_EXCHANGE, CTX)) == errno.EINVAL


async def test_rename_noreplace_is_eexist(ops: Operations) -> None:
    g = await closed_files(ops, b"a", b"b")
    assert await errno_of(ops.rename(g, b"a", g, b"b", pyfuse3.RENAME_NOREPLACE, CTX)) == errno.EEXIST


async def test_iommu_files_refuse_every_change(ops: Operations) -> None:
    io = (await ops.lookup(fmt.ROOT_INO, fmt.IOMMU_DIR_NAME, CTX)).st_ino
    root = (await ops.lookup(io, fmt.ROOT_PGTABLES_NAME, CTX)).st_ino
    attr = pyfuse3.EntryAttributes()
    assert await errno_of(ops.open(root, os.O_RDWR, CTX)) == errno.EPERM
    assert await errno_of(ops.setattr(root, attr, fields(update_size=True), None, CTX)) == errno.EPERM
    assert await errno_of(ops.setattr(root, attr, fields(update_mode=True), None, CTX)) == errno.EPERM
    assert await errno_of(ops.unlink(io, fmt.ROOT_PGTABLES_NAME, CTX)) == errno.EPERM
    assert await errno_of(ops.create(io, b"x", 0o644, os.O_RDWR, CTX)) == errno.EPERM
    fi = await ops.open(root, os.O_RDONLY, CTX)
    assert len(await read(ops, fi.fh, 0, 1 << 20)) == 1 << 20
    await ops.release(fi.fh)


async def test_root_takes_no_new_entries(ops: Operations) -> None:
    assert await errno_of(ops.mkdir(fmt.ROOT_INO, b"x", 0o755, CTX)) == errno.EPERM


async def test_read_only_store_gives_erofs(image: Path) -> None:
    with Store.open(image, read_only=True) as ro:
        ops = Operations(ro)
        g = await guest_dir(ops)
        assert await errno_of(ops.create(g, b"x", 0o644, os.O_RDWR, CTX)) == errno.EROFS
        assert await errno_of(ops.mkdir(g, b"d", 0o755, CTX)) == errno.EROFS


async def test_a_bug_in_a_handler_becomes_eio_not_a_crash(ops: Operations, caplog) -> None:
    ops.store = None  # type: ignore[assignment] - every store call now fails unexpectedly
    assert await errno_of(ops.statfs(CTX)) == errno.EIO
    assert "statfs failed" in caplog.text


# ------------------------------------------- an in-process mount, on trio


@pytest.mark.mount
async def test_the_handlers_serve_a_real_mount_from_this_trio_loop(image: Path, tmp_path: Path) -> None:
    """pyfuse3.main in this test's own trio loop; the mount is touched only from worker threads
    (touching it from the loop's thread would deadlock, FUSE-NOTES)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    store = Store.open(image)
    ops = Operations(store)
    pyfuse3.init(ops, str(mnt), {"fsname=in-process", "subtype=pkfuse", "default_permissions"})
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pyfuse3.main)
            names = await trio.to_thread.run_sync(os.listdir, mnt)
            f = mnt / "guest_mem" / "vm0"
            await trio.to_thread.run_sync(f.write_bytes, b"through the kernel")
            data = await trio.to_thread.run_sync(f.read_bytes)
            extents = await trio.to_thread.run_sync(os.getxattr, f, "user.pkernfs.extents")
            pyfuse3.terminate()
    finally:
        pyfuse3.close(unmount=True)
        ops.forget_all()
        store.close()
    assert sorted(names) == [".pkernfs", "guest_mem", "iommu"]
    assert data == b"through the kernel"
    assert extents.startswith(b"0x0 0x")
    assert not os.path.ismount(mnt)
    status, findings = check_image(str(image))
    assert status == 0, [str(x) for x in findings]
