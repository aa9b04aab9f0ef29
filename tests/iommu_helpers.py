"""Fixtures and helpers shared by the IOMMU test modules.

A module that imports the ``store`` and ``io`` fixtures defines its own
``image`` fixture (a path to a fresh image of the size it needs); ``io``
opens the IOMMU with the register block beside the image.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from backing import format as fmt
from backing import vtd
from backing.iommu import Domain, Iommu
from backing.regs import default_path
from backing.store import Store


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


def entry_where(store: Store, dom: Domain, iova: int, level: int) -> int:
    """u64 index in the image of the entry of ``dom`` that translates ``iova`` at ``level``."""
    table = dom.pml4_page
    for lvl in range(level):
        where = table * 512 + (iova >> fmt.VTD_LEVEL_SHIFT[lvl]) % 512
        table = int(vtd.entry_pages(store.image_u64[where], store.geometry.base_pfn))
    return table * 512 + (iova >> fmt.VTD_LEVEL_SHIFT[level]) % 512
