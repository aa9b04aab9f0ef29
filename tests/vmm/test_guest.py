"""The guest program's behaviour (guest/guest.c), run on the Unicorn engine over a plain file as guest RAM.

Each test boots the real binary and reads RAM from outside, as the VMM's
verifier does. The guest keeps abi.py's contract: the step's store order,
the cold-boot takeover of a torn state, the DMA ring, mode FILL.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
from vmm_helpers import RAM

from pkfuse.vmm import abi, boot, guest, verify
from pkfuse.vmm.emulator import Emulator
from pkfuse.vmm.memory import GuestMemory


class Ports:
    """The VMM's port handler: records every OUT; stops a vCPU at PORT_ERROR and PORT_DONE."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, int, int]] = []

    def __call__(self, vcpu: int, port: int, value: int) -> bool:
        self.seen.append((vcpu, port, value))
        return port not in (abi.PORT_ERROR, abi.PORT_DONE)

    def of(self, port: int) -> list[tuple[int, int]]:
        return [(v, x) for v, p, x in self.seen if p == port]


def setup(mem: GuestMemory, fresh: bool = True, **params: object) -> np.ndarray:
    p = boot.GuestParams(ram_size=RAM, **{"nr_vcpus": 1, "dirty_share": 0.05, **params})  # type: ignore[arg-type]
    return boot.write_boot(mem.array, p, guest.load(), fresh=fresh)


def state(mem: GuestMemory, i: int) -> np.void:
    g = abi.VCPU_STATE_GPA + i * abi.VCPU_STATE_STRIDE
    return np.frombuffer(mem.array[g:g + abi.VCPU_STATE.itemsize].tobytes(), abi.VCPU_STATE)[0]


def put_state(mem: GuestMemory, i: int, **fields: int) -> None:
    s = state(mem, i).copy()
    for k, v in fields.items():
        s[k] = v
    g = abi.VCPU_STATE_GPA + i * abi.VCPU_STATE_STRIDE
    mem.array[g:g + abi.VCPU_STATE.itemsize] = np.frombuffer(s.tobytes(), np.uint8)


@contextlib.contextmanager
def running(mem: GuestMemory, ports: Ports, nr_vcpus: int = 1, states: list[bytes] | None = None) -> Iterator[Emulator]:
    e = Emulator(mem, nr_vcpus, ports)
    try:
        if states is None:
            e.boot()
        else:
            e.restore(states)
        e.start()
        yield e
    finally:
        e.close()


def wait_for(what, timeout: float = 5.0) -> None:  # noqa: ANN001 -- a predicate
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.002)


def test_guest_boots_and_its_counters_advance_with_every_invariant_holding(mem: GuestMemory) -> None:
    setup(mem)
    ports = Ports()
    with running(mem, ports) as e:
        wait_for(lambda: state(mem, 0)["counter"] > 64 * (abi.RING_ENTRIES + 2))
        e.pause()
        v = verify.verify(mem.array)
        assert e.stopped() == {}
    assert v.ok, v.findings
    assert ports.of(abi.PORT_STARTED) == [(0, 0)]
    s = v.vcpus[0]
    assert s.counter > 64 * (abi.RING_ENTRIES + 2) and s.pages == s.counter and s.started == 1 and s.boots == 0
    assert s.pass_ >= 1  # the area was written more than once round
    assert s.dma_posted == s.produced == abi.RING_ENTRIES  # nobody serves the ring: full, and the loop goes on


def test_two_vcpus_each_dirty_their_own_area(mem: GuestMemory) -> None:
    config = setup(mem, nr_vcpus=2)
    with running(mem, Ports(), 2) as e:
        wait_for(lambda: min(state(mem, 0)["pages"], state(mem, 1)["pages"]) > int(config["dirty_pages"]))
        e.pause()
    v = verify.verify(mem.array)
    assert v.ok, v.findings
    for i in range(2):  # a page off the cursor holds its own vCPU's pattern of a complete pass
        s = v.vcpus[i]
        page, gen = (0, s.pass_) if s.cursor else (int(config["dirty_pages"]) - 1, s.pass_ - 1)  # page 0 may be torn
        base = abi.dirty_area(config, i)[0] + page * abi.PAGE_SIZE
        q = mem.array[base:base + abi.PAGE_SIZE].view("<u8")
        gpa = np.arange(base, base + abi.PAGE_SIZE, 8, dtype=np.uint64)
        assert np.array_equal(q, abi.pattern(gpa, gen))


def test_fill_mode_fills_the_area_and_says_done(mem: GuestMemory) -> None:
    config = setup(mem, nr_vcpus=2, mode=abi.MODE_FILL, fill_value=0x1122334455667788)
    ports = Ports()
    with running(mem, ports, 2) as e:
        wait_for(lambda: len(e.stopped()) == 2)
        assert all("0x511" in why for why in e.stopped().values())
    assert sorted(ports.of(abi.PORT_DONE)) == [(0, 0), (1, 1)]
    base, _ = abi.dirty_area(config, 0)
    _, size = abi.dirty_area(config, 1)
    assert np.all(mem.array[base:base + 2 * size].view("<u8") == 0x1122334455667788)


def test_cold_boot_over_a_torn_step_completes_it_and_counts_a_boot(mem: GuestMemory) -> None:
    setup(mem)
    with running(mem, Ports()) as e:
        wait_for(lambda: state(mem, 0)["counter"] > 50)
        e.pause()
    n = int(state(mem, 0)["counter"])
    put_state(mem, 0, counter=n - 1)  # checksum F(n) stored, counter not: a kill between step 4's stores
    assert verify.verify(mem.array).ok
    with running(mem, Ports()) as e:  # a cold boot: boot(), not restore()
        wait_for(lambda: state(mem, 0)["counter"] > n + 10)
        e.pause()
    s = state(mem, 0)
    assert s["boots"] == 1 and s["started"] == 2 and s["error"] == abi.ERROR_NONE
    assert verify.verify(mem.array).ok


def test_cold_boot_over_a_checksum_of_neither_step_stops_with_torn(mem: GuestMemory) -> None:
    setup(mem)
    put_state(mem, 0, counter=41, checksum=abi.checksum(43, 0), pages=41, started=1)
    ports = Ports()
    with running(mem, ports) as e:
        wait_for(lambda: e.stopped())
    assert ports.of(abi.PORT_ERROR) == [(0, abi.ERROR_TORN)]
    s = state(mem, 0)
    assert s["error"] == abi.ERROR_TORN and s["error_value"] == abi.VCPU_STATE.fields["checksum"][1]
    assert s["counter"] == 41  # nothing continued


def test_a_vcpu_restored_from_registers_older_than_ram_stops_with_rollback(mem: GuestMemory) -> None:
    setup(mem)
    with running(mem, Ports()) as e:
        wait_for(lambda: state(mem, 0)["counter"] > 100)
        e.pause()
        old = e.save()
        e.resume()
        counter = int(state(mem, 0)["counter"])
        wait_for(lambda: state(mem, 0)["counter"] > counter + 100)
        e.pause()
    ports = Ports()
    with running(mem, ports, states=old) as e:
        wait_for(lambda: e.stopped())
    assert ports.of(abi.PORT_ERROR) == [(0, abi.ERROR_ROLLBACK)]
    s = state(mem, 0)
    assert s["error"] == abi.ERROR_ROLLBACK
    assert s["error_value"] in (abi.VCPU_STATE.fields[f][1] for f in ("counter", "checksum", "pages"))


@pytest.mark.parametrize(("error", "value"), [(abi.ERROR_ROLLBACK, 0), (abi.ERROR_LOST, 0x600008)],
                         ids=["rollback", "lost page"])
def test_a_rollback_or_lost_page_error_is_sticky_across_a_cold_boot(mem: GuestMemory, error: int, value: int) -> None:
    setup(mem)
    put_state(mem, 0, counter=5, checksum=abi.checksum(5, 0), pages=5, started=1, error=error, error_value=value)
    ports = Ports()
    with running(mem, ports) as e:
        wait_for(lambda: e.stopped())
    assert ports.of(abi.PORT_ERROR) == [(0, error)] and not ports.of(abi.PORT_STARTED)
    assert state(mem, 0)["counter"] == 5


def _area(mem: GuestMemory) -> tuple[int, int]:
    """A guest set up in ``mem``; (its area's base, pages in the area)."""
    setup(mem)
    base, size = abi.dirty_area(boot_config(mem), 0)
    dp = size // abi.PAGE_SIZE
    return base, dp


def boot_config(mem: GuestMemory) -> np.void:
    return np.frombuffer(mem.array[abi.CONFIG_GPA:abi.CONFIG_GPA + abi.CONFIG.itemsize].tobytes(), abi.CONFIG)[0]


def test_a_page_that_lost_the_last_pass_stops_the_guest_with_lost_when_it_comes_back_to_it(mem: GuestMemory) -> None:
    base, dp = _area(mem)
    ports = Ports()
    with running(mem, ports) as e:
        wait_for(lambda: state(mem, 0)["pages"] > dp + 2)  # in the second pass
        e.pause()
        cursor = int(state(mem, 0)["pages"]) % dp
        victim = base + ((cursor + dp // 2) % dp) * abi.PAGE_SIZE + 8 * 7  # ahead of the cursor
        mem.array[victim:victim + 8] ^= np.uint8(0x5A)  # what a restart that lost the page would leave
        e.resume()
        wait_for(lambda: e.stopped())
    assert ports.of(abi.PORT_ERROR) == [(0, abi.ERROR_LOST)]
    s = state(mem, 0)
    assert s["error"] == abi.ERROR_LOST and s["error_value"] == victim
    # the verifier, reading from outside, names the same qword (the guest stopped before rewriting it)
    assert [f.gpa for f in verify.verify(mem.array).findings if f.structure == "dirty_area[0]"] == [victim]


def test_a_page_cut_in_the_middle_of_its_write_is_taken_over_by_a_cold_boot(mem: GuestMemory) -> None:
    base, dp = _area(mem)
    with running(mem, Ports()) as e:
        wait_for(lambda: state(mem, 0)["pages"] > dp + 2)
        e.pause()
    pages = int(state(mem, 0)["pages"])
    page = base + (pages % dp) * abi.PAGE_SIZE
    half = abi.PAGE_SIZE // 2  # the kill came half-way through the page's write of this pass
    q = mem.array[page:page + half].view("<u8")
    q[:] = abi.pattern(np.uint64(page) + np.arange(half // 8, dtype=np.uint64) * np.uint64(8), pages // dp)
    assert verify.verify(mem.array).ok
    ports = Ports()
    with running(mem, ports) as e:  # a cold boot over it
        wait_for(lambda: state(mem, 0)["pages"] > pages + dp)  # past that page, once more round
        e.pause()
    assert not ports.of(abi.PORT_ERROR)
    assert verify.verify(mem.array).ok


def test_a_bad_config_stops_with_the_offset_of_its_field(mem: GuestMemory) -> None:
    setup(mem)
    at = abi.CONFIG_GPA + abi.CONFIG.fields["ring_entries"][1]
    mem.array[at:at + 4] = np.frombuffer(np.uint32(7).tobytes(), np.uint8)
    ports = Ports()
    with running(mem, ports) as e:
        wait_for(lambda: e.stopped())
    assert ports.of(abi.PORT_ERROR) == [(0, abi.ERROR_CONFIG)]
    s = state(mem, 0)
    assert s["error"] == abi.ERROR_CONFIG and s["error_value"] == abi.CONFIG.fields["ring_entries"][1]


def serve_ring(mem: GuestMemory, vcpu: int, seed: int, wrong_result: bool = False) -> int:
    """Act as the DMA device on a paused guest: complete every posted descriptor; return how many."""
    rg = abi.ring_gpa(vcpu)
    hdr = mem.array[rg:rg + abi.RING_HEADER.itemsize].view(abi.RING_HEADER)
    descs = mem.array[rg + abi.DESCRIPTORS_OFFSET:rg + abi.DESCRIPTORS_OFFSET
                      + abi.RING_ENTRIES * abi.DESCRIPTOR.itemsize].view(abi.DESCRIPTOR)
    done = 0
    while hdr["consumed"][0] < hdr["produced"][0]:
        d = descs[int(hdr["consumed"][0]) % abi.RING_ENTRIES]
        assert d["status"] == abi.DESC_POSTED
        gpa, n = int(d["buffer_gpa"]), int(d["length"]) // 8
        buf = mem.array[gpa:gpa + 8 * n].view("<u8")
        if d["op"] == abi.DMA_WRITE:
            buf[:] = abi.dma_pattern(np.arange(gpa, gpa + 8 * n, 8, dtype=np.uint64), int(d["seq"]), seed)
        d["result"] = (int(buf.sum(dtype=np.uint64)) + (1 if wrong_result else 0)) & abi.U64
        d["status"] = abi.DESC_DONE
        hdr["consumed"] += 1
        done += 1
    return done


def test_the_guest_collects_and_checks_completed_dma_in_order(mem: GuestMemory) -> None:
    setup(mem, dma_every=4, seed=99)
    with running(mem, Ports()) as e:
        served = 0
        for _ in range(3):
            wait_for(lambda: state(mem, 0)["dma_posted"] >= served + abi.RING_ENTRIES)
            e.pause()
            served += serve_ring(mem, 0, seed=99)
            e.resume()
        wait_for(lambda: state(mem, 0)["dma_completed"] >= served)
        e.pause()
        v = verify.verify(mem.array)
    assert v.ok, v.findings
    s = v.vcpus[0]
    assert s.dma_ok >= served == 3 * abi.RING_ENTRIES and s.dma_errors == 0


def test_a_dma_completion_with_a_wrong_result_counts_an_error(mem: GuestMemory) -> None:
    setup(mem, dma_every=4)
    with running(mem, Ports()) as e:
        wait_for(lambda: state(mem, 0)["dma_posted"] >= abi.RING_ENTRIES)
        e.pause()
        served = serve_ring(mem, 0, seed=0, wrong_result=True)
        e.resume()
        wait_for(lambda: state(mem, 0)["dma_completed"] >= served)
        e.pause()
    s = state(mem, 0)
    assert s["dma_errors"] == served and s["dma_ok"] == 0
    assert verify.verify(mem.array).ok  # the ring itself is consistent; the errors are counted


def test_cold_boot_completes_a_post_cut_before_dma_posted(mem: GuestMemory) -> None:
    setup(mem, dma_every=2)
    with running(mem, Ports()) as e:
        wait_for(lambda: state(mem, 0)["dma_posted"] == abi.RING_ENTRIES)
        e.pause()
    put_state(mem, 0, dma_posted=abi.RING_ENTRIES - 1)  # produced + 1 stored, dma_posted + 1 not
    with running(mem, Ports()) as e:
        wait_for(lambda: state(mem, 0)["boots"] == 1)
        e.pause()
    assert state(mem, 0)["dma_posted"] == abi.RING_ENTRIES
    assert verify.verify(mem.array).ok


def test_cold_boot_completes_a_collection_cut_after_its_count(mem: GuestMemory) -> None:
    setup(mem, dma_every=2)
    with running(mem, Ports()) as e:
        wait_for(lambda: state(mem, 0)["dma_posted"] == abi.RING_ENTRIES)
        e.pause()
    served = serve_ring(mem, 0, seed=0)
    put_state(mem, 0, dma_ok=1)  # descriptor 0 counted, dma_completed + 1 not stored
    with running(mem, Ports()) as e:
        wait_for(lambda: state(mem, 0)["dma_completed"] >= served)
        e.pause()
    s = state(mem, 0)
    assert (s["dma_ok"], s["dma_errors"]) == (served, 0)  # counted once, not twice
    assert verify.verify(mem.array).ok


def test_dma_served_by_a_device_running_beside_the_guest_checks_out(mem: GuestMemory) -> None:
    """A device thread polls the ring while the vCPU runs; pauses of the guest alone verify clean."""
    setup(mem, nr_vcpus=1, dma_every=3, seed=7, dma_length=1024)
    stop = threading.Event()

    def device() -> None:
        while not stop.is_set():
            if int(np.frombuffer(mem.array[abi.ring_gpa(0):abi.ring_gpa(0) + 8].tobytes(), "<u8")[0]) \
                    == abi.RING_MAGIC:
                serve_ring(mem, 0, seed=7)
            time.sleep(0)
    t = threading.Thread(target=device)
    t.start()
    try:
        with running(mem, Ports()) as e:
            for _ in range(20):
                time.sleep(0.01)
                e.pause()
                v = verify.verify(mem.array)  # the device goes on meanwhile
                assert v.ok, v.findings
                e.resume()
            wait_for(lambda: state(mem, 0)["dma_ok"] > 100)
            e.pause()
    finally:
        stop.set()
        t.join()
    s = state(mem, 0)
    assert s["dma_errors"] == 0 and s["dma_ok"] > 100
