"""The client side of a VMM's monitor (``pkfuse vmm run --monitor PATH``; the server is ``pkfuse.cli.vmm``).

The protocol: a Unix stream socket, one command per line (``status``,
``prepare SESSION``, ``freeze``, ``cancel``, ``stop``), one reply line per
command, ``ok ...`` or ``error: ...``.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence


def call(path: str | os.PathLike[str], words: Sequence[str], timeout: float = 60.0) -> str:
    """Send one command; its reply line, stripped ('' when the VMM closed without replying)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as s:
        s.settimeout(timeout)
        s.connect(os.fspath(path))
        s.sendall(" ".join(words).encode() + b"\n")
        reply = b""
        while not reply.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            reply += chunk
    return reply.decode(errors="replace").strip()
