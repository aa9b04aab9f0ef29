"""Live update on a live mount: sessions over the control socket, reboot(), SIGKILL, a new daemon.

The VMM is this test process (the client library); the restart is
``Mount.restart`` (SIGKILL of the daemon, a new mount of the same image);
what the device sees is the walker over the image's bytes and the register
block, read without asking any daemon.
"""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import Mount, run_example
from iommu_helpers import device_view, entry_where

from backing import format as fmt
from backing import fsck, vtd
from backing.iommu import Iommu
from backing.store import Store
from pkfuse.uapi import Iommufd, LiveUpdate, Session

pytestmark = pytest.mark.mount

MiB = 1 << 20
PS = fmt.PAGE_SIZE
RID = "00:03.0"
SID = fmt.requester_id(0, 3, 0)
IOVA = 1 << 30
SIZE = 8 * MiB
#: one IOVA per 4 KiB page of the guest, and one past its end (a fault)
IOVAS = np.arange(IOVA, IOVA + SIZE + PS, PS, dtype=np.uint64)


@pytest.fixture
def live(image: Path, tmp_path: Path, mount_image: Callable[..., Mount]) -> Mount:
    m = mount_image(image, "--control", str(tmp_path / "ctl.sock"))
    with open(m.path / "guest_mem" / "vm0", "wb") as f:
        f.truncate(SIZE)
    return m


def hardware(image: Path) -> tuple[list[int], list[int]]:
    """What the device reaches at every IOVA of the guest: (phys, fault reason)."""
    return device_view(image, SID, IOVAS)


def errno_of(fn: Callable[[], object]) -> int:
    with pytest.raises(OSError) as exc:
        fn()
    return exc.value.errno


class Vmm:
    """The VMM's side of one boot: its open files and connections (closed at teardown)."""

    def __init__(self, m: Mount) -> None:
        self.m = m
        self.fd = os.open(m.path / "guest_mem" / "vm0", os.O_RDWR)
        self.iommufd = Iommufd(str(m.path))
        self.lu = LiveUpdate(str(m.path))
        self.sessions: list = []

    def build(self, fd: int | None = None) -> int:
        """IOAS with the guest at IOVA, the device bound and attached through a HWPT; the HWPT id."""
        ioas = self.iommufd.ioas_alloc()
        self.iommufd.ioas_map_file(ioas, self.fd if fd is None else fd, 0, SIZE, IOVA)
        dev = self.iommufd.device_bind(RID)
        hwpt = self.iommufd.hwpt_alloc(dev, ioas)
        self.iommufd.device_attach(dev, hwpt)
        return hwpt

    def preserve(self, hwpt: int) -> None:
        s = self.lu.create_session("vm0")
        self.sessions.append(s)
        s.preserve_fd(self.fd, 1)
        self.iommufd.hwpt_lu_set_preserve(hwpt, 2, s)

    def close(self) -> None:
        if self.fd < 0:
            return
        for s in self.sessions:
            s.close()
        self.lu.close()
        self.iommufd.close()
        try:
            os.close(self.fd)
        except OSError as exc:  # a file of the mount the restart killed
            if exc.errno != errno.ENOTCONN:
                raise
        self.fd = -1


@pytest.fixture
def vmms() -> Iterator[list[Vmm]]:
    made: list[Vmm] = []
    yield made
    for v in made:
        v.close()


def vmm(vmms: list[Vmm], m: Mount) -> Vmm:
    v = Vmm(m)
    vmms.append(v)
    return v


def test_a_preserved_guest_survives_reboot_and_sigkill_and_is_adopted(live: Mount, image: Path,
                                                                      vmms: list[Vmm]) -> None:
    _survives(live, image, vmms, adopted=True)


def test_ephemeral_design_a_preserved_guest_survives_through_its_fixed_copy(
        image: Path, tmp_path: Path, mount_image: Callable[..., Mount], vmms: list[Vmm]) -> None:
    m = mount_image(image, "--control", str(tmp_path / "ctl.sock"), "--domains", "ephemeral")
    with open(m.path / "guest_mem" / "vm0", "wb") as f:
        f.truncate(SIZE)
    _survives(m, image, vmms, adopted=False)


def _domain_ids(m: Mount) -> set[str]:
    return {n for n in os.listdir(m.path / "iommu") if n.startswith("dom-")}


def _survives(live: Mount, image: Path, vmms: list[Vmm], *, adopted: bool) -> None:
    """Build, preserve, reboot(), SIGKILL, remount, retrieve, rebuild, finish: the device's
    translations are the same at every step; adopted: the preserved domain is the new HWPT's
    (pkernfs), else a new one replaced the restored fixed copy, freed at finish (the review's)."""
    v = vmm(vmms, live)
    v.preserve(v.build())
    before = hardware(image)
    assert set(before[1][:-1]) == {0} and before[1][-1] != 0
    assert len(_domain_ids(live)) == (1 if adopted else 0)  # ephemeral: the HWPT's tables are in host RAM
    v.lu.reboot()
    live.restart()  # the kexec: the daemon (and with it every connection) dies at once
    assert hardware(image) == before  # DMA went on through the restart, before any VMM came back
    restored = _domain_ids(live)
    assert len(restored) == 1  # in the image: the live domain (pkernfs) or its fixed copy

    v2 = vmm(vmms, live)
    s = v2.lu.retrieve_session("vm0")
    v2.sessions.append(s)
    fd = s.retrieve_fd(1)
    try:
        assert os.fstat(fd).st_ino == os.stat(live.path / "guest_mem" / "vm0").st_ino
        v2.build(fd)  # the same maps: adopted (pkernfs), or a new domain replaces the fixed copy
        assert hardware(image) == before
        s.finish()
    finally:
        os.close(fd)
    if adopted:
        assert _domain_ids(live) == restored
    else:
        deadline = time.monotonic() + 10
        while _domain_ids(live) and time.monotonic() < deadline:  # the copy goes after the grace period
            time.sleep(0.05)
        assert _domain_ids(live) == set()
    assert "lu-state" not in os.listdir(live.path / "iommu")
    assert hardware(image) == before
    for x in vmms:
        x.close()
    vmms.clear()
    assert live.unmount() == 0
    assert fsck.check_image(image)[0] == 0


def test_every_call_after_reboot_is_eshutdown(live: Mount, vmms: list[Vmm]) -> None:
    v = vmm(vmms, live)
    v.lu.reboot()
    assert errno_of(lambda: v.iommufd.ioas_alloc()) == errno.ESHUTDOWN
    assert errno_of(lambda: v.lu.create_session("late")) == errno.ESHUTDOWN


def test_retrieving_a_file_twice_gives_the_same_open_file(live: Mount, vmms: list[Vmm]) -> None:
    v = vmm(vmms, live)
    v.preserve(v.build())
    v.lu.reboot()
    live.restart()
    v2 = vmm(vmms, live)
    s = v2.lu.retrieve_session("vm0")
    v2.sessions.append(s)
    a, b = s.retrieve_fd(1), s.retrieve_fd(1)
    try:
        os.lseek(a, 12345, os.SEEK_SET)
        assert os.lseek(b, 0, os.SEEK_CUR) == 12345  # one file description, two descriptors
    finally:
        os.close(a)
        os.close(b)


def test_session_errnos_on_the_socket(live: Mount, vmms: list[Vmm], tmp_path: Path) -> None:
    v = vmm(vmms, live)
    s = v.lu.create_session("a")
    v.sessions.append(s)
    assert errno_of(lambda: v.lu.create_session("a")) == errno.EEXIST
    assert errno_of(lambda: v.lu.retrieve_session("nothing")) == errno.ENOENT
    s.preserve_fd(v.fd, 1)
    assert errno_of(lambda: s.preserve_fd(v.fd, 2)) == errno.EEXIST  # the file is preserved already
    other = tmp_path / "other"
    other.write_bytes(b"x")
    with open(other, "rb") as f:
        assert errno_of(lambda: s.preserve_fd(f, 3)) == errno.EBADF  # not a file on the mount
    assert errno_of(lambda: s.finish()) == errno.EINVAL  # an outgoing session finishes after the reboot
    assert errno_of(lambda: s.retrieve_fd(1)) == errno.ENOENT
    hwpt = v.build()
    fake = Session(socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET))  # a socket, not a session
    try:
        assert errno_of(lambda: v.iommufd.hwpt_lu_set_preserve(hwpt, 9, fake)) == errno.EBADF
    finally:
        fake.close()
    v.iommufd.hwpt_lu_set_preserve(hwpt, 2, s)
    assert errno_of(lambda: v.iommufd.hwpt_lu_set_preserve(hwpt, 4, s)) == errno.EEXIST
    assert errno_of(lambda: v.iommufd.ioas_unmap(1, IOVA, SIZE)) == errno.EBUSY  # the IOAS is frozen


def test_a_preserved_file_cannot_change_size_through_the_mount(live: Mount, vmms: list[Vmm]) -> None:
    v = vmm(vmms, live)
    s = v.lu.create_session("a")
    v.sessions.append(s)
    s.preserve_fd(v.fd, 1)
    assert errno_of(lambda: os.truncate(live.path / "guest_mem" / "vm0", 2 * SIZE)) == errno.EBUSY


def test_closing_an_outgoing_session_cancels_it(live: Mount, vmms: list[Vmm]) -> None:
    v = vmm(vmms, live)
    s = v.lu.create_session("a")
    s.preserve_fd(v.fd, 1)
    s.close()
    deadline = time.monotonic() + 10
    while True:  # the daemon cancels when it reads the end of the session's connection
        try:
            os.truncate(live.path / "guest_mem" / "vm0", 2 * SIZE)
            break
        except OSError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                raise
            time.sleep(0.01)
    v.lu.create_session("a").close()  # the name is free again


def test_status_shows_the_sessions(live: Mount, vmms: list[Vmm]) -> None:
    v = vmm(vmms, live)
    v.preserve(v.build())
    status = (live.path / ".pkernfs" / "status").read_text()
    line = next(x for x in status.splitlines() if x.startswith("liveupdate:"))
    assert line.split(":", 1)[1].strip() == "boot 0, domains persistent, 1 sessions: vm0 outgoing"
    assert "  session vm0: outgoing, 1 files, 1 hwpts" in (live.path / ".pkernfs" / "iommu").read_text()


def test_the_liveupdate_example_runs_through_a_kexec(image: Path, tmp_path: Path) -> None:
    r = run_example("liveupdate.py", image, tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout.splitlines()
    reached = [line.split("reaches:")[1] for line in out if "reaches:" in line]
    assert len(reached) == 3 and "fault" not in "".join(reached)
    assert len(set(reached)) == 1  # before, during and after the kexec: the same pages
    assert any("guest state written before the kexec" in line for line in out)
    assert "lu-state" in next(line for line in out if line.startswith("reboot() committed"))
    assert "lu-state" not in out[-1] and out[-1].startswith("finished")


def test_a_vmm_killed_with_a_preserved_session_leaks_nothing(live: Mount, image: Path) -> None:
    """Its session fd closes with it: the session is cancelled, then its context is released."""
    code = (
        "import os, signal\n"
        "from pkfuse.uapi import Iommufd, LiveUpdate\n"
        f"fd = os.open({str(live.path / 'guest_mem' / 'vm0')!r}, os.O_RDWR)\n"
        f"i, lu = Iommufd({str(live.path)!r}), LiveUpdate({str(live.path)!r})\n"
        f"a = i.ioas_alloc(); i.ioas_map_file(a, fd, 0, {SIZE}, {IOVA})\n"
        f"d = i.device_bind({RID!r}); h = i.hwpt_alloc(d, a); i.device_attach(d, h)\n"
        "s = lu.create_session('vm0'); s.preserve_fd(fd, 1); i.hwpt_lu_set_preserve(h, 2, s)\n"
        "print('ready', flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout == "ready\n", r.stderr
    deadline = time.monotonic() + 10
    while True:  # released once the daemon read the end of all three connections
        try:
            os.truncate(live.path / "guest_mem" / "vm0", 0)
            break
        except OSError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    assert set(hardware(image)[1]) != {0}  # the device is blocked
    assert live.unmount() == 0
    status, findings = fsck.check_image(str(image))
    assert status == 0, findings


def test_a_tampered_domain_mounts_refuses_its_session_with_the_finding_and_blocks_the_device(
        live: Mount, image: Path, vmms: list[Vmm]) -> None:
    v = vmm(vmms, live)
    v.preserve(v.build())
    v.lu.reboot()
    live.kill()
    with Store.open(image) as s, Iommu.open(s) as io:  # garbage between the kernels: a leaf into metadata
        [dom] = io.domains.values()
        where = entry_where(s, dom, IOVA, 2)  # 8 MiB at a 2 MiB-aligned IOVA: SL-PDE leaves
        s.image_u64[where] = np.uint64(vtd.leaf_entry(2, s.geometry.phys_addr(0), True))
    live.expected_errors = ("refused",)
    live.start()  # the mount goes on: only the garbage is refused
    iommu = (live.path / ".pkernfs" / "iommu").read_text()
    assert f"refused: iommu/{dom.name} SL-PDE @{where * 8:#x}: maps 512 pages at" in iommu
    assert "session vm0: refused: iommu/lu-state hwpts[0].domain_id @0x" in iommu
    status = (live.path / ".pkernfs" / "status").read_text()
    assert "2 refused at open or restore" in status, status  # the domain and the context entry pointing at it
    assert set(hardware(image)[1]) == {fmt.FR_CONTEXT_NOT_PRESENT}  # blocked, before any VMM came back
    v2 = vmm(vmms, live)
    assert errno_of(lambda: v2.lu.retrieve_session("vm0")) == errno.ENOENT  # never adopted
    for x in vmms:
        x.close()
    vmms.clear()
    assert live.unmount() == 0
    assert fsck.check_image(image) == (0, [])
