"""The KVM engine (pkfuse.vmm.kvm, vcpu, vm) on the real /dev/kvm.

Guests are tiny ring-3 programs assembled by hand into RAM at GUEST_TEXT_GPA
over ``boot.write_boot``'s structures (the counter guest: vCPU i increments
its counter at VCPU_STATE[i], checking first that its register copy in RCX
equals RAM, ``ud2`` if not -- so a vCPU restored from registers that disagree
with RAM triple-faults), and the real guest (``pkfuse.vmm.guest``) when it
builds. Every VM is closed by a fixture, threads joined, also on failure.
Measurements print (``-s``); nothing asserts a timing.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import shutil
import signal
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from pkfuse.vmm import abi, boot, cpustate, kvm, vcpu
from pkfuse.vmm.engine import EngineError
from pkfuse.vmm.memory import GuestMemory
from pkfuse.vmm.vm import Vm


def _have_kvm() -> bool:
    try:
        os.close(os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC))
        return True
    except OSError:
        return False


needs_kvm = pytest.mark.skipif(not _have_kvm(), reason="no usable /dev/kvm: the KVM engine needs KVM")

RAM_SIZE = 16 * abi.MiB
MMIO_GPA = 0x3FE00000  #: mapped by the guest's page tables (the test adds the PD entry), no memory slot there


# ------------------------------------------------------------------ a little assembler
class Asm:
    """x86-64 bytes with labels and rel8 jumps (enough for the guests here)."""

    def __init__(self) -> None:
        self.code = bytearray()
        self.labels: dict[str, int] = {}
        self.fixups: list[tuple[int, str]] = []

    def emit(self, *parts: bytes) -> Asm:
        for p in parts:
            self.code += p
        return self

    def label(self, name: str) -> Asm:
        self.labels[name] = len(self.code)
        return self

    def jcc8(self, opcode: int, target: str) -> Asm:
        self.code += bytes([opcode, 0])
        self.fixups.append((len(self.code), target))
        return self

    def assemble(self) -> bytes:
        for end, target in self.fixups:
            d = self.labels[target] - end
            assert -128 <= d < 128
            self.code[end - 1] = d & 0xFF
        return bytes(self.code)


JNE, JNZ, JMP = 0x75, 0x75, 0xEB
UD2 = b"\x0f\x0b"


def imm32(v: int) -> bytes:
    return struct.pack("<I", v)


def imm64(v: int) -> bytes:
    return struct.pack("<Q", v)


def counter_guest(out_mask: int | None = 0xFFFF) -> bytes:
    """vCPU i: RBX = &VCPU_STATE[i].counter, RAX = its copy of the counter; loop { RDX = RAX + 1; lock cmpxchg:
    store RDX only if RAM still holds RAX, else ud2; RAX = RDX; every out_mask + 1 steps OUT PORT_STARTED, EAX }
    (no OUT at all when out_mask is None).

    The check and the store are one instruction, so registers that disagree with RAM -- older or newer, paused
    at any instruction -- fail the next cmpxchg: the guest triple-faults instead of rolling RAM back. At every
    instruction RAM holds RAX or RAX + 1 (between the cmpxchg and the copy back)."""
    a = Asm().emit(b"\x48\x89\xfb",  # mov rbx, rdi
                   b"\x48\xc1\xe3\x08",  # shl rbx, 8  (VCPU_STATE_STRIDE)
                   b"\x48\x81\xc3" + imm32(abi.VCPU_STATE_GPA),  # add rbx, VCPU_STATE_GPA
                   b"\x48\x8b\x03")  # mov rax, [rbx]
    a.label("loop").emit(b"\x48\x8d\x50\x01",  # lea rdx, [rax + 1]
                         b"\xf0\x48\x0f\xb1\x13").jcc8(JNE, "fail")  # lock cmpxchg [rbx], rdx; jne fail
    a.emit(b"\x48\x89\xd0")  # mov rax, rdx
    if out_mask is not None:
        a.emit(b"\xa9" + imm32(out_mask)).jcc8(JNZ, "loop")  # test eax, mask; jnz loop
        a.emit(b"\xba" + imm32(abi.PORT_STARTED), b"\xef")  # mov edx, port; out dx, eax
    a.jcc8(JMP, "loop")
    a.label("fail").emit(UD2)
    return a.assemble()


def in_step(regs: kvm.kvm_regs, ram: GuestMemory, vcpu: int) -> bool:
    """The counter guest's invariant: RAM holds its RAX or RAX + 1."""
    return counter(ram, vcpu) - regs.rax in (0, 1)


def fill_guest(dest: int, length: int, value: int) -> bytes:
    """loop { rep stosq of value over [dest, dest + length); OUT PORT_DONE, EAX }."""
    a = Asm().label("pass").emit(b"\x48\xbf" + imm64(dest), b"\x48\xb9" + imm64(length // 8),
                                 b"\x48\xb8" + imm64(value), b"\xf3\x48\xab",  # mov rdi, rcx, rax; rep stosq
                                 b"\xba" + imm32(abi.PORT_DONE), b"\xef").jcc8(JMP, "pass")
    return a.assemble()


def counter(ram: GuestMemory, vcpu: int) -> int:
    at = abi.VCPU_STATE_GPA + vcpu * abi.VCPU_STATE_STRIDE
    return int(ram.array[at:at + 8].view("<u8")[0])


# ------------------------------------------------------------------ fixtures
class Ports:
    """The port handler: records every OUT; ``stop`` decides per OUT whether the vCPU stops there."""

    def __init__(self, stop: Callable[[int, int, int], bool] = lambda v, p, x: False) -> None:
        self.outs: list[tuple[int, int, int, int]] = []  # (vcpu, port, value, perf_counter_ns)
        self.stop = stop
        self.cond = threading.Condition()

    def __call__(self, vcpu: int, port: int, value: int) -> bool:
        with self.cond:
            self.outs.append((vcpu, port, value, time.perf_counter_ns()))
            self.cond.notify_all()
        return not self.stop(vcpu, port, value)

    def wait(self, pred: Callable[[list[tuple[int, int, int, int]]], bool], timeout: float = 10.0) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: pred(self.outs), timeout), f"port writes so far: {self.outs[-5:]}"


@pytest.fixture
def ram_file(tmp_path: Path) -> Path:
    p = tmp_path / "guest.ram"
    with open(p, "wb") as f:
        f.truncate(RAM_SIZE)
    return p


@pytest.fixture
def ram(ram_file: Path) -> Iterator[GuestMemory]:
    fd = os.open(ram_file, os.O_RDWR | os.O_CLOEXEC)
    try:
        mem = GuestMemory.of_file(fd, RAM_SIZE)
    finally:
        os.close(fd)
    yield mem
    mem.close()


@pytest.fixture
def vms() -> Iterator[Callable[..., Vm]]:
    """``vms(ram, nr_vcpus, on_port)``: a Vm closed at teardown (threads joined), whatever happened."""
    made: list[Vm] = []

    def make(ram: GuestMemory, nr_vcpus: int, on_port: Callable[[int, int, int], bool]) -> Vm:
        v = Vm(ram, nr_vcpus, on_port)
        made.append(v)
        return v

    yield make
    for v in made:
        v.close()
    for t in threading.enumerate():
        assert not t.name.startswith("kvm-vcpu"), f"{t.name} still alive after close"


def load(ram: GuestMemory, text: bytes, nr_vcpus: int = 1, **params: object) -> np.ndarray:
    return boot.write_boot(ram.array, boot.GuestParams(nr_vcpus=nr_vcpus, ram_size=RAM_SIZE, **params), text,
                           fresh=True)


def wait_stopped(vm: Vm, n: int, timeout: float = 10.0) -> dict[int, str]:
    deadline = time.monotonic() + timeout
    while len(vm.stopped()) < n:
        assert time.monotonic() < deadline, f"stopped so far: {vm.stopped()}"
        time.sleep(0.002)
    return vm.stopped()


def wait_until(pred: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline
        time.sleep(0.002)


# ------------------------------------------------------------------ the uAPI layer, no KVM needed
def test_struct_sizes_and_ioctl_numbers_match_the_kernel_headers(tmp_path: Path) -> None:
    """Sizes and ioctl numbers as the installed uAPI headers compute them (a C program prints them)."""
    names = ["KVM_GET_API_VERSION", "KVM_CREATE_VM", "KVM_GET_MSR_INDEX_LIST", "KVM_CHECK_EXTENSION",
             "KVM_GET_VCPU_MMAP_SIZE", "KVM_GET_SUPPORTED_CPUID", "KVM_CREATE_VCPU", "KVM_SET_USER_MEMORY_REGION",
             "KVM_SET_TSS_ADDR", "KVM_SET_IDENTITY_MAP_ADDR", "KVM_RUN", "KVM_GET_REGS", "KVM_SET_REGS",
             "KVM_GET_SREGS", "KVM_SET_SREGS", "KVM_GET_MSRS", "KVM_SET_MSRS", "KVM_SET_CPUID2", "KVM_GET_CPUID2",
             "KVM_GET_MP_STATE", "KVM_SET_MP_STATE", "KVM_GET_VCPU_EVENTS", "KVM_SET_VCPU_EVENTS",
             "KVM_GET_DEBUGREGS", "KVM_SET_DEBUGREGS", "KVM_GET_XSAVE", "KVM_SET_XSAVE", "KVM_GET_XCRS",
             "KVM_SET_XCRS", "KVM_GET_XSAVE2", "KVM_CAP_IMMEDIATE_EXIT", "KVM_CAP_XSAVE2", "KVM_CAP_XCRS",
             "KVM_CAP_VCPU_EVENTS", "KVM_CAP_DEBUGREGS", "KVM_CAP_MP_STATE", "KVM_CAP_EXT_CPUID",
             "KVM_EXIT_IO", "KVM_EXIT_MMIO", "KVM_EXIT_SHUTDOWN", "KVM_EXIT_FAIL_ENTRY", "KVM_EXIT_INTERNAL_ERROR"]
    structs = ["kvm_regs", "kvm_sregs", "kvm_segment", "kvm_userspace_memory_region", "kvm_xsave", "kvm_msrs",
               "kvm_msr_entry", "kvm_msr_list", "kvm_cpuid2", "kvm_cpuid_entry2", "kvm_xcrs", "kvm_vcpu_events",
               "kvm_mp_state", "kvm_debugregs", "kvm_run"]
    offsets = [("kvm_run", "immediate_exit"), ("kvm_run", "exit_reason"), ("kvm_run", "io"), ("kvm_run", "mmio"),
               ("kvm_run", "kvm_valid_regs"), ("kvm_sregs", "efer"), ("kvm_vcpu_events", "exception_payload")]
    if shutil.which("gcc") is None or not Path("/usr/include/linux/kvm.h").exists():
        pytest.skip("no gcc or no /usr/include/linux/kvm.h to compare with")
    src = tmp_path / "sizes.c"
    src.write_text("#include <stdio.h>\n#include <stddef.h>\n#include <linux/kvm.h>\nint main(void){\n"
                   + "".join(f'printf("{n} %lu\\n", (unsigned long){n});\n' for n in names)
                   + "".join(f'printf("{s} %zu\\n", sizeof(struct {s}));\n' for s in structs)
                   + "".join(f'printf("{s}.{f} %zu\\n", offsetof(struct {s}, {f}));\n' for s, f in offsets)
                   + "return 0;}\n")
    exe = tmp_path / "sizes"
    subprocess.run(["gcc", "-o", str(exe), str(src)], check=True, capture_output=True)
    out = dict(line.split() for line in subprocess.run([str(exe)], check=True, capture_output=True,
                                                       text=True).stdout.splitlines())
    for n in names:
        assert getattr(kvm, n) == int(out[n]), n
    for s in structs:
        assert ctypes.sizeof(getattr(kvm, s)) == int(out[s]), s
    for s, f in offsets:
        assert getattr(getattr(kvm, s), f).offset == int(out[f"{s}.{f}"]), f"{s}.{f}"
    # the KVM blob declares the same sizes
    for name, size in cpustate.KVM_SECTION_SIZES.items():
        assert ctypes.sizeof(getattr(kvm, f"kvm_{name}")) == size


def test_struct_sizes_from_the_notes() -> None:
    assert [ctypes.sizeof(t) for t in (kvm.kvm_regs, kvm.kvm_sregs, kvm.kvm_segment,
                                       kvm.kvm_userspace_memory_region, kvm.kvm_xsave)] == [144, 312, 24, 32, 4096]
    assert kvm.kvm_run.exit_reason.offset == 8 and kvm.kvm_run.io.offset == 32
    assert (kvm.KVM_GET_REGS, kvm.KVM_SET_USER_MEMORY_REGION, kvm.KVM_RUN) == (0x8090AE81, 0x4020AE46, 0xAE80)


def test_no_dev_kvm_is_one_line(ram: GuestMemory) -> None:
    with pytest.raises(EngineError) as e:
        Vm(ram, 1, Ports(), device="/nonexistent/kvm")
    assert "\n" not in str(e.value) and "/nonexistent/kvm" in str(e.value)


@needs_kvm
def test_capability_check_names_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    fd = kvm.open_kvm()
    try:
        caps = kvm.check_capabilities(fd, 2)
        assert {name for name, _ in kvm.REQUIRED_CAPABILITIES.values()} <= set(caps)
        real = kvm.check_extension
        monkeypatch.setattr(kvm, "check_extension",
                            lambda f, cap: 0 if cap == kvm.KVM_CAP_IMMEDIATE_EXIT else real(f, cap))
        with pytest.raises(EngineError, match=r"^kvm: KVM_CAP_IMMEDIATE_EXIT is missing \(needed for pause") as e:
            kvm.check_capabilities(fd)
        assert "\n" not in str(e.value)
        monkeypatch.setattr(kvm, "check_extension", real)
        monkeypatch.setattr(kvm, "get_api_version", lambda f: 11)
        with pytest.raises(EngineError, match="KVM_GET_API_VERSION is 11"):
            kvm.check_capabilities(fd)
        monkeypatch.undo()
        with pytest.raises(EngineError, match="5000 vCPUs asked"):
            kvm.check_capabilities(fd, 5000)
    finally:
        os.close(fd)


# ------------------------------------------------------------------ the engine
@needs_kvm
def test_vcpu_starts_in_64_bit_mode_at_cpl3(ram: GuestMemory, vms: Callable[..., Vm]) -> None:
    load(ram, counter_guest(None), nr_vcpus=2)
    vm = vms(ram, 2, Ports())
    vm.boot()
    for i, v in enumerate(vm.vcpus):
        r, s = v.get_regs(), v.get_sregs()
        assert (r.rip, r.rsp, r.rdi, r.rsi) == (abi.GUEST_TEXT_GPA, abi.STACK_TOP - i * abi.STACK_SIZE, i,
                                               abi.CONFIG_GPA)
    vm.start()
    wait_until(lambda: counter(ram, 0) > 1000 and counter(ram, 1) > 1000)
    vm.pause()
    for v in vm.vcpus:
        s = v.get_sregs()
        assert s.cs.dpl == 3 and s.ss.dpl == 3 and s.cs.l == 1 and s.cs.selector == abi.SEL_USER_CODE
        assert s.efer & boot.EFER_LMA and s.efer & boot.EFER_LME
        assert s.cr0 & boot.CR0_PG and s.cr0 & boot.CR0_PE and s.cr4 & boot.CR4_PAE
        assert s.cr3 == abi.PML4_GPA and s.idt.limit == 0
        assert abi.GUEST_TEXT_GPA <= v.get_regs().rip < abi.GUEST_TEXT_GPA + 64
    assert vm.stopped() == {}


@needs_kvm
def test_store_lands_in_the_file_and_out_reaches_on_port(ram: GuestMemory, ram_file: Path,
                                                         vms: Callable[..., Vm]) -> None:
    load(ram, counter_guest(0xFFF))
    ports = Ports(stop=lambda v, p, x: x >= 0x3000)
    vm = vms(ram, 1, ports)
    vm.boot()
    vm.start()
    assert wait_stopped(vm, 1) == {0: "port handler stopped it at OUT 0x510, 0x3000"}
    assert [(v, p, x) for v, p, x, _ in ports.outs] == [(0, abi.PORT_STARTED, 0x1000 * k) for k in (1, 2, 3)]
    # the guest's store is in the file behind the mapping (read through another descriptor, no msync)
    with open(ram_file, "rb") as f:
        f.seek(abi.VCPU_STATE_GPA)
        assert struct.unpack("<Q", f.read(8))[0] == 0x3000
    st = vm.statistics()["vcpus"][0]
    assert st["exits"] == {"io": 3} and st["port_writes"] == 3 and st["state"] == "stopped"
    # stopped after completing the OUT: the RIP is past it (either hypervisor), and it can be saved
    assert len(vm.save()) == 1


@needs_kvm
def test_out_at_cpl3_works_through_the_tss_io_bitmap(ram: GuestMemory, vms: Callable[..., Vm]) -> None:
    """Under PVM the guest reads RFLAGS.IOPL as 0 whatever the VMM set: the OUT is allowed by the TSS's bitmap
    (boot.TSS_IOMAP_OFFSET); on VT-x IOPL reads 3 and allows it first."""
    text = (b"\x9c\x58"  # pushfq; pop rax
            + b"\x48\x89\x04\x25" + imm32(0x3000)  # mov [0x3000], rax
            + b"\xba" + imm32(abi.PORT_DONE) + b"\xef\xeb\xfe")  # mov edx, port; out dx, eax; jmp $
    load(ram, text)
    tss = ram.array[abi.TSS_GPA:abi.TSS_GPA + boot.TSS_LIMIT + 1]
    assert int(tss[0x66:0x68].view("<u2")[0]) == boot.TSS_IOMAP_OFFSET and not tss[0x68:-1].any() and tss[-1] == 0xFF
    ports = Ports(stop=lambda v, p, x: True)
    vm = vms(ram, 1, ports)
    vm.boot()
    vm.start()
    wait_stopped(vm, 1)
    rflags = int(ram.array[0x3000:0x3008].view("<u8")[0])
    assert [o[1] for o in ports.outs] == [abi.PORT_DONE]
    print(f"\n[kvm] RFLAGS as the guest reads it at CPL 3: {rflags:#x} (IOPL {(rflags >> 12) & 3}; the VMM set "
          f"{boot.RFLAGS:#x})")


@needs_kvm
def test_vm_made_off_the_main_thread_needs_the_kick_handler_first(ram: GuestMemory) -> None:
    old = signal.signal(vcpu.KICK_SIGNAL, signal.SIG_DFL)
    try:
        got: list[BaseException] = []

        def make() -> None:
            try:
                Vm(ram, 1, Ports()).close()
            except BaseException as e:  # noqa: BLE001
                got.append(e)

        t = threading.Thread(target=make)
        t.start()
        t.join()
        assert len(got) == 1 and isinstance(got[0], EngineError)
        assert "install_kick_handler() there" in str(got[0]) and "\n" not in str(got[0])
        vcpu.install_kick_handler()
        t = threading.Thread(target=make)
        t.start()
        t.join()
        assert len(got) == 1  # installed from the main thread: a VM can be made anywhere
    finally:
        signal.signal(vcpu.KICK_SIGNAL, old)


@needs_kvm
def test_in_reads_zero_and_mmio_reads_zeros_writes_ignored(ram: GuestMemory, vms: Callable[..., Vm]) -> None:
    text = (b"\x48\xb8" + imm64(0x1122334455667788)  # mov rax, imm64
            + b"\x48\x89\x04\x25" + imm32(MMIO_GPA)  # mov [MMIO_GPA], rax: an MMIO write
            + b"\x48\x89\x04\x25" + imm32(0x3000)  # mov [0x3000], rax: RAM
            + b"\x48\x8b\x04\x25" + imm32(MMIO_GPA + 8)  # mov rax, [MMIO_GPA + 8]: an MMIO read
            + b"\x48\x89\x04\x25" + imm32(0x3008)  # mov [0x3008], rax
            + b"\xba" + imm32(abi.PORT_STARTED) + b"\xed"  # mov edx, port; in eax, dx
            + b"\x48\x89\x04\x25" + imm32(0x3010)  # mov [0x3010], rax
            + b"\xef\xeb\xfe")  # out dx, eax; jmp $
    load(ram, text)
    ram.array[0x3000:0x3018] = 0xAA
    pd_entry = abi.PD_GPA + (MMIO_GPA >> 21) * 8
    ram.array[pd_entry:pd_entry + 8] = np.frombuffer(imm64(MMIO_GPA | boot.PTE_P | boot.PTE_RW | boot.PTE_US
                                                           | boot.PTE_PS), np.uint8)
    ports = Ports(stop=lambda v, p, x: True)
    vm = vms(ram, 1, ports)
    vm.boot()
    vm.start()
    wait_stopped(vm, 1)
    assert list(ram.array[0x3000:0x3018].view("<u8")) == [0x1122334455667788, 0, 0]
    assert [(p, x) for _, p, x, _ in ports.outs] == [(abi.PORT_STARTED, 0)]
    st = vm.statistics()["vcpus"][0]
    assert (st["mmio_writes"], st["mmio_reads"], st["port_reads"], st["port_writes"]) == (1, 1, 1, 1)


@needs_kvm
def test_triple_fault_stops_the_vcpu_and_does_not_hang(ram: GuestMemory, vms: Callable[..., Vm]) -> None:
    load(ram, b"\x90\x90" + UD2, nr_vcpus=2)
    vm = vms(ram, 2, Ports())
    vm.boot()
    vm.start()
    stopped = wait_stopped(vm, 2)
    for i in (0, 1):
        assert stopped[i].startswith("shutdown (triple fault") and f"rip {abi.GUEST_TEXT_GPA + 2:#x}" in stopped[i]
    t = time.perf_counter()
    vm.pause()  # nothing to pause: returns at once
    assert time.perf_counter() - t < 1.0
    assert not any(t.name.startswith("kvm-vcpu") for t in threading.enumerate())
    assert len(vm.save()) == 2


@needs_kvm
def test_an_instruction_kvm_cannot_emulate_stops_with_the_reason(ram: GuestMemory, vms: Callable[..., Vm]) -> None:
    """Ring-0 code (never the guest's) is emulated an instruction at a time under PVM, and its emulator has no
    SSE: KVM_EXIT_INTERNAL_ERROR, a stop naming the instruction. On VT-x ring 0 runs the pxor natively."""
    load(ram, b"\x66\x0f\xef\xc0" + b"\xba" + imm32(abi.PORT_DONE) + b"\xef\xeb\xfe")  # pxor xmm0, xmm0; out
    vm = vms(ram, 1, Ports(stop=lambda v, p, x: True))
    vm.vcpus[0].boot(dataclasses.replace(boot.initial_cpu(0), cs=boot.KERNEL_CODE, ds=boot.KERNEL_DATA))
    vm.start()
    reason = wait_stopped(vm, 1)[0]
    assert reason in (f"port handler stopped it at OUT {abi.PORT_DONE:#x}, 0x0",
                      f"internal error: emulation (suberror 1) at rip {abi.GUEST_TEXT_GPA:#x}, instruction bytes "
                      "66 0f ef c0 ba 11 05 00 00 ef eb fe 00 00 00"), reason
    print(f"\n[kvm] pxor at CPL 0: {reason}")


@needs_kvm
def test_port_handler_error_stops_that_vcpu_only(ram: GuestMemory, vms: Callable[..., Vm]) -> None:
    load(ram, counter_guest(0xFFFF), nr_vcpus=2)

    def stop(v: int, p: int, x: int) -> bool:
        if v == 1:
            raise RuntimeError("device on fire")
        return False

    ports = Ports(stop=stop)
    vm = vms(ram, 2, ports)
    vm.boot()
    vm.start()
    wait_stopped(vm, 1)
    ports.wait(lambda outs: sum(1 for o in outs if o[0] == 0) >= 3)
    assert vm.stopped() == {1: "port handler raised RuntimeError: device on fire (OUT 0x510, 0x10000)"}
    assert vm.running() == [0]


@needs_kvm
def test_a_port_handler_cannot_pause_its_own_vm(ram: GuestMemory, vms: Callable[..., Vm]) -> None:
    load(ram, counter_guest(0xFFFF))
    box: list[Vm] = []
    refusals: list[str] = []

    def handler(v: int, p: int, x: int) -> bool:
        try:
            box[0].pause()
        except EngineError as e:
            refusals.append(str(e))
        return False

    vm = vms(ram, 1, handler)
    box.append(vm)
    vm.boot()
    vm.start()
    wait_stopped(vm, 1)
    assert refusals == ["kvm: pause from a vCPU's own thread (a port handler?) would wait for itself: return "
                        "False from the handler to stop that vCPU"]


@needs_kvm
def test_two_vcpus_run_in_parallel_threads(ram: GuestMemory, vms: Callable[..., Vm]) -> None:
    """No exit at all: were the GIL held in KVM_RUN, neither the other vCPU nor this thread would get to run."""
    load(ram, counter_guest(None), nr_vcpus=2)
    vm = vms(ram, 2, Ports())
    vm.boot()
    vm.start()
    wait_until(lambda: all(v.in_run for v in vm.vcpus) and counter(ram, 0) > 0 and counter(ram, 1) > 0)
    a = [counter(ram, 0), counter(ram, 1)]
    time.sleep(0.2)
    b = [counter(ram, 0), counter(ram, 1)]
    assert all(v.in_run for v in vm.vcpus)  # both inside KVM_RUN at once, still in their first call
    assert b[0] > a[0] and b[1] > a[1], (a, b)
    assert [v.statistics.runs for v in vm.vcpus] == [0, 0]
    vm.pause()
    st = vm.statistics()["vcpus"]
    print(f"\n[kvm] two vCPUs 0.2 s: {(b[0] - a[0]) / 0.2 / 1e9:.2f} and {(b[1] - a[1]) / 0.2 / 1e9:.2f} "
          f"G steps/s; time in KVM_RUN {st[0]['run_ns'] / 1e6:.0f} and {st[1]['run_ns'] / 1e6:.0f} ms")


@needs_kvm
def test_pause_returns_promptly_with_every_vcpu_out_of_kvm_run(ram: GuestMemory, vms: Callable[..., Vm]) -> None:
    load(ram, counter_guest(None), nr_vcpus=2)
    vm = vms(ram, 2, Ports())
    vm.boot()
    vm.start()
    latencies = []
    for _ in range(20):
        wait_until(lambda: all(v.in_run for v in vm.vcpus))
        t = time.perf_counter_ns()
        vm.pause()
        latencies.append(time.perf_counter_ns() - t)
        assert vm.paused() and not any(v.in_run for v in vm.vcpus)
        c = [counter(ram, 0), counter(ram, 1)]
        time.sleep(0.01)
        assert [counter(ram, 0), counter(ram, 1)] == c  # nothing runs the guest
        vm.resume()
        wait_until(lambda: counter(ram, 0) > c[0] and counter(ram, 1) > c[1])
    assert vm.stopped() == {}
    st = vm.statistics()["vcpus"]
    assert all(s["pauses"] == 20 for s in st)
    lat = sorted(latencies)
    print(f"\n[kvm] pause of 2 running vCPUs (kick + immediate_exit re-entry): median {lat[10] / 1e3:.0f} us, "
          f"max {lat[-1] / 1e3:.0f} us; kicks {[s['kicks'] for s in st]} for 20 pauses")


@needs_kvm
def test_pause_works_with_sa_restart_on_the_kick_signal(ram: GuestMemory, vms: Callable[..., Vm]) -> None:
    """KVM_RUN returns -EINTR, which the kernel never restarts: SA_RESTART on the kick changes nothing."""
    load(ram, counter_guest(None))
    vm = vms(ram, 1, Ports())
    vm.boot()
    vm.start()
    signal.siginterrupt(vcpu.KICK_SIGNAL, False)  # sets SA_RESTART on the installed handler
    try:
        for _ in range(5):
            wait_until(lambda: vm.vcpus[0].in_run)
            vm.pause()
            assert vm.paused() and vm.vcpus[0].statistics.exits["intr"] >= 1
            vm.resume()
    finally:
        signal.siginterrupt(vcpu.KICK_SIGNAL, True)
    vm.pause()
    assert vm.vcpus[0].statistics.pauses == 6


@needs_kvm
def test_saved_blob_holds_every_kvm_structure(ram: GuestMemory, vms: Callable[..., Vm]) -> None:
    load(ram, counter_guest(None))
    vm = vms(ram, 1, Ports())
    vm.boot()
    s = cpustate.decode_kvm_vcpu(vm.save()[0], expect_vcpu=0)
    assert list(s) == list(cpustate.KVM_SECTIONS)
    assert len(s["xsave"]) == vm.xsave_size
    msrs = int.from_bytes(s["msrs"][:4], "little")
    assert msrs == len(vm.vcpus[0].msr_indices) > 10
    assert 0x10 in vm.vcpus[0].msr_indices  # IA32_TSC
    assert kvm.kvm_regs.from_buffer_copy(s["regs"]).rip == abi.GUEST_TEXT_GPA
    assert int.from_bytes(s["cpuid"][:4], "little") == vm.supported_cpuid.nent
    assert kvm.kvm_mp_state.from_buffer_copy(s["mp_state"]).mp_state == kvm.KVM_MP_STATE_RUNNABLE
    fd = vm.vcpus[0].fd
    if vm.capabilities["KVM_CAP_XSAVE2"]:  # the XSAVE2 call gives the same region, at the VM's size
        assert kvm.get_xsave2(fd, vm.xsave_size)[:4096] == kvm.get_xsave(fd) == s["xsave"][:4096]
    x = kvm.get_xcrs(fd)
    assert x.nr_xcrs >= 1 and x.xcrs[0].xcr == 0 and x.xcrs[0].value & 1  # XCR0: x87 at least


@needs_kvm
def test_pause_while_exiting_often_completes_io(ram: GuestMemory, vms: Callable[..., Vm]) -> None:
    """A vCPU paused around an OUT: its state is whole (saving and restoring it continues the guest)."""
    load(ram, counter_guest(0x3F), nr_vcpus=2)
    ports = Ports()
    vm = vms(ram, 2, ports)
    vm.boot()
    vm.start()
    for _ in range(20):
        ports.wait(lambda outs: len(outs) > 10)
        vm.pause()
        for v in vm.vcpus:
            assert in_step(v.get_regs(), ram, v.index)
        vm.resume()
    vm.pause()
    assert vm.stopped() == {}


@needs_kvm
def test_save_close_restore_continues_the_counter(ram: GuestMemory, ram_file: Path, tmp_path: Path,
                                                 vms: Callable[..., Vm]) -> None:
    config = load(ram, counter_guest(0xFFFF), nr_vcpus=2)
    uuid = bytes(config["vm_uuid"].tobytes())
    vm = vms(ram, 2, Ports())
    vm.boot()
    vm.start()
    wait_until(lambda: counter(ram, 0) > 1 << 20 and counter(ram, 1) > 1 << 20)
    t0 = time.perf_counter_ns()
    vm.pause()
    t1 = time.perf_counter_ns()
    blobs = vm.save()
    t2 = time.perf_counter_ns()
    state = tmp_path / "vcpus.state"
    cpustate.write_state(state, cpustate.encode("kvm", uuid, RAM_SIZE, blobs))
    t3 = time.perf_counter_ns()
    saved = [counter(ram, 0), counter(ram, 1)]
    regs = [bytes(v.get_regs()) for v in vm.vcpus]
    assert all(in_step(v.get_regs(), ram, v.index) for v in vm.vcpus)
    vm.close()
    ram.close()  # a new mapping of the file, as a new VMM process would make
    fd = os.open(ram_file, os.O_RDWR | os.O_CLOEXEC)
    ram2 = GuestMemory.of_file(fd, RAM_SIZE)
    os.close(fd)
    made: list[Vm] = []
    try:
        assert [counter(ram2, 0), counter(ram2, 1)] == saved
        ports = Ports()
        t4 = time.perf_counter_ns()
        vm2 = vms(ram2, 2, ports)
        made.append(vm2)
        t5 = time.perf_counter_ns()
        loaded = cpustate.read_state(state, expect_uuid=uuid, expect_vcpus=2, expect_engine="kvm",
                                     expect_ram_size=RAM_SIZE)
        vm2.restore(loaded.blobs)
        t6 = time.perf_counter_ns()
        assert [bytes(v.get_regs()) for v in vm2.vcpus] == regs
        vm2.start()
        ports.wait(lambda outs: {0, 1} <= {o[0] for o in outs})
        vm2.pause()
        assert vm2.stopped() == {}  # the guest's check (RAM == RAX) held at every step
        first = {v: min(x for w, _, x, _ in ports.outs if w == v) for v in (0, 1)}
        for v in (0, 1):  # continued from where it stopped: the first OUT is the next multiple of 0x10000
            assert first[v] == (saved[v] | 0xFFFF) + 1
            assert counter(ram2, v) > saved[v]
        print(f"\n[kvm] 2 vCPUs: pause {(t1 - t0) / 1e3:.0f} us, save {(t2 - t1) / 1e3:.0f} us, "
              f"state written durably {(t3 - t2) / 1e3:.0f} us ({state.stat().st_size} bytes); new VM "
              f"{(t5 - t4) / 1e3:.0f} us, read + restore {(t6 - t5) / 1e3:.0f} us")
    finally:
        for v in made:  # before its RAM goes
            v.close()
        ram2.close()


@needs_kvm
def test_restore_of_an_older_state_is_caught_by_the_guest(ram: GuestMemory, vms: Callable[..., Vm]) -> None:
    """Registers older than RAM: the guest's check fails, ud2, a triple fault: a stop, never a silent rollback."""
    load(ram, counter_guest(None))
    vm = vms(ram, 1, Ports())
    vm.boot()
    vm.start()
    wait_until(lambda: counter(ram, 0) > 1000)
    vm.pause()
    old = vm.save()
    vm.resume()
    c = counter(ram, 0)
    wait_until(lambda: counter(ram, 0) > c + 1000)
    vm.close()
    vm2 = vms(ram, 1, Ports())
    vm2.restore(old)
    vm2.start()
    ud2 = abi.GUEST_TEXT_GPA + len(counter_guest(None)) - 2
    assert wait_stopped(vm2, 1)[0] == (f"shutdown (triple fault: the guest has no IDT, so any exception ends it) "
                                       f"at rip {ud2:#x}")


@needs_kvm
def test_restore_refuses_a_blob_of_another_vcpu(ram: GuestMemory, vms: Callable[..., Vm]) -> None:
    load(ram, counter_guest(None), nr_vcpus=2)
    vm = vms(ram, 2, Ports())
    vm.boot()
    blobs = vm.save()
    with pytest.raises(cpustate.CpuStateError, match=r"KVM_VCPU_HEADER\.vcpu at offset 12: the blob of vCPU 1 "
                                                     r"given to vCPU 0"):
        vm.restore(blobs[::-1])
    with pytest.raises(EngineError, match="1 vCPU states for a VM of 2"):
        vm.restore(blobs[:1])
    vm.restore(blobs)


@needs_kvm
def test_save_needs_a_paused_vcpu_and_close_ends_running_threads(ram: GuestMemory, vms: Callable[..., Vm]) -> None:
    load(ram, counter_guest(None), nr_vcpus=2)
    vm = vms(ram, 2, Ports())
    vm.boot()
    vm.start()
    with pytest.raises(EngineError, match="save of vCPU 0 while it is running: pause it first"):
        vm.save()
    t = time.perf_counter()
    vm.close()  # while both run: kicked out and joined
    assert time.perf_counter() - t < 2.0
    assert not any(t.name.startswith("kvm-vcpu") for t in threading.enumerate())
    with pytest.raises(EngineError, match="closed"):
        vm.start()


# ------------------------------------------------------------------ the real guest
def _guest_binary() -> bytes:
    from pkfuse.vmm import guest

    try:
        return guest.load()
    except guest.GuestBuildError as e:
        pytest.skip(f"the guest binary cannot be built here: {e}")


def _state(ram: GuestMemory, vcpu: int) -> np.void:
    at = abi.VCPU_STATE_GPA + vcpu * abi.VCPU_STATE_STRIDE
    return np.frombuffer(ram.array[at:at + abi.VCPU_STATE.itemsize].tobytes(), abi.VCPU_STATE)[0]


@needs_kvm
def test_real_guest_runs_pauses_and_continues_after_restore(ram: GuestMemory, vms: Callable[..., Vm]) -> None:
    """The guest program on KVM: every pause leaves RAM the verifier accepts; save -> close -> restore continues."""
    from pkfuse.vmm import verify

    text = _guest_binary()
    load(ram, text, nr_vcpus=2, dma_every=0, dirty_share=0.25)
    errors = Ports(stop=lambda v, p, x: p == abi.PORT_ERROR)
    vm = vms(ram, 2, errors)
    vm.boot()
    vm.start()
    errors.wait(lambda outs: {(0, abi.PORT_STARTED, 0), (1, abi.PORT_STARTED, 1)} <= {o[:3] for o in outs})
    wait_until(lambda: _state(ram, 0)["counter"] > 1000 and _state(ram, 1)["counter"] > 1000)
    verdicts = []
    for _ in range(5):  # paused anywhere in a step: RAM is one of the states the verifier accepts
        vm.pause()
        verdicts.append(verify.verify(ram.array))
        assert verdicts[-1].ok, verdicts[-1].summary()
        vm.resume()
        time.sleep(0.02)
    vm.pause()
    assert vm.stopped() == {}, [(hex(o[1]), o[2]) for o in errors.outs]
    before = verify.verify(ram.array)
    assert before.ok and not verify.progressed(verdicts[0], before, advanced=True)
    for v in before.vcpus:
        assert v.error == abi.ERROR_NONE and v.started == 1 and v.pages > 0
    blobs = vm.save()
    vm.close()
    ports = Ports(stop=lambda v, p, x: True)
    vm2 = vms(ram, 2, ports)
    vm2.restore(blobs)
    vm2.start()
    wait_until(lambda: all(_state(ram, i)["counter"] > before.vcpus[i].counter + 1000 for i in (0, 1)))
    vm2.pause()
    assert vm2.stopped() == {} and ports.outs == []  # no error port, no second start
    after = verify.verify(ram.array)
    assert after.ok, after.summary()
    assert not verify.progressed(before, after, advanced=True)
    assert [(v.boots, v.started) for v in after.vcpus] == [(v.boots, v.started) for v in before.vcpus]


@needs_kvm
def test_real_guest_fill_mode(ram: GuestMemory, vms: Callable[..., Vm]) -> None:
    text = _guest_binary()
    config = load(ram, text, nr_vcpus=2, mode=abi.MODE_FILL, dma_every=0, dirty_share=0.5,
                  fill_value=0x5A5A_0123_4567_89AB)
    ports = Ports(stop=lambda v, p, x: p in (abi.PORT_DONE, abi.PORT_ERROR))
    vm = vms(ram, 2, ports)
    vm.boot()
    vm.start()
    wait_stopped(vm, 2)
    assert {(o[1], o[2]) for o in ports.outs if o[1] != abi.PORT_STARTED} == {(abi.PORT_DONE, 0), (abi.PORT_DONE, 1)}
    for i in (0, 1):
        gpa, size = abi.dirty_area(config, i)
        assert (ram.array[gpa:gpa + size].view("<u8") == 0x5A5A_0123_4567_89AB).all()


# ------------------------------------------------------------------ measurements (printed, not asserted)
@needs_kvm
@pytest.mark.slow
def test_measure_creation_and_one_vcpu_save_restore(ram: GuestMemory, vms: Callable[..., Vm]) -> None:
    load(ram, counter_guest(None))
    create, pause_resume, restore, kick = [], [], [], []
    for _ in range(5):
        t = time.perf_counter_ns()
        vm = Vm(ram, 1, Ports())
        create.append((time.perf_counter_ns() - t, vm.creation_ns))
        vm.close()
    vm = vms(ram, 1, Ports())
    vm.boot()
    vm.start()
    for _ in range(10):
        wait_until(lambda: vm.vcpus[0].in_run)
        t = time.perf_counter_ns()
        vm.pause()
        blobs = vm.save()
        vm.resume()
        pause_resume.append(time.perf_counter_ns() - t)
        kick.append(vm.vcpus[0].statistics.last_pause_ns)
    vm.pause()
    blobs = vm.save()
    for _ in range(5):
        vm2 = Vm(ram, 1, Ports())
        t = time.perf_counter_ns()
        vm2.restore(blobs)
        restore.append(time.perf_counter_ns() - t)
        vm2.close()
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    c = sorted(create, key=lambda x: x[0])[2]
    print(f"\n[kvm] Vm(16 MiB, 1 vCPU): {c[0] / 1e6:.2f} ms (open + checks + KVM_CREATE_VM "
          f"{c[1]['vm'] / 1e6:.2f}, memslot {c[1]['memslot'] / 1e6:.3f}, vCPU + CPUID + MSR filter "
          f"{c[1]['vcpus'] / 1e6:.2f}); pause + save + resume of 1 vCPU: median {med(pause_resume) / 1e3:.0f} us "
          f"(request to paused in the vCPU thread {med(kick) / 1e3:.0f} us); "
          f"restore of 1 vCPU: median {med(restore) / 1e3:.0f} us ({len(blobs[0])}-byte blob)")


@needs_kvm
@pytest.mark.slow
def test_measure_out_exit_round_trip(ram: GuestMemory, vms: Callable[..., Vm]) -> None:
    """A guest that does nothing but OUT: exits per second through the Python loop and a no-op handler."""
    load(ram, counter_guest(0))  # OUT after every step
    ports = Ports()
    vm = vms(ram, 1, ports)
    vm.boot()
    vm.start()
    ports.wait(lambda outs: len(outs) >= 200)
    t, n = time.perf_counter_ns(), len(ports.outs)
    time.sleep(0.5)
    t2, n2 = time.perf_counter_ns(), len(ports.outs)
    vm.pause()
    st = vm.statistics()["vcpus"][0]
    assert vm.stopped() == {} and st["exits"]["io"] >= n2
    print(f"\n[kvm] OUT exit round trip at CPL 3 (KVM_RUN -> Python -> handler -> KVM_RUN): "
          f"{(t2 - t) / (n2 - n) / 1e3:.0f} us ({(n2 - n) / ((t2 - t) / 1e9):.0f} exits/s); inside KVM_RUN "
          f"{st['run_ns'] / st['runs'] / 1e3:.0f} us a call")


@needs_kvm
@pytest.mark.slow
def test_measure_guest_fill_bandwidth(tmp_path: Path, vms: Callable[..., Vm]) -> None:
    """rep stosq over 8 MiB: first touch of a sparse file, then present pages, vs a host memset of the mapping."""
    size, dest, length, passes = 64 * abi.MiB, 16 * abi.MiB, 32 * abi.MiB, 6
    results = {}
    for populate in (False, True):
        path = tmp_path / f"fill{int(populate)}.ram"
        with open(path, "wb") as f:
            f.truncate(size)
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        mem = GuestMemory.of_file(fd, size)
        os.close(fd)
        try:
            boot.write_boot(mem.array, boot.GuestParams(nr_vcpus=1, ram_size=size),
                            fill_guest(dest, length, 0x0101010101010101), fresh=True)
            if populate:
                t = time.perf_counter_ns()
                mem.populate()
                results["populate"] = time.perf_counter_ns() - t
            ports = Ports(stop=lambda v, p, x: False)
            vm = vms(mem, 1, ports)
            vm.boot()
            t0 = time.perf_counter_ns()
            vm.start()
            ports.wait(lambda outs: len(outs) >= passes)
            vm.pause()
            stamps = [t0] + [o[3] for o in ports.outs[:passes]]
            gbs = [length / (b - a) for a, b in zip(stamps, stamps[1:])]  # bytes/ns = GB/s
            host = []
            for _ in range(passes):
                t = time.perf_counter_ns()
                ctypes.memset(mem.address + dest, 0x02, length)
                host.append(length / (time.perf_counter_ns() - t))
            assert (mem.array[dest:dest + length:4096] == 0x02).all()
            results[populate] = (gbs, host)
            vm.close()
        finally:
            mem.close()
    (first, host0), (popd, host1) = results[False], results[True]
    present = sorted(first[1:] + popd[1:])
    hosts = sorted(host0 + host1)
    print(f"\n[kvm] guest rep stosq over {length >> 20} MiB: first touch {first[0]:.3f} GB/s, after "
          f"MADV_POPULATE_WRITE ({results['populate'] / 1e6:.0f} ms for {size >> 20} MiB) {popd[0]:.2f} GB/s, "
          f"present median {present[len(present) // 2]:.2f} GB/s; host memset of the same mapping median "
          f"{hosts[len(hosts) // 2]:.2f} GB/s (ratio {present[len(present) // 2] / hosts[len(hosts) // 2]:.2f})")
