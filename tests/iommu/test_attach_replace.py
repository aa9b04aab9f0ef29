"""Re-attaching a requester to another domain never unmaps it, not between any two stores.

The hardware reads a context entry as two 64-bit words and may do so at any
moment: after every single store that a replacing attach makes, the walker
(over the image's bytes, as the device reads them) must still translate
every mapped IOVA, to the old domain's pages or the new one's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from backing import format as fmt
from backing import fsck, vtd, walker
from backing.iommu import Iommu
from backing.store import Store

MiB = 1 << 20
PS = fmt.PAGE_SIZE


@pytest.fixture
def image(make_image: Callable[..., Path]) -> Path:
    return make_image("64M")


class RecordingStores:
    """Stands in for ``store.image_u64``: forwards everything, and after each store calls ``after``."""

    def __init__(self, real: np.ndarray, after: Callable[[], None]) -> None:
        self.real = real
        self.after = after
        self.stores = 0

    def __getitem__(self, key: object) -> object:
        return self.real[key]

    def __setitem__(self, key: object, value: object) -> None:
        self.real[key] = value
        self.stores += 1
        self.after()

    def __getattr__(self, name: str) -> object:
        return getattr(self.real, name)


@pytest.fixture
def two_domains(store: Store, io: Iommu) -> Iterator[tuple[int, object, object]]:
    """vm0 (4 MiB) mapped at IOVA 0 by dom-1 (attached to 00:03.0) and, identically, by dom-2."""
    ino = store.create(store.lookup(fmt.ROOT_INO, fmt.GUEST_DIR_NAME), b"vm0", 0o644, 0, 0)
    store.truncate(ino, 4 * MiB)
    d1, d2 = io.create_domain(), io.create_domain()
    for d in (d1, d2):
        d.map_file(ino, 0, 4 * MiB, 0)
    d1.attach(0, 3, 0)
    io.enable()
    yield ino, d1, d2


def test_every_store_of_a_replacing_attach_leaves_the_device_translating(
    store: Store, io: Iommu, two_domains: tuple[int, object, object]
) -> None:
    _ino, d1, d2 = two_domains
    iovas = np.arange(0, 4 * MiB, 64 * 1024, dtype=np.uint64)
    want, faults = io.translate(0, 3, 0, iovas)
    assert not faults.any()
    seen: list[int] = []

    def check() -> None:
        g = store.geometry
        assert io.regs is not None
        phys, fault = walker.translate(real, g.base_phys, g.npages, io.regs, fmt.requester_id(0, 3, 0), iovas)
        seen.append(int(fault.any()))
        assert not fault.any(), f"a store left the device faulting: reasons {sorted(set(fault.tolist()))}"
        assert (phys == want).all()

    real = store.image_u64
    rec = RecordingStores(real, check)
    store.image_u64 = rec  # type: ignore[assignment]
    try:
        d2.attach(0, 3, 0, replace=True)  # type: ignore[attr-defined]
    finally:
        store.image_u64 = real
    assert rec.stores >= 2 and seen == [0] * rec.stores
    assert io.attached[fmt.requester_id(0, 3, 0)] == d2.domain_id  # type: ignore[attr-defined]


def test_a_kill_between_the_switch_and_the_did_is_finished_at_open(
    store: Store, io: Iommu, two_domains: tuple[int, object, object], image: Path
) -> None:
    _ino, d1, d2 = two_domains
    sid = fmt.requester_id(0, 3, 0)
    real = store.image_u64

    class Killed(Exception):
        pass

    def kill_after_first() -> None:
        raise Killed

    store.image_u64 = RecordingStores(real, kill_after_first)  # type: ignore[assignment]
    try:
        with pytest.raises(Killed):
            d2.attach(0, 3, 0, replace=True)  # type: ignore[attr-defined]
    finally:
        store.image_u64 = real
    status, findings = fsck.check_image(str(image))
    assert status == 0, findings  # a crash state, not corruption
    reopened = Iommu.open(store)
    try:
        assert reopened.attached[sid] == d2.domain_id  # type: ignore[attr-defined]
        _ct, _page, where = reopened._context_where(0, 3, 0)
        assert vtd.context_entry_fields(int(real[where]), int(real[where + 1]))["DID"] == d2.domain_id  # type: ignore[attr-defined]
    finally:
        reopened.close()
