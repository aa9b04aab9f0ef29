"""``pkfuse iommu`` on an image a daemon serves: the same commands go through the control socket to the
daemon, which does what the offline command does, on its live IOMMU.

Every check compares with the offline command on an identical image (made by the same steps, so the same
physical layout): the same exit status, output and one-line errors, the same ``list`` (the domain part of
``.pkernfs/iommu``), the same translations by ``pkfuse iommu translate``.
"""

from __future__ import annotations

import errno
import os
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
from backing.iotlb import TranslationCache
from backing.regs import Regs, default_path
from backing.store import Store
from pkfuse.uapi import Iommufd

pytestmark = pytest.mark.mount

MiB = 1 << 20
STORE_WARNING = "image mapping still exported; it is released at exit\n"


def pk(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pkfuse", "iommu", *map(str, args)], capture_output=True,
                          text=True, timeout=60, check=False)


def with_guest(path: Path) -> int:
    """guest_mem/vm0 of 8 MiB; returns its first physical address."""
    with Store.open(path) as s:
        g = s.create(s.lookup(fmt.ROOT_INO, fmt.GUEST_DIR_NAME), b"vm0", 0o644, 0, 0)
        s.truncate(g, 8 * MiB)
        return s.extents(g)[0].phys_addr


@pytest.fixture
def pair(make_image: Callable[..., Path], mount_image: Callable[..., Mount]) -> tuple[Mount, Path, int]:
    """(a mount of live.img, offline.img, vm0's physical address): two images made by the same steps."""
    live, offline = make_image("64M", name="live.img"), make_image("64M", name="offline.img")
    base = with_guest(live)
    assert with_guest(offline) == base
    return mount_image(live), offline, base


def domain_part(text: str) -> str:
    """``.pkernfs/iommu`` up to its live sections (``iommufd:``, then whatever follows it)."""
    lines = text.splitlines(keepends=True)
    end = next((i for i, line in enumerate(lines) if line.startswith("iommufd:")), len(lines))
    return "".join(lines[:end])


def view(m: Mount) -> str:
    return (m.path / ".pkernfs" / "iommu").read_text()


def same(m: Mount, offline: Path, *args: object, mountpoint: bool = False) -> subprocess.CompletedProcess[str]:
    """Run ``pkfuse iommu ACTION TARGET ...`` on the live image (or its mountpoint) and offline; they must agree."""
    action, *rest = args
    live = pk(action, m.path if mountpoint else m.image, *rest)
    off = pk(action, offline, *rest)
    # The offline command's known extra line (before this work too): a refusal raised while the store's
    # numpy views are alive in the traceback makes Store.close warn. Not part of the one-line error.
    off_err = off.stderr.replace(STORE_WARNING, "")
    assert (live.returncode, live.stdout, live.stderr) == (off.returncode, off.stdout, off_err), args
    assert "Traceback" not in live.stderr
    return live


def test_every_command_does_on_a_served_image_what_it_does_offline(pair: tuple[Mount, Path, int]) -> None:
    m, offline, base = pair
    steps: list[tuple[object, ...]] = [
        ("create",), ("create", "--id", 7), ("create", "--id", 7), ("create", "--id", 0), ("create", "--id", -3),
        ("create", "--id", 70000),
        ("map", 1, "--iova", "0x200000", "--length", "4M", "--file", "guest_mem/vm0"),  # 2 MiB leaves
        ("map", 1, "--iova", "0x40000000", "--length", "8K", "--phys", hex(base + 4 * MiB), "--ro"),
        ("map", 1, "--iova", "0x200000", "--length", "4K", "--file", "guest_mem/vm0"),  # EEXIST
        ("map", 1, "--iova", "0", "--length", "4K", "--phys", hex(base - 4096)),  # EFAULT: not guest RAM
        ("map", 1, "--iova", "0x1000", "--length", "0", "--file", "/guest_mem/vm0"),  # EINVAL
        ("map", 1, "--iova", "0x800", "--length", "4K", "--file", "guest_mem/vm0", "--offset", "4K"),  # EINVAL
        ("map", 1, "--iova", "0", "--length", "4K", "--file", "guest_mem/nope"),  # ENOENT
        ("map", 1, "--iova", "0", "--length", "4K", "--file", "guest_mem"),  # not a guest file
        ("map", 9, "--iova", "0", "--length", "4K", "--file", "guest_mem/vm0"),  # no domain 9
        ("unmap", 1, "--iova", "0x201000", "--length", "4K"),  # splits a superpage
        ("unmap", 1, "--iova", "0x10000000", "--length", "4K"),  # nothing there
        ("copy", 1), ("copy", 1, "--id", 7), ("copy", 5), ("copy", -1),
        ("attach", 1, "00:03.0"), ("attach", 2, "00:03.0"), ("attach", 2, "00:03.0", "--replace"),
        ("attach", 7, "1:2:3"), ("attach", 7, "00:20.0"),  # usage errors
        ("detach", 1, "00:03.0"),  # not attached to dom-1 any more
        ("enable",),
        ("translate", "00:03.0", "0x200010", "0x201008", "0x40001000", "0x5000", "--write"),
        ("destroy", 2), ("destroy", 1), ("destroy", 1), ("destroy", -1),
        ("detach", 2, "00:03.0"), ("destroy", 2), ("attach", 7, "00:04.0"),
    ]
    outcomes = []
    for i, step in enumerate(steps):
        r = same(m, offline, *step, mountpoint=bool(i % 2))  # the image path and the mountpoint alike
        outcomes.append(r.returncode)
    assert outcomes.count(0) >= 12 and 1 in outcomes and 2 in outcomes and 3 in outcomes  # translate faulted
    # list: the daemon's view, whose domains are the offline list's; its live sections follow
    assert domain_part(view(m)) == pk("list", offline).stdout
    assert view(m)[len(domain_part(view(m))):].startswith("iommufd: 0 contexts, 0 ioas, 0 hwpts, 0 devices\n")
    assert pk("list", m.image).stdout == view(m) == pk("list", m.path).stdout


def test_errors_name_the_check_that_refused(pair: tuple[Mount, Path, int]) -> None:
    m, _offline, _base = pair
    assert pk("create", m.image).returncode == 0
    assert pk("attach", m.image, 1, "00:03.0").returncode == 0
    r = pk("destroy", m.image, 1)
    assert (r.returncode, r.stderr) == (1, "pkfuse iommu destroy: error: EBUSY: iommu/dom-1 is attached to 00:03.0\n")
    r = pk("map", m.path, 1, "--iova", "0", "--length", str(1 << 64), "--phys", "0")
    assert (r.returncode, r.stderr) == (2, "pkfuse iommu map: error: --length 0x10000000000000000 does not fit "
                                           "64 bits\n")  # the wire cannot carry it: refused before connecting
    log = m.log_text()
    assert "pkfuse iommu destroy refused: EBUSY: iommu/dom-1 is attached to 00:03.0" in log  # with the pid
    assert "pkfuse iommu attach: iommu/dom-1 00:03.0" in log


@pytest.fixture
def vmm(pair: tuple[Mount, Path, int]) -> Iterator[tuple[Iommufd, int, int, int]]:
    """A VMM's iommufd on the mount: vm0 mapped, 00:05.0 attached; yields (iommufd, hwpt id, its DID, dev)."""
    m = pair[0]
    fd = os.open(m.path / "guest_mem" / "vm0", os.O_RDWR)
    try:
        with Iommufd(str(m.path)) as iommufd:
            ioas = iommufd.ioas_alloc()
            iommufd.ioas_map_file(ioas, fd, 0, 4 * MiB, 0)
            dev = iommufd.device_bind("00:05.0")
            hwpt = iommufd.device_attach(dev, ioas)
            line = next(x for x in view(m).splitlines() if x.strip().startswith(f"hwpt {hwpt}:"))
            did = int(line.split("DID ")[1].split(",")[0])
            yield iommufd, hwpt, did, dev
    finally:
        os.close(fd)


def test_a_domain_iommufd_owns_is_busy_for_every_change(pair: tuple[Mount, Path, int],
                                                        vmm: tuple[Iommufd, int, int, int]) -> None:
    m = pair[0]
    _iommufd, hwpt, did, _dev = vmm
    before = view(m)
    owned = f"EBUSY: domain {did} is owned by iommufd HWPT {hwpt} of pid {os.getpid()}"
    for args in (("destroy", did), ("map", did, "--iova", "0x10000000", "--length", "4K", "--file", "guest_mem/vm0"),
                 ("unmap", did, "--iova", "0", "--length", "4K"), ("attach", did, "00:06.0"),
                 ("detach", did, "00:05.0")):
        r = pk(args[0], m.image, *args[1:])
        assert (r.returncode, r.stderr) == (1, f"pkfuse iommu {args[0]}: error: {owned}\n"), args
    assert view(m) == before  # nothing changed
    r = pk("copy", m.image, did)  # reading it is fine: a kernel-owned copy
    assert r.returncode == 0 and "a copy of" in r.stdout
    assert pk("create", m.image, "--id", 40).returncode == 0
    r = pk("attach", m.image, 40, "00:05.0", "--replace")  # the VMM's device: not the kernel's to move
    assert r.returncode == 1 and r.stderr == (f"pkfuse iommu attach: error: EBUSY: requester 00:05.0 is attached to "
                                              f"domain {did}, which is owned by iommufd HWPT {hwpt} of pid "
                                              f"{os.getpid()}\n")


def test_a_requester_iommufd_has_bound_is_busy_for_attach(pair: tuple[Mount, Path, int]) -> None:
    m = pair[0]
    assert pk("create", m.image).returncode == 0
    with Iommufd(str(m.path)) as iommufd:
        dev = iommufd.device_bind("00:07.0")
        r = pk("attach", m.path, 1, "00:07.0")
        assert r.stderr == (f"pkfuse iommu attach: error: EBUSY: requester 00:07.0 is bound to iommufd (device {dev} "
                            f"of pid {os.getpid()})\n")
    deadline = time.monotonic() + 10
    while pk("attach", m.path, 1, "00:07.0").returncode:  # free once the daemon released the context
        assert time.monotonic() < deadline


def test_the_admin_connection_leaves_no_context_behind(pair: tuple[Mount, Path, int]) -> None:
    m = pair[0]
    assert pk("create", m.image).returncode == 0
    status = (m.path / ".pkernfs" / "status").read_text()
    assert "iommufd:                  0 contexts, 0 ioas, 0 hwpts, 0 devices" in status


def test_a_read_only_mount_refuses_changes_and_lists_its_view(make_image: Callable[..., Path],
                                                               mount_image: Callable[..., Mount]) -> None:
    image = make_image("64M")
    assert pk("create", image).returncode == 0
    m = mount_image(image, "--read-only")
    r = pk("create", image)
    assert r.returncode == 1 and len(r.stderr.splitlines()) == 1
    assert r.stderr.startswith(f"pkfuse iommu create: error: EROFS: {image} is served read-only on {m.path}")
    assert pk("list", m.path).stdout == view(m) and "iommu/dom-1: DID 1" in view(m)


def test_after_the_unmount_the_commands_are_offline_again(pair: tuple[Mount, Path, int]) -> None:
    m, _offline, _base = pair
    assert pk("create", m.image).returncode == 0
    assert pk("map", m.image, 1, "--iova", "0", "--length", "2M", "--file", "guest_mem/vm0").returncode == 0
    shown = domain_part(view(m))
    assert m.unmount() == 0
    assert pk("list", m.image).stdout == shown  # what the daemon did is in the image
    assert pk("create", m.image).stdout == "iommu/dom-2: DID 2\n"  # and the image is the offline command's


def test_the_hardware_commands_take_the_mountpoint_for_its_image_and_registers(pair: tuple[Mount, Path, int]) -> None:
    m = pair[0]
    assert pk("create", m.path).returncode == 0 and pk("attach", m.path, 1, "00:03.0").returncode == 0
    assert pk("enable", m.path).returncode == 0
    assert pk("translate", m.path, "00:03.0", "0x1000").stdout == pk("translate", m.image, "00:03.0", "0x1000").stdout
    assert "00:03.0 read iova 0x1000" in pk("faults", m.path).stdout
    assert "translation enabled" in view(m)
    assert pk("disable", m.path).returncode == 0 and "translation disabled" in view(m)


def test_the_daemons_reason_reaches_the_user_for_each_errno_of_map(pair: tuple[Mount, Path, int]) -> None:
    """The daemon's reason, not only its errno, reaches the user: one refusal per errno map can give."""
    m, offline, base = pair
    for target in (m.image, offline):
        assert pk("create", target).returncode == 0
    seen = set()
    for args in (("--iova", "0", "--length", "4K", "--phys", hex(base - 4096)),
                 ("--iova", "0x3000", "--length", "4K", "--phys", hex(base + 1)),
                 ("--iova", hex(1 << 48), "--length", "4K", "--phys", hex(base))):
        r = same(m, offline, "map", 1, *args)
        seen.add(r.stderr.split(": ")[2])
    assert seen == {errno.errorcode[errno.EFAULT], errno.errorcode[errno.EINVAL]}


def test_a_devices_caches_see_no_stale_translation_after_the_live_admin_calls(pair: tuple[Mount, Path, int]) -> None:
    m, _offline, base = pair
    for args in (("create",), ("map", 1, "--iova", 0, "--length", "4M", "--file", "guest_mem/vm0"),
                 ("attach", 1, "00:03.0"), ("enable",)):
        assert pk(args[0], m.image, *args[1:]).returncode == 0, args
    u64, phys0, npages = walker.open_image(m.image)
    iovas = np.array([0, 5 * 4096, 2 * MiB + 7], np.uint64)
    sid = fmt.requester_id(0, 3, 0)
    with Regs.open(default_path(m.image), create=False) as regs:
        cache = TranslationCache(u64, phys0, npages, regs)  # the device: the image and the registers, no daemon

        def agrees() -> bool:
            cache.poll()
            phys, fault, _hit = cache.translate(sid, iovas, True)
            walked, wfault = walker.translate(u64, phys0, npages, regs, sid, iovas, True)
            return phys.tolist() == walked.tolist() and fault.tolist() == wfault.tolist()

        assert agrees() and cache.translate(sid, iovas, True)[0].tolist() == [base, base + 5 * 4096, base + 2 * MiB + 7]
        assert pk("unmap", m.image, 1, "--iova", 4096 * 5, "--length", 4096).returncode == 0  # the daemon's call
        assert agrees() and cache.translate(sid, iovas, True)[1].tolist() == [0, fmt.FR_WRITE, 0]
        assert pk("detach", m.image, 1, "00:03.0").returncode == 0
        assert agrees() and cache.translate(sid, iovas[:1], True)[1].tolist() == [fmt.FR_CONTEXT_NOT_PRESENT]
