"""Fixtures shared by the VMM's test modules without a mount: guest RAM over a plain file.

Not a conftest.py: a second module named ``conftest`` would shadow tests/conftest.py for the
modules that import ``Mount`` from it. tests/conftest.py loads it as a plugin (``mem`` is
available everywhere, as ``iommu_helpers``' fixtures are).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

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
