"""Fixtures and helpers shared by the IOMMU test modules.

A module that imports the ``store`` and ``io`` fixtures defines its own
``image`` fixture (a path to a fresh image of the size it needs); ``io``
opens the IOMMU with the register block beside the image; ``eio`` opens it
with the ephemeral memory beside the image too (``IMAGE.ephemeral``, the
default size), so it can make ephemeral domains.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from backing import ephemeral, vtd
from backing import format as fmt
from backing.iommu import Domain, Iommu
from backing.iommufd import Iommufd
from backing.liveupdate import LiveUpdate
from backing.regs import default_path
from backing.store import Store
from pkfuse.harness import tables


@pytest.fixture
def store(image: Path) -> Iterator[Store]:
    s = Store.open(image)
    yield s
    s.close()


@pytest.fixture
def io(store: Store, image: Path) -> Iterator[Iommu]:
    i = Iommu.open(store, default_path(image))
    yield i
    i.close()


@pytest.fixture
def eio(store: Store, image: Path) -> Iterator[Iommu]:
    i = Iommu.open(store, default_path(image), ephemeral=ephemeral.default_path(image))
    yield i
    i.close()


def entry_where(store: Store, dom: Domain, iova: int, level: int) -> int:
    """u64 index, in the domain's memory (``dom.memory.u64``: the image's ``image_u64`` for a
    domain file), of the entry of ``dom`` that translates ``iova`` at ``level``."""
    u64, base_pfn = dom.memory.u64, dom.memory.base_pfn
    table = dom.pml4_page
    for lvl in range(level):
        where = table * 512 + (iova >> fmt.VTD_LEVEL_SHIFT[lvl]) % 512
        table = int(vtd.entry_pages(u64[where], base_pfn))
    return table * 512 + (iova >> fmt.VTD_LEVEL_SHIFT[level]) % 512


def device_view(image: Path, sid: int, iovas: np.ndarray) -> tuple[list[int], list[int]]:
    """What requester ``sid`` reaches at each IOVA, as the hardware walks it: (phys, fault reason).

    Reads the image, the ephemeral memory beside it (the ephemeral design's
    domains are there) and the register block, asking no daemon
    (``pkfuse.harness.tables.device_view``, which the restart harness uses too).
    """
    phys, faults = tables.device_view(image, sid, iovas)
    return phys.tolist(), faults.tolist()


class Boot:
    """One daemon's kernel state on ``image``."""

    def __init__(self, image: Path, mode: str = "persistent") -> None:
        self.store = Store.open(image)
        self.io = Iommu.open(self.store, default_path(image))
        self.fd = Iommufd(self.store, self.io)
        self.lu = LiveUpdate(self.store, self.fd, mode=mode)
        self.findings = self.lu.restore()
        self.closed = False

    def close(self) -> None:
        """A clean stop (after reboot(): the halted kernel releases nothing)."""
        self.closed = True
        self.fd.close()
        self.io.close()
        self.store.close()

    def kill(self) -> None:
        """A SIGKILL: the image as it is, nothing torn down."""
        self.closed = True
        self.io.close()
        self.store.close()

    def guest(self, name: bytes, size: int) -> int:
        ino = self.store.create(self.store.lookup(fmt.ROOT_INO, fmt.GUEST_DIR_NAME), name, 0o644, 0, 0)
        self.store.truncate(ino, size)
        return ino

    def ino(self, name: bytes) -> int:
        return self.store.lookup(self.store.lookup(fmt.ROOT_INO, fmt.GUEST_DIR_NAME), name)

    def translations(self, rid: int) -> list[tuple[int, int, int, bool]]:
        did = self.io.attached[rid]
        return [(m.iova, m.phys_addr, m.length, m.write) for m in self.io.domains[did].mappings()]
