"""The framing over a real AF_UNIX SOCK_SEQPACKET socketpair: round trips, malformed datagrams, no fd leaks, EOF."""

from __future__ import annotations

import array
import errno
import os
import socket
from collections.abc import Iterator

import pytest
import trio

from pkfuse.uapi import transport as t
from pkfuse.uapi import wire as w

Pair = tuple[socket.socket, socket.socket]


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        yield a, b


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def same_file(fd1: int, fd2: int) -> bool:
    s1, s2 = os.fstat(fd1), os.fstat(fd2)
    return (s1.st_dev, s1.st_ino) == (s2.st_dev, s2.st_ino)


def send_raw(sock: socket.socket, data: bytes, fds: list[int]) -> None:
    """Send a datagram past the sender-side checks, as a misbehaving peer would."""
    sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else [])


def test_request_round_trip_carries_cmd_payload_and_fds(pair: Pair) -> None:
    a, b = pair
    r, wr = os.pipe()
    try:
        payload = w.encode(w.new(w.iommu_ioas_map_file, fd=r, length=4096))
        t.send_request(a, w.IOMMU_IOAS_MAP_FILE, payload, [r, wr])
        cmd, got, fds = t.recv_request(b)
        assert (cmd, got) == (w.IOMMU_IOAS_MAP_FILE, payload)
        assert len(fds) == 2 and same_file(fds[0], r) and same_file(fds[1], wr)
        t.close_fds(fds)
    finally:
        os.close(r)
        os.close(wr)


def test_reply_round_trip_carries_errno_payload_and_fds(pair: Pair) -> None:
    a, b = pair
    r, wr = os.pipe()
    try:
        t.send_reply(b, 0, b"out-struct" + b"array", [r])
        err, payload, fds = t.recv_reply(a)
        assert (err, payload) == (0, b"out-structarray")
        assert len(fds) == 1 and same_file(fds[0], r)
        t.close_fds(fds)
    finally:
        os.close(r)
        os.close(wr)


def test_error_reply_carries_positive_errno_and_no_payload(pair: Pair) -> None:
    a, b = pair
    t.send_reply(b, errno.ENOENT)
    assert t.recv_reply(a) == (errno.ENOENT, b"", [])


def test_received_fds_are_close_on_exec(pair: Pair) -> None:
    a, b = pair
    r, wr = os.pipe()
    os.set_inheritable(r, True)
    try:
        t.send_request(a, 1, b"", [r])
        _, _, fds = t.recv_request(b)
        assert not os.get_inheritable(fds[0])
        t.close_fds(fds)
    finally:
        os.close(r)
        os.close(wr)


def test_oversized_datagram_is_emsgsize_and_the_connection_survives(pair: Pair) -> None:
    a, b = pair
    send_raw(a, bytes(t.MAX_MESSAGE + 1), [])
    with pytest.raises(t.WireError) as e:
        t.recv_request(b)
    assert e.value.errno == errno.EMSGSIZE
    t.send_request(a, w.IOMMU_DESTROY, b"next")
    assert t.recv_request(b) == (w.IOMMU_DESTROY, b"next", [])


def test_oversized_datagram_with_fds_closes_them(pair: Pair) -> None:
    a, b = pair
    r, wr = os.pipe()
    before = open_fds()
    send_raw(a, bytes(t.MAX_MESSAGE + 1), [r])
    with pytest.raises(t.WireError):
        t.recv_request(b)
    assert open_fds() == before
    os.close(r)
    os.close(wr)


def test_too_many_fds_is_ebadf_and_no_fd_leaks(pair: Pair) -> None:
    a, b = pair
    before = open_fds()
    mine = [os.open("/dev/null", os.O_RDONLY) for _ in range(t.MAX_FDS + 1)]
    send_raw(a, w.IOMMU_DESTROY.to_bytes(4, "little"), mine)
    with pytest.raises(t.WireError) as e:
        t.recv_request(b)
    assert e.value.errno == errno.EBADF
    t.close_fds(mine)
    assert open_fds() == before


def test_too_many_fds_leaves_the_connection_usable(pair: Pair) -> None:
    a, b = pair
    mine = [os.open("/dev/null", os.O_RDONLY) for _ in range(t.MAX_FDS + 3)]
    send_raw(a, b"\0\0\0\0", mine)
    t.close_fds(mine)
    with pytest.raises(t.WireError):
        t.recv_request(b)
    t.send_request(a, 7, b"")
    assert t.recv_request(b) == (7, b"", [])


def test_datagram_shorter_than_a_command_is_einval_and_its_fd_closed(pair: Pair) -> None:
    a, b = pair
    r, wr = os.pipe()
    before = open_fds()
    send_raw(a, b"\x01\x02", [r])
    with pytest.raises(t.WireError) as e:
        t.recv_request(b)
    assert e.value.errno == errno.EINVAL
    assert open_fds() == before
    os.close(r)
    os.close(wr)


def test_empty_datagram_is_einval_not_end_of_file(pair: Pair) -> None:
    a, b = pair
    a.send(b"")
    with pytest.raises(t.WireError) as e:
        t.recv_request(b)
    assert e.value.errno == errno.EINVAL


def test_peer_close_is_connection_closed(pair: Pair) -> None:
    a, b = pair
    a.close()
    with pytest.raises(t.ConnectionClosed):
        t.recv_request(b)


def test_peer_close_after_a_request_delivers_the_request_first(pair: Pair) -> None:
    a, b = pair
    t.send_request(a, 5, b"last")
    a.close()
    assert t.recv_request(b) == (5, b"last", [])
    with pytest.raises(t.ConnectionClosed):
        t.recv_request(b)


def test_reply_to_a_closed_peer_is_connection_closed(pair: Pair) -> None:
    a, b = pair
    a.close()
    with pytest.raises(t.ConnectionClosed):
        t.send_reply(b, 0, b"")


def test_send_refuses_a_datagram_over_max_message(pair: Pair) -> None:
    a, _ = pair
    with pytest.raises(t.WireError) as e:
        t.send_request(a, 1, bytes(t.MAX_MESSAGE - 3))
    assert e.value.errno == errno.EMSGSIZE


def test_send_refuses_more_than_max_fds(pair: Pair) -> None:
    a, _ = pair
    with pytest.raises(t.WireError) as e:
        t.send_request(a, 1, b"", [0] * (t.MAX_FDS + 1))
    assert e.value.errno == errno.EBADF


def test_exactly_max_fds_pass(pair: Pair) -> None:
    a, b = pair
    mine = [os.open("/dev/null", os.O_RDONLY) for _ in range(t.MAX_FDS)]
    t.send_request(a, 1, b"", mine)
    _, _, fds = t.recv_request(b)
    assert len(fds) == t.MAX_FDS
    t.close_fds(mine + fds)


async def test_parse_request_serves_trio_sockets(pair: Pair) -> None:
    """The server's path: trio.socket's recvmsg, then the same at_eof and parse_request."""
    a, b = pair
    r, wr = os.pipe()
    server = trio.socket.from_stdlib_socket(b.dup())
    with server:
        t.send_request(a, w.IOMMU_IOAS_ALLOC, b"abc", [r])
        data, ancdata, flags, _ = await server.recvmsg(t.RECV_BUFSIZE, t.RECV_ANCBUFSIZE, t.RECV_FLAGS)
        assert not t.at_eof(server, data, ancdata)
        cmd, payload, fds = t.parse_request(data, ancdata, flags)
        assert (cmd, payload, len(fds)) == (w.IOMMU_IOAS_ALLOC, b"abc", 1)
        t.close_fds(fds)
        await server.sendmsg([t.pack_reply(0, b"ok")], t.scm_rights([wr]), t.SEND_FLAGS)
        err, payload, fds = t.recv_reply(a)
        assert (err, payload) == (0, b"ok") and same_file(fds[0], wr)
        t.close_fds(fds)
        a.close()
        data, ancdata, flags, _ = await server.recvmsg(t.RECV_BUFSIZE, t.RECV_ANCBUFSIZE, t.RECV_FLAGS)
        assert t.at_eof(server, data, ancdata)
    os.close(r)
    os.close(wr)
