"""The Unicorn engine: the guest's vCPUs on the Unicorn CPU emulator, where ``/dev/kvm`` is missing.

Implements ``engine.Engine`` over the same guest RAM as the KVM engine: every
vCPU is its own ``Uc`` over one host mapping (``mem_map_ptr`` at
guest-physical 0 of ``ram.address``), so its stores land in the file, and the
other vCPUs, the verifier and a DMA device see them at once. Each vCPU runs in
its own thread (``emu_start`` releases the GIL; the two cores run two vCPUs).

How a vCPU gets to ``boot.initial_cpu`` (Unicorn has no call that sets the
CPL, and in 64-bit mode a write of CS or SS sets only the selector): CR4,
CR3, EFER, GDTR, IDTR, TR and LDTR are written, then a trampoline in a page
private to the engine (mapped above guest RAM, beyond the guest's page
tables, so the guest cannot reach it) runs at CPL 0 with paging off: it
loads DS/ES/FS/GS with ``mov`` and does an ``iretq`` whose frame holds the
target CS, SS, RSP and RFLAGS, so the CPU loads CS and SS from the guest's
own GDT and drops to the CPL of CS (3), with IOPL 3 from RFLAGS. Emulation
stops at the trampoline's landing address; then CR0 is written with PG set
(paging on, through the guest's page tables: U/S and 2 MiB leaves are
honoured) and the general registers and RIP are set. ``restore`` goes the
same way with the saved values.

What Unicorn does not model that KVM does: no APIC, no interrupts and no
timer (the guest uses none); no XSAVE state beyond SSE (the guest is built
with ``-mgeneral-regs-only``; x87 is not saved); a CPU exception is not a
triple fault through a missing IDT but an ``UC_HOOK_INTR`` callback, which
this engine turns into a stop with the vector (the same outcome: the vCPU
leaves for good); ``pause`` stops at a translation-block boundary, which is
an instruction boundary after any OUT already handled (the OUT hook runs
inside the instruction). The TSS's I/O bitmap is never consulted (IOPL 3).

Speed (unicorn 2.1.4 on the 2-core development machine): the guest's step
with one page of the dirty area per step 32,000-43,000 steps/s per vCPU
(0.13-0.18 GB/s of pattern stores), 6.2-6.4 M steps/s without a dirty area;
two vCPUs run on both cores at once (2.0 CPUs busy, each at about the speed
of one alone); mode FILL's ``rep stosq`` 0.14-0.18 GB/s on one vCPU,
0.19-0.27 GB/s on two (RAM pre-faulted or not makes little difference: the
emulation is the cost). Enough for every test; not a benchmark of the guest
(KVM runs it natively at CPL 3).

The saved state of a vCPU is one ``UNICORN_VCPU_STATE`` record (magic,
version, size, then the registers); ``restore`` refuses another engine's
blob, another version or size.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

import numpy as np
from unicorn import (
    UC_ARCH_X86,
    UC_ERR_INSN_INVALID,
    UC_HOOK_INSN,
    UC_HOOK_INTR,
    UC_MODE_64,
    UC_PROT_ALL,
    Uc,
    UcError,
)
from unicorn import x86_const as x86

from . import abi, boot
from .engine import EngineError, GuestRam, PortHandler

log = logging.getLogger(__name__)

MSR_EFER = 0xC0000080
TRAMPOLINE_SIZE = 0x1000
_FRAME = 0xF00  #: the iretq frame's offset in the trampoline page
_LANDING = 0x800  #: where the iretq lands (emulation stops there)
_NEVER = 0xC00  #: emu_start's `until` while the guest runs: private, so never reached

#: SDM encoding order (rax, rcx, rdx, rbx, rsp, rbp, rsi, rdi, r8..r15)
GPRS = (x86.UC_X86_REG_RAX, x86.UC_X86_REG_RCX, x86.UC_X86_REG_RDX, x86.UC_X86_REG_RBX,
        x86.UC_X86_REG_RSP, x86.UC_X86_REG_RBP, x86.UC_X86_REG_RSI, x86.UC_X86_REG_RDI,
        x86.UC_X86_REG_R8, x86.UC_X86_REG_R9, x86.UC_X86_REG_R10, x86.UC_X86_REG_R11,
        x86.UC_X86_REG_R12, x86.UC_X86_REG_R13, x86.UC_X86_REG_R14, x86.UC_X86_REG_R15)
#: the data segments the trampoline loads with mov (CS and SS come through iretq)
DATA_SEGMENTS = (("ds", x86.UC_X86_REG_DS, 0xD8), ("es", x86.UC_X86_REG_ES, 0xC0),
                 ("fs", x86.UC_X86_REG_FS, 0xE0), ("gs", x86.UC_X86_REG_GS, 0xE8))
XMMS = tuple(x86.UC_X86_REG_XMM0 + i for i in range(16))

STATE_MAGIC = int.from_bytes(b"PKUCVCPU", "little")
STATE_VERSION = 1

#: a vCPU's saved state: what the guest depends on, little-endian
UNICORN_VCPU_STATE = np.dtype([
    ("magic", "<u8"),  # STATE_MAGIC
    ("version", "<u4"),  # STATE_VERSION
    ("size", "<u4"),  # this record's size
    ("gprs", "<u8", (16,)),  # GPRS order
    ("rip", "<u8"),
    ("rflags", "<u8"),
    ("cs", "<u2"), ("ss", "<u2"), ("ds", "<u2"), ("es", "<u2"), ("fs", "<u2"), ("gs", "<u2"),
    ("reserved0", "<u4"),
    ("fs_base", "<u8"),
    ("gs_base", "<u8"),
    ("cr0", "<u8"), ("cr2", "<u8"), ("cr3", "<u8"), ("cr4", "<u8"),
    ("efer", "<u8"),
    ("gdt_base", "<u8"), ("gdt_limit", "<u4"),
    ("idt_limit", "<u4"), ("idt_base", "<u8"),
    ("tr_base", "<u8"), ("tr_limit", "<u4"), ("tr_flags", "<u4"),
    ("tr_selector", "<u2"), ("reserved1", "<u2"),
    ("mxcsr", "<u4"),
    ("xmm", "<u8", (16, 2)),
])
assert UNICORN_VCPU_STATE.itemsize == 536

_VECTORS = {0: "#DE", 1: "#DB", 3: "#BP", 4: "#OF", 5: "#BR", 6: "#UD", 7: "#NM", 8: "#DF", 10: "#TS",
            11: "#NP", 12: "#SS", 13: "#GP", 14: "#PF", 16: "#MF", 17: "#AC", 18: "#MC", 19: "#XM"}


def _seg_flags(s: boot.Segment) -> int:
    """A segment's attributes as QEMU keeps them (the descriptor's high dword, bits 8-23)."""
    return (s.type << 8 | s.s << 12 | s.dpl << 13 | s.present << 15 | s.l << 21 | s.db << 22 | s.g << 23)


def _trampoline(selectors: dict[str, int]) -> bytes:
    """mov ax, sel; mov <seg>, ax for DS/ES/FS/GS; iretq."""
    code = b""
    for name, _, modrm in DATA_SEGMENTS:
        code += b"\x66\xb8" + selectors[name].to_bytes(2, "little") + bytes((0x8E, modrm))
    return code + b"\x48\xcf"


class _Vcpu:
    def __init__(self, index: int, uc: Uc) -> None:
        self.index = index
        self.uc = uc
        self.rip = 0
        self.ready = False  #: booted or restored
        self.thread: threading.Thread | None = None
        self.in_guest = False  #: inside emu_start (or about to be)
        self.paused = False  #: parked by pause()
        self.stop_reason: str | None = None  #: set by a hook before it stops the emulation
        self.stopped: str | None = None  #: left for good, why
        self.out_count = 0


class Emulator:
    """The guest's vCPUs on Unicorn over ``ram`` (see the module docstring)."""

    name = "unicorn"

    def __init__(self, ram: GuestRam, nr_vcpus: int, on_port: PortHandler) -> None:
        if not 1 <= nr_vcpus <= abi.MAX_VCPUS:
            raise EngineError(f"{nr_vcpus} vCPUs: the guest supports 1 to {abi.MAX_VCPUS}")
        if ram.size % abi.PAGE_SIZE or ram.address % abi.PAGE_SIZE:
            raise EngineError(f"guest RAM at {ram.address:#x} (+{ram.size:#x}) is not page-aligned")
        self.nr_vcpus = nr_vcpus
        self.ram = ram
        self.on_port = on_port
        self.trampoline = ram.size  #: the private page, just above guest RAM
        self._cond = threading.Condition()
        self._want_pause = True  #: vCPUs park until start()/resume()
        self._closing = False
        self._closed = False
        self._started = False
        self._vcpus: list[_Vcpu] = []
        try:
            for i in range(nr_vcpus):
                self._vcpus.append(_Vcpu(i, self._make_uc(i)))
        except UcError as e:
            raise EngineError(f"unicorn: creating vCPU {len(self._vcpus)}: {e}") from None

    # ---------------------------------------------------------------- construction
    def _make_uc(self, index: int) -> Uc:
        uc = Uc(UC_ARCH_X86, UC_MODE_64)
        uc.mem_map_ptr(0, self.ram.size, UC_PROT_ALL, self.ram.address)
        uc.mem_map(self.trampoline, TRAMPOLINE_SIZE, UC_PROT_ALL)
        uc.hook_add(UC_HOOK_INSN, self._hook_out, index, 1, 0, x86.UC_X86_INS_OUT)
        uc.hook_add(UC_HOOK_INSN, self._hook_in, index, 1, 0, x86.UC_X86_INS_IN)
        uc.hook_add(UC_HOOK_INTR, self._hook_intr, index)
        return uc

    # ---------------------------------------------------------------- hooks (in the vCPU's thread)
    def _hook_out(self, uc: Uc, port: int, size: int, value: int, index: int) -> None:
        v = self._vcpus[index]
        v.out_count += 1
        if not self.on_port(index, port, value):
            v.stop_reason = f"the VMM stopped it at OUT {value:#x} to port {port:#x}"
            uc.emu_stop()

    def _hook_in(self, uc: Uc, port: int, size: int, index: int) -> int:
        self._vcpus[index].stop_reason = f"IN from port {port:#x}: no device answers IN"
        uc.emu_stop()
        return (1 << (8 * size)) - 1

    def _hook_intr(self, uc: Uc, intno: int, index: int) -> None:
        rip = uc.reg_read(x86.UC_X86_REG_RIP)
        self._vcpus[index].stop_reason = (f"shutdown: CPU exception {intno} ({_VECTORS.get(intno, 'interrupt')}) "
                                          f"at rip {rip:#x} with no IDT (a triple fault)")
        uc.emu_stop()

    # ---------------------------------------------------------------- CPU state
    def _enter(self, v: _Vcpu, r: np.void) -> None:
        """Put ``v`` at the state ``r`` (UNICORN_VCPU_STATE): the trampoline to CS's CPL, then paging on."""
        uc = v.uc
        try:
            uc.reg_write(x86.UC_X86_REG_CR0, boot.CR0_PE | boot.CR0_ET)  # paging off for the trampoline
            uc.reg_write(x86.UC_X86_REG_CR4, int(r["cr4"]))
            uc.reg_write(x86.UC_X86_REG_CR3, int(r["cr3"]))
            uc.msr_write(MSR_EFER, int(r["efer"]))
            uc.reg_write(x86.UC_X86_REG_GDTR, (0, int(r["gdt_base"]), int(r["gdt_limit"]), 0))
            uc.reg_write(x86.UC_X86_REG_IDTR, (0, int(r["idt_base"]), int(r["idt_limit"]), 0))
            uc.reg_write(x86.UC_X86_REG_TR, (int(r["tr_selector"]), int(r["tr_base"]), int(r["tr_limit"]),
                                             int(r["tr_flags"])))
            uc.reg_write(x86.UC_X86_REG_LDTR, (0, 0, 0, 0))
            t = self.trampoline
            code = _trampoline({name: int(r[name]) for name, _, _ in DATA_SEGMENTS})
            frame = np.array([t + _LANDING, int(r["cs"]), int(r["rflags"]), int(r["gprs"][4]), int(r["ss"])],
                             np.uint64)
            uc.mem_write(t, code)
            uc.mem_write(t + _FRAME, frame.tobytes())
            uc.reg_write(x86.UC_X86_REG_RSP, t + _FRAME)
            uc.emu_start(t, t + _LANDING)
            if v.stop_reason is not None:
                raise EngineError(f"unicorn: vCPU {v.index}: the trampoline to CPL 3 failed: {v.stop_reason}")
            cs, ss = uc.reg_read(x86.UC_X86_REG_CS), uc.reg_read(x86.UC_X86_REG_SS)
            if (cs, ss) != (int(r["cs"]), int(r["ss"])):
                raise EngineError(f"unicorn: vCPU {v.index}: the iretq to CS {int(r['cs']):#x} SS {int(r['ss']):#x} "
                                  f"left CS {cs:#x} SS {ss:#x}")
            uc.reg_write(x86.UC_X86_REG_CR0, int(r["cr0"]))
            uc.reg_write(x86.UC_X86_REG_CR2, int(r["cr2"]))
            uc.reg_write(x86.UC_X86_REG_FS_BASE, int(r["fs_base"]))
            uc.reg_write(x86.UC_X86_REG_GS_BASE, int(r["gs_base"]))
            uc.reg_write(x86.UC_X86_REG_MXCSR, int(r["mxcsr"]))
            for reg, (lo, hi) in zip(XMMS, r["xmm"]):
                uc.reg_write(reg, int(lo) | int(hi) << 64)
            for reg, value in zip(GPRS, r["gprs"]):
                uc.reg_write(reg, int(value))
            uc.reg_write(x86.UC_X86_REG_RIP, int(r["rip"]))
        except UcError as e:
            raise EngineError(f"unicorn: setting vCPU {v.index}'s state: {e}") from None
        v.rip = int(r["rip"])
        v.ready = True
        v.stopped = v.stop_reason = None

    def _read(self, v: _Vcpu) -> bytes:
        uc = v.uc
        r = np.zeros((), UNICORN_VCPU_STATE)
        r["magic"], r["version"], r["size"] = STATE_MAGIC, STATE_VERSION, UNICORN_VCPU_STATE.itemsize
        r["gprs"] = [uc.reg_read(reg) for reg in GPRS]
        r["rip"], r["rflags"] = uc.reg_read(x86.UC_X86_REG_RIP), uc.reg_read(x86.UC_X86_REG_RFLAGS)
        for name, reg in (("cs", x86.UC_X86_REG_CS), ("ss", x86.UC_X86_REG_SS), ("ds", x86.UC_X86_REG_DS),
                          ("es", x86.UC_X86_REG_ES), ("fs", x86.UC_X86_REG_FS), ("gs", x86.UC_X86_REG_GS)):
            r[name] = uc.reg_read(reg)
        r["fs_base"], r["gs_base"] = uc.reg_read(x86.UC_X86_REG_FS_BASE), uc.reg_read(x86.UC_X86_REG_GS_BASE)
        for name in ("cr0", "cr2", "cr3", "cr4"):
            r[name] = uc.reg_read(getattr(x86, f"UC_X86_REG_{name.upper()}"))
        r["efer"] = uc.msr_read(MSR_EFER)
        _, r["gdt_base"], r["gdt_limit"], _ = uc.reg_read(x86.UC_X86_REG_GDTR)
        _, r["idt_base"], r["idt_limit"], _ = uc.reg_read(x86.UC_X86_REG_IDTR)
        r["tr_selector"], r["tr_base"], r["tr_limit"], r["tr_flags"] = uc.reg_read(x86.UC_X86_REG_TR)
        r["mxcsr"] = uc.reg_read(x86.UC_X86_REG_MXCSR)
        r["xmm"] = [(x & (2**64 - 1), x >> 64) for x in (uc.reg_read(reg) for reg in XMMS)]
        return r.tobytes()

    @staticmethod
    def _initial(index: int) -> np.void:
        c = boot.initial_cpu(index)
        r = np.zeros((), UNICORN_VCPU_STATE)
        r["magic"], r["version"], r["size"] = STATE_MAGIC, STATE_VERSION, UNICORN_VCPU_STATE.itemsize
        gprs = np.zeros(16, np.uint64)
        gprs[4], gprs[6], gprs[7] = c.rsp, c.rsi, c.rdi
        r["gprs"], r["rip"], r["rflags"] = gprs, c.rip, c.rflags
        r["cs"], r["ss"] = c.cs.selector, c.ds.selector
        r["ds"] = r["es"] = r["fs"] = r["gs"] = c.ds.selector
        r["cr0"], r["cr3"], r["cr4"], r["efer"] = c.cr0, c.cr3, c.cr4, c.efer
        r["gdt_base"], r["gdt_limit"] = c.gdt
        r["idt_base"], r["idt_limit"] = c.idt
        r["tr_selector"], r["tr_base"], r["tr_limit"] = c.tr.selector, c.tr.base, c.tr.limit
        r["tr_flags"] = _seg_flags(c.tr)
        r["mxcsr"] = 0x1F80
        return r[()]

    # ---------------------------------------------------------------- Engine
    def boot(self) -> None:
        """Every vCPU at its first instruction (``boot.initial_cpu``): a cold boot."""
        self._check_not_started("boot")
        for v in self._vcpus:
            self._enter(v, self._initial(v.index))

    def restore(self, states: Sequence[bytes]) -> None:
        """Every vCPU from ``states`` (``save`` of a Unicorn engine, any process)."""
        self._check_not_started("restore")
        if len(states) != self.nr_vcpus:
            raise EngineError(f"restore: {len(states)} saved states for {self.nr_vcpus} vCPUs")
        records = []
        for i, blob in enumerate(states):
            if len(blob) != UNICORN_VCPU_STATE.itemsize:
                raise EngineError(f"restore: vCPU {i}'s state is {len(blob)} bytes, a Unicorn state is "
                                  f"{UNICORN_VCPU_STATE.itemsize}")
            r = np.frombuffer(blob, UNICORN_VCPU_STATE)[0]
            if int(r["magic"]) != STATE_MAGIC or int(r["size"]) != UNICORN_VCPU_STATE.itemsize:
                raise EngineError(f"restore: vCPU {i}'s state is not a Unicorn vCPU state")
            if int(r["version"]) != STATE_VERSION:
                raise EngineError(f"restore: vCPU {i}'s state is version {int(r['version'])}, this engine reads "
                                  f"version {STATE_VERSION}")
            records.append(r)
        for v, r in zip(self._vcpus, records):
            self._enter(v, r)

    def start(self) -> None:
        """Run every vCPU in its own thread until paused, stopped or closed."""
        self._check_not_started("start")
        if not all(v.ready for v in self._vcpus):
            raise EngineError("start: boot or restore the vCPUs first")
        self._started = True
        with self._cond:
            self._want_pause = False
        for v in self._vcpus:
            v.thread = threading.Thread(target=self._run, args=(v,), name=f"unicorn-vcpu{v.index}", daemon=True)
            v.thread.start()

    def pause(self) -> None:
        """Return once every vCPU is parked between two translation blocks (or has left).

        Called from the port handler (in a vCPU's thread), it does not wait for that vCPU: it
        parks once the handler returns.
        """
        me = threading.current_thread()
        with self._cond:
            self._want_pause = True
            while True:
                busy = [v for v in self._vcpus if v.thread is not None and v.stopped is None and not v.paused]
                for v in busy:
                    if v.in_guest:
                        v.uc.emu_stop()  # a stop just before emu_start begins is lost: hence the loop
                if not [v for v in busy if v.thread is not me]:
                    return
                self._cond.wait(0.005)

    def resume(self) -> None:
        """Run the paused vCPUs again from where they stopped."""
        if self._closed:
            raise EngineError("resume: the engine is closed")
        with self._cond:
            self._want_pause = False
            self._cond.notify_all()

    def save(self) -> list[bytes]:
        """Each vCPU's registers (UNICORN_VCPU_STATE); every vCPU must be paused or stopped."""
        with self._cond:
            running = [v.index for v in self._vcpus if v.thread is not None and v.stopped is None and not v.paused]
        if running:
            raise EngineError(f"save: vCPUs {running} are running: pause first")
        if not all(v.ready for v in self._vcpus):
            raise EngineError("save: a vCPU was never booted or restored")
        return [self._read(v) for v in self._vcpus]

    def stopped(self) -> dict[int, str]:
        with self._cond:
            return {v.index: v.stopped for v in self._vcpus if v.stopped is not None}

    def close(self) -> None:
        """Stop every vCPU, join its thread, release the Unicorn instances; guest RAM stays as it is."""
        if self._closed:
            return
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        me = threading.current_thread()
        for v in self._vcpus:
            if v.thread is me:  # close from the port handler: that thread ends when the handler returns
                v.uc.emu_stop()
                continue
            while v.thread is not None and v.thread.is_alive():
                v.uc.emu_stop()
                v.thread.join(0.005)
        self._closed = True
        if me not in [v.thread for v in self._vcpus]:  # else this thread still uses its Uc: freed with the engine
            self._vcpus_uc_release()

    def statistics(self) -> dict[str, list[int]]:
        """Port writes seen per vCPU."""
        return {"out": [v.out_count for v in self._vcpus]}

    def __enter__(self) -> Emulator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------- internals
    def _check_not_started(self, what: str) -> None:
        if self._closed:
            raise EngineError(f"{what}: the engine is closed")
        if self._started:
            raise EngineError(f"{what}: the vCPUs are already started")

    def _vcpus_uc_release(self) -> None:
        for v in self._vcpus:
            v.uc = None  # type: ignore[assignment]  # the binding releases the handle with the object

    def _run(self, v: _Vcpu) -> None:
        while True:
            with self._cond:
                while self._want_pause and not self._closing:
                    v.paused = True
                    self._cond.notify_all()
                    self._cond.wait()
                v.paused = False
                if self._closing:
                    return
                v.in_guest = True
            reason = None
            try:
                v.uc.emu_start(v.rip, self.trampoline + _NEVER)
            except UcError as e:
                rip = v.uc.reg_read(x86.UC_X86_REG_RIP)
                if e.errno == UC_ERR_INSN_INVALID:  # Unicorn's #UD is an error, not an exception
                    reason = f"shutdown: invalid instruction (#UD) at rip {rip:#x} with no IDT (a triple fault)"
                else:
                    reason = v.stop_reason or f"unicorn: {e} at rip {rip:#x}"
            except Exception as e:  # the port handler raised (the binding re-raises it here)
                reason = f"the port handler raised {type(e).__name__}: {e}"
                log.exception("vCPU %d: port handler", v.index)
            v.rip = v.uc.reg_read(x86.UC_X86_REG_RIP)
            reason = reason or v.stop_reason
            with self._cond:
                v.in_guest = False
                if reason is not None:
                    v.stopped = reason
                    self._cond.notify_all()
                    log.debug("vCPU %d stopped: %s", v.index, reason)
                    return
