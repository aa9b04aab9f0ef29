"""A forgotten IOTLB invalidation, end to end: a real ``pkfuse device`` keeps reaching the old page.

The kernel is this process: an unmounted image opened read-write (``Store``) and its IOMMU driver
(``backing.iommu.Iommu``, the register block beside the image), with a domain mapping guest file
``vm0`` at IOVA = file offset in 2 MiB leaves, attached for 00:03.0, translation enabled. The
hardware is a ``pkfuse device --records --rings 0`` process: it stamps records into the records
region (``abi.RECORDS_GPA``), each ending with a store of the header's count into the region's
first page, translating every DMA through its own context cache and IOTLB (``backing.iotlb``,
polled for invalidations before each request; the 2 MiB leaf is cached at its first DMA).

While it runs, the test changes the translation of that first page -- unmaps it, or remaps it to
a page of another file -- through ``Domain.unmap`` / ``Domain.map``, and:

- with the driver's IOTLB invalidation suppressed (``Iommu._flush_iotlb_psi``, the one method
  that posts it, replaced in this process only: the driver bug under test; the device, its cache
  and the register block are the real ones), the tables say the new page (or nothing), and yet
  the device's log shows DMAs after the change reaching the old page, served by the IOTLB:
  ``checks.stale_after`` flags them and ``check_no_stale_dma`` fails; posting the invalidation
  late ends them;
- with the invalidation posted, no DMA after the change reaches the old page: the remapped page
  gets the stores, or the unmapped one faults.

"After the change" starts ``INVALIDATION_WAIT`` after the driver's last store: the device polls
before each request, so a DMA translated just before the post may be logged just after it (the
window a real driver closes with its wait descriptor).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import reap

from backing import format as fmt
from backing.iommu import Domain, Iommu
from backing.store import Store
from pkfuse.harness import checks
from pkfuse.harness import device as dv
from pkfuse.vmm import abi

MiB = 1 << 20
PS = fmt.PAGE_SIZE
SID = fmt.requester_id(0, 3, 0)
GUEST = 8 * MiB  #: the smallest guest (abi.MIN_RAM): IOVA 0..8 MiB, the records region at 4 MiB
PAGE = abi.RECORDS_GPA  #: the IOVA whose translation changes: the records header, its count stored every record
COUNT = PAGE + abi.RECORDS_HEADER.fields["count"][1]
INVALIDATION_WAIT = 0.02  #: seconds after the change before a DMA counts as "after" it
STALE_FOR = 0.6  #: seconds the device runs after the change


@pytest.fixture
def image(make_image: Callable[..., Path]) -> Path:
    return make_image("64M")


class Kernel:
    """The in-process kernel: ``vm0`` mapped and attached, a ``spare`` file's page to remap to."""

    def __init__(self, store: Store, io: Iommu) -> None:
        self.store, self.io = store, io
        guest_dir = store.lookup(fmt.ROOT_INO, fmt.GUEST_DIR_NAME)
        self.vm0 = store.create(guest_dir, b"vm0", 0o600, 0, 0)
        store.truncate(self.vm0, GUEST)
        spare = store.create(guest_dir, b"spare", 0o600, 0, 0)
        store.truncate(spare, 2 * MiB)
        self.spare_phys = store.extents(spare)[0].phys_addr
        self.extents = [(e.file_offset, e.phys_addr, e.length) for e in store.extents(self.vm0)]
        self.pages = checks.guest_pages(self.extents, GUEST)  #: IOVA page -> phys, as mapped now
        self.dom: Domain = io.create_domain()
        self.dom.map_file(self.vm0, 0, GUEST, 0)
        self.dom.attach(0, 3, 0)
        io.enable()

    def count(self) -> int:
        """The records header's count, read from the image where vm0 holds it."""
        at = (int(self.pages[COUNT // PS]) + COUNT % PS - self.store.geometry.base_phys) // 8
        return int(self.store.image_u64[at])

    def tables_give(self, iova: int) -> tuple[int, int]:
        """(phys, fault) of a write at ``iova`` for 00:03.0, walked from the tables as hardware walks them."""
        phys, fault = self.io.translate(0, 3, 0, [iova], write=True)
        return int(phys[0]), int(fault[0])


@pytest.fixture
def kernel(store: Store, io: Iommu) -> Kernel:
    return Kernel(store, io)


@pytest.fixture
def device(image: Path, tmp_path: Path) -> Iterator[Callable[[], tuple[subprocess.Popen[bytes], Path, Path]]]:
    """Starts the device (records only, 3,000 DMA/s); stopped at teardown by its pid, also on failure."""
    started: list[subprocess.Popen[bytes]] = []

    def start() -> tuple[subprocess.Popen[bytes], Path, Path]:
        logf, js = tmp_path / "dev.dmalog", tmp_path / "dev.json"
        p = subprocess.Popen([sys.executable, "-m", "pkfuse", "device", str(image), "--rid", "00:03.0", "--rings",
                              "0", "--records", "--rate", "3000", "--log", str(logf), "--json", str(js)],
                             stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
        started.append(p)
        return p, logf, js

    yield start
    for p in started:
        if p.poll() is None:
            p.terminate()
    for p in started:
        reap(p, 5)


def wait_for(what: Callable[[], object], timeout: float = 10.0, why: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, f"timed out: {why}"
        time.sleep(0.01)


def stop(p: subprocess.Popen[bytes], js: Path) -> dict:
    p.send_signal(signal.SIGTERM)
    assert p.wait(10) == 0, p.stderr.read().decode()  # type: ignore[union-attr]
    return json.loads(js.read_text())


def change(kernel: Kernel, how: str) -> np.ndarray:
    """Unmap PAGE, or remap it to the spare file's first page; the page map the tables give after."""
    kernel.dom.unmap(PAGE, PS)
    after = kernel.pages.copy()
    after[PAGE // PS] = 0
    if how == "remap":
        kernel.dom.map(PAGE, kernel.spare_phys, PS)
        after[PAGE // PS] = kernel.spare_phys
    return after


def at_page(e: np.ndarray) -> np.ndarray:
    return (e["iova"] >= PAGE) & (e["iova"] < PAGE + PS)


@pytest.mark.parametrize("how", ["unmap", "remap"])
def test_a_forgotten_invalidation_leaves_the_device_reaching_the_old_page(
        kernel: Kernel, device: Callable, monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    p, logf, js = device()
    wait_for(lambda: kernel.count() >= 30, why="the device stamped no records")
    assert kernel.io.regs is not None
    post = kernel.io._flush_iotlb_psi
    forgotten: list[tuple[int, int, int]] = []
    monkeypatch.setattr(kernel.io, "_flush_iotlb_psi", lambda did, first, end: forgotten.append((did, first, end)))
    tail = kernel.io.regs.iq_tail
    t_change = time.monotonic_ns()
    after = change(kernel, how)
    since = time.monotonic_ns() + int(INVALIDATION_WAIT * 1e9)
    assert forgotten == [(kernel.dom.domain_id, PAGE // PS, PAGE // PS + 1)] and kernel.io.regs.iq_tail == tail
    # the tables are right: the spare page, or nothing
    phys, fault = kernel.tables_give(COUNT)
    assert (phys, fault == 0) == ((kernel.spare_phys + COUNT % PS, True) if how == "remap" else (0, False))
    c0 = kernel.count()
    time.sleep(STALE_FOR)
    c1 = kernel.count()
    post(*forgotten[0])  # the invalidation, late: the device's next poll drops the stale leaf
    fixed = time.monotonic_ns() + int(INVALIDATION_WAIT * 1e9)
    time.sleep(0.3)
    out = stop(p, js)
    e = dv.read_log(logf)

    before = e["time_ns"] < np.uint64(t_change)
    assert before.sum() > 30 and not checks.astray(e[before], kernel.pages).any()  # all well before the change
    stale = checks.stale_after(e, since, after)
    old = kernel.pages[PAGE // PS]
    s = e[stale]
    assert s.size > 100, f"{s.size} stale DMAs"  # ~1,000 count stores a second
    assert at_page(s).all() and (s["phys"] - (s["iova"] - np.uint64(PAGE)) == old).all()  # the old page, each
    assert (s["iotlb"] == dv.IOTLB_HIT).all() and (s["kind"] == dv.KIND_RECORDS_COUNT).all()
    assert (e["time_ns"][stale] < np.uint64(fixed)).all()  # none once the invalidation was posted
    ch = checks.check_no_stale_dma(e, since, after, f"after the {how}")
    assert not ch.ok and ch.detail.startswith(f"{s.size} of ") and f"({s.size} served by the IOTLB)" in ch.detail
    assert f"first IOVA {COUNT:#x} -> {int(old) + COUNT % PS:#x}" in ch.detail, ch.detail
    # after the late invalidation: the count store walks the tables again and goes where they say
    late = e[(e["time_ns"] >= np.uint64(fixed)) & at_page(e)]
    assert late.size and checks.check_no_stale_dma(e, fixed, after, "after the late invalidation").ok
    if how == "remap":
        assert late["done"].all() and (late["phys"] - (late["iova"] - np.uint64(PAGE)) == kernel.spare_phys).all()
    else:
        assert not late["done"].any() and late["fault"].all() and out["faults"] > 0
    assert c1 > c0 + 100  # the stale stores landed in vm0's page, which the tables no longer give for the IOVA
    if how == "remap":  # and, once invalidated, in the spare page: the count the device ended at
        at = (kernel.spare_phys + COUNT % PS - kernel.store.geometry.base_phys) // 8
        assert int(kernel.store.image_u64[at]) == out["next_record_seq"] > c1


@pytest.mark.parametrize("how", ["unmap", "remap"])
def test_with_the_invalidation_posted_no_dma_reaches_the_old_page(kernel: Kernel, device: Callable, how: str) -> None:
    p, logf, js = device()
    wait_for(lambda: kernel.count() >= 30, why="the device stamped no records")
    assert kernel.io.regs is not None
    tail = kernel.io.regs.iq_tail
    after = change(kernel, how)
    since = time.monotonic_ns() + int(INVALIDATION_WAIT * 1e9)
    descs, _, overrun = kernel.io.regs.invalidations_since(tail)
    assert not overrun and [(int(d["type"]), int(d["granularity"]), int(d["did"]), int(d["addr"])) for d in descs] \
        == [(fmt.INV_TYPE_IOTLB, fmt.INV_G_PAGE, kernel.dom.domain_id, PAGE)]
    time.sleep(STALE_FOR)
    out = stop(p, js)
    e = dv.read_log(logf)
    ch = checks.check_no_stale_dma(e, since, after, f"after the {how}")
    assert ch.ok, ch.detail
    assert not checks.stale_after(e, since, after).any()
    there = e[(e["time_ns"] >= np.uint64(since)) & at_page(e)]
    assert there.size > 10  # the device went on using the page's IOVA
    if how == "remap":  # the new page gets the stores: the header again (no magic there), then every count
        assert there["done"].all() and (there["phys"] - (there["iova"] - np.uint64(PAGE)) == kernel.spare_phys).all()
        assert (there["kind"] == dv.KIND_RECORDS_COUNT).any()
    else:  # nothing there any more: every DMA at that page faults, none is made
        assert not there["done"].any() and there["fault"].all() and out["faults"] > 0
    assert os.path.getsize(logf) > dv.LOG_HEADER.itemsize
