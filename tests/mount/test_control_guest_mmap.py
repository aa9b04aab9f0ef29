"""PKFUSE_GUEST_MMAP on a live mount: GuestMemory over a guest file's scattered pages, its errnos,
the pin it holds, SIGKILL survival of its stores, and a DMA seeing them at once.

What the image holds is read from the image file itself (or the walker over it), as
another process or the device would, never by asking the daemon.
"""

from __future__ import annotations

import errno
import os
import random
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import Mount

from backing import format as fmt
from backing import walker
from backing.regs import Regs, default_path
from pkfuse.uapi import Iommufd, LiveUpdate, wire
from pkfuse.vmm.memory import GuestMemory

pytestmark = pytest.mark.mount

MiB = 1 << 20
PS = fmt.PAGE_SIZE
RID = "00:03.0"
SID = fmt.requester_id(0, 3, 0)
GUEST = 8 * MiB  #: vm0's size: four 2 MiB pieces, each allocated between two of vm1's


@pytest.fixture
def ctl(tmp_path: Path) -> Path:
    return tmp_path / "ctl.sock"


@pytest.fixture
def live(image: Path, ctl: Path, mount_image: Callable[..., Mount]) -> Mount:
    """A mount whose ``guest_mem/vm0`` is scattered: its growth interleaved with ``vm1``'s."""
    m = mount_image(image, "--control", str(ctl))
    gdir = m.path / "guest_mem"
    for name in ("vm0", "vm1"):
        (gdir / name).write_bytes(b"")
    for size in range(2 * MiB, GUEST + 1, 2 * MiB):
        os.truncate(gdir / "vm0", size)
        os.truncate(gdir / "vm1", size)
    return m


@pytest.fixture
def iommufd(live: Mount) -> Iterator[Iommufd]:
    with Iommufd(str(live.path)) as fd:
        yield fd


@pytest.fixture
def vm0(live: Mount) -> Iterator[int]:
    fd = os.open(live.path / "guest_mem" / "vm0", os.O_RDWR)
    yield fd
    os.close(fd)


def vm0_path(m: Mount) -> Path:
    return m.path / "guest_mem" / "vm0"


def xattr_extents(m: Mount) -> list[tuple[int, int, int]]:
    """``user.pkernfs.extents``: (file_offset, phys_addr, length) lines."""
    text = os.getxattr(vm0_path(m), "user.pkernfs.extents").decode()
    return [tuple(int(x, 16) for x in line.split()) for line in text.splitlines()]  # type: ignore[misc]


def image_bytes_of_guest(image: Path, extents: list[tuple[int, int, int]], base: int) -> bytes:
    """The guest's bytes in file order, read from the image file at its extents' physical pages."""
    fd = os.open(image, os.O_RDONLY)
    try:
        return b"".join(os.pread(fd, n, phys - base) for _, phys, n in sorted(extents))
    finally:
        os.close(fd)


def base_phys(image: Path) -> int:
    return walker.open_image(image)[1]


def errno_of(fn: Callable[[], object]) -> int:
    with pytest.raises(OSError) as exc:
        fn()
    return exc.value.errno


def wait_truncatable(path: Path, size: int, timeout: float = 10.0) -> None:
    """Truncate once the daemon dropped the pins: it does when it reads the connection's end,
    a moment after the client's close returned (or after its process died)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            os.truncate(path, size)
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def mappings(m: Mount) -> int:
    """The daemon's count of live mappings (``guest_mmaps:`` in ``.pkernfs/status``)."""
    for line in (m.path / ".pkernfs" / "status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key == "guest_mmaps":
            return int(value.split(",")[1].split()[0])
    raise AssertionError("no guest_mmaps line in the status")


def wait_mappings(m: Mount, n: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while mappings(m) != n:
        assert time.monotonic() < deadline, f"{mappings(m)} mappings, {n} expected"
        time.sleep(0.01)


# ----------------------------------------------------------------- mapping


def test_the_scattered_file_has_non_contiguous_extents(live: Mount) -> None:
    ext = sorted(xattr_extents(live))
    assert len(ext) == GUEST // (2 * MiB)
    assert all(a[1] + a[2] != b[1] for a, b in zip(ext, ext[1:]))  # no two neighbours in the image


def test_the_call_answers_the_files_extents_as_image_offsets(live: Mount, image: Path, iommufd: Iommufd,
                                                             vm0: int) -> None:
    m = iommufd.guest_mmap(vm0)
    try:
        base = base_phys(image)
        assert m.length == GUEST and m.phys_base == base
        assert m.extents == [(fo, phys - base, n) for fo, phys, n in sorted(xattr_extents(live))]
        assert os.fstat(m.image_fd).st_ino == os.stat(image).st_ino
    finally:
        m.close()


def test_a_pattern_through_guest_memory_lands_at_the_extents_in_the_image(live: Mount, image: Path,
                                                                          iommufd: Iommufd, vm0: int) -> None:
    pattern = np.random.default_rng(1).integers(0, 256, GUEST, dtype=np.uint8)
    with GuestMemory.map_file(iommufd, vm0) as mem:
        assert mem.size == GUEST and len(mem.extents) == GUEST // (2 * MiB)
        mem.array[:] = pattern
        got = image_bytes_of_guest(image, xattr_extents(live), base_phys(image))
    assert got == pattern.tobytes()


def test_stores_read_back_through_the_mount(iommufd: Iommufd, vm0: int) -> None:
    with GuestMemory.map_file(iommufd, vm0) as mem:
        for gpa in (0, 2 * MiB - 3, 2 * MiB, GUEST - 8):
            mem.view[gpa:gpa + 3] = b"abc"
            assert os.pread(vm0, 3, gpa) == b"abc"  # direct_io: the read comes to the image's bytes


def test_writes_through_the_mount_are_seen_through_the_mapping(iommufd: Iommufd, vm0: int) -> None:
    with GuestMemory.map_file(iommufd, vm0) as mem:
        os.pwrite(vm0, b"from the mount", 6 * MiB + 10)
        assert bytes(mem.view[6 * MiB + 10: 6 * MiB + 24]) == b"from the mount"


def test_phys_addr_is_the_images_physical_address(live: Mount, iommufd: Iommufd, vm0: int) -> None:
    with GuestMemory.map_file(iommufd, vm0) as mem:
        for fo, phys, n in xattr_extents(live):
            assert mem.phys_addr(fo) == phys and mem.phys_addr(fo + n - 1) == phys + n - 1


def test_the_call_is_served_on_a_liveupdate_connection(live: Mount, vm0: int) -> None:
    with LiveUpdate(str(live.path)) as lu:
        m = lu.guest_mmap(vm0)
        m.close()
        assert m.length == GUEST


def test_the_call_is_served_on_a_session_fd(live: Mount, vm0: int) -> None:
    with LiveUpdate(str(live.path)) as lu, lu.create_session("s") as session:
        m = session.guest_mmap(vm0)
        m.close()
        assert m.length == GUEST


def test_the_extent_table_arrives_sealed(iommufd: Iommufd, vm0: int) -> None:
    import fcntl

    _, _, fds = iommufd._call(wire.PKFUSE_GUEST_MMAP, wire.new(wire.pkfuse_guest_mmap), [vm0], want_fds=2)
    try:
        seals = fcntl.fcntl(fds[1], fcntl.F_GET_SEALS)
        want = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL
        assert seals & want == want
        assert os.readlink(f"/proc/self/fd/{fds[1]}").startswith("/memfd:pkfuse-guest-extents")
    finally:
        for fd in fds:
            os.close(fd)


# ------------------------------------------------------------------- errnos


def raw_errno(client: Iommufd, fds: list[int], **fields: int) -> int:
    return errno_of(lambda: client._call(wire.PKFUSE_GUEST_MMAP, wire.new(wire.pkfuse_guest_mmap, **fields), fds,
                                         want_fds=2))


def test_no_descriptor_is_ebadf(iommufd: Iommufd) -> None:
    assert raw_errno(iommufd, []) == errno.EBADF


def test_two_descriptors_are_ebadf(iommufd: Iommufd, vm0: int) -> None:
    assert raw_errno(iommufd, [vm0, vm0]) == errno.EBADF


def test_a_file_not_on_the_mount_is_ebadf(iommufd: Iommufd, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.write_bytes(bytes(PS))
    fd = os.open(other, os.O_RDWR)
    try:
        assert errno_of(lambda: iommufd.guest_mmap(fd)) == errno.EBADF
    finally:
        os.close(fd)


def test_a_directory_on_the_mount_is_ebadf(live: Mount, iommufd: Iommufd) -> None:
    fd = os.open(live.path / "guest_mem", os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert errno_of(lambda: iommufd.guest_mmap(fd)) == errno.EBADF
    finally:
        os.close(fd)


@pytest.mark.parametrize("flags", [os.O_RDONLY, os.O_WRONLY], ids=["O_RDONLY", "O_WRONLY"])
def test_a_descriptor_not_open_read_write_is_eacces(live: Mount, iommufd: Iommufd, flags: int) -> None:
    fd = os.open(vm0_path(live), flags)
    try:
        assert errno_of(lambda: iommufd.guest_mmap(fd)) == errno.EACCES
    finally:
        os.close(fd)


def test_an_empty_guest_file_is_einval(live: Mount, iommufd: Iommufd) -> None:
    path = live.path / "guest_mem" / "empty"
    path.write_bytes(b"")
    fd = os.open(path, os.O_RDWR)
    try:
        assert errno_of(lambda: iommufd.guest_mmap(fd)) == errno.EINVAL
    finally:
        os.close(fd)


@pytest.mark.parametrize("name", ["iommu/root-pgtables", ".pkernfs/status"])
def test_a_daemon_file_can_only_be_opened_read_only_so_it_is_eacces(live: Mount, iommufd: Iommufd,
                                                                     name: str) -> None:
    fd = os.open(live.path / name, os.O_RDONLY)
    try:
        assert errno_of(lambda: iommufd.guest_mmap(fd)) == errno.EACCES
    finally:
        os.close(fd)


def test_unknown_flags_are_eopnotsupp(iommufd: Iommufd, vm0: int) -> None:
    assert raw_errno(iommufd, [vm0], flags=1) == errno.EOPNOTSUPP


def test_a_nonzero_reserved_field_is_eopnotsupp(iommufd: Iommufd, vm0: int) -> None:
    assert raw_errno(iommufd, [vm0], __reserved=1) == errno.EOPNOTSUPP


def test_a_refused_call_pins_nothing(live: Mount, iommufd: Iommufd) -> None:
    fd = os.open(vm0_path(live), os.O_RDONLY)
    try:
        errno_of(lambda: iommufd.guest_mmap(fd))
    finally:
        os.close(fd)
    os.truncate(vm0_path(live), GUEST - 2 * MiB)  # at once: no pin to wait for


# ---------------------------------------------------------------------- pin


def test_truncate_down_while_mapped_is_ebusy(live: Mount, iommufd: Iommufd, vm0: int) -> None:
    iommufd.guest_mmap(vm0).close()
    assert errno_of(lambda: os.truncate(vm0_path(live), 2 * MiB)) == errno.EBUSY
    assert os.stat(vm0_path(live)).st_size == GUEST


def test_truncate_up_while_mapped_is_ebusy(live: Mount, iommufd: Iommufd, vm0: int) -> None:
    iommufd.guest_mmap(vm0).close()
    assert errno_of(lambda: os.truncate(vm0_path(live), GUEST + 2 * MiB)) == errno.EBUSY


def test_a_write_past_the_end_while_mapped_is_ebusy(live: Mount, iommufd: Iommufd, vm0: int) -> None:
    iommufd.guest_mmap(vm0).close()
    assert errno_of(lambda: os.pwrite(vm0, b"x", GUEST)) == errno.EBUSY


def test_unlink_while_mapped_is_ebusy(live: Mount, iommufd: Iommufd, vm0: int) -> None:
    iommufd.guest_mmap(vm0).close()
    assert errno_of(lambda: os.unlink(vm0_path(live))) == errno.EBUSY


def test_truncate_works_once_the_mapping_connection_closed(live: Mount, vm0: int) -> None:
    with Iommufd(str(live.path)) as client:
        mem = GuestMemory.map_file(client, vm0)
    mem.close()
    wait_truncatable(vm0_path(live), 2 * MiB)
    assert os.stat(vm0_path(live)).st_size == 2 * MiB


def test_another_connections_mapping_keeps_the_pin(live: Mount, iommufd: Iommufd, vm0: int) -> None:
    iommufd.guest_mmap(vm0).close()
    with Iommufd(str(live.path)) as other:
        other.guest_mmap(vm0).close()
        assert mappings(live) == 2
    wait_mappings(live, 1)  # the daemon has read the other connection's end
    assert errno_of(lambda: os.truncate(vm0_path(live), 0)) == errno.EBUSY


def test_the_status_counts_mappings_files_and_connections(live: Mount, iommufd: Iommufd, vm0: int) -> None:
    iommufd.guest_mmap(vm0).close()
    iommufd.guest_mmap(vm0).close()
    status = (live.path / ".pkernfs" / "status").read_text()
    assert "guest_mmaps:" in status and "1 files mapped, 2 mappings, 1 connections" in status


def test_after_reboot_a_closed_connection_keeps_its_pin(live: Mount, vm0: int) -> None:
    with Iommufd(str(live.path)) as client, LiveUpdate(str(live.path)) as lu:
        client.guest_mmap(vm0).close()
        lu.reboot()  # the kernel is gone: closing a file releases nothing any more
    time.sleep(0.1)
    assert errno_of(lambda: os.truncate(vm0_path(live), 0)) == errno.EBUSY
    os.truncate(live.path / "guest_mem" / "vm1", 0)  # a file nobody mapped: truncate works as before


# ------------------------------------------------------- a mapping process

_CHILD = """
import os, struct, sys, time
from pkfuse.uapi import Iommufd
from pkfuse.vmm.memory import GuestMemory
ctl, guest, out, mode = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
client = Iommufd(ctl)
fd = os.open(guest, os.O_RDWR)
mem = GuestMemory.map_file(client, fd)
os.close(fd)
slots = mem.array.view("<u8")
os.write(out, struct.pack("<Q", 0))  # mapped
if mode == "store":  # store i at slot i - 1, then report it: a reported store is a completed one
    i, n, pack, write = 1, slots.size, struct.Struct("<Q").pack, os.write
    while i <= n:
        slots[i - 1] = i
        write(out, pack(i))
        i += 1
time.sleep(3600)
"""


class Child:
    """A process that maps vm0 through its own connection; its reports are read from a pipe."""

    def __init__(self, live: Mount, ctl: Path, mode: str) -> None:
        r, w = os.pipe()
        self.read_end = r
        self.buf = bytearray()
        self.proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(ctl), str(vm0_path(live)), str(w), mode],
                                     pass_fds=(w,))
        os.close(w)

    def wait_mapped(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.buf) < 8:
            assert self.proc.poll() is None, "the mapping process died"
            assert time.monotonic() < deadline, "the mapping process did not map"
            self.pump(0.05)

    def pump(self, seconds: float) -> None:
        """Read reports for ``seconds`` (the pipe must not fill: the child would block)."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            if select.select([self.read_end], [], [], left)[0]:
                chunk = os.read(self.read_end, 1 << 16)
                if not chunk:
                    return
                self.buf += chunk

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        while chunk := os.read(self.read_end, 1 << 16):  # what it reported before it died
            self.buf += chunk

    def close(self) -> None:
        self.kill()
        os.close(self.read_end)

    def reported(self) -> np.ndarray:
        whole = len(self.buf) - len(self.buf) % 8
        return np.frombuffer(bytes(self.buf[8:whole]), "<u8")  # the first report is "mapped"


@pytest.fixture
def spawn(live: Mount, ctl: Path) -> Iterator[Callable[[str], Child]]:
    made: list[Child] = []

    def start(mode: str) -> Child:
        c = Child(live, ctl, mode)
        made.append(c)
        return c

    yield start
    for c in made:
        c.close()


def test_the_pin_goes_when_the_mapping_process_is_killed(live: Mount, spawn: Callable[[str], Child]) -> None:
    child = spawn("hold")
    child.wait_mapped()
    assert errno_of(lambda: os.truncate(vm0_path(live), 0)) == errno.EBUSY
    child.kill()
    wait_truncatable(vm0_path(live), 0)
    assert mappings(live) == 0


def check_reported_stores(image: Path, extents: list[tuple[int, int, int]], reported: np.ndarray) -> None:
    slots = np.frombuffer(image_bytes_of_guest(image, extents, base_phys(image)), "<u8")
    assert reported.size, "the child reported no store"
    assert np.array_equal(reported, np.arange(1, reported.size + 1, dtype=np.uint64))  # in order, none lost
    missing = np.flatnonzero(slots[reported.astype(np.int64) - 1] != reported)
    assert not missing.size, f"{missing.size} reported stores are not in the image, first {reported[missing[0]]}"


def test_every_reported_store_survives_sigkill_at_a_random_instant(live: Mount, image: Path,
                                                                   spawn: Callable[[str], Child]) -> None:
    rng = random.Random(12)
    extents = xattr_extents(live)
    for _ in range(4):
        child = spawn("store")
        child.wait_mapped()
        child.pump(rng.uniform(0.01, 0.3))
        child.kill()
        check_reported_stores(image, extents, child.reported())
        wait_truncatable(vm0_path(live), 0)  # the pin went with the process; a fresh guest for the next round
        os.truncate(vm0_path(live), GUEST)
        extents = xattr_extents(live)


def test_stores_survive_sigkill_of_the_daemon_and_then_of_the_mapping_process(
        live: Mount, image: Path, spawn: Callable[[str], Child]) -> None:
    extents = xattr_extents(live)
    child = spawn("store")
    child.wait_mapped()
    child.pump(0.1)
    live.kill()  # the daemon first: the child's mapping is of the image, it stores on
    child.pump(0.1)
    child.kill()
    reported = child.reported()
    check_reported_stores(image, extents, reported)
    live.start()  # the restart: the stores are the file's bytes through the mount too
    fd = os.open(vm0_path(live), os.O_RDONLY)
    try:
        last = int(reported[-1])
        assert int.from_bytes(os.pread(fd, 8, (last - 1) * 8), "little") == last
    finally:
        os.close(fd)


# --------------------------------------------------------------------- DMA


def test_a_dma_through_the_iommu_sees_a_store_at_once(live: Mount, image: Path, iommufd: Iommufd, vm0: int) -> None:
    iova_base = 1 << 32
    ioas = iommufd.ioas_alloc()
    assert iommufd.ioas_map_file(ioas, vm0, 0, GUEST, iova_base) == iova_base
    dev = iommufd.device_bind(RID)
    iommufd.device_attach(dev, iommufd.hwpt_alloc(dev, ioas))
    u64, base, npages = walker.open_image(image)  # the device's view of memory: the image
    with GuestMemory.map_file(iommufd, vm0) as mem, Regs.open(default_path(image), create=False) as regs:
        slots = mem.array.view("<u8")
        gpas = [8, 2 * MiB + PS, 5 * MiB + 16, GUEST - 8]
        for n, gpa in enumerate(gpas):
            value = 0xD1A0_0000_0000 + n
            slots[gpa // 8] = value
            phys, faults = walker.translate(u64, base, npages, regs, SID,
                                            np.array([iova_base + gpa], np.uint64), False)
            assert int(faults[0]) == 0
            assert int(phys[0]) == mem.phys_addr(gpa)
            assert int(u64[(int(phys[0]) - base) // 8]) == value
    del u64
