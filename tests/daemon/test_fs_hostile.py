"""The FUSE handlers under names and offsets the kernel itself would never send, with no mount (issue 14).

A buggy or hostile kernel side (or a future caller of the handlers) may hand
the daemon a name with ``/`` or NUL, ``.``, ``..``, an empty or over-long
name, offsets near 2**64: each gets an errno and changes nothing -- the
directory's entries, every inode's attributes and the free pages are as
before, and the store fixture's fsck at teardown is clean.
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

from backing import format as fmt
from backing.fsck import check_image
from backing.store import Store
from pkfuse.daemon.fs import Operations

CTX = SimpleNamespace(uid=0, gid=0, pid=os.getpid(), umask=0o022)
MiB = 1 << 20
BAD = [b"a/b", b"a\0b", b".", b"..", b"/", b"x/..", b"", b"n" * (fmt.NAME_MAX + 1), b"\0"]


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


def snapshot(store: Store) -> tuple:
    """What a refused call must leave as it was: every directory's entries, every inode, the free pages."""
    with store.lock:
        return ({d: dict(kids) for d, kids in store._children.items()}, store.inodes.tobytes(),
                store.statfs().free_pages)


def want_for(name: bytes) -> int:
    return errno.ENAMETOOLONG if len(name) > fmt.NAME_MAX else errno.EINVAL


async def errno_of(coro) -> int:
    with pytest.raises(pyfuse3.FUSEError) as exc:
        await coro
    return exc.value.errno


@pytest.mark.parametrize("name", BAD, ids=repr)
async def test_a_bad_name_is_refused_by_every_call_and_changes_nothing(ops: Operations, store: Store,
                                                                       name: bytes) -> None:
    g = (await ops.lookup(fmt.ROOT_INO, fmt.GUEST_DIR_NAME, CTX)).st_ino
    io = (await ops.lookup(fmt.ROOT_INO, fmt.IOMMU_DIR_NAME, CTX)).st_ino
    fi, attr = await ops.create(g, b"f", stat.S_IFREG | 0o644, os.O_RDWR, CTX)
    await ops.setattr(attr.st_ino, SimpleNamespace(st_size=2 * MiB), SimpleNamespace(
        **{f: f == "update_size" for f in ("update_atime", "update_mtime", "update_ctime", "update_mode",
                                           "update_uid", "update_gid", "update_size")}), fi.fh, CTX)
    before = snapshot(store)
    want = want_for(name)
    assert await errno_of(ops.create(g, name, stat.S_IFREG | 0o644, os.O_RDWR, CTX)) == want
    assert await errno_of(ops.mknod(g, name, stat.S_IFREG | 0o644, 0, CTX)) == want
    assert await errno_of(ops.mkdir(g, name, 0o755, CTX)) == want
    assert await errno_of(ops.rename(g, b"f", g, name, 0, CTX)) == want
    assert await errno_of(ops.create(io, name, stat.S_IFREG | 0o644, os.O_RDWR, CTX)) == errno.EPERM
    if name not in (b".", b".."):  # the kernel resolves those itself; an unknown name is just not there
        assert await errno_of(ops.lookup(g, name, CTX)) == (want if want == errno.ENAMETOOLONG else errno.ENOENT)
    for call in (ops.rename(g, name, g, b"zz", 0, CTX), ops.unlink(g, name, CTX), ops.rmdir(g, name, CTX)):
        assert await errno_of(call) == errno.ENOENT
    assert await errno_of(ops.link(attr.st_ino, g, name, CTX)) == errno.EPERM
    assert await errno_of(ops.setxattr(attr.st_ino, name, b"v", CTX)) in (errno.ENOTSUP, errno.EPERM)
    assert snapshot(store) == before
    await ops.release(fi.fh)


async def test_offsets_and_sizes_near_two_to_the_64_change_nothing(ops: Operations, store: Store) -> None:
    g = (await ops.lookup(fmt.ROOT_INO, fmt.GUEST_DIR_NAME, CTX)).st_ino
    fi, attr = await ops.create(g, b"f", stat.S_IFREG | 0o644, os.O_RDWR, CTX)
    assert await ops.write(fi.fh, 0, b"data") == 4
    before = snapshot(store)
    for off in (1 << 62, (1 << 63) - 1, (1 << 64) - 1, (1 << 64) - 4):
        assert await errno_of(ops.write(fi.fh, off, b"x")) == errno.EFBIG
        assert bytes(await ops.read(fi.fh, off, 1 << 20)) == b""
    assert bytes(await ops.read(fi.fh, 2, (1 << 63) - 1)) == b"ta"  # a huge size reads what there is
    fields = SimpleNamespace(**{f: f == "update_size" for f in ("update_atime", "update_mtime", "update_ctime",
                                                                "update_mode", "update_uid", "update_gid",
                                                                "update_size")})
    for size in (1 << 40, 1 << 62, (1 << 63) - 1, (1 << 64) - 1):
        assert await errno_of(ops.setattr(attr.st_ino, SimpleNamespace(st_size=size), fields, fi.fh, CTX)) \
            in (errno.EFBIG, errno.ENOSPC)
    assert snapshot(store) == before
    await ops.release(fi.fh)
