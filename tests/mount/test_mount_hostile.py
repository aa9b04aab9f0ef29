"""Hostile input through the kernel to the FUSE operations: each gets the right errno and changes nothing.

Over-long names, offsets and sizes near 2**63, every change tried on the
IOMMU's files (the daemon alone writes IOMMU state), and a truncate racing a
map of the same file through the control socket. "Nothing changed" is
checked from outside: the directory listings, the files' sizes, modes and
bytes, the hardware's translations (the walker over the image), and fsck
after the unmount.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import Mount

from backing import format as fmt
from backing import fsck
from backing.iommu import Iommu
from backing.store import Store
from pkfuse.harness.tables import device_view
from pkfuse.uapi import Iommufd

pytestmark = pytest.mark.mount

MiB = 1 << 20
PS = fmt.PAGE_SIZE
SID = fmt.requester_id(0, 3, 0)


@pytest.fixture
def hostile_image(make_image: Callable[..., Path]) -> Path:
    """vm0 (4 MiB), dom-1 mapping it at IOVA 0 for 00:03.0, translation on."""
    path = make_image("64M")
    with Store.open(path) as s:
        g = s.create(s.lookup(fmt.ROOT_INO, b"guest_mem"), b"vm0", 0o644, 0, 0)
        s.truncate(g, 4 * MiB)
        with Iommu.open(s, str(path) + ".regs") as io:
            d = io.create_domain()
            d.map_file(g, 0, 4 * MiB, 0, write=True)
            d.attach(0, 3, 0)
            io.enable()
    return path


def fallocate(fd: int, length: int) -> None:
    """fallocate(2) itself: glibc's posix_fallocate would emulate an unsupported one by writing zeros."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    if libc.fallocate(fd, 0, 0, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def errno_of(fn: Callable[..., object], *args: object) -> int:
    with pytest.raises(OSError) as exc:
        fn(*args)
    return exc.value.errno


def state(m: Mount) -> tuple:
    """Listings, sizes, modes, owners and bytes of every file, and what 00:03.0 reaches."""
    files = {}
    for d in ("guest_mem", "iommu"):
        for p in sorted((m.path / d).iterdir()):
            st = os.stat(p)
            files[f"{d}/{p.name}"] = (st.st_size, st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns,
                                      hashlib.sha256(p.read_bytes()).hexdigest())
    phys, faults = device_view(m.image, SID, np.arange(0, 4 * MiB + PS, 64 * 1024, dtype=np.uint64), write=False)
    return files, phys.tolist(), faults.tolist()


def test_over_long_names_are_enametoolong_and_change_nothing(hostile_image: Path,
                                                             mount_image: Callable[..., Mount]) -> None:
    m = mount_image(hostile_image)
    g = m.path / "guest_mem"
    before = state(m)
    for n in (fmt.NAME_MAX + 1, 255, 256, 4096):
        name = "n" * n
        assert errno_of(os.open, g / name, os.O_CREAT | os.O_RDWR, 0o644) == errno.ENAMETOOLONG
        assert errno_of(os.mkdir, g / name) == errno.ENAMETOOLONG
        assert errno_of(os.rename, g / "vm0", g / name) == errno.ENAMETOOLONG
        assert errno_of(os.stat, g / name) == errno.ENAMETOOLONG
    assert errno_of(os.open, g / ("n" * 5000), os.O_RDONLY) == errno.ENAMETOOLONG  # longer than a path
    assert state(m) == before
    edge = g / ("n" * fmt.NAME_MAX)  # the longest name there is
    edge.write_bytes(b"x")
    assert edge.read_bytes() == b"x" and (g / "vm0").exists()
    edge.unlink()
    assert state(m) == before


def test_offsets_and_sizes_near_two_to_the_63_change_nothing(hostile_image: Path,
                                                             mount_image: Callable[..., Mount]) -> None:
    m = mount_image(hostile_image)
    f = m.path / "guest_mem" / "f"
    f.write_bytes(b"data")
    before = state(m)
    fd = os.open(f, os.O_RDWR)
    try:
        for off in (1 << 40, 1 << 62, (1 << 63) - 2):
            assert errno_of(os.pwrite, fd, b"x", off) == errno.EFBIG
            assert os.pread(fd, 1, off) == b""
        assert os.pread(fd, 1 << 20, 1 << 62) == b""
        assert errno_of(os.pread, fd, 1 << 20, (1 << 63) - 2) == errno.EINVAL  # the kernel's: the end wraps
        assert os.pread(fd, 1 << 30, 2) == b"ta"
        for size in (1 << 40, 1 << 62, (1 << 63) - 1):
            assert errno_of(os.ftruncate, fd, size) in (errno.EFBIG, errno.EINVAL)
        assert errno_of(fallocate, fd, 1 << 62) in (errno.EFBIG, errno.EOPNOTSUPP, errno.ENOSPC)
        assert errno_of(os.pwrite, fd, b"x", -1) == errno.EINVAL  # the kernel's own check
    finally:
        os.close(fd)
    assert state(m) == before


IOMMU_CHANGES: dict[str, Callable[[Path, Path], object]] = {
    "open O_TRUNC": lambda f, g: os.open(f, os.O_RDONLY | os.O_TRUNC),
    "open O_RDWR": lambda f, g: os.open(f, os.O_RDWR),
    "truncate up": lambda f, g: os.truncate(f, os.stat(f).st_size + PS),
    "chmod": lambda f, g: os.chmod(f, 0o644),
    "chown": lambda f, g: os.chown(f, 1, 1),
    "utime": lambda f, g: os.utime(f, (0, 0)),
    "setxattr": lambda f, g: os.setxattr(f, "user.x", b"1"),
    "removexattr": lambda f, g: os.removexattr(f, "user.pkernfs.kind"),
    "unlink": lambda f, g: os.unlink(f),
    "rename away": lambda f, g: os.rename(f, g / "stolen"),
    "rename a guest file over it": lambda f, g: os.rename(g / "vm0", f),
    "link": lambda f, g: os.link(f, g / "alias"),
}


@pytest.mark.parametrize("target", ["dom-1", "root-pgtables"])
def test_no_change_to_an_iommu_file_goes_through(hostile_image: Path, mount_image: Callable[..., Mount],
                                                 target: str) -> None:
    m = mount_image(hostile_image)
    f, g = m.path / "iommu" / target, m.path / "guest_mem"
    before = state(m)
    assert before[2][0] == 0  # 00:03.0 translates through dom-1
    refused = {}
    for what, change in IOMMU_CHANGES.items():
        with pytest.raises(OSError) as exc:
            change(f, g)
        refused[what] = exc.value.errno
    allowed = {errno.EPERM, errno.EACCES, errno.EXDEV, errno.ENOTSUP}
    assert all(e in allowed for e in refused.values()), refused
    with open(f, "rb") as fh:  # and through a descriptor opened for reading
        assert errno_of(os.ftruncate, fh.fileno(), 0) in (errno.EINVAL, errno.EBADF)
        assert errno_of(os.write, fh.fileno(), b"x") == errno.EBADF
    assert state(m) == before


def test_a_truncate_racing_maps_of_its_file_never_lets_both_through(hostile_image: Path,
                                                                      mount_image: Callable[..., Mount]) -> None:
    """Twenty rounds of a truncate-down against IOAS_MAP_FILE and against GUEST_MMAP of the whole file:
    the file keeps its size (the map won) or the map is refused (the truncate won), never both."""
    m = mount_image(hostile_image, "--control", str(hostile_image.with_name("ctl.sock")))
    path = m.path / "guest_mem" / "race"
    path.write_bytes(b"")
    size = 2 * MiB
    os.truncate(path, size)
    outcomes = set()
    for rnd in range(20):
        mmap_call = rnd % 2 == 1
        with Iommufd(str(m.path)) as fd:
            gfd = os.open(path, os.O_RDWR)
            ioas = fd.ioas_alloc()
            barrier = threading.Barrier(2)
            got: dict[str, int] = {}

            def truncate() -> None:
                barrier.wait(5)
                try:
                    os.truncate(path, size - PS)
                    got["truncate"] = 0
                except OSError as exc:
                    got["truncate"] = exc.errno

            t = threading.Thread(target=truncate)
            t.start()
            barrier.wait(5)
            mapped = 0
            try:
                if mmap_call:
                    g = fd.guest_mmap(gfd)
                    g.close()
                    mapped = g.length
                else:
                    fd.ioas_map_file(ioas, gfd, 0, size, 8 * MiB)
                    mapped = size
                got["map"] = 0
            except OSError as exc:
                got["map"] = exc.errno
            t.join(10)
            os.close(gfd)
            now = os.stat(path).st_size
            outcome = (got["map"], got["truncate"])
            if mmap_call:  # a mapping of whatever size the file has: after a truncate, the smaller one
                assert outcome in ((0, errno.EBUSY), (0, 0)), (rnd, outcome)
                assert mapped == now == (size - PS if got["truncate"] == 0 else size), (rnd, mapped, now)
            else:  # a map of the whole file: after a truncate it runs past the end
                assert outcome in ((0, errno.EBUSY), (errno.EINVAL, 0)), (rnd, outcome)
                assert now == (size if got["map"] == 0 else size - PS)
            outcomes.add((mmap_call, *outcome))
        # closing the connection dropped the map's pin (a destroyed domain's after its grace period)
        for _ in range(200):
            try:
                os.truncate(path, size)
                break
            except OSError as exc:
                assert exc.errno == errno.EBUSY
                threading.Event().wait(0.02)
    assert outcomes  # which side wins is the scheduler's
    assert m.unmount() == 0
    status, findings = fsck.check_image(str(hostile_image))
    assert status == 0, findings
