"""How the daemon recognises a session fd sent back to it (IOMMU_HWPT_LU_SET_PRESERVE), without a mount.

The session is found by the (device, inode) of the client's end and only a
socket qualifies; the ``fstat`` runs off the trio thread (a descriptor of a
file on the daemon's own mount would be a FUSE request to that very thread:
it hung the daemon, found by ``pkfuse fuzz --target requests``).
"""

from __future__ import annotations

import errno
import os
import socket
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from backing.errors import StoreError
from pkfuse.daemon import liveupdate as dlu


class _Server:
    def serve_connection(self, sock: socket.socket, device: bytes, **kw: object) -> None:
        self.kept = sock  # the daemon's end, served elsewhere


def _calls() -> dlu.LiveUpdateCalls:
    return dlu.LiveUpdateCalls(_Server(), SimpleNamespace())  # type: ignore[arg-type]


async def test_the_session_fd_itself_names_its_session() -> None:
    calls = _calls()
    session = object()
    fd = calls._session_fd(session)  # type: ignore[arg-type]
    try:
        assert await calls._session_of([fd]) is session
    finally:
        os.close(fd)


async def test_a_file_with_the_sockets_inode_number_names_no_session(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _calls()
    fd = calls._session_fd(object())  # type: ignore[arg-type]
    other = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        st = os.fstat(fd)
        real = os.fstat

        def fstat(n: int) -> os.stat_result:  # the file: a regular file, same inode number (and device)
            if n == other:
                f = list(real(n))
                f[1], f[2] = st.st_ino, st.st_dev
                return os.stat_result(f)
            return real(n)

        monkeypatch.setattr(dlu.os, "fstat", fstat)
        with pytest.raises(StoreError) as exc:
            await calls._session_of([other])
        assert exc.value.errno == errno.EBADF
    finally:
        os.close(fd)
        os.close(other)


async def test_the_descriptor_is_resolved_off_the_trio_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _calls()
    seen: list[threading.Thread] = []
    real = os.fstat

    def fstat(n: int) -> os.stat_result:
        seen.append(threading.current_thread())
        return real(n)

    r, w = os.pipe()
    try:
        monkeypatch.setattr(dlu.os, "fstat", fstat)
        with pytest.raises(StoreError):
            await calls._session_of([r])
        assert seen and threading.main_thread() not in seen
    finally:
        os.close(r)
        os.close(w)
