"""The VMM on a live mount: a real VM whose RAM is a guest file's image pages, its stop and resume,
its live update across a SIGKILL of the daemon, and what it refuses.

Each test runs on every engine this machine has (KVM where ``/dev/kvm`` opens, Unicorn always).
The restart is ``Mount.restart`` (SIGKILL of the daemon, a new mount of the same image).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import Mount, run_example
from iommu_helpers import device_view

from backing import format as fmt
from backing import fsck
from pkfuse.harness.tables import device_leaves
from pkfuse.vmm import abi, handover, verify
from pkfuse.vmm.vmm import Vmm, VmmError, VmmSpec

pytestmark = pytest.mark.mount

MiB = 1 << 20
MEMORY = 16 * MiB
SID = fmt.requester_id(0, 3, 0)  #: 00:03.0, the VMM's default device
#: an IOVA in every 2 MiB of guest RAM, and one past its end (a fault)
IOVAS = np.arange(0, MEMORY + 2 * MiB, 2 * MiB, dtype=np.uint64) + np.uint64(0x1000)
ENGINES = ["unicorn", pytest.param("kvm", marks=pytest.mark.skipif(
    not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="no /dev/kvm here: the KVM engine cannot run"))]


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def vmms() -> Iterator[list[Vmm]]:
    """Every Vmm a test made, closed at teardown (vCPUs stopped, RAM unmapped), also on failure."""
    made: list[Vmm] = []
    yield made
    for v in made:
        v.close(save=False)


@pytest.fixture
def live(make_image: Callable[..., Path], tmp_path: Path, mount_image: Callable[..., Mount]) -> Mount:
    return mount_image(make_image("128M"), "--control", str(tmp_path / "ctl.sock"))


def _spec(m: Mount, engine: str, **kw: object) -> VmmSpec:
    fields: dict[str, object] = dict(guest=str(m.path / "guest_mem" / "vm0"), memory=MEMORY, vcpus=1,
                                     engine=engine, dirty_share=0.5, dma_every=64)
    fields.update(kw)
    return VmmSpec(**fields)  # type: ignore[arg-type]


def _run_until(vmm: Vmm, steps: int, timeout: float = 20.0) -> np.ndarray:
    """Guest state once every vCPU made ``steps`` steps (and wrote at least one page)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = vmm.vcpu_states()
        if (s["counter"] >= steps).all() and (s["pages"] > 0).all():
            return s
        assert not vmm.ports.errors, f"the guest reported {vmm.ports.errors}"
        time.sleep(0.01)
    pytest.fail(f"the guest did not reach {steps} steps in {timeout} s: {vmm.status_line()}")


def _clean(vmm: Vmm) -> verify.Verdict:
    v = verify.verify(vmm.ram.array)
    assert v.ok, v.findings
    return v


def test_a_vm_runs_on_its_guest_file_and_keeps_every_invariant(live: Mount, engine: str, vmms: list[Vmm]) -> None:
    vmm = Vmm.start(_spec(live, engine, vcpus=2))
    vmms.append(vmm)
    _run_until(vmm, 200)
    vmm.pause()
    v = _clean(vmm)
    s = vmm.vcpu_states()
    assert (s["counter"] > 0).all() and (s["dma_posted"] > 0).all() and not vmm.ports.errors
    assert v is not None


def _scattered(m: Mount, name: str, size: int) -> None:
    """A guest file grown 2 MiB at a time, interleaved with another file's growth: 2 MiB extents apart."""
    guest, filler = m.path / "guest_mem" / name, m.path / "guest_mem" / f"{name}.filler"
    with open(guest, "wb") as g, open(filler, "wb") as f:
        for n in range(1, size // (2 * MiB) + 1):
            g.truncate(n * 2 * MiB)
            f.truncate(n * 2 * MiB)


def test_the_guests_stores_are_the_images_pages_at_its_extents(live: Mount, engine: str,
                                                               vmms: list[Vmm]) -> None:
    """Guest RAM scattered over the image is one guest-physical range: what the guest wrote at g is
    in the image at the extent holding g, where its pattern says."""
    _scattered(live, "vm0", MEMORY)
    vmm = Vmm.start(_spec(live, engine))
    vmms.append(vmm)
    assert len(vmm.ram.extents) == MEMORY // (2 * MiB)  # nothing contiguous in the image
    _run_until(vmm, 600)  # the dirty area's first pages lie in the third extent and beyond
    vmm.pause()
    image = np.memmap(live.image, np.uint8, "r")
    pages = int(vmm.vcpu_states()["pages"][0])
    gpa = abi.DIRTY_GPA + (pages - 1) % int(verify.verify(vmm.ram.array).config["dirty_pages"]) * abi.PAGE_SIZE
    e = next(e for e in vmm.ram.extents if e.file_offset <= gpa < e.file_offset + e.length)
    at = e.image_offset + gpa - e.file_offset
    npass = (pages - 1) // int(verify.verify(vmm.ram.array).config["dirty_pages"])
    assert image[at:at + 8].view(np.uint64)[0] == abi.pattern(np.array([gpa], np.uint64), npass)[0]
    for e in vmm.ram.extents:
        assert np.array_equal(image[e.image_offset:e.image_offset + e.length],
                              vmm.ram.array[e.file_offset:e.file_offset + e.length])
    with open(live.path / "guest_mem" / "vm0", "rb", buffering=0) as f:  # and through the mount
        assert f.read(abi.PAGE_SIZE * 4) == vmm.ram.array[:abi.PAGE_SIZE * 4].tobytes()


def test_a_stop_saves_the_vcpus_and_a_resume_continues_them(live: Mount, engine: str, vmms: list[Vmm]) -> None:
    vmm = Vmm.start(_spec(live, engine))
    vmms.append(vmm)
    _run_until(vmm, 100)
    vmm.close(save=True)
    before = verify.verify(_read(live))
    again = Vmm.start(_spec(live, engine), resume=True)
    vmms.append(again)
    _run_until(again, int(before.vcpus[0].counter) + 100)
    again.pause()
    after = _clean(again)
    assert verify.progressed(before, after) == [], "the counters went back"
    assert int(again.vcpu_states()["boots"][0]) == 0, "a resume is not a boot"


def _read(m: Mount) -> np.ndarray:
    return np.frombuffer((m.path / "guest_mem" / "vm0").read_bytes(), np.uint8)


@pytest.mark.parametrize("domains", ["persistent", "ephemeral"])
def test_a_live_update_continues_the_guest_through_a_kexec(
        make_image: Callable[..., Path], tmp_path: Path, mount_image: Callable[..., Mount], vmms: list[Vmm],
        engine: str, domains: str) -> None:
    m = mount_image(make_image("128M"), "--control", str(tmp_path / "ctl.sock"), "--domains", domains)
    vmm = Vmm.start(_spec(m, engine))
    vmms.append(vmm)
    _run_until(vmm, 100)
    vmm.prepare("vm0")
    _run_until(vmm, int(vmm.vcpu_states()["counter"][0]) + 50)  # prepared: the VM still runs
    dma = device_view(m.image, SID, IOVAS)
    assert dma[1][:-1] == [0] * (len(IOVAS) - 1) and dma[1][-1] != 0  # guest RAM at IOVA = GPA, nothing past it
    vmm.freeze()
    before = verify.verify(vmm.ram.array)
    assert before.ok, before.findings
    vmm.close(save=False)
    m.restart()  # the kexec: SIGKILL of the daemon, a new one mounts the image
    assert device_view(m.image, SID, IOVAS) == dma  # between the kernels, DMA translates as before
    succ = Vmm.incoming(m.path, "vm0", timeout=30)
    vmms.append(succ)
    _run_until(succ, int(before.vcpus[0].counter) + 100)
    succ.pause()
    after = _clean(succ)
    assert verify.progressed(before, after) == []
    assert not succ.ports.errors and int(succ.vcpu_states()["boots"][0]) == 0
    assert succ.hwpt is not None and set(succ.timings) >= {"retrieve", "remap", "vm_create", "vcpu_restore",
                                                           "blackout"}
    assert device_view(m.image, SID, IOVAS) == dma  # adopted or replaced, the same translations
    status = (m.path / ".pkernfs" / "status").read_text()
    assert "0 sessions" in status, status  # finished


@pytest.mark.parametrize("domains", ["persistent", "ephemeral"])
def test_iommu_pgsize_4k_gives_the_device_4k_leaves_through_a_live_update(
        make_image: Callable[..., Path], tmp_path: Path, mount_image: Callable[..., Mount], vmms: list[Vmm],
        domains: str) -> None:
    """``--iommu-pgsize 4K``: IOMMU_OPTION_HUGE_PAGES 0 on the IOAS, so the hardware's walk of every IOVA
    ends at a 4 KiB leaf -- before the freeze, between the kernels and after the successor's rebuild;
    the default maps the same guest with 2 MiB leaves."""
    m = mount_image(make_image("128M"), "--control", str(tmp_path / "ctl.sock"), "--domains", domains)
    iovas = IOVAS[:-1]
    small = Vmm.start(_spec(m, "auto", guest=str(m.path / "guest_mem" / "vm1"), dma_every=0))
    vmms.append(small)
    assert set(device_leaves(m.image, SID, iovas)[0].tolist()) == {2 * MiB}  # the default: superpages
    small.close(save=False)
    vmm = Vmm.start(_spec(m, "auto", iommu_pgsize="4K"))
    vmms.append(vmm)
    _run_until(vmm, 100)

    def leaves() -> set[int]:
        size, fault = device_leaves(m.image, SID, iovas)
        assert not fault.any(), fault
        return set(size.tolist())

    assert leaves() == {4096}
    assert "huge pages off" in (m.path / ".pkernfs" / "iommu").read_text()
    assert vmm.describe()["iommu_pgsize"] == "4K"
    vmm.prepare("vm0")
    dma = device_view(m.image, SID, IOVAS)
    vmm.freeze()
    before = verify.verify(vmm.ram.array)
    vmm.close(save=False)
    m.restart()
    assert leaves() == {4096} and device_view(m.image, SID, IOVAS) == dma  # the saved domain, between kernels
    succ = Vmm.incoming(m.path, "vm0", timeout=30, iommu_pgsize="4K")
    vmms.append(succ)
    _run_until(succ, int(before.vcpus[0].counter) + 100)
    assert leaves() == {4096} and device_view(m.image, SID, IOVAS) == dma  # adopted or replaced: 4 KiB still
    succ.pause()
    assert verify.progressed(before, _clean(succ)) == []


def test_a_cancelled_prepare_leaves_the_vm_as_it_was(live: Mount, engine: str, vmms: list[Vmm]) -> None:
    vmm = Vmm.start(_spec(live, engine))
    vmms.append(vmm)
    vmm.prepare("vm0")
    vmm.cancel()
    with open(live.path / "guest_mem" / "vm0.vmstate", "r+b") as f:
        f.truncate(handover.FILE_SIZE)  # no longer frozen: a truncate to its size is allowed
    s = _run_until(vmm, 100)
    assert "0 sessions" in (live.path / ".pkernfs" / "status").read_text()
    assert s["counter"][0] >= 100


def test_a_resume_refuses_another_vms_state(live: Mount, engine: str, vmms: list[Vmm]) -> None:
    a = Vmm.start(_spec(live, engine))
    vmms.append(a)
    _run_until(a, 10)
    a.close(save=True)
    b = Vmm.start(_spec(live, engine, guest=str(live.path / "guest_mem" / "vm1")))
    vmms.append(b)
    b.close(save=False)
    (live.path / "guest_mem" / "vm1.vmstate").write_bytes((live.path / "guest_mem" / "vm0.vmstate").read_bytes())
    with pytest.raises(VmmError, match="belongs to another VM"):
        Vmm.start(_spec(live, engine, guest=str(live.path / "guest_mem" / "vm1")), resume=True)


def test_a_resume_refuses_a_different_vcpu_count(live: Mount, engine: str, vmms: list[Vmm]) -> None:
    a = Vmm.start(_spec(live, engine))
    vmms.append(a)
    _run_until(a, 10)
    a.close(save=True)
    with pytest.raises(VmmError, match="1 vCPUs, the VM 2"):
        Vmm.start(_spec(live, engine, vcpus=2), resume=True)


def test_a_guest_file_it_may_not_write_is_refused(live: Mount) -> None:
    with pytest.raises(VmmError, match="cannot open guest RAM .* for writing"):
        Vmm.start(_spec(live, "unicorn", guest=str(live.path / "iommu" / "root-pgtables")))


def test_a_guest_file_of_another_size_is_refused(live: Mount) -> None:
    (live.path / "guest_mem" / "vm0").write_bytes(b"\0" * MiB)
    with pytest.raises(VmmError, match="is 1048576 bytes, not the 16777216 asked for"):
        Vmm.start(_spec(live, "unicorn"))


def test_the_image_is_clean_after_a_vm_stopped(live: Mount, engine: str, vmms: list[Vmm]) -> None:
    vmm = Vmm.start(_spec(live, engine))
    vmms.append(vmm)
    _run_until(vmm, 10)
    vmm.close(save=True)
    assert live.unmount() == 0
    status, findings = fsck.check_image(str(live.image))
    assert status == 0, findings


def test_the_vmm_example_runs_a_live_update_and_verifies(image: Path, tmp_path: Path, engine: str) -> None:
    assert len((Path(__file__).resolve().parents[2] / "examples" / "vmm.py").read_text().splitlines()) < 150
    r = run_example("vmm.py", image, tmp_path, engine)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout.splitlines()
    assert out[0].startswith(f"running on {engine}") and any(line.startswith("resumed:") for line in out)
    assert out[-1] == "every invariant holds and the guest continued"
