"""pkfuse's own /dev/iommu calls on a live mount (``PKFUSE_DOMAIN_*``, ``PKFUSE_LAST_ERROR``), by raw datagrams and
through ``pkfuse.uapi.admin.IommuAdmin``; and the live iommufd objects in ``.pkernfs/iommu`` and the status.

The ``pkfuse iommu`` commands over these calls, compared with their offline runs: tests/cli/test_iommu_live.py.
"""

from __future__ import annotations

import errno
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import Mount

from backing import format as fmt
from pkfuse.uapi import Iommufd, LiveUpdate, transport, wire
from pkfuse.uapi.admin import IommuAdmin

pytestmark = pytest.mark.mount

MiB = 1 << 20


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
def admin(live: Mount) -> Iterator[IommuAdmin]:
    with IommuAdmin(str(live.path)) as a:
        yield a


def status_line(m: Mount, key: str) -> str:
    for line in (m.path / ".pkernfs" / "status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k.strip() == key:
            return v.strip()
    raise AssertionError(f"no {key} line")


def view(m: Mount) -> str:
    return (m.path / ".pkernfs" / "iommu").read_text()


def wait_contexts(m: Mount, n: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not status_line(m, "iommufd").startswith(f"{n} contexts"):
        assert time.monotonic() < deadline, status_line(m, "iommufd")
        time.sleep(0.01)


def errno_of(fn: Callable[[], object]) -> int:
    with pytest.raises(OSError) as exc:
        fn()
    return exc.value.errno


# ------------------------------------------------------------------ raw datagrams


def raw_iommu(ctl: Path, device: bytes = wire.DEV_IOMMU) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.connect(str(ctl))
    assert ask(s, wire.PKFUSE_OPEN, wire.encode(wire.new(wire.pkfuse_open, path=device)))[0] == 0
    return s


def ask(s: socket.socket, cmd: int, payload: bytes) -> tuple[int, bytes]:
    s.send(cmd.to_bytes(4, "little") + payload)
    reply = s.recv(transport.MAX_MESSAGE)
    return int.from_bytes(reply[:4], "little", signed=True), reply[4:]


def sized(payload: bytes | bytearray) -> bytes:
    """``payload`` with its size field saying its length."""
    out = bytearray(payload)
    out[:4] = len(out).to_bytes(4, "little")
    return bytes(out)


def last_error(s: socket.socket) -> tuple[int, tuple[int, int, str] | None]:
    code, out = ask(s, wire.PKFUSE_LAST_ERROR, wire.encode(wire.new(wire.pkfuse_last_error)))
    if code:
        return code, None
    st = wire.pkfuse_last_error.from_buffer_copy(out)
    return 0, (st.out_cmd, st.out_errno, wire.cstring(st.out_message).decode())


def test_malformed_structs_get_the_kernels_errnos_and_the_connection_lives_on(live: Mount, ctl: Path) -> None:
    create = wire.encode(wire.new(wire.pkfuse_domain_create))
    with raw_iommu(ctl) as s:
        assert ask(s, wire.PKFUSE_DOMAIN_CREATE, sized(create + b"\0\0\0\1"))[0] == errno.E2BIG
        assert ask(s, wire.PKFUSE_DOMAIN_CREATE, sized(create[:12]))[0] == errno.EINVAL  # no older version
        assert ask(s, wire.PKFUSE_DOMAIN_CREATE, create[:4] + bytes(8))[0] == errno.EINVAL  # size disagrees
        reserved = bytearray(create)
        reserved[12] = 1
        assert ask(s, wire.PKFUSE_DOMAIN_CREATE, bytes(reserved))[0] == errno.EOPNOTSUPP
        assert last_error(s) == (errno.ENODATA, None)  # refused by the struct rules: before the call, no reason
        flags = wire.encode(wire.new(wire.pkfuse_domain_unmap, flags=4, domain_id=1, iova=0, length=4096))
        assert ask(s, wire.PKFUSE_DOMAIN_UNMAP, flags)[0] == errno.EOPNOTSUPP
        assert last_error(s) == (0, (wire.PKFUSE_DOMAIN_UNMAP, errno.EOPNOTSUPP,
                                     "pkfuse_domain_unmap: unknown flags 0x4"))
        attach = wire.encode(wire.new(wire.pkfuse_domain_attach, flags=2, domain_id=1, rid=0x18))
        assert ask(s, wire.PKFUSE_DOMAIN_ATTACH, attach)[0] == errno.EOPNOTSUPP  # only REPLACE is known
        big_rid = wire.encode(wire.new(wire.pkfuse_domain_detach, domain_id=1, rid=0x10000))
        assert ask(s, wire.PKFUSE_DOMAIN_DETACH, big_rid)[0] == errno.EINVAL
        assert last_error(s)[1] == (wire.PKFUSE_DOMAIN_DETACH, errno.EINVAL, "requester id 0x10000 is not 16 bits")
        lerr = wire.encode(wire.new(wire.pkfuse_last_error, flags=1))
        assert ask(s, wire.PKFUSE_LAST_ERROR, lerr)[0] == errno.EOPNOTSUPP
        assert ask(s, wire._IO(wire.PKFUSE_TYPE, 0x19), bytes(8))[0] == errno.ENOTTY
        code, out = ask(s, wire.PKFUSE_DOMAIN_CREATE, create)  # still served
        assert code == 0 and wire.pkfuse_domain_create.from_buffer_copy(out).domain_id == 1
    with raw_iommu(ctl, wire.DEV_LIVEUPDATE) as s:  # /dev/iommu's calls only
        assert ask(s, wire.PKFUSE_DOMAIN_CREATE, create)[0] == errno.ENOTTY


# ------------------------------------------------------------------ the client


def test_the_calls_return_what_they_made_and_the_domains_outlive_the_connection(live: Mount,
                                                                                admin: IommuAdmin) -> None:
    assert admin.domain_create() == 1 and admin.domain_create(9) == 9
    admin.domain_map_file(1, "guest_mem/vm0", 0, 4 * MiB, 0x200000)
    base = int(os.getxattr(live.path / "guest_mem" / "vm0", "user.pkernfs.extents").split()[1], 16)
    admin.domain_map(1, 0x10000000, base + 4 * MiB, 8192, writeable=False)
    assert admin.domain_unmap(1, 0x200000, 4096) == 4096
    assert admin.domain_unmap(1, 0x30000000, 4096) == 0
    assert admin.domain_copy(1) == 2 and admin.domain_copy(1, 30) == 30
    admin.domain_attach(2, "00:03.0")
    admin.domain_attach(30, 0x18, replace=True)
    admin.domain_detach(30, "00:03.0")
    admin.domain_destroy(2)  # after the replace's grace period
    admin.release()
    assert status_line(live, "iommufd").startswith("0 contexts")  # released before release() returned
    text = view(live)
    assert [x.split(":")[0] for x in text.splitlines() if x.startswith("iommu/")] == [
        "iommu/dom-1", "iommu/dom-9", "iommu/dom-30"]
    assert "0x000010000000-0x000010001fff" in text and " r- guest_mem/vm0+0x400000" in text


def test_a_refusal_carries_the_daemons_reason_once(admin: IommuAdmin) -> None:
    admin.domain_create(3)
    with pytest.raises(FileExistsError) as exc:
        admin.domain_create(3)
    assert exc.value.strerror == "IOMMU domain 3 exists"
    assert admin.last_error() is None  # read already (by the call that was refused)
    assert errno_of(lambda: admin.domain_destroy(4)) == errno.ENOENT
    admin.domain_create()  # a success clears the reason of the refusal before it
    assert admin.last_error() is None


def test_a_domain_iommufd_holds_is_ebusy_while_it_lives_and_while_it_dies(live: Mount, admin: IommuAdmin) -> None:
    fd = os.open(live.path / "guest_mem" / "vm0", os.O_RDWR)
    try:
        client = Iommufd(str(live.path))
        ioas = client.ioas_alloc()
        client.ioas_map_file(ioas, fd, 0, 2 * MiB, 0)
        hwpt = client.device_attach(client.device_bind("00:05.0"), ioas)
    finally:
        os.close(fd)
    did = int(next(x for x in view(live).splitlines() if f"hwpt {hwpt}:" in x).split("DID ")[1].split(",")[0])
    with pytest.raises(OSError) as exc:
        admin.domain_unmap(did, 0, 4096)
    assert (exc.value.errno, exc.value.strerror) == (
        errno.EBUSY, f"domain {did} is owned by iommufd HWPT {hwpt} of pid {os.getpid()}")
    client.close()
    closed = time.monotonic()
    wait_contexts(live, 1)  # the admin connection's own, empty context is left
    try:
        admin.domain_destroy(did)
        pytest.fail("a dying domain was destroyed")
    except OSError as e:
        if time.monotonic() - closed < 0.8:  # inside its grace period (iommu.FREE_GRACE_S, 1 s)
            assert (e.errno, e.strerror) == (errno.EBUSY, f"domain {did} is a destroyed iommufd HWPT's, freed once "
                                                          "its grace period has passed")
        else:  # a slow machine: the reaper freed it first
            assert e.errno in (errno.EBUSY, errno.ENOENT)


# ------------------------------------------------------------------ the views


def test_iommu_view_and_status_show_the_live_objects_until_the_client_closes(live: Mount) -> None:
    fd = os.open(live.path / "guest_mem" / "vm0", os.O_RDWR)
    try:
        with Iommufd(str(live.path)) as client:
            ioas = client.ioas_alloc()
            client.ioas_map_file(ioas, fd, 2 * MiB, 2 * MiB, 0x40000000)
            client.ioas_map_file(ioas, fd, 0, 4096, 0x1000, writeable=False)
            dev = client.device_bind("00:04.0")
            auto = client.device_attach(dev, ioas)
            other = client.device_bind("02:00.1")
            hwpt = client.hwpt_alloc(other, ioas)
            text = view(live)
            assert status_line(live, "iommufd") == "1 contexts, 1 ioas, 2 hwpts, 2 devices"
            live_part = text[text.index("\niommufd:") + 1:].splitlines()
            dids = {int(x.split("DID ")[1].split(",")[0]) for x in live_part if "DID " in x}
            assert live_part[:9] == [
                "iommufd: 1 contexts, 1 ioas, 2 hwpts, 2 devices",
                f"context of pid {os.getpid()}: 5 objects",
                f"  ioas {ioas}: 2 areas, hwpts {auto}, {hwpt}",
                "    0x000000001000-0x000000001fff -> guest_mem/vm0+0x0 r-",
                "    0x000040000000-0x0000401fffff -> guest_mem/vm0+0x200000 rw",
                f"  hwpt {auto}: ioas {ioas}, DID {min(dids)}, auto, devices {dev}",
                f"  hwpt {hwpt}: ioas {ioas}, DID {max(dids)}, allocated, devices none",
                f"  device {dev}: rid 00:04.0, attached hwpt {auto}",
                f"  device {other}: rid 02:00.1, attached none",
            ]
            for did in dids:  # the HWPTs' domains are in the domain part too, with the requester
                assert f"iommu/dom-{did}: DID {did}," in text
            assert f"attached {fmt.requester_name(fmt.requester_id(0, 4, 0))}" in text
    finally:
        os.close(fd)
    wait_contexts(live, 0)
    text = view(live)
    assert "context of" not in text and "iommufd: 0 contexts, 0 ioas, 0 hwpts, 0 devices\n" in text
    assert status_line(live, "iommufd") == "0 contexts, 0 ioas, 0 hwpts, 0 devices"


def test_a_liveupdate_connection_is_no_iommufd_context(live: Mount) -> None:
    with LiveUpdate(str(live.path)):
        assert status_line(live, "iommufd").startswith("0 contexts")
