"""The invalidation queue in the register block (backing.regs) and what the driver posts to it.

The queue: its layout beside the old registers, the order a post writes in,
the reader's overrun, a layout-1 block extended in place. The driver
(backing.iommu): every change of a table that hardware may cache is followed
by the descriptors that cover it, and a map that only fills not-present
entries posts none. Whether a cache that reads them stays correct is
tests/iommu/test_iotlb.py's question.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from backing import format as fmt
from backing import regs as regs_mod
from backing.errors import FormatError
from backing.iommu import Domain, Iommu
from backing.regs import Regs, default_path
from backing.store import Store
from pkfuse.cli.entry import main as pkfuse_main

MiB = 1 << 20
PS = fmt.PAGE_SIZE
SID = fmt.requester_id(0, 3, 0)
CC, IOTLB = fmt.INV_TYPE_CC, fmt.INV_TYPE_IOTLB
G, DOM, DEV, PAGE = fmt.INV_G_GLOBAL, fmt.INV_G_DOMAIN, fmt.INV_G_DEVICE, fmt.INV_G_PAGE


@pytest.fixture
def image(make_image: Callable[..., Path]) -> Path:
    return make_image("64M")


@pytest.fixture
def regs(tmp_path: Path) -> Iterator[Regs]:
    with Regs.open(tmp_path / "r.regs") as r:
        yield r


@pytest.fixture
def base(store: Store) -> int:
    """Physical address of a 16 MiB guest file (2 MiB aligned)."""
    ino = store.create(store.lookup(fmt.ROOT_INO, fmt.GUEST_DIR_NAME), b"vm0", 0o600, 0, 0)
    store.truncate(ino, 16 * MiB)
    (e,) = store.extents(ino)
    return e.phys_addr


def posted(r: Regs, since: int) -> list[tuple[int, ...]]:
    """(type, granularity, did, sid, am, addr) of each descriptor after ``since``."""
    descs, _seq, overrun = r.invalidations_since(since)
    assert not overrun
    return [tuple(int(d[f]) for f in ("type", "granularity", "did", "sid", "am", "addr")) for d in descs]


def after(io: Iommu, fn: Callable[[], object]) -> list[tuple[int, ...]]:
    assert io.regs is not None
    seq = io.regs.iq_tail
    fn()
    return posted(io.regs, seq)


# ------------------------------------------------------------------ the queue


def test_the_queue_is_appended_after_the_fault_ring_and_every_old_offset_stays() -> None:
    f = fmt.REGS_DTYPE.fields
    assert [f[n][1] for n in ("magic", "rtaddr", "gsts", "fault_seq", "faults")] == [0, 8, 16, 24, 32]
    assert f["layout"][1] == 32 + fmt.FAULT_LOG_ENTRIES * fmt.FAULT_RECORD_DTYPE.itemsize
    assert f["iq_tail"][1] == f["layout"][1] + 8 and f["iq_tail"][1] % 8 == 0
    assert f["inv_queue"][1] == 2 * PS  # page aligned, as IQA_REG
    assert fmt.INV_DESC_DTYPE.itemsize == 32
    assert regs_mod.REGS_SIZE == 4 * PS


def test_a_post_writes_the_descriptor_before_the_tail_that_publishes_it(regs: Regs) -> None:
    order: list[tuple[str, int, int]] = []

    class Recorder:
        def __init__(self, name: str, a: np.ndarray) -> None:
            self.name, self.a = name, a

        def __getitem__(self, i: int) -> object:
            return self.a[i]

        def __setitem__(self, i: int, v: int) -> None:
            order.append((self.name, i, int(v)))
            self.a[i] = v

    regs._queue64 = Recorder("queue", regs._queue64)  # type: ignore[assignment]
    regs._words = Recorder("words", regs._words)  # type: ignore[assignment]
    seq = regs.invalidate_iotlb(PAGE, did=7, addr=0x200000, am=9)
    tail_word = fmt.REGS_DTYPE.fields["iq_tail"][1] // 8
    assert seq == 1
    assert order == [("queue", 0, 0), ("queue", 1, IOTLB | PAGE << 32), ("queue", 2, 7 | 9 << 32),
                     ("queue", 3, 0x200000), ("queue", 0, 1), ("words", tail_word, 1)]


def test_descriptors_are_read_back_in_order_with_the_new_tail(regs: Regs) -> None:
    regs.invalidate_context(DEV, did=3, sid=SID)
    regs.invalidate_iotlb(DOM, did=3)
    regs.invalidate_iotlb(G)
    assert posted(regs, 0) == [(CC, DEV, 3, SID, 0, 0), (IOTLB, DOM, 3, 0, 0, 0), (IOTLB, G, 0, 0, 0, 0)]
    descs, seq, overrun = regs.invalidations_since(2)
    assert (descs["seq"].tolist(), seq, overrun) == ([3], 3, False)
    assert regs.invalidations_since(3)[1:] == (3, False) and regs.invalidations_since(3)[0].size == 0


def test_a_reader_a_whole_ring_behind_gets_everything(regs: Regs) -> None:
    n = fmt.INV_QUEUE_ENTRIES
    for i in range(n + 10):
        regs.invalidate_iotlb(DOM, did=i)
    descs, seq, overrun = regs.invalidations_since(10)
    assert not overrun and seq == n + 10 and descs["did"].tolist() == list(range(10, n + 10))


def test_a_reader_more_than_the_ring_behind_is_told_overrun(regs: Regs) -> None:
    for i in range(fmt.INV_QUEUE_ENTRIES + 10):
        regs.invalidate_iotlb(DOM, did=i)
    descs, seq, overrun = regs.invalidations_since(9)
    assert overrun and seq == fmt.INV_QUEUE_ENTRIES + 10 and descs.size == 0


def test_a_slot_rewritten_under_the_reader_is_an_overrun(regs: Regs) -> None:
    regs.invalidate_iotlb(DOM, did=1)
    regs.invalidate_iotlb(DOM, did=2)
    regs._queue64[4] = 0  # slot 1 as a post lapping the ring leaves it for an instant
    assert regs.invalidations_since(0)[2] is True


def test_a_tail_behind_the_reader_is_an_overrun(regs: Regs) -> None:
    regs.invalidate_iotlb(G)
    assert regs.invalidations_since(5) == (regs_mod.EMPTY_INVALIDATIONS, 1, True)


@pytest.mark.parametrize("call", [
    lambda r: r.invalidate_iotlb(PAGE, did=1, addr=0x1000, am=1),  # not aligned to 2 pages
    lambda r: r.invalidate_iotlb(PAGE, did=1, addr=0, am=fmt.INV_MAX_AM + 1),
    lambda r: r.invalidate_iotlb(7),
    lambda r: r.invalidate_context(0),
])
def test_a_malformed_descriptor_is_refused_and_posts_nothing(regs: Regs, call: Callable[[Regs], int]) -> None:
    with pytest.raises(ValueError):
        call(regs)
    assert regs.iq_tail == 0


def test_a_layout_1_block_is_extended_in_place_and_keeps_its_registers(tmp_path: Path) -> None:
    path = tmp_path / "old.regs"
    old = np.zeros(1, fmt.REGS_DTYPE)  # layout 1: the same fields up to the fault ring, zero after
    old["magic"], old["rtaddr"], old["gsts"], old["fault_seq"] = fmt.REGS_MAGIC, 0x1_0000_0000, fmt.GSTS_TES, 1
    old["faults"][0, 0] = (1, 0x5000, SID, fmt.FR_READ, 0, (0, 0, 0))
    path.write_bytes(old.tobytes()[: fmt.REGS_V1_BYTES])
    with Regs.open(path, create=False) as r:
        assert os.path.getsize(path) == regs_mod.REGS_SIZE
        assert (r.layout, r.iq_tail, r.rtaddr, r.enabled) == (fmt.REGS_LAYOUT, 0, 0x1_0000_0000, True)
        assert [(f.seq, f.iova, f.reason) for f in r.faults()] == [(1, 0x5000, fmt.FR_READ)]
        r.invalidate_iotlb(G)
    with Regs.open(path, create=False) as again:
        assert again.iq_tail == 1 and posted(again, 0) == [(IOTLB, G, 0, 0, 0, 0)]


def test_a_block_of_a_later_layout_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "new.regs"
    with Regs.open(path):
        pass
    raw = bytearray(path.read_bytes())
    off = fmt.REGS_DTYPE.fields["layout"][1]
    raw[off : off + 8] = (fmt.REGS_LAYOUT + 1).to_bytes(8, "little")
    path.write_bytes(bytes(raw))
    with pytest.raises(FormatError, match="layout 3"):
        Regs.open(path, create=False)


# ------------------------------------------------------------- what the driver posts


@pytest.fixture
def dom(io: Iommu, base: int) -> Domain:
    d = io.create_domain()
    d.map(0, base, 4 * MiB)  # 2 MiB leaves
    d.map(8 * MiB, base + 4 * MiB, 16 * PS)  # 4 KiB leaves
    return d


def test_a_read_write_open_is_the_driver_starting_and_flushes_globally(store: Store, image: Path) -> None:
    with Regs.open(default_path(image)) as r:
        seq = r.iq_tail
        Iommu.open(store, default_path(image)).close()
        assert posted(r, seq) == [(CC, G, 0, 0, 0, 0), (IOTLB, G, 0, 0, 0, 0)]


def test_a_read_only_open_posts_nothing(image: Path) -> None:
    with Regs.open(default_path(image)) as r:
        seq = r.iq_tail
        st = Store.open(image, read_only=True, lock=False)
        try:
            Iommu.open(st, default_path(image)).close()
        finally:
            st.close()
        assert r.iq_tail == seq


def test_enable_and_disable_flush_globally(io: Iommu) -> None:
    assert after(io, io.enable) == [(CC, G, 0, 0, 0, 0), (IOTLB, G, 0, 0, 0, 0)]
    assert after(io, io.disable) == [(CC, G, 0, 0, 0, 0), (IOTLB, G, 0, 0, 0, 0)]


def test_a_map_posts_nothing(io: Iommu, dom: Domain, base: int) -> None:
    dom.attach(0, 3, 0)
    assert after(io, lambda: dom.map(1 << 30, base + 8 * MiB, 2 * MiB)) == []


def test_unmap_of_an_attached_domain_posts_a_page_selective_iotlb_invalidation(io: Iommu, dom: Domain) -> None:
    dom.attach(0, 3, 0)
    did = dom.domain_id
    assert after(io, lambda: dom.unmap(8 * MiB + 5 * PS, PS)) == [(IOTLB, PAGE, did, 0, 0, 8 * MiB + 5 * PS)]
    # pages 6..8: the aligned 2**am pages covering them are 0..15 of the block (am 4)
    assert after(io, lambda: dom.unmap(8 * MiB + 6 * PS, 3 * PS)) == [(IOTLB, PAGE, did, 0, 4, 8 * MiB)]
    assert after(io, lambda: dom.unmap(2 * MiB, 2 * MiB)) == [(IOTLB, PAGE, did, 0, 9, 2 * MiB)]


def test_an_unmap_wider_than_the_largest_address_mask_is_domain_selective(io: Iommu, dom: Domain) -> None:
    dom.attach(0, 3, 0)
    span = PS << (fmt.INV_MAX_AM + 1)
    assert after(io, lambda: dom.unmap(0, span)) == [(IOTLB, DOM, dom.domain_id, 0, 0, 0)]


def test_unmap_of_a_domain_nobody_is_attached_to_posts_nothing(io: Iommu, dom: Domain) -> None:
    assert after(io, lambda: dom.unmap(0, 4 * MiB)) == []


def test_attach_posts_a_device_selective_context_invalidation(io: Iommu, dom: Domain) -> None:
    assert after(io, lambda: dom.attach(0, 3, 0)) == [(CC, DEV, dom.domain_id, SID, 0, 0)]


def test_a_replacing_attach_invalidates_the_context_then_the_old_domain(io: Iommu, dom: Domain) -> None:
    other = io.create_domain()
    dom.attach(0, 3, 0)
    old = dom.domain_id
    assert after(io, lambda: other.attach(0, 3, 0, replace=True)) == [(CC, DEV, old, SID, 0, 0),
                                                                      (IOTLB, DOM, old, 0, 0, 0)]


def test_detach_invalidates_the_context_then_the_domain(io: Iommu, dom: Domain) -> None:
    dom.attach(0, 3, 0)
    did = dom.domain_id
    assert after(io, lambda: dom.detach(0, 3, 0)) == [(CC, DEV, did, SID, 0, 0), (IOTLB, DOM, did, 0, 0, 0)]


def test_freeing_a_domain_invalidates_its_did(io: Iommu, dom: Domain) -> None:
    did = dom.domain_id
    assert after(io, lambda: io.destroy_domain(dom)) == [(IOTLB, DOM, did, 0, 0, 0)]


def test_the_offline_command_line_posts_to_the_register_block_beside_the_image(image: Path) -> None:
    st = Store.open(image)
    ino = st.create(st.lookup(fmt.ROOT_INO, fmt.GUEST_DIR_NAME), b"vm0", 0o600, 0, 0)
    st.truncate(ino, 4 * MiB)
    with Iommu.open(st, default_path(image)) as kernel:
        d = kernel.create_domain()
        d.map_file(ino, 0, 4 * MiB, 0)
        d.attach(0, 3, 0)
        did = d.domain_id
    st.close()
    with Regs.open(default_path(image), create=False) as r:
        seq = r.iq_tail
        assert pkfuse_main(["iommu", "unmap", str(image), str(did), "--iova", "0", "--length", "2M"]) == 0
        assert pkfuse_main(["iommu", "detach", str(image), str(did), "00:03.0"]) == 0
        assert posted(r, seq) == [(CC, G, 0, 0, 0, 0), (IOTLB, G, 0, 0, 0, 0),  # each open: the driver's start
                                  (IOTLB, PAGE, did, 0, 9, 0),
                                  (CC, G, 0, 0, 0, 0), (IOTLB, G, 0, 0, 0, 0),
                                  (CC, DEV, did, SID, 0, 0), (IOTLB, DOM, did, 0, 0, 0)]


def _post_many(path: str, n: int) -> None:
    with Regs.open(path, create=False) as r:
        for i in range(n):
            r.invalidate_iotlb(PAGE, did=i & 0xFFFF, addr=(i & 0xFFFF) << fmt.PAGE_SHIFT, am=0)


def test_a_reader_racing_a_writer_in_another_process_never_sees_a_torn_descriptor(tmp_path: Path) -> None:
    path = str(tmp_path / "race.regs")
    n = 20000
    with Regs.open(path) as r:
        writer = multiprocessing.get_context("fork").Process(target=_post_many, args=(path, n))
        writer.start()
        seq, seen, overruns = 0, 0, 0
        while seq < n:
            descs, seq, overrun = r.invalidations_since(seq)
            overruns += overrun
            seen += descs.size
            expect = (descs["seq"] - np.uint64(1)) & np.uint64(0xFFFF)
            assert (descs["did"] == expect).all() and (descs["addr"] >> np.uint64(12) == expect).all()
            assert (descs["type"] == IOTLB).all() and (descs["granularity"] == PAGE).all()
        writer.join(30)
        assert writer.exitcode == 0 and seen + overruns > 0
