"""The verifier (pkfuse/vmm/verify.py): clean over what the guest leaves, a finding naming the gpa for each corruption."""

from __future__ import annotations

import mmap
import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from pkfuse.vmm import abi, boot, guest, verify
from pkfuse.vmm.emulator import Emulator
from pkfuse.vmm.memory import GuestMemory

RAM = 8 * abi.MiB
STATE = abi.VCPU_STATE_GPA
RING = abi.ring_gpa(0)


def field(dtype: np.dtype, name: str) -> int:
    return dtype.fields[name][1]


def put(mem: GuestMemory, gpa: int, value: int, dtype: str = "<u8") -> None:
    n = np.dtype(dtype).itemsize
    mem.array[gpa:gpa + n] = np.frombuffer(np.array(value, dtype).tobytes(), np.uint8)


def get(mem: GuestMemory, gpa: int, dtype: str = "<u8") -> int:
    return int(np.frombuffer(mem.array[gpa:gpa + np.dtype(dtype).itemsize].tobytes(), dtype)[0])


def open_ram(path: Path, size: int) -> GuestMemory:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, size)
        return GuestMemory.of_file(fd, size)
    finally:
        os.close(fd)


@pytest.fixture
def ran(tmp_path: Path) -> Iterator[GuestMemory]:
    """Guest RAM after the guest ran on Unicorn: past its first pass, its ring full, paused, engine closed."""
    mem = open_ram(tmp_path / "guest.ram", RAM)
    config = boot.write_boot(mem.array, boot.GuestParams(nr_vcpus=1, ram_size=RAM, dirty_share=0.02, dma_every=8),
                             guest.load(), fresh=True)
    e = Emulator(mem, 1, lambda vcpu, port, value: port != abi.PORT_ERROR)
    try:
        e.boot()
        e.start()
        deadline, dp = time.monotonic() + 5, int(config["dirty_pages"])
        while True:  # past the first pass, the ring full, the cursor a few pages into a pass
            e.pause()
            pages = get(mem, STATE + field(abi.VCPU_STATE, "pages"))
            if pages > dp and get(mem, RING + field(abi.RING_HEADER, "produced")) == abi.RING_ENTRIES \
                    and 3 <= pages % dp < dp - 3:
                break
            assert time.monotonic() < deadline
            e.resume()
            time.sleep(0.001)
    finally:
        e.close()
    yield mem
    mem.close()


def only(v: verify.Verdict) -> verify.Finding:
    assert len(v.findings) == 1, v.findings
    return v.findings[0]


def test_a_fresh_boot_image_and_a_run_guest_are_clean(ran: GuestMemory, tmp_path: Path) -> None:
    v = verify.verify(ran.array)
    assert v.ok, v.findings
    assert v.vcpus[0].pass_ >= 1 and v.vcpus[0].produced == abi.RING_ENTRIES
    fresh = open_ram(tmp_path / "fresh.ram", RAM)
    boot.write_boot(fresh.array, boot.GuestParams(nr_vcpus=2, ram_size=RAM), guest.load(), fresh=True)
    assert verify.verify(fresh.array).ok
    fresh.close()


def test_a_flipped_pattern_qword_below_the_cursor_is_named_by_its_gpa(ran: GuestMemory) -> None:
    v = verify.verify(ran.array)
    base, _ = abi.dirty_area(v.config, 0)
    gpa = base + (v.vcpus[0].cursor - 1) * abi.PAGE_SIZE + 0x128
    put(ran, gpa, get(ran, gpa) ^ 1 << 17)
    f = only(verify.verify(ran.array))
    assert (f.structure, f.gpa) == ("dirty_area[0]", gpa) and "below the cursor" in f.problem


def test_a_flipped_pattern_qword_above_the_cursor_is_named_by_its_gpa(ran: GuestMemory) -> None:
    v = verify.verify(ran.array)
    base, size = abi.dirty_area(v.config, 0)
    gpa = base + size - 8
    put(ran, gpa, get(ran, gpa) ^ 1)
    f = only(verify.verify(ran.array))
    assert (f.structure, f.gpa) == ("dirty_area[0]", gpa) and "above the cursor" in f.problem


def test_the_page_at_the_cursor_may_hold_a_prefix_of_the_pass_but_nothing_else(ran: GuestMemory) -> None:
    v = verify.verify(ran.array)
    base, _ = abi.dirty_area(v.config, 0)
    page = base + v.vcpus[0].cursor * abi.PAGE_SIZE
    gpas = np.arange(page, page + abi.PAGE_SIZE, 8, dtype=np.uint64)
    q = ran.array[page:page + abi.PAGE_SIZE].view("<u8")
    q[:] = abi.pattern(gpas, v.vcpus[0].pass_ - 1)  # not yet written in this pass (the pause may be after it)
    q[:100] = abi.pattern(gpas[:100], v.vcpus[0].pass_)  # a kill 100 qwords into the page: accepted
    assert verify.verify(ran.array).ok
    q[200] = abi.pattern(gpas[200], v.vcpus[0].pass_)  # a current qword after an old one: not a prefix
    f = only(verify.verify(ran.array))
    assert (f.structure, f.gpa) == ("dirty_area[0]", page + 200 * 8) and "at the cursor" in f.problem


def test_a_checksum_of_neither_step_is_named_by_its_gpa(ran: GuestMemory) -> None:
    at = STATE + field(abi.VCPU_STATE, "checksum")
    n = get(ran, STATE)
    put(ran, at, abi.checksum(n + 1, 0))  # a kill between step 4's stores: accepted
    assert verify.verify(ran.array).ok
    put(ran, at, abi.checksum(n + 2, 0))
    f = only(verify.verify(ran.array))
    assert (f.structure, f.gpa) == ("vcpu_state[0]", at) and "checksum" in f.problem


def test_an_error_the_guest_stopped_with_is_a_finding(ran: GuestMemory) -> None:
    put(ran, STATE + field(abi.VCPU_STATE, "error"), abi.ERROR_ROLLBACK, "<u4")
    f = only(verify.verify(ran.array))
    assert f.gpa == STATE + field(abi.VCPU_STATE, "error") and "rollback" in f.problem


def test_a_consumed_index_past_produced_is_named_by_its_gpa(ran: GuestMemory) -> None:
    at = RING + field(abi.RING_HEADER, "consumed")
    put(ran, at, abi.RING_ENTRIES + 1)
    v = verify.verify(ran.array)
    assert v.findings and all(f.structure == "ring[0]" and f.gpa == at for f in v.findings), v.findings


def test_a_produced_index_with_more_in_flight_than_entries_is_named_by_its_gpa(ran: GuestMemory) -> None:
    at = RING + field(abi.RING_HEADER, "produced")
    put(ran, at, abi.RING_ENTRIES + 1)
    v = verify.verify(ran.array)
    assert ("ring[0]", at) in {(f.structure, f.gpa) for f in v.findings}, v.findings


def test_a_descriptor_status_the_indices_do_not_allow_is_named_by_its_gpa(ran: GuestMemory) -> None:
    at = RING + abi.DESCRIPTORS_OFFSET + 3 * abi.DESCRIPTOR.itemsize + field(abi.DESCRIPTOR, "status")
    assert get(ran, at, "<u4") == abi.DESC_POSTED
    put(ran, at, abi.DESC_FREE, "<u4")  # a live, unconsumed descriptor freed
    f = only(verify.verify(ran.array))
    assert (f.structure, f.gpa) == ("descriptor[0][3]", at)


def test_the_states_a_kill_leaves_in_the_ring_are_accepted(ran: GuestMemory) -> None:
    put(ran, STATE + field(abi.VCPU_STATE, "dma_posted"), abi.RING_ENTRIES - 1)  # produced stored, dma_posted not
    put(ran, RING + abi.DESCRIPTORS_OFFSET + field(abi.DESCRIPTOR, "status"), abi.DESC_DONE, "<u4")
    put(ran, RING + field(abi.RING_HEADER, "consumed"), 0)  # the device stored DONE, not yet consumed + 1
    assert verify.verify(ran.array).ok


def test_a_bad_config_magic_is_one_finding_and_stops_there(ran: GuestMemory) -> None:
    put(ran, abi.CONFIG_GPA, 0x1234)
    v = verify.verify(ran.array)
    assert [(f.structure, f.gpa) for f in v.findings] == [("config", abi.CONFIG_GPA)] and v.vcpus == []
    assert v.summary().startswith("guest state BAD, 1 finding(s): config at 0x1000: magic")


def test_progressed_flags_counters_that_went_back(ran: GuestMemory) -> None:
    before = verify.verify(ran.array)
    assert verify.progressed(before, before) == []
    assert [f.problem for f in verify.progressed(before, before, advanced=True)] == [
        f"counter did not advance ({before.vcpus[0].counter})"]
    n = before.vcpus[0].counter
    put(ran, STATE, n - 1)
    put(ran, STATE + field(abi.VCPU_STATE, "checksum"), abi.checksum(n - 1, 0))
    f = verify.progressed(before, verify.verify(ran.array))
    assert [(x.structure, x.gpa) for x in f] == [("vcpu_state[0]", STATE)] and "went back" in f[0].problem


def test_it_reads_an_mmap_of_the_file_and_sums_up_in_one_line(tmp_path: Path, ran: GuestMemory) -> None:
    with open(tmp_path / "guest.ram", "rb") as fh, mmap.mmap(fh.fileno(), 0, prot=mmap.PROT_READ) as mm:
        v = verify.verify(mm)
        assert v.ok and v.vcpus[0].counter == verify.verify(ran.array).vcpus[0].counter
        line = v.summary()
        del v
    assert line.startswith("guest state ok: 1 vCPU(s), mode run, steps ") and "\n" not in line


def test_a_large_area_is_checked_without_a_loop_per_page(tmp_path: Path) -> None:
    size = 128 * abi.MiB
    mem = open_ram(tmp_path / "big.ram", size)
    config = boot.write_boot(mem.array, boot.GuestParams(nr_vcpus=1, ram_size=size, dirty_share=1.0),
                             guest.load(), fresh=True)
    base, length = abi.dirty_area(config, 0)
    dp = int(config["dirty_pages"])
    q = mem.array[base:base + length].view("<u8")
    q[:] = abi.pattern(np.arange(base, base + length, 8, dtype=np.uint64), 0)  # pass 0 complete
    put(mem, STATE + field(abi.VCPU_STATE, "pages"), dp)  # pass 1, cursor 0: all of it the previous pass
    t = time.perf_counter()
    v = verify.verify(mem.array)
    elapsed = time.perf_counter() - t
    q[dp // 2 * 512 + 5] ^= np.uint64(1)
    f = only(verify.verify(mem.array))
    del q
    mem.close()
    assert v.ok, v.findings
    assert f.gpa == base + (dp // 2 * 512 + 5) * 8
    assert elapsed < 3.0, f"{length >> 20} MiB verified in {elapsed:.2f} s"


def stamp(mem: GuestMemory, n: int) -> np.ndarray:
    """Records 0..n-1 as the device stamps them (header, records, count); the records region as RECORDs."""
    g = abi.RECORDS_GPA
    h = np.zeros(1, abi.RECORDS_HEADER)
    h["magic"], h["capacity"], h["record_size"], h["count"] = abi.RECORDS_MAGIC, abi.RECORDS_CAPACITY, 64, n
    mem.array[g:g + 64] = h.view(np.uint8)
    r = mem.array[g + abi.RECORDS_OFFSET:g + abi.RECORDS_SIZE].view(abi.RECORD)
    seq = np.arange(n, dtype=np.uint64)
    r["seq"][:n], r["time_ns"][:n], r["payload"][:n] = seq, 1000 + seq, abi.record_payload(seq)
    r["check"][:n] = abi.record_check(r[:n].view("<u8").reshape(n, 8))
    return r


def test_whole_records_below_the_count_and_a_torn_newest_are_clean(ran: GuestMemory) -> None:
    r = stamp(ran, 100)
    assert verify.verify(ran.array).ok
    r["seq"][100], r["payload"][100][:2] = 100, abi.record_payload(100)[:2]  # record 100 half stored, no check
    assert verify.verify(ran.array).ok
    r["check"][100] = abi.record_check(r[100:101].view("<u8").reshape(1, 8))[0]  # the check before the payload
    f = only(verify.verify(ran.array))
    assert f.structure == "record[100]" and f.gpa == abi.record_gpa(100) and "stored last" in f.problem


def test_a_record_below_the_count_out_of_place_or_out_of_order_is_named(ran: GuestMemory) -> None:
    r = stamp(ran, 100)
    r["payload"][40][3] ^= np.uint64(1)
    f = only(verify.verify(ran.array))
    assert f.structure == "record[40]" and f.gpa == abi.record_gpa(40) and "not whole" in f.problem
    r = stamp(ran, 100)
    r["time_ns"][70] = 5
    r["check"][70] = abi.record_check(r[70:71].view("<u8").reshape(1, 8))[0]
    f = only(verify.verify(ran.array))
    assert f.structure == "record[70]" and "before record 69" in f.problem


def test_a_slot_above_the_count_that_is_not_zero_is_named(ran: GuestMemory) -> None:
    r = stamp(ran, 10)
    r["time_ns"][20] = 1
    f = only(verify.verify(ran.array))
    assert f.structure == "record[20]" and f.gpa == abi.record_gpa(20) and "not zero" in f.problem
