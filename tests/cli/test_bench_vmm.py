"""The layouts ``pkfuse bench --only vmm`` measures: as many extents as it says, none merging.

The bench's worst case relies on what the allocator does (``scattered_layout``); a change there
would silently make it measure fewer extents. Small sizes: these take well under a second.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from backing import format as fmt
from backing.guestmmap import GuestMaps
from backing.mkfs import mkfs
from backing.store import Store
from pkfuse.bench.vmm import fill_params, permuted_extents, scattered_layout
from pkfuse.vmm import abi

PS = fmt.PAGE_SIZE


def test_scattered_layout_has_every_extent_apart(tmp_path: Path) -> None:
    n = 1024
    image = tmp_path / "s.img"
    mkfs(image, n * PS + 8 * (1 << 20), extent_count=4 * n)
    with Store.open(image) as store:
        ino = scattered_layout(store, b"g", n, PS)
        maps = GuestMaps(store)
        e = maps.mmap("t", ino, os.O_RDWR).extents  # merged: contiguous neighbours would be one
        maps.close()
        assert e.size == n and (e["length"] == PS).all()
        assert (e["file_offset"] == np.arange(n) * PS).all()
        io = e["image_offset"].astype(np.int64)
        assert np.unique(io).size == n and not (io[1:] == io[:-1] + PS).any()
        names = {name for name, _ in store.children(store.lookup(fmt.ROOT_INO, fmt.GUEST_DIR_NAME))}
        assert names == {b"g", b"g.filler"}  # the spacers are gone: their holes are the file's
        assert store.statfs().free_pages == 0


def test_permuted_extents_tile_and_never_merge() -> None:
    rows = permuted_extents(4096, 2 << 20)
    assert (rows[:, 0] == np.arange(4096) * (2 << 20)).all() and (rows[:, 2] == 2 << 20).all()
    assert sorted(rows[:, 1] // (2 << 20)) == list(range(4096))
    assert not (rows[1:, 1] == rows[:-1, 1] + (2 << 20)).any()


def test_fill_params_make_the_area_the_dirty_area() -> None:
    for area in (16 << 20, 64 << 20, 512 << 20):
        params, ram = fill_params(area)
        assert ram == abi.DIRTY_GPA + area
        assert abi.dirty_area(params.config(), 0) == (abi.DIRTY_GPA, area)
