"""The DMA device (``pkfuse device``): hardware beside a real VM on a live mount, never asking the daemon.

Each test starts a VM (``Vmm.start``, or ``pkfuse vmm run`` where the test
kills it) whose HWPT is attached for requester 00:03.0, then a device
process on a requester id, and reads guest RAM through the IOMMU as the
device does (a second ``Device`` in the test process, with no log). Every
process a test starts is stopped at teardown, also on failure, by its pid.
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
from conftest import Mount, reap

from backing import format as fmt
from backing import walker
from backing.regs import Regs
from pkfuse.harness import device as dv
from pkfuse.vmm import abi, verify
from pkfuse.vmm.vmm import Vmm, VmmSpec, state_view

pytestmark = pytest.mark.mount

MEMORY = 16 * abi.MiB
RID = "00:03.0"  #: the VMM's default device
SID = fmt.requester_id(0, 3, 0)
ENGINES = ["unicorn", pytest.param("kvm", marks=pytest.mark.skipif(
    not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="no /dev/kvm here: the KVM engine cannot run"))]


@pytest.fixture
def live(make_image: Callable[..., Path], tmp_path: Path, mount_image: Callable[..., Mount]) -> Mount:
    return mount_image(make_image("128M"), "--control", str(tmp_path / "ctl.sock"))


@pytest.fixture
def vmms() -> Iterator[list[Vmm]]:
    made: list[Vmm] = []
    yield made
    for v in made:
        v.close(save=False)


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Every process a test started (devices, VMMs): SIGTERM, then SIGKILL, by pid, at teardown."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.terminate()
    for p in started:
        reap(p, 5)


def start_vm(m: Mount, vmms: list[Vmm], engine: str = "unicorn", **kw: object) -> Vmm:
    fields: dict[str, object] = {"guest": str(m.path / "guest_mem" / "vm0"), "memory": MEMORY, "vcpus": 1,
                                 "engine": engine, "dirty_share": 0.1, "dma_every": 16, **kw}
    spec = VmmSpec(**fields)  # type: ignore[arg-type]
    vmm = Vmm.start(spec)
    vmms.append(vmm)
    return vmm


def start_device(procs: list, m: Mount, tmp_path: Path, *args: str, rid: str = RID,
                 name: str = "dev") -> tuple[subprocess.Popen[bytes], Path, Path]:
    logf, js = tmp_path / f"{name}.dmalog", tmp_path / f"{name}.json"
    p = subprocess.Popen([sys.executable, "-m", "pkfuse", "device", str(m.image), "--rid", rid, "--log", str(logf),
                          "--json", str(js), *args], stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
    procs.append(p)
    deadline = time.monotonic() + 30  # its log exists once its signal handlers do: a stop is then a clean one
    while not logf.exists():
        assert p.poll() is None and time.monotonic() < deadline, p.stderr.read().decode()  # type: ignore[union-attr]
        time.sleep(0.005)
    return p, logf, js


def stop_device(p: subprocess.Popen[bytes], js: Path) -> dict:
    p.send_signal(signal.SIGTERM)
    rc = p.wait(10)
    assert rc == 0, p.stderr.read().decode()  # type: ignore[union-attr]
    return json.loads(js.read_text())


def wait_for(what: Callable[[], object], timeout: float = 15.0, why: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, f"timed out: {why}"
        time.sleep(0.01)


class Probe:
    """Guest RAM read as the device reads it: DMA through the IOMMU for 00:03.0 (no log)."""

    def __init__(self, image: Path) -> None:
        self.dev = dv.Device(str(image), SID)

    def read(self, gpa: int, n: int) -> np.ndarray:
        data = self.dev.dma_read(gpa, n, dv.KIND_CONFIG)
        assert data is not None, "the probe's DMA faulted"
        return data

    def records_count(self) -> int:
        h = self.read(abi.RECORDS_GPA, abi.RECORDS_HEADER.itemsize).view(abi.RECORDS_HEADER)[0]
        return int(h["count"]) if int(h["magic"]) == abi.RECORDS_MAGIC else 0

    def dma_ok(self) -> int:
        return int(state_view(np.concatenate([np.zeros(abi.VCPU_STATE_GPA, np.uint8),
                                              self.read(abi.VCPU_STATE_GPA, abi.VCPU_STATE_STRIDE)]), 1)
                   ["dma_ok"][0])

    def close(self) -> None:
        self.dev.close()


@pytest.mark.parametrize("engine", ENGINES)
def test_the_guests_dma_requests_complete_and_the_verifier_is_clean(
        live: Mount, vmms: list[Vmm], procs: list, tmp_path: Path, engine: str) -> None:
    vmm = start_vm(live, vmms, engine)
    p, _, js = start_device(procs, live, tmp_path, "--rate", "4000", "--records")
    wait_for(lambda: int(vmm.vcpu_states()["dma_ok"][0]) >= 40, why=vmm.status_line())
    vmm.pause()
    v = verify.verify(vmm.ram.array)  # the device goes on stamping meanwhile
    assert v.ok, v.findings
    s = v.vcpus[0]
    assert s.dma_ok >= 40 and s.dma_errors == 0
    out = stop_device(p, js)
    assert out["faults"] == 0 and out["descriptors_done"]["0"] >= 40 and out["records"] > 0
    assert verify.verify(vmm.ram.array).ok


def test_the_records_region_fills_in_order(live: Mount, vmms: list[Vmm], procs: list, tmp_path: Path) -> None:
    vmm = start_vm(live, vmms, dma_every=0)
    p, _, js = start_device(procs, live, tmp_path, "--rate", "4000", "--rings", "0", "--records")
    ram = vmm.ram.array
    hdr = ram[abi.RECORDS_GPA:abi.RECORDS_GPA + 64].view(abi.RECORDS_HEADER)
    wait_for(lambda: int(hdr["magic"][0]) == abi.RECORDS_MAGIC and int(hdr["count"][0]) >= 200)
    out = stop_device(p, js)
    n = int(hdr["count"][0])
    assert n == out["records"] == out["next_record_seq"] and int(hdr["writer_rid"][0]) == SID
    r = ram[abi.RECORDS_GPA + abi.RECORDS_OFFSET:abi.RECORDS_GPA + abi.RECORDS_SIZE].view(abi.RECORD)
    assert np.array_equal(r["seq"][:n], np.arange(n)) and (np.diff(r["time_ns"][:n].astype(np.int64)) >= 0).all()
    assert np.array_equal(r["payload"][:n], abi.record_payload(np.arange(n)))
    assert np.array_equal(r["check"][:n], abi.record_check(r[:n].view("<u8").reshape(n, 8)))
    assert (r["rid"][:n] == SID).all() and (r["pid"][:n] == p.pid).all() and not r[n:].view("<u8").any()
    vmm.pause()
    assert verify.verify(ram).ok


def test_every_dma_in_the_log_reached_the_address_the_walker_gives(
        live: Mount, vmms: list[Vmm], procs: list, tmp_path: Path) -> None:
    vmm = start_vm(live, vmms)
    p, logf, js = start_device(procs, live, tmp_path, "--rate", "4000", "--records")
    wait_for(lambda: int(vmm.vcpu_states()["dma_ok"][0]) >= 20)
    stop_device(p, js)
    e = dv.read_log(logf)
    assert e.size > 100 and (e["done"] == 1).all() and not e["fault"].any()
    assert {dv.KIND_RING_HEADER, dv.KIND_DESCRIPTOR, dv.KIND_BUFFER, dv.KIND_RECORD} <= set(e["kind"].tolist())
    image_u64, base, npages = walker.open_image(live.image)
    with Regs.open(str(live.image) + ".regs", create=False) as regs:
        phys, fault = walker.translate(image_u64, base, npages, regs, SID, e["iova"], e["op"] == dv.OP_WRITE)
    assert not fault.any() and np.array_equal(phys, e["phys"])
    # and each is the guest file's page: the VMM's mapping of the same IOVA (= GPA) is that image page
    assert np.array_equal(vmm.ram.phys_addrs(e["iova"]), e["phys"])
    # a record's log entries carry the checksum of the bytes now in its slot (the region has not wrapped)
    rec = e[(e["kind"] == dv.KIND_RECORD)][:50]
    for row in rec:
        g = int(row["iova"])
        assert int(row["checksum"]) == dv.checksum(vmm.ram.array[g:g + int(row["length"])])


def test_dma_goes_on_while_the_daemon_and_then_the_vmm_are_sigkilled(
        live: Mount, procs: list, tmp_path: Path) -> None:
    guest = live.path / "guest_mem" / "vm0"
    vm = subprocess.Popen([sys.executable, "-m", "pkfuse", "vmm", "run", str(guest), "--memory", "16M",
                           "--engine", "unicorn", "--dma-every", "16", "--dirty-share", "0.1", "--quiet"],
                          stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
    procs.append(vm)
    wait_for(lambda: guest.exists() and guest.stat().st_size == MEMORY and os.path.getsize(f"{guest}.vmstate") > 0,
             why="the VMM did not start")
    probe = None
    p, logf, js = start_device(procs, live, tmp_path, "--rate", "4000", "--records")
    try:
        def ready() -> bool:
            nonlocal probe
            try:
                probe = probe or Probe(live.image)
                return probe.dma_ok() >= 10 and probe.records_count() >= 10
            except AssertionError:  # the HWPT not attached yet
                if probe is not None:
                    probe.close()
                probe = None
                return False
        wait_for(ready, why="no DMA served")
        assert probe is not None
        live.kill()  # the kernel is gone: nobody changes the tables or the registers
        r0, ok0 = probe.records_count(), probe.dma_ok()
        wait_for(lambda: probe.records_count() >= r0 + 100 and probe.dma_ok() >= ok0 + 10,
                 why="the device stopped with the daemon")
        os.kill(vm.pid, signal.SIGKILL)
        vm.wait(10)
        r1 = probe.records_count()
        wait_for(lambda: probe.records_count() >= r1 + 100, why="the device stopped with the VMM")
        assert p.poll() is None
        out = stop_device(p, js)
    finally:
        if probe is not None:
            probe.close()
    assert out["faults"] == 0 and out["records"] >= r1 + 100
    e = dv.read_log(logf)
    assert not e["fault"].any() and e.size == out["log_entries"]


def test_a_device_without_a_context_entry_faults_and_touches_nothing(
        live: Mount, vmms: list[Vmm], procs: list, tmp_path: Path) -> None:
    vmm = start_vm(live, vmms)
    with Regs.open(str(live.image) + ".regs", create=False) as regs:
        assert regs.enabled
        seq0 = regs.fault_seq
    wait_for(lambda: int(vmm.vcpu_states()["dma_posted"][0]) >= 4)
    p, logf, js = start_device(procs, live, tmp_path, "--rate", "2000", "--records", "--seconds", "0.5",
                               rid="00:04.0")
    assert p.wait(10) == 0
    out = json.loads(js.read_text())
    e = dv.read_log(logf)
    sid = fmt.requester_id(0, 4, 0)
    assert e.size > 10 and out["performed"] == 0 and not e["done"].any() and not e["phys"].any()
    assert (e["fault"] == fmt.FR_CONTEXT_NOT_PRESENT).all() and (e["rid"] == sid).all()
    assert list(out["faults_by_reason"]) == [f"{fmt.FR_CONTEXT_NOT_PRESENT:#04x} "
                                             f"{fmt.FR_NAMES[fmt.FR_CONTEXT_NOT_PRESENT]}"]
    ram = vmm.ram.array
    assert not ram[abi.RECORDS_GPA:abi.RECORDS_GPA + abi.RECORDS_SIZE].any()  # no record, no header
    assert int(vmm.vcpu_states()["dma_completed"][0]) == 0  # no descriptor completed
    with Regs.open(str(live.image) + ".regs", create=False) as regs:
        mine = [f for f in regs.faults() if f.seq > seq0 and f.source_id == sid]
        assert regs.fault_seq - seq0 >= e.size  # every faulted piece, recorded
    assert mine and all(f.reason == fmt.FR_CONTEXT_NOT_PRESENT for f in mine)
    assert {(f.iova, f.write) for f in mine} >= {(abi.ring_gpa(0), False)}


def test_sigterm_flushes_the_log(live: Mount, vmms: list[Vmm], procs: list, tmp_path: Path) -> None:
    vmm = start_vm(live, vmms, dma_every=0)
    p, logf, js = start_device(procs, live, tmp_path, "--rate", "3000", "--rings", "0", "--records")
    hdr = vmm.ram.array[abi.RECORDS_GPA:abi.RECORDS_GPA + 64].view(abi.RECORDS_HEADER)
    wait_for(lambda: int(hdr["count"][0]) >= 50)
    out = stop_device(p, js)
    e = dv.read_log(logf)
    assert e.size == out["log_entries"] > 0  # every DMA made is in the log, none torn
    counts = e[e["kind"] == dv.KIND_RECORDS_COUNT]
    assert counts.size == int(hdr["count"][0]) == out["records"]
    last = int(counts["iova"][-1])
    assert last == abi.RECORDS_GPA + abi.RECORDS_HEADER.fields["count"][1]
    assert int(counts["checksum"][-1]) == int(hdr["count"][0])  # the last count stored is logged


def test_the_device_walks_a_domain_whose_tables_are_in_ephemeral_memory(
        make_image: Callable[..., Path], tmp_path: Path, mount_image: Callable[..., Mount], vmms: list[Vmm],
        procs: list) -> None:
    m = mount_image(make_image("128M"), "--control", str(tmp_path / "ctl.sock"), "--domains", "ephemeral")
    vmm = start_vm(m, vmms)
    p, logf, js = start_device(procs, m, tmp_path, "--rate", "3000")  # IMAGE.ephemeral by default
    blind, blog, bjs = start_device(procs, m, tmp_path, "--rate", "500", "--ephemeral", str(tmp_path / "none"),
                                    name="blind")
    wait_for(lambda: int(vmm.vcpu_states()["dma_ok"][0]) >= 20, why=vmm.status_line())
    out, bout = stop_device(p, js), stop_device(blind, bjs)
    assert out["faults"] == 0 and out["ephemeral_maps"] == 1 and int(vmm.vcpu_states()["dma_errors"][0]) == 0
    e = dv.read_log(logf)
    image_u64, base, npages = walker.open_image(m.image)
    with Regs.open(str(m.image) + ".regs", create=False) as regs:
        phys, fault = walker.translate(image_u64, base, npages, regs, SID, e["iova"], e["op"] == dv.OP_WRITE,
                                       ephemeral=walker.open_ephemeral(str(m.image) + ".ephemeral"))
    assert not fault.any() and np.array_equal(phys, e["phys"])
    # without the ephemeral memory the SL-PML4 (above the image) is outside memory: every DMA faults
    b = dv.read_log(blog)
    assert bout["performed"] == 0 and b.size and (b["fault"] == fmt.FR_NEXT_PT_INVALID).all()


def test_a_vmm_gone_with_the_daemon_alive_leaves_the_device_faulting_not_dead(
        live: Mount, vmms: list[Vmm], procs: list, tmp_path: Path) -> None:
    vmm = start_vm(live, vmms)
    p, logf, js = start_device(procs, live, tmp_path, "--rate", "3000", "--records")
    wait_for(lambda: int(vmm.vcpu_states()["dma_ok"][0]) >= 10)
    vmm.close(save=False)  # the kernel's release of its iommufd: the HWPT goes, the context entry is cleared
    t = time.monotonic_ns()
    time.sleep(0.5)
    assert p.poll() is None
    out = stop_device(p, js)
    e = dv.read_log(logf)
    late = e[e["time_ns"] > t + 100_000_000]
    assert late.size and (late["fault"] == fmt.FR_CONTEXT_NOT_PRESENT).all() and not late["done"].any()
    assert out["faults"] >= late.size // 2  # each DMA, however many pieces, is one fault in the summary


def test_a_sigkill_of_the_device_loses_at_most_the_last_100_ms_of_its_log(
        live: Mount, vmms: list[Vmm], procs: list, tmp_path: Path) -> None:
    vmm = start_vm(live, vmms, dma_every=0)
    p, logf, _ = start_device(procs, live, tmp_path, "--rate", "2000", "--rings", "0", "--records")
    hdr = vmm.ram.array[abi.RECORDS_GPA:abi.RECORDS_GPA + 64].view(abi.RECORDS_HEADER)
    wait_for(lambda: int(hdr["count"][0]) >= 200)
    t = time.monotonic_ns()
    os.kill(p.pid, signal.SIGKILL)
    p.wait(10)
    e = dv.read_log(logf)
    assert t - int(e["time_ns"][-1]) < 150_000_000  # flushed every 100 ms (+ a round, + the sleep)
    logged = int((e["kind"] == dv.KIND_RECORDS_COUNT).sum())
    assert 0 <= int(hdr["count"][0]) - logged <= 2000 // 4 * 0.15 + 2


def test_bad_arguments_are_one_line_errors(image: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "pkfuse", "device", str(image), *args], capture_output=True,
                              text=True, timeout=30)
    r = run("--rid", "3.0")
    assert r.returncode == 1 and r.stderr == "pkfuse: error: not a requester id 'bb:dd.f': '3.0'\n"
    r = run("--rid", "00:03.0", "--regs", str(image.with_name("none.regs")))
    assert r.returncode == 1 and r.stderr.startswith("pkfuse: error: no register block at ") \
        and r.stderr.count("\n") == 1
    r = run("--rid", "00:03.0", "--rate", "0")
    assert r.returncode == 1 and "rate 0.0" in r.stderr and r.stderr.count("\n") == 1


def test_the_log_reads_back_what_was_appended_and_sums_it_up(tmp_path: Path) -> None:
    path = tmp_path / "x.dmalog"
    log = dv.DmaLog(str(path), SID, batch=4)
    rows = np.zeros(10, dv.LOG_ENTRY)
    rows["iova"], rows["length"], rows["op"], rows["done"] = np.arange(10) * 4096, 64, dv.OP_WRITE, 1
    rows["op"][::2] = dv.OP_READ
    rows["done"][9], rows["fault"][9] = 0, fmt.FR_WRITE
    log.append(rows[:7])
    assert len(dv.read_log(path)) == 4  # a full batch is written at once, the rest at the flush
    log.append_one(tuple(rows[7].tolist()))
    log.append(rows[8:])
    log.close()
    with open(path, "ab") as f:
        f.write(b"torn")  # a kill in the middle of a write: the piece is left out
    e = dv.read_log(path)
    assert e.tobytes() == rows.tobytes()
    s = dv.summarize(e)
    assert (s["entries"], s["performed"], s["bytes_read"], s["bytes_written"], s["faults"]) == (10, 9, 320, 256, 1)
    assert s["faults_by_reason"] == {f"{fmt.FR_WRITE:#04x} {fmt.FR_NAMES[fmt.FR_WRITE]}": 1}
    r = subprocess.run([sys.executable, "-m", "pkfuse.harness.device", str(path)], capture_output=True, text=True,
                       check=True)
    assert json.loads(r.stdout)[str(path)] == s


def test_a_buffer_whose_dma_faults_completes_its_descriptor_with_desc_fault(
        live: Mount, vmms: list[Vmm], procs: list, tmp_path: Path) -> None:
    vmm = start_vm(live, vmms)
    # a kernel-owned domain for 00:05.0 mapping only CONFIG's page and ring 0's first (header, descriptors),
    # not its buffers
    for args in (("create", "--id", "9"),
                 ("map", "9", "--iova", hex(abi.CONFIG_GPA), "--length", "4K", "--file", "guest_mem/vm0",
                  "--offset", hex(abi.CONFIG_GPA)),
                 ("map", "9", "--iova", hex(abi.ring_gpa(0)), "--length", "4K", "--file", "guest_mem/vm0",
                  "--offset", hex(abi.ring_gpa(0))),
                 ("attach", "9", "00:05.0")):
        r = subprocess.run([sys.executable, "-m", "pkfuse", "iommu", args[0], str(live.path), *args[1:]],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
    p, logf, js = start_device(procs, live, tmp_path, "--rate", "2000", rid="00:05.0")
    wait_for(lambda: int(vmm.vcpu_states()["dma_errors"][0]) >= 6, why=vmm.status_line())
    out = stop_device(p, js)
    vmm.pause()
    v = verify.verify(vmm.ram.array)
    assert v.ok, v.findings  # DESC_FAULT below consumed is a state the ring allows
    assert v.vcpus[0].dma_ok == 0 and v.vcpus[0].dma_errors >= 6 and out["descriptors_faulted"]["0"] >= 6
    e = dv.read_log(logf)
    buf = e[e["kind"] == dv.KIND_BUFFER]
    assert not buf["done"].any() and set(buf["fault"].tolist()) == {fmt.FR_READ, fmt.FR_WRITE}
    assert (buf["fault"] == np.where(buf["op"] == dv.OP_WRITE, fmt.FR_WRITE, fmt.FR_READ)).all()
    done = e[np.isin(e["kind"], [dv.KIND_STATUS, dv.KIND_CONSUMED])]
    assert done["done"].all() and (done["checksum"][done["kind"] == dv.KIND_STATUS] == abi.DESC_FAULT).all()


def test_a_restart_that_poisons_the_ephemeral_memory_is_mapped_again_and_walked_as_poison_or_blocked(
        make_image: Callable[..., Path], tmp_path: Path, mount_image: Callable[..., Mount], vmms: list[Vmm],
        procs: list) -> None:
    m = mount_image(make_image("128M"), "--control", str(tmp_path / "ctl.sock"), "--domains", "ephemeral")
    vmm = start_vm(m, vmms)
    p, logf, js = start_device(procs, m, tmp_path, "--rate", "2000")
    wait_for(lambda: int(vmm.vcpu_states()["dma_ok"][0]) >= 5, why=vmm.status_line())
    m.restart()  # the kexec: the new daemon's open poisons the ephemeral memory and clears its context entries
    t = time.monotonic_ns()
    time.sleep(1.0)  # EPHEMERAL_RECHECK twice
    out = stop_device(p, js)
    assert out["ephemeral_maps"] == 2  # the header's boot_id changed: mapped again
    e = dv.read_log(logf)
    late = e[e["time_ns"] > t + 600_000_000]
    assert late.size and not late["done"].any()
    assert set(late["fault"].tolist()) <= {fmt.FR_CONTEXT_NOT_PRESENT, fmt.FR_PT_RSVD}


def test_the_iotlb_serves_repeated_translations_and_the_log_says_hit_or_miss(
        live: Mount, vmms: list[Vmm], procs: list, tmp_path: Path) -> None:
    vmm = start_vm(live, vmms)
    p, logf, js = start_device(procs, live, tmp_path, "--rate", "3000", "--records")
    q, qlog, qjs = start_device(procs, live, tmp_path, "--rate", "500", "--records", "--rings", "0", "--no-iotlb",
                                rid="00:04.0", name="walker")
    wait_for(lambda: int(vmm.vcpu_states()["dma_ok"][0]) >= 20, why=vmm.status_line())
    out, qout = stop_device(p, js), stop_device(q, qjs)
    e = dv.read_log(logf)
    hits, misses = int((e["iotlb"] == dv.IOTLB_HIT).sum()), int((e["iotlb"] == dv.IOTLB_MISS).sum())
    assert hits + misses == e.size and misses >= 1 and hits > 10 * misses  # guest RAM: a few 2 MiB leaves
    assert out["translator"]["hits"] == hits and out["translator"]["misses"] == misses
    assert (e["iotlb"][:1] == dv.IOTLB_MISS).all()  # the first DMA finds the cache empty
    w = dv.read_log(qlog)  # without the cache every DMA is a walk (and faults: 00:04.0 has no context entry)
    assert (w["iotlb"] == dv.IOTLB_NONE).all() and qout["translator"]["walks"] >= 1
