"""iommufd on a live mount: the control socket served by a real daemon, driven by the client library.

What the hardware sees is checked with the walker over the image's bytes and
the register block, as the device process will read them: never by asking
the daemon.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import Mount

from backing import format as fmt
from backing import fsck, walker
from backing.regs import Regs, default_path
from pkfuse.uapi import Iommufd, LiveUpdate, transport, wire

pytestmark = pytest.mark.mount

MiB = 1 << 20
PS = fmt.PAGE_SIZE
RID = "00:03.0"
SID = fmt.requester_id(0, 3, 0)


@pytest.fixture
def ctl(tmp_path: Path) -> Path:
    return tmp_path / "ctl.sock"


@pytest.fixture
def live(image: Path, ctl: Path, mount_image: Callable[..., Mount]) -> Mount:
    m = mount_image(image, "--control", str(ctl))
    (m.path / "guest_mem" / "vm0").write_bytes(b"")
    os.truncate(m.path / "guest_mem" / "vm0", 8 * MiB)
    return m


@pytest.fixture
def iommufd(live: Mount) -> Iterator[Iommufd]:
    with Iommufd(str(live.path)) as fd:
        yield fd


def guest_fd(m: Mount, flags: int = os.O_RDWR) -> int:
    return os.open(m.path / "guest_mem" / "vm0", flags)


def hardware_translate(image: Path, iovas: list[int], write: bool = False) -> tuple[list[int], list[int]]:
    """What the simulated device reaches: the walker over the image and its register block."""
    u64, base, npages = walker.open_image(image)
    with Regs.open(default_path(image), create=False) as regs:
        phys, faults = walker.translate(u64, base, npages, regs, SID, np.asarray(iovas, np.uint64), write)
    return phys.tolist(), faults.tolist()


def extents(m: Mount) -> list[tuple[int, int, int]]:
    text = os.getxattr(m.path / "guest_mem" / "vm0", "user.pkernfs.extents").decode()
    return [tuple(int(x, 16) for x in line.split()) for line in text.splitlines()]  # type: ignore[misc]


def phys_of(m: Mount, offset: int) -> int:
    return next(p + offset - off for off, p, n in extents(m) if off <= offset < off + n)


def truncate_once_unpinned(path: Path, timeout: float = 10.0) -> None:
    """Truncate ``path`` to 0 once no domain maps it: a destroyed domain keeps its pages
    (and pins) for ``iommu.FREE_GRACE_S`` after its last detach, the IOTLB-flush stand-in."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            os.truncate(path, 0)
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def wait_released(m: Mount, timeout: float = 10.0) -> None:
    """Wait until the daemon has released a closed connection's device: binding RID works again.

    The daemon releases when it reads the end of the connection, a moment
    after the client's close() returned (the kernel releases before close
    returns, when it drops the last reference).
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            with Iommufd(str(m.path)) as probe:
                probe.device_bind(RID)
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def errno_of(fn: Callable[[], object]) -> int:
    with pytest.raises(OSError) as exc:
        fn()
    return exc.value.errno


# ------------------------------------------------------------- transport


def test_status_names_the_socket_and_it_is_mode_0600(live: Mount, ctl: Path) -> None:
    status = (live.path / ".pkernfs" / "status").read_text()
    assert "control_socket:" in status and str(ctl) in status
    st = os.stat(ctl)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600


def test_the_socket_goes_with_a_clean_unmount(live: Mount, ctl: Path) -> None:
    assert live.unmount() == 0
    assert not ctl.exists()


def raw(ctl: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.connect(str(ctl))
    return s


def ask(s: socket.socket, data: bytes) -> int:
    s.send(data)
    reply = s.recv(transport.MAX_MESSAGE)
    return int.from_bytes(reply[:4], "little", signed=True)


def open_msg(path: bytes) -> bytes:
    return wire.PKFUSE_OPEN.to_bytes(4, "little") + wire.encode(wire.new(wire.pkfuse_open, path=path))


def test_malformed_messages_get_an_errno_and_the_connection_lives_on(live: Mount, ctl: Path) -> None:
    with raw(ctl) as s:
        assert ask(s, wire.IOMMU_IOAS_ALLOC.to_bytes(4, "little") + bytes(12)) == errno.EBADF  # nothing opened
        assert ask(s, b"\x01") == errno.EINVAL  # shorter than a command
        assert ask(s, open_msg(b"/dev/nothing")) == errno.ENOENT
        assert ask(s, open_msg(b"/dev/iommu")) == 0
        assert ask(s, open_msg(b"/dev/iommu")) == errno.EBUSY
        assert ask(s, (0x3B00 | 0x7F).to_bytes(4, "little") + bytes(8)) == errno.ENOTTY
        alloc = wire.IOMMU_IOAS_ALLOC.to_bytes(4, "little")
        assert ask(s, alloc + (12).to_bytes(4, "little") + bytes(4)) == errno.EINVAL  # size says 12, 8 sent
        assert ask(s, alloc + (16).to_bytes(4, "little") + bytes(8) + b"\x01\0\0\0") == errno.E2BIG
        assert ask(s, alloc + (12).to_bytes(4, "little") + b"\x01\0\0\0" + bytes(4)) == errno.EOPNOTSUPP  # flags
        assert ask(s, alloc + bytes(transport.MAX_MESSAGE)) == errno.EMSGSIZE
        assert ask(s, alloc + (16).to_bytes(4, "little") + bytes(12)) == 0  # trailing zeros are fine


def test_liveupdate_opens_once(live: Mount) -> None:
    with LiveUpdate(str(live.path)):
        assert errno_of(lambda: LiveUpdate(str(live.path))) == errno.EBUSY
    LiveUpdate(str(live.path)).close()  # free again once closed


# ------------------------------------------------------------------ IOAS


def test_map_file_then_attach_makes_the_hardware_translate_to_the_files_pages(live: Mount, image: Path,
                                                                                iommufd: Iommufd) -> None:
    fd = guest_fd(live)
    try:
        ioas = iommufd.ioas_alloc()
        assert iommufd.ioas_map_file(ioas, fd, 0, 8 * MiB, 0) == 0
        dev = iommufd.device_bind(RID)
        iommufd.device_attach(dev, ioas)
    finally:
        os.close(fd)
    phys, faults = hardware_translate(image, [0, 5 * PS, 8 * MiB - PS])
    assert phys == [phys_of(live, 0), phys_of(live, 5 * PS), phys_of(live, 8 * MiB - PS)]
    assert set(faults) == {0}


def test_map_file_refuses_a_file_that_is_not_on_the_mount(iommufd: Iommufd, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.write_bytes(bytes(PS))
    fd = os.open(other, os.O_RDWR)
    try:
        ioas = iommufd.ioas_alloc()
        assert errno_of(lambda: iommufd.ioas_map_file(ioas, fd, 0, PS, 0)) == errno.EBADF
    finally:
        os.close(fd)


def test_a_writeable_map_of_a_read_only_descriptor_is_eacces(live: Mount, iommufd: Iommufd) -> None:
    fd = guest_fd(live, os.O_RDONLY)
    try:
        ioas = iommufd.ioas_alloc()
        assert errno_of(lambda: iommufd.ioas_map_file(ioas, fd, 0, PS, 0)) == errno.EACCES
        assert iommufd.ioas_map_file(ioas, fd, 0, PS, 0, writeable=False) == 0
    finally:
        os.close(fd)


def test_a_mapped_guest_file_is_busy_through_the_mount(live: Mount, iommufd: Iommufd) -> None:
    fd = guest_fd(live)
    try:
        ioas = iommufd.ioas_alloc()
        iommufd.ioas_map_file(ioas, fd, 0, 8 * MiB, 0)
    finally:
        os.close(fd)
    path = live.path / "guest_mem" / "vm0"
    assert errno_of(lambda: os.truncate(path, 0)) == errno.EBUSY
    assert errno_of(lambda: os.unlink(path)) == errno.EBUSY
    assert iommufd.ioas_unmap(ioas, 0, 8 * MiB) == 8 * MiB
    os.truncate(path, 0)


def test_iova_ranges_round_trip(iommufd: Iommufd) -> None:
    ioas = iommufd.ioas_alloc()
    assert iommufd.ioas_iova_ranges(ioas) == ([(0, (1 << 48) - 1)], PS)


def test_option_huge_pages_off_makes_4k_leaves_and_refusals_travel_as_errnos(live: Mount, iommufd: Iommufd) -> None:
    O, OP = wire.iommufd_option, wire.iommufd_option_ops
    ioas = iommufd.ioas_alloc()
    assert iommufd.option(O.IOMMU_OPTION_HUGE_PAGES, OP.IOMMU_OPTION_OP_GET, ioas) == 1
    assert iommufd.option(O.IOMMU_OPTION_HUGE_PAGES, OP.IOMMU_OPTION_OP_SET, ioas, 0) == 0
    assert iommufd.option(O.IOMMU_OPTION_HUGE_PAGES, OP.IOMMU_OPTION_OP_GET, ioas) == 0
    fd = guest_fd(live)
    try:
        iommufd.ioas_map_file(ioas, fd, 0, 8 * MiB, 0)
        dev = iommufd.device_bind(RID)
        iommufd.device_attach(dev, iommufd.hwpt_alloc(dev, ioas))
        assert "huge pages off" in (live.path / ".pkernfs" / "iommu").read_text()
        iommufd.option(O.IOMMU_OPTION_HUGE_PAGES, OP.IOMMU_OPTION_OP_SET, ioas, 1)  # on again: always allowed
        assert errno_of(lambda: iommufd.option(O.IOMMU_OPTION_HUGE_PAGES, OP.IOMMU_OPTION_OP_SET, ioas, 0)) \
            == errno.EINVAL  # mapped into a HWPT already
        assert errno_of(lambda: iommufd.option(7, OP.IOMMU_OPTION_OP_GET, ioas)) == errno.EOPNOTSUPP
        req = wire.new(wire.iommu_option, option_id=1, op=1, object_id=ioas, __reserved=1)
        assert errno_of(lambda: iommufd._call(wire.IOMMU_OPTION, req)) == errno.EOPNOTSUPP
    finally:
        os.close(fd)


def test_ids_of_another_connection_are_enoent(live: Mount, iommufd: Iommufd) -> None:
    ioas = iommufd.ioas_alloc()
    with Iommufd(str(live.path)) as other:
        assert errno_of(lambda: other.destroy(ioas)) == errno.ENOENT


# ------------------------------------------------------------- releasing


def test_closing_the_connection_releases_devices_domains_and_pins(live: Mount, image: Path) -> None:
    fd = guest_fd(live)
    try:
        with Iommufd(str(live.path)) as iommufd:
            ioas = iommufd.ioas_alloc()
            iommufd.ioas_map_file(ioas, fd, 0, 8 * MiB, 0)
            iommufd.device_attach(iommufd.device_bind(RID), ioas)
    finally:
        os.close(fd)
    wait_released(live)  # the requester is free again
    _phys, faults = hardware_translate(image, [0])
    assert faults != [0]  # blocked
    truncate_once_unpinned(live.path / "guest_mem" / "vm0")  # no pin left


def test_a_client_killed_mid_sequence_leaks_nothing(live: Mount, image: Path) -> None:
    code = (
        "import os, signal, sys\n"
        "from pkfuse.uapi import Iommufd\n"
        f"fd = os.open({str(live.path / 'guest_mem' / 'vm0')!r}, os.O_RDWR)\n"
        f"i = Iommufd({str(live.path)!r})\n"
        "a = i.ioas_alloc(); i.ioas_map_file(a, fd, 0, 8 << 20, 0)\n"
        f"i.device_attach(i.device_bind({RID!r}), a)\n"
        "print('ready', flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout == "ready\n", r.stderr
    wait_released(live)
    truncate_once_unpinned(live.path / "guest_mem" / "vm0")
    assert live.unmount() == 0
    status, findings = fsck.check_image(str(image))
    assert status == 0, findings


def test_the_iommufd_example_runs_against_a_mount(live: Mount) -> None:
    example = Path(__file__).resolve().parents[2] / "examples" / "iommufd.py"
    r = subprocess.run([sys.executable, str(example), str(live.path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    reached = [line for line in lines if "reaches:" in line]
    assert len(reached) == 2 and "fault" not in "".join(reached)
    assert reached[0].split("reaches:")[1] == reached[1].split("reaches:")[1]  # the replace changed no target
    assert "fault" in lines[-1]  # detached: blocked


def test_the_default_socket_is_per_image_under_run_pkfuse_and_goes_with_the_unmount(image: Path,
                                                                                     tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("the default for root; other users get $XDG_RUNTIME_DIR/pkfuse")
    mnt = tmp_path / "dflt"
    mnt.mkdir()
    run = [sys.executable, "-m", "pkfuse"]
    r = subprocess.run([*run, "mount", "--log", str(tmp_path / "dflt.log"), str(image), str(mnt)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    try:
        status = dict(line.split(":", 1) for line in (mnt / ".pkernfs" / "status").read_text().splitlines())
        path = f"/run/pkfuse/{status['uuid'].strip()}.sock"
        assert status["control_socket"].strip() == path
        assert stat.S_ISSOCK(os.stat(path).st_mode)
        with Iommufd(str(mnt)) as fd:
            assert fd.ioas_alloc() == 1
    finally:
        assert subprocess.run([*run, "umount", str(mnt)], capture_output=True, timeout=60).returncode == 0
    assert not os.path.exists(path)


def test_unknown_flag_bits_are_refused_as_the_kernel_does(live: Mount, iommufd: Iommufd) -> None:
    """A bit no enum member names still counts (~ of an IntFlag used to drop it)."""
    fd = guest_fd(live)
    try:
        ioas = iommufd.ioas_alloc()
        F = wire.iommufd_ioas_map_flags
        req = wire.new(wire.iommu_ioas_map_file, flags=int(F.IOMMU_IOAS_MAP_READABLE) | 0x8, ioas_id=ioas, fd=fd,
                       start=0, length=PS)
        assert errno_of(lambda: iommufd._call(wire.IOMMU_IOAS_MAP_FILE, req, [fd])) == errno.EOPNOTSUPP
        dev = iommufd.device_bind(RID)
        req = wire.new(wire.pkfuse_device_attach_iommufd_pt, flags=0x100, dev_id=dev, pt_id=ioas)
        assert errno_of(lambda: iommufd._call(wire.VFIO_DEVICE_ATTACH_IOMMUFD_PT, req)) == errno.EINVAL
    finally:
        os.close(fd)
