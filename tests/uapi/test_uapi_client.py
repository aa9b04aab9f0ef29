"""The client library against a fake server: its encoding, its errno raising, its EMSGSIZE retry, its fds."""

from __future__ import annotations

import ctypes
import errno
import os
import queue
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pkfuse.uapi import ConnectionClosed, Iommufd, LiveUpdate, Session
from pkfuse.uapi import transport as t
from pkfuse.uapi import wire as w

Reply = tuple[int, bytes, list[int]]


@dataclass
class Call:
    """One request as the fake server received it; ``files`` are (st_dev, st_ino) of its descriptors."""

    cmd: int
    payload: bytes
    files: list[tuple[int, int]]

    def struct(self, struct_type: type[ctypes.Structure]) -> ctypes.Structure:
        return w.decode(struct_type, self.payload)


Handler = Callable[["FakeServer", Call, list[int]], Reply | None]


@dataclass
class FakeServer:
    """A test double of the daemon's control server, for testing the *client's* behaviour only.

    It speaks the framing (``pkfuse.uapi.transport``) and answers each
    request with whatever ``handler`` returns, recording every request in
    ``calls``; it implements none of the kernel's semantics (the real
    server and its tests are the lead's, in ``pkfuse/daemon/control.py``).
    Descriptors it received or sent are closed after each reply.
    """

    path: str
    handler: Handler
    calls: list[Call] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.listener.bind(self.path)
        self.listener.listen()
        self.listener.settimeout(0.05)
        self.stopping = threading.Event()
        self.hangups: queue.Queue[int] = queue.Queue()  # one entry per connection the client closed
        self._spawn(self._accept)

    def _spawn(self, target: Callable[..., None], *args: object) -> None:
        th = threading.Thread(target=target, args=args, daemon=True)
        th.start()
        self.threads.append(th)

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.serve(conn)

    def serve(self, conn: socket.socket) -> None:
        """Answer requests on ``conn`` (a new connection or a session end) in a thread of its own."""
        conn.settimeout(None)
        self._spawn(self._loop, conn)

    def _loop(self, conn: socket.socket) -> None:
        with conn:
            while True:
                try:
                    cmd, payload, fds = t.recv_request(conn)
                except ConnectionClosed:
                    self.hangups.put(conn.fileno())
                    return
                except OSError:
                    return
                files = [(os.fstat(fd).st_dev, os.fstat(fd).st_ino) for fd in fds]
                call = Call(cmd, payload, files)
                self.calls.append(call)
                answer = self.handler(self, call, fds)
                if answer is None:  # hang up, as a daemon that died would
                    t.close_fds(fds)
                    return
                err, out, out_fds = answer
                try:
                    t.send_reply(conn, err, out, out_fds)
                except ConnectionClosed:
                    return
                finally:
                    t.close_fds(fds + out_fds)

    def stop(self) -> None:
        self.stopping.set()
        self.listener.close()
        for th in self.threads:
            th.join(timeout=5)

    def requests(self, cmd: int) -> list[Call]:
        return [c for c in self.calls if c.cmd == cmd]


def echo(call: Call) -> Reply:
    """Success, the request's own bytes as the out struct."""
    return 0, call.payload, []


def reply_with(struct_type: type[ctypes.Structure], **out: int) -> Callable[[Call], Reply]:
    """A reply of the request's struct with the ``out`` fields filled in."""

    def make(call: Call) -> Reply:
        inst = call.struct(struct_type)
        for k, v in out.items():
            setattr(inst, k, v)
        return 0, w.encode(inst), []

    return make


def table(answers: dict[int, Callable[[Call], Reply]]) -> Handler:
    """A handler answering by command; PKFUSE_OPEN echoes, anything else unlisted is ENOTTY."""

    def handle(server: FakeServer, call: Call, fds: list[int]) -> Reply:
        if call.cmd in answers:
            return answers[call.cmd](call)
        if call.cmd == w.PKFUSE_OPEN:
            return echo(call)
        return errno.ENOTTY, b"", []

    return handle


Serve = Callable[[Handler], FakeServer]


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Serve]:
    """Start fake servers on sockets in tmp_path; all are stopped at teardown."""
    servers: list[FakeServer] = []

    def start(handler: Handler) -> FakeServer:
        server = FakeServer(str(tmp_path / f"control{len(servers)}.sock"), handler)
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def open_sockets() -> int:
    """This process's socket descriptors (a file another thread opens meanwhile is not counted)."""
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            n += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
        except OSError:
            pass
    return n


def identity(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


# --------------------------------------------------------------------------
# Opening
# --------------------------------------------------------------------------


def test_iommufd_first_sends_pkfuse_open_of_dev_iommu(serve: Serve) -> None:
    server = serve(table({}))
    with Iommufd(server.path):
        pass
    first = server.calls[0]
    assert first.cmd == w.PKFUSE_OPEN
    op = first.struct(w.pkfuse_open)
    assert (op.size, op.flags, w.cstring(op.path)) == (72, 0, b"/dev/iommu")


def test_liveupdate_first_sends_pkfuse_open_of_dev_liveupdate(serve: Serve) -> None:
    server = serve(table({}))
    with LiveUpdate(server.path):
        pass
    assert w.cstring(server.calls[0].struct(w.pkfuse_open).path) == b"/dev/liveupdate"


def test_mountpoint_is_resolved_through_the_status_file(serve: Serve, tmp_path: Path) -> None:
    server = serve(table({}))
    (tmp_path / "mnt" / ".pkernfs").mkdir(parents=True)
    (tmp_path / "mnt" / ".pkernfs" / "status").write_text(
        f"image:          /x.img\ncontrol_socket: {server.path}\niommu:          not loaded\n")
    with Iommufd(tmp_path / "mnt"):
        pass
    assert server.calls[0].cmd == w.PKFUSE_OPEN


def test_status_file_without_control_socket_is_enoent(tmp_path: Path) -> None:
    (tmp_path / ".pkernfs").mkdir()
    (tmp_path / ".pkernfs" / "status").write_text("image: /x.img\n")
    with pytest.raises(FileNotFoundError) as e:
        Iommufd(tmp_path)
    assert e.value.errno == errno.ENOENT


def test_refused_open_raises_its_errno_and_closes_the_connection(serve: Serve) -> None:
    server = serve(table({w.PKFUSE_OPEN: lambda call: (errno.EBUSY, b"", [])}))
    before = open_sockets()
    with pytest.raises(OSError) as e:
        LiveUpdate(server.path)
    assert e.value.errno == errno.EBUSY
    server.hangups.get(timeout=5)  # the client closed its connection: the server saw end of file
    for th in server.threads[1:]:  # and the server's end of it is closed too: count only the client's
        th.join(timeout=5)
    assert open_sockets() == before


# --------------------------------------------------------------------------
# iommufd calls
# --------------------------------------------------------------------------


def test_ioas_alloc_returns_out_ioas_id(serve: Serve) -> None:
    server = serve(table({w.IOMMU_IOAS_ALLOC: reply_with(w.iommu_ioas_alloc, out_ioas_id=7)}))
    with Iommufd(server.path) as fd:
        assert fd.ioas_alloc() == 7
    req = server.requests(w.IOMMU_IOAS_ALLOC)[0]
    assert len(req.payload) == 12 and req.struct(w.iommu_ioas_alloc).flags == 0


def test_ioas_map_file_sends_the_file_and_fixed_iova_flags(serve: Serve, tmp_path: Path) -> None:
    server = serve(table({w.IOMMU_IOAS_MAP_FILE: echo}))
    guest = tmp_path / "guest"
    guest.write_bytes(bytes(8192))
    with Iommufd(server.path) as fd, open(guest, "rb") as f:
        assert fd.ioas_map_file(3, f, 4096, 4096, iova=1 << 32) == 1 << 32
        req = server.requests(w.IOMMU_IOAS_MAP_FILE)[0]
        m = req.struct(w.iommu_ioas_map_file)
        f_ = w.iommufd_ioas_map_flags
        assert m.flags == f_.IOMMU_IOAS_MAP_FIXED_IOVA | f_.IOMMU_IOAS_MAP_READABLE | f_.IOMMU_IOAS_MAP_WRITEABLE
        assert (m.ioas_id, m.fd, m.start, m.length, m.iova) == (3, f.fileno(), 4096, 4096, 1 << 32)
        assert req.files == [identity(f.fileno())]


def test_ioas_map_file_without_iova_lets_the_daemon_pick(serve: Serve) -> None:
    server = serve(table({w.IOMMU_IOAS_MAP_FILE: reply_with(w.iommu_ioas_map_file, iova=0x20_0000)}))
    r, wr = os.pipe()
    try:
        with Iommufd(server.path) as fd:
            assert fd.ioas_map_file(1, r, 0, 4096, writeable=False) == 0x20_0000
        m = server.requests(w.IOMMU_IOAS_MAP_FILE)[0].struct(w.iommu_ioas_map_file)
        assert m.flags == w.iommufd_ioas_map_flags.IOMMU_IOAS_MAP_READABLE and m.iova == 0
    finally:
        os.close(r)
        os.close(wr)


def test_error_reply_raises_oserror_with_the_kernels_errno(serve: Serve) -> None:
    server = serve(table({w.IOMMU_IOAS_UNMAP: lambda call: (errno.ENOENT, b"", [])}))
    with Iommufd(server.path) as fd, pytest.raises(OSError) as e:
        fd.ioas_unmap(1, 0, 4096)
    assert e.value.errno == errno.ENOENT and e.value.strerror == os.strerror(errno.ENOENT)


def test_ioas_unmap_returns_the_bytes_unmapped(serve: Serve) -> None:
    server = serve(table({w.IOMMU_IOAS_UNMAP: reply_with(w.iommu_ioas_unmap, length=3 << 21)}))
    with Iommufd(server.path) as fd:
        assert fd.ioas_unmap(2, 0, (1 << 64) - 1) == 3 << 21
    u = server.requests(w.IOMMU_IOAS_UNMAP)[0].struct(w.iommu_ioas_unmap)
    assert (u.ioas_id, u.iova, u.length) == (2, 0, (1 << 64) - 1)


SIX_RANGES = [(i << 32, (i << 32) + 0xFFFF_FFFF) for i in range(6)]


def iova_ranges_answer(ranges: list[tuple[int, int]]) -> Callable[[Call], Reply]:
    """As the kernel: num_iovas set to the total, the ranges that fit sent, EMSGSIZE if not all fit."""

    def make(call: Call) -> Reply:
        req = call.struct(w.iommu_ioas_iova_ranges)
        capacity = req.num_iovas
        req.num_iovas = len(ranges)
        req.out_iova_alignment = 4096
        err = errno.EMSGSIZE if capacity < len(ranges) else 0
        return err, w.encode(req) + w.encode_iova_ranges(ranges[:capacity]), []

    return make


def test_ioas_iova_ranges_retries_once_with_the_count_needed(serve: Serve) -> None:
    server = serve(table({w.IOMMU_IOAS_IOVA_RANGES: iova_ranges_answer(SIX_RANGES)}))
    with Iommufd(server.path) as fd:
        assert fd.ioas_iova_ranges(5) == (SIX_RANGES, 4096)
    asked = [c.struct(w.iommu_ioas_iova_ranges) for c in server.requests(w.IOMMU_IOAS_IOVA_RANGES)]
    assert len(asked) == 2
    assert asked[0].num_iovas < 6 and asked[1].num_iovas == 6
    assert all(a.ioas_id == 5 and a.allowed_iovas == 0 for a in asked)


def test_ioas_iova_ranges_that_fit_take_one_call(serve: Serve) -> None:
    server = serve(table({w.IOMMU_IOAS_IOVA_RANGES: iova_ranges_answer(SIX_RANGES[:1])}))
    with Iommufd(server.path) as fd:
        assert fd.ioas_iova_ranges(5) == (SIX_RANGES[:1], 4096)
    assert len(server.requests(w.IOMMU_IOAS_IOVA_RANGES)) == 1


def test_ioas_iova_ranges_second_emsgsize_is_raised(serve: Serve) -> None:
    grown: list[int] = [6]

    def growing(call: Call) -> Reply:  # the ranges change between the two calls
        grown[0] += 1
        return iova_ranges_answer([(i, i) for i in range(grown[0])])(call)

    server = serve(table({w.IOMMU_IOAS_IOVA_RANGES: growing}))
    with Iommufd(server.path) as fd, pytest.raises(OSError) as e:
        fd.ioas_iova_ranges(5)
    assert e.value.errno == errno.EMSGSIZE
    assert len(server.requests(w.IOMMU_IOAS_IOVA_RANGES)) == 2


def test_hwpt_alloc_names_device_and_ioas_and_returns_the_hwpt(serve: Serve) -> None:
    server = serve(table({w.IOMMU_HWPT_ALLOC: reply_with(w.iommu_hwpt_alloc, out_hwpt_id=11)}))
    with Iommufd(server.path) as fd:
        assert fd.hwpt_alloc(4, 2) == 11
    h = server.requests(w.IOMMU_HWPT_ALLOC)[0].struct(w.iommu_hwpt_alloc)
    assert (h.size, h.flags, h.dev_id, h.pt_id, h.data_type, h.data_uptr) == (48, 0, 4, 2, 0, 0)


def test_destroy_sends_the_id(serve: Serve) -> None:
    server = serve(table({w.IOMMU_DESTROY: echo}))
    with Iommufd(server.path) as fd:
        fd.destroy(9)
    assert server.requests(w.IOMMU_DESTROY)[0].struct(w.iommu_destroy).id == 9


def test_device_bind_packs_the_requester_id_from_bdf(serve: Serve) -> None:
    server = serve(table({w.VFIO_DEVICE_BIND_IOMMUFD: reply_with(w.pkfuse_device_bind_iommufd, out_devid=1)}))
    with Iommufd(server.path) as fd:
        assert fd.device_bind("3a:1f.7") == 1
        assert fd.device_bind(0x0008) == 1
    rids = [c.struct(w.pkfuse_device_bind_iommufd).rid for c in server.requests(w.VFIO_DEVICE_BIND_IOMMUFD)]
    assert rids == [0x3A << 8 | 0x1F << 3 | 7, 0x0008]


def test_device_bind_refuses_a_malformed_bdf_before_sending(serve: Serve) -> None:
    server = serve(table({}))
    with Iommufd(server.path) as fd, pytest.raises(ValueError):
        fd.device_bind("3a:20.0")  # device 0x20 > 31
    assert not server.requests(w.VFIO_DEVICE_BIND_IOMMUFD)


def test_device_attach_names_the_device_and_returns_the_hwpt(serve: Serve) -> None:
    server = serve(table({w.VFIO_DEVICE_ATTACH_IOMMUFD_PT: reply_with(w.pkfuse_device_attach_iommufd_pt, pt_id=12)}))
    with Iommufd(server.path) as fd:
        assert fd.device_attach(1, 2) == 12
    a = server.requests(w.VFIO_DEVICE_ATTACH_IOMMUFD_PT)[0].struct(w.pkfuse_device_attach_iommufd_pt)
    assert (a.argsz, a.flags, a.pt_id, a.pasid, a.dev_id) == (24, 0, 2, 0, 1)


def test_device_detach_names_the_device(serve: Serve) -> None:
    server = serve(table({w.VFIO_DEVICE_DETACH_IOMMUFD_PT: echo}))
    with Iommufd(server.path) as fd:
        fd.device_detach(3)
    d = server.requests(w.VFIO_DEVICE_DETACH_IOMMUFD_PT)[0].struct(w.pkfuse_device_detach_iommufd_pt)
    assert (d.argsz, d.flags, d.dev_id) == (16, 0, 3)


def test_value_too_wide_for_its_field_is_refused_before_sending(serve: Serve) -> None:
    server = serve(table({}))
    with Iommufd(server.path) as fd, pytest.raises(OverflowError):
        fd.destroy(1 << 32)
    assert [c.cmd for c in server.calls] == [w.PKFUSE_OPEN]


# --------------------------------------------------------------------------
# Live update
# --------------------------------------------------------------------------


def session_answers(extra: dict[int, Callable[[Call], Reply]] | None = None) -> Handler:
    """CREATE/RETRIEVE_SESSION answered with a socketpair end served by the same fake server."""

    def handle(server: FakeServer, call: Call, fds: list[int]) -> Reply:
        if call.cmd in (w.LIVEUPDATE_IOCTL_CREATE_SESSION, w.LIVEUPDATE_IOCTL_RETRIEVE_SESSION):
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            server.serve(ours)
            out = call.struct(w.liveupdate_ioctl_create_session)
            out.fd = theirs.fileno()
            return 0, w.encode(out), [theirs.detach()]
        return table(extra or {})(server, call, fds)

    return handle


def test_create_session_returns_a_session_connected_to_the_daemon(serve: Serve) -> None:
    server = serve(session_answers({w.LIVEUPDATE_SESSION_FINISH: echo}))
    with LiveUpdate(server.path) as lu, lu.create_session("vm0") as session:
        assert isinstance(session, Session)
        session.finish()
    c = server.requests(w.LIVEUPDATE_IOCTL_CREATE_SESSION)[0].struct(w.liveupdate_ioctl_create_session)
    assert (c.size, w.cstring(c.name)) == (72, b"vm0")
    f = server.requests(w.LIVEUPDATE_SESSION_FINISH)[0].struct(w.liveupdate_session_finish)
    assert (f.size, f.reserved) == (8, 0)


def test_retrieve_session_sends_its_name(serve: Serve) -> None:
    server = serve(session_answers())
    with LiveUpdate(server.path) as lu, lu.retrieve_session(b"vm1"):
        pass
    r = server.requests(w.LIVEUPDATE_IOCTL_RETRIEVE_SESSION)[0].struct(w.liveupdate_ioctl_retrieve_session)
    assert w.cstring(r.name) == b"vm1"


def test_session_name_too_long_is_refused_before_sending(serve: Serve) -> None:
    server = serve(session_answers())
    with LiveUpdate(server.path) as lu, pytest.raises(ValueError):
        lu.create_session("n" * 64)
    assert not server.requests(w.LIVEUPDATE_IOCTL_CREATE_SESSION)


def test_preserve_fd_sends_the_file_and_the_token(serve: Serve) -> None:
    server = serve(session_answers({w.LIVEUPDATE_SESSION_PRESERVE_FD: echo}))
    memfd = os.memfd_create("guest")
    try:
        with LiveUpdate(server.path) as lu, lu.create_session("vm0") as session:
            session.preserve_fd(memfd, 1 << 40)
        req = server.requests(w.LIVEUPDATE_SESSION_PRESERVE_FD)[0]
        p = req.struct(w.liveupdate_session_preserve_fd)
        assert (p.fd, p.token) == (memfd, 1 << 40)
        assert req.files == [identity(memfd)]
    finally:
        os.close(memfd)


def test_retrieve_fd_returns_the_received_descriptor(serve: Serve, tmp_path: Path) -> None:
    kept = tmp_path / "kept"
    kept.write_bytes(b"guest ram")

    def give(call: Call) -> Reply:
        fd = os.open(kept, os.O_RDONLY)
        out = call.struct(w.liveupdate_session_retrieve_fd)
        out.fd = fd
        return 0, w.encode(out), [fd]

    server = serve(session_answers({w.LIVEUPDATE_SESSION_RETRIEVE_FD: give}))
    with LiveUpdate(server.path) as lu, lu.retrieve_session("vm0") as session:
        fd = session.retrieve_fd(5)
    try:
        assert os.pread(fd, 9, 0) == b"guest ram"
    finally:
        os.close(fd)
    assert server.requests(w.LIVEUPDATE_SESSION_RETRIEVE_FD)[0].struct(w.liveupdate_session_retrieve_fd).token == 5


def test_reply_missing_its_descriptor_is_eproto(serve: Serve) -> None:
    server = serve(session_answers({w.LIVEUPDATE_SESSION_RETRIEVE_FD: echo}))
    with LiveUpdate(server.path) as lu, lu.retrieve_session("vm0") as session, pytest.raises(OSError) as e:
        session.retrieve_fd(5)
    assert e.value.errno == errno.EPROTO


def test_descriptors_of_an_error_reply_are_closed(serve: Serve) -> None:
    def fail_with_fd(call: Call) -> Reply:
        return errno.EIO, b"", [os.open("/dev/null", os.O_RDONLY)]

    server = serve(session_answers({w.LIVEUPDATE_SESSION_RETRIEVE_FD: fail_with_fd, w.LIVEUPDATE_SESSION_FINISH: echo,
                                    w.PKFUSE_REBOOT: echo}))
    with LiveUpdate(server.path) as lu, lu.retrieve_session("vm0") as session:
        # One more round trip on each connection: the server closes what a reply
        # carried after sending it, so only then is its count settled.
        lu.reboot()
        session.finish()
        before = open_fds()
        with pytest.raises(OSError):
            session.retrieve_fd(5)
        session.finish()  # the server has closed its copy of the failed reply's fd
        assert open_fds() == before


def test_hwpt_lu_set_preserve_sends_the_session_fd(serve: Serve) -> None:
    server = serve(session_answers({w.IOMMU_HWPT_LU_SET_PRESERVE: echo}))
    with LiveUpdate(server.path) as lu, lu.create_session("vm0") as session, Iommufd(server.path) as fd:
        fd.hwpt_lu_set_preserve(11, 0xABCD, session)
        req = server.requests(w.IOMMU_HWPT_LU_SET_PRESERVE)[0]
        p = req.struct(w.iommu_hwpt_lu_set_preserve)
        assert (p.size, p.hwpt_id, p.hwpt_token) == (12, 11, 0xABCD)
        assert req.files == [identity(session.fileno())]


def test_reboot_sends_pkfuse_reboot(serve: Serve) -> None:
    server = serve(table({w.PKFUSE_REBOOT: echo}))
    with LiveUpdate(server.path) as lu:
        lu.reboot()
    r = server.requests(w.PKFUSE_REBOOT)[0].struct(w.pkfuse_reboot)
    assert (r.size, r.flags) == (8, 0)


def test_reboot_failure_raises_eagain(serve: Serve) -> None:
    server = serve(table({w.PKFUSE_REBOOT: lambda call: (errno.EAGAIN, b"", [])}))
    with LiveUpdate(server.path) as lu, pytest.raises(OSError) as e:
        lu.reboot()
    assert e.value.errno == errno.EAGAIN


# --------------------------------------------------------------------------
# The daemon gone, or speaking out of turn
# --------------------------------------------------------------------------


def test_daemon_closing_the_connection_is_connection_closed(serve: Serve) -> None:
    def hang_up(server: FakeServer, call: Call, fds: list[int]) -> Reply | None:
        return echo(call) if call.cmd == w.PKFUSE_OPEN else None

    server = serve(hang_up)
    with Iommufd(server.path) as fd, pytest.raises(ConnectionClosed):
        fd.ioas_alloc()


def test_reply_struct_of_the_wrong_length_is_eproto(serve: Serve) -> None:
    server = serve(table({w.IOMMU_IOAS_ALLOC: lambda call: (0, b"\x0c\x00\x00\x00", [])}))
    with Iommufd(server.path) as fd, pytest.raises(OSError) as e:
        fd.ioas_alloc()
    assert e.value.errno == errno.EPROTO
