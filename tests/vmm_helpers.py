"""Fixtures shared by the VMM's and the harness's test modules: guest RAM over a plain file (``mem``),
and the restart harness's ``workdir`` (after the test nothing of it may be running or mounted).

Not a conftest.py: a second module named ``conftest`` would shadow tests/conftest.py for the
modules that import ``Mount`` from it. tests/conftest.py loads it as a plugin (``mem`` is
available everywhere, as ``iommu_helpers``' fixtures are).
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from pkfuse.daemon.mountinfo import mounted_paths
from pkfuse.vmm import abi
from pkfuse.vmm.memory import GuestMemory

RAM = 8 * abi.MiB  #: the guest RAM of the ``mem`` fixture


@pytest.fixture
def mem(tmp_path: Path) -> Iterator[GuestMemory]:
    """``RAM`` bytes of a temporary file as guest RAM (one extent), unmapped at teardown."""
    fd = os.open(tmp_path / "guest.ram", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, RAM)
        m = GuestMemory.of_file(fd, RAM)
    finally:
        os.close(fd)
    yield m
    m.close()


def _ours(tmp_path: Path) -> list[int]:
    """Pids whose command line names this test's directory (every process a harness here started)."""
    key = os.fsencode(tmp_path)
    found = []
    for d in os.listdir("/proc"):
        if d.isdigit() and int(d) != os.getpid():
            with contextlib.suppress(OSError):
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    if any(key in arg for arg in f.read().split(b"\0")):
                        found.append(int(d))
    return found


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    """The harness's workdir; afterwards nothing of it may be running or mounted (else: cleared, and fail)."""
    yield tmp_path / "rt"
    mounts = [m for m in mounted_paths() if m.startswith(str(tmp_path))]
    procs = _ours(tmp_path)
    for pid in procs:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    from conftest import force_unmount

    for m in mounts:
        force_unmount(Path(m))
    assert not mounts and not procs, f"left behind: mounts {mounts}, processes {procs}"
