"""One KVM vCPU: its fd and ``kvm_run`` page, the thread that runs it, pause, and its saved state.

The thread's loop: ``KVM_RUN`` (GIL released: every vCPU is in the guest at
once), then the exit --

* ``KVM_EXIT_IO``: an OUT's value (``size`` bytes at ``io.data_offset`` of the
  ``kvm_run`` page, ``count`` times for a ``rep outs``) goes to the VMM's
  ``on_port(vcpu, port, value)``, which says whether the vCPU goes on; an IN
  reads 0.
* ``KVM_EXIT_MMIO``: the guest touched an address outside its RAM: reads
  give zeros, writes are ignored; both counted.
* ``KVM_EXIT_SHUTDOWN``: a triple fault. The guest has no IDT, so any
  exception ends here: the vCPU stops with the reason (and its RIP).
* ``KVM_EXIT_FAIL_ENTRY``, ``KVM_EXIT_INTERNAL_ERROR``, anything else, or a
  failing ``KVM_RUN``: the vCPU stops with the hardware or KVM reason.
* ``EINTR``: a kick (or a stray signal): the loop looks at what it is asked.

Pause, in the order of ../shared/KVM-NOTES.md that does not tear: the pauser
sets ``kvm_run.immediate_exit = 1``, then asks for the pause, then kicks the
thread with ``KICK_SIGNAL`` (``signal.pthread_kill``; its Python handler is
a no-op, installed from the main thread by ``install_kick_handler``). A
thread inside ``KVM_RUN`` returns EINTR (KVM returns ``-EINTR``, which no
SA_RESTART restarts); a thread about to enter it sees ``immediate_exit``
and returns at once; a kick lost to a thread running Python code is
harmless, since the thread looks at the request before its next entry, and
the pauser kicks again until the thread answers. The thread then re-enters
``KVM_RUN`` once with ``immediate_exit = 1``: KVM completes the pending I/O
of the last exit (an IN's value into RAX; on VT-x the RIP of an OUT; under
PVM here it is already past) and returns EINTR. Only then is the vCPU
paused: its state is whole, and it stays so until ``resume``.

A vCPU that stops for good (a handler said stop, a shutdown, an error)
completes its pending I/O the same way, and its thread ends: it can still be
saved. ``save``/``restore`` touch the vCPU only while no thread is in
``KVM_RUN`` (not started, paused or stopped).
"""

from __future__ import annotations

import collections
import ctypes
import dataclasses
import errno
import fcntl
import logging
import mmap
import os
import signal
import threading
import time
from collections.abc import Sequence

from . import boot, cpustate, kvm
from .engine import EngineError, PortHandler

log = logging.getLogger(__name__)

#: the signal that kicks a vCPU thread out of KVM_RUN (a real-time one: nothing else here uses it)
KICK_SIGNAL = signal.SIGRTMIN + 4
PAUSE_TIMEOUT = 5.0  #: seconds ``wait_paused`` waits for a vCPU to leave KVM_RUN
REKICK_INTERVAL = 0.005  #: seconds between kicks while a vCPU has not answered

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.restype = ctypes.c_int
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
MAP_FAILED = ctypes.c_void_p(-1).value


def _kick_handler(signum: int, frame: object) -> None:
    """Nothing: the signal's work is done when it interrupts KVM_RUN."""


def install_kick_handler() -> None:
    """Install KICK_SIGNAL's no-op handler; must run in the main thread (``signal.signal``'s rule).

    Python's handler is installed without SA_RESTART; KVM_RUN is not restarted by it anyway.
    """
    if signal.getsignal(KICK_SIGNAL) is _kick_handler:
        return
    if threading.current_thread() is not threading.main_thread():
        raise EngineError(f"kvm: the vCPU kick signal ({KICK_SIGNAL!r}) needs its handler installed from the main "
                          "thread first: call pkfuse.vmm.vcpu.install_kick_handler() there")
    signal.signal(KICK_SIGNAL, _kick_handler)


# the vCPU's life (``Vcpu.state``)
IDLE = "idle"  #: created, no thread yet (boot/restore allowed)
RUNNING = "running"  #: its thread is running the guest
PAUSED = "paused"  #: its thread waits for resume; state whole
STOPPED = "stopped"  #: left for good (``stop_reason``); its thread has ended
CLOSED = "closed"


@dataclasses.dataclass
class VcpuStatistics:
    """What one vCPU did: KVM_RUN calls and time inside, exits by reason, port and MMIO traffic, pauses."""

    runs: int = 0
    run_ns: int = 0  #: time inside KVM_RUN
    exits: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    port_writes: int = 0
    port_reads: int = 0
    mmio_reads: int = 0
    mmio_writes: int = 0
    kicks: int = 0
    pauses: int = 0
    last_pause_ns: int = 0  #: request to paused, the last pause

    def as_dict(self) -> dict[str, object]:
        """A copy, safe while the vCPU runs (``dict()`` of the Counter is one step under the GIL; ``asdict``
        would iterate it in Python while the thread adds a reason)."""
        d: dict[str, object] = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["exits"] = dict(self.exits)
        return d


def _segment(s: boot.Segment) -> kvm.kvm_segment:
    return kvm.kvm_segment(base=s.base, limit=s.limit, selector=s.selector, type=s.type, present=s.present,
                           dpl=s.dpl, db=s.db, s=s.s, l=s.l, g=s.g, avl=0, unusable=0 if s.present else 1)


def vcpu_cpuid(supported: ctypes.Structure, index: int) -> ctypes.Structure:
    """The host's supported CPUID with this vCPU's APIC ID (leaf 1 EBX[31:24], leaf 0xB/0x1F EDX)."""
    c = kvm.cpuid2_of(list(supported.entries[:supported.nent]))
    for e in c.entries[:c.nent]:
        if e.function == 1:
            e.ebx = (e.ebx & 0x00FFFFFF) | (index & 0xFF) << 24
        elif e.function in (0xB, 0x1F):
            e.edx = index
    return c


class Vcpu:
    """vCPU ``index`` of a VM: created with its CPUID set and its ``kvm_run`` page mapped."""

    def __init__(self, vm_fd: int, index: int, mmap_size: int, cpuid: ctypes.Structure, on_port: PortHandler,
                 xsave_size: int) -> None:
        self.index = index
        self.on_port = on_port
        self.xsave_size = xsave_size
        self.msr_indices: list[int] = []  #: what save reads and restore writes (the VM filters the list once)
        self.fd = kvm.create_vcpu(vm_fd, index)
        self._mmap_size = mmap_size
        addr = _libc.mmap(None, mmap_size, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED, self.fd, 0)
        if addr in (None, MAP_FAILED):
            err = ctypes.get_errno()
            os.close(self.fd)
            raise OSError(err, f"mmap of vCPU {index}'s kvm_run: {os.strerror(err)}")
        self._run_addr: int = addr
        self.run = kvm.kvm_run.from_address(addr)
        self.cpuid = vcpu_cpuid(cpuid, index)
        try:
            kvm.set_cpuid2(self.fd, self.cpuid)
        except BaseException:
            del self.run
            _libc.munmap(addr, mmap_size)
            os.close(self.fd)
            raise
        self.state = IDLE
        self.stop_reason: str | None = None
        self.in_run = False  #: inside KVM_RUN now (racy by nature: for statistics and tests)
        self.statistics = VcpuStatistics()
        self._want = RUNNING  #: what the thread is asked: RUNNING, PAUSED or CLOSED
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._pause_asked = 0

    # ------------------------------------------------------------------ thread control
    @property
    def thread_ident(self) -> int | None:
        t = self._thread
        return t.ident if t is not None else None

    def start(self) -> None:
        if self.state != IDLE:
            raise EngineError(f"kvm: vCPU {self.index} is {self.state}, start needs a vCPU not started")
        self.run.immediate_exit = 0
        self._want = RUNNING
        self.state = RUNNING
        self._thread = threading.Thread(target=self._loop, name=f"kvm-vcpu{self.index}", daemon=True)
        self._thread.start()

    def _kick(self) -> None:
        t = self._thread
        if t is not None and t.ident is not None and t.is_alive():
            self.statistics.kicks += 1
            try:
                signal.pthread_kill(t.ident, KICK_SIGNAL)
            except ProcessLookupError:  # ended between the check and the kill
                pass

    def request_pause(self) -> None:
        """Ask the thread to pause (immediate_exit first, then the request, then a kick); returns at once."""
        with self._cond:
            if self.state != RUNNING or self._want != RUNNING:
                return
            self.run.immediate_exit = 1
            self._want = PAUSED
            self._pause_asked = time.perf_counter_ns()
        self._kick()

    def wait_paused(self, deadline: float) -> None:
        """Until the thread is paused or stopped (kicking again while it has not answered)."""
        with self._cond:
            while self.state == RUNNING:
                if time.monotonic() > deadline:
                    raise EngineError(f"kvm: vCPU {self.index} did not leave KVM_RUN within {PAUSE_TIMEOUT} s")
                if not self._cond.wait(REKICK_INTERVAL) and self.state == RUNNING:
                    self._kick()

    def request_resume(self) -> None:
        """Let a paused thread go on (its state turns RUNNING when it does: ``wait_resumed``)."""
        with self._cond:
            if self.state != PAUSED or self._want != PAUSED:
                return
            self.run.immediate_exit = 0
            self._want = RUNNING
            self._cond.notify_all()

    def wait_resumed(self, deadline: float) -> None:
        """Until the thread has taken the resume: a pause asked after this returns is its own, never lost."""
        with self._cond:
            while self.state == PAUSED and self._want == RUNNING:
                if time.monotonic() > deadline:
                    raise EngineError(f"kvm: vCPU {self.index} did not resume within {PAUSE_TIMEOUT} s")
                self._cond.wait(0.1)

    def close(self, timeout: float = PAUSE_TIMEOUT) -> None:
        """End the thread (kicked out of KVM_RUN if there), unmap ``kvm_run``, close the fd."""
        if self.state == CLOSED:
            return
        with self._cond:
            self.run.immediate_exit = 1
            self._want = CLOSED
            self._cond.notify_all()
        t = self._thread
        if t is not None:
            deadline = time.monotonic() + timeout
            while t.is_alive() and time.monotonic() < deadline:
                self._kick()
                t.join(REKICK_INTERVAL)
            if t.is_alive():
                raise EngineError(f"kvm: vCPU {self.index}'s thread did not end within {timeout} s")
        self.state = CLOSED
        self._thread = None
        del self.run
        _libc.munmap(self._run_addr, self._mmap_size)
        os.close(self.fd)

    # ------------------------------------------------------------------ the thread
    def _complete_io(self) -> None:
        """Re-enter KVM_RUN once with immediate_exit = 1: KVM completes the last exit's I/O, returns EINTR."""
        self.run.immediate_exit = 1
        try:
            rc = kvm.run(self.fd)
        except OSError as e:
            log.warning("vCPU %d: completing pending I/O: %s", self.index, e)
            return
        self.statistics.runs += 1
        if rc != errno.EINTR:  # an exit instead of EINTR: KVM ran the guest; never seen, but say so
            log.warning("vCPU %d: the immediate_exit re-entry exited (%s)", self.index,
                        kvm.EXIT_NAMES.get(self.run.exit_reason, self.run.exit_reason))

    def _stop(self, reason: str, pending_io: bool) -> None:
        if pending_io:
            self._complete_io()
        with self._cond:
            self.stop_reason = reason
            self.state = STOPPED
            self._cond.notify_all()
        log.info("vCPU %d stopped: %s", self.index, reason)

    def _wait_asked(self) -> bool:
        """The thread was asked something: complete I/O, pause until resumed; False when it must end."""
        self._complete_io()
        with self._cond:
            if self._want == PAUSED:
                self.state = PAUSED
                self.statistics.pauses += 1
                self.statistics.last_pause_ns = time.perf_counter_ns() - self._pause_asked
                self._cond.notify_all()
                while self._want == PAUSED:
                    self._cond.wait()
            if self._want == CLOSED:
                self.state = CLOSED
                self._cond.notify_all()
                return False
            self.state = RUNNING  # the thread itself: a resume is taken once it is here
            self._cond.notify_all()
            return True

    def _internal_error(self) -> str:
        i = self.run.internal
        n = min(i.ndata, 16)
        what = (f"internal error: {kvm.KVM_INTERNAL_ERROR_NAMES.get(i.suberror, 'unknown')} (suberror "
                f"{i.suberror}) at rip {kvm.get_regs(self.fd).rip:#x}")
        if i.suberror == kvm.KVM_INTERNAL_ERROR_EMULATION and n >= 3 and i.data[0] & 1:
            # struct emulation_failure over the data: flags, then insn_size and 15 instruction bytes
            raw = b"".join(d.to_bytes(8, "little") for d in i.data[1:3])
            return f"{what}, instruction bytes {raw[1:1 + min(raw[0], 15)].hex(' ')}"
        return f"{what}, data [{' '.join(f'{d:#x}' for d in i.data[:n])}]"

    def _loop(self) -> None:
        try:
            self._run_loop()
        except BaseException as e:  # never leave a pauser waiting on a dead thread
            log.exception("vCPU %d: the run loop failed", self.index)
            with self._cond:
                self.stop_reason = f"engine error: {type(e).__name__}: {e}"
                self.state = STOPPED
                self._cond.notify_all()

    def _run_loop(self) -> None:
        run, fd, stats, exits, index = self.run, self.fd, self.statistics, self.statistics.exits, self.index
        base = self._run_addr
        names = kvm.EXIT_NAMES
        clock = time.perf_counter_ns
        while True:
            if self._want != RUNNING and not self._wait_asked():
                return
            self.in_run = True
            t0 = clock()
            try:
                rc = kvm.run(fd)
            except OSError as e:
                self.in_run = False
                self._stop(f"KVM_RUN failed: {e.strerror}", pending_io=False)
                return
            stats.run_ns += clock() - t0
            self.in_run = False
            stats.runs += 1
            if rc == errno.EINTR:
                exits["intr"] += 1
                continue
            reason = run.exit_reason
            exits[names.get(reason, str(reason))] += 1
            if reason == kvm.KVM_EXIT_IO:
                io = run.io
                size, count, port = io.size, io.count, io.port
                at = base + io.data_offset
                if io.direction == kvm.KVM_EXIT_IO_OUT:
                    data = ctypes.string_at(at, size * count)
                    for k in range(count):
                        stats.port_writes += 1
                        value = int.from_bytes(data[k * size:(k + 1) * size], "little")
                        try:
                            go = self.on_port(index, port, value)
                        except Exception as e:  # noqa: BLE001 -- the handler's bug stops this vCPU, not the VMM
                            log.exception("vCPU %d: port handler failed on OUT %#x, %#x", index, port, value)
                            self._stop(f"port handler raised {type(e).__name__}: {e} (OUT {port:#x}, {value:#x})",
                                       pending_io=True)
                            return
                        if not go:
                            self._stop(f"port handler stopped it at OUT {port:#x}, {value:#x}", pending_io=True)
                            return
                else:
                    stats.port_reads += count
                    ctypes.memset(at, 0, size * count)
            elif reason == kvm.KVM_EXIT_MMIO:
                if run.mmio.is_write:
                    stats.mmio_writes += 1
                else:
                    stats.mmio_reads += 1
                    ctypes.memset(ctypes.addressof(run.mmio.data), 0, 8)
            elif reason == kvm.KVM_EXIT_SHUTDOWN:
                rip = kvm.get_regs(fd).rip
                self._stop(f"shutdown (triple fault: the guest has no IDT, so any exception ends it) at rip "
                           f"{rip:#x}", pending_io=False)
                return
            elif reason == kvm.KVM_EXIT_FAIL_ENTRY:
                f = run.fail_entry
                self._stop(f"fail entry: hardware entry failure reason {f.hardware_entry_failure_reason:#x} on "
                           f"cpu {f.cpu}", pending_io=False)
                return
            elif reason == kvm.KVM_EXIT_INTERNAL_ERROR:
                self._stop(self._internal_error(), pending_io=False)
                return
            elif reason == kvm.KVM_EXIT_UNKNOWN:
                self._stop(f"unknown exit: hardware exit reason {run.hw.hardware_exit_reason:#x}", pending_io=False)
                return
            elif reason == kvm.KVM_EXIT_INTR:
                continue
            else:
                self._stop(f"unhandled exit {names.get(reason, '?')} ({reason})", pending_io=False)
                return

    # ------------------------------------------------------------------ state (no thread in KVM_RUN)
    def _check_still(self, what: str) -> None:
        if self.state not in (IDLE, PAUSED, STOPPED):
            raise EngineError(f"kvm: {what} of vCPU {self.index} while it is {self.state}: pause it first")

    def boot(self, init: boot.CpuInit) -> None:
        """Registers and special registers of ``init``: 64-bit mode, CPL 3, IOPL 3, no IDT."""
        self._check_still("boot")
        regs = kvm.kvm_regs(rip=init.rip, rsp=init.rsp, rdi=init.rdi, rsi=init.rsi, rflags=init.rflags)
        sregs = kvm.get_sregs(self.fd)  # keeps apic_base and the interrupt bitmap KVM gave
        sregs.cs = _segment(init.cs)
        for name in ("ds", "es", "fs", "gs", "ss"):
            setattr(sregs, name, _segment(init.ds))
        sregs.tr, sregs.ldt = _segment(init.tr), _segment(init.ldt)
        sregs.gdt = kvm.kvm_dtable(base=init.gdt[0], limit=init.gdt[1])
        sregs.idt = kvm.kvm_dtable(base=init.idt[0], limit=init.idt[1])
        sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer = init.cr0, init.cr3, init.cr4, init.efer
        sregs.cr2 = sregs.cr8 = 0
        kvm.set_sregs(self.fd, sregs)
        kvm.set_regs(self.fd, regs)

    def save(self) -> bytes:
        """This vCPU's whole state as a KVM vCPU blob (``cpustate.KVM_VCPU_HEADER``)."""
        self._check_still("save")
        fd = self.fd
        msrs = kvm.get_msrs(fd, self.msr_indices)
        if len(msrs) != len(self.msr_indices):
            raise EngineError(f"kvm: KVM_GET_MSRS of vCPU {self.index} read {len(msrs)} of "
                              f"{len(self.msr_indices)} MSRs, refused {self.msr_indices[len(msrs)]:#x}")
        xsave = kvm.get_xsave2(fd, self.xsave_size) if self.xsave_size > kvm.KVM_XSAVE_SIZE else kvm.get_xsave(fd)
        sections = {
            "regs": bytes(kvm.get_regs(fd)),
            "sregs": bytes(kvm.get_sregs(fd)),
            "xsave": bytes(xsave),
            "xcrs": bytes(kvm.get_xcrs(fd)),
            "msrs": bytes(kvm.msrs_of(msrs)),
            "vcpu_events": bytes(kvm.get_vcpu_events(fd)),
            "mp_state": bytes(kvm.get_mp_state(fd)),
            "debugregs": bytes(kvm.get_debugregs(fd)),
            "cpuid": bytes(self.cpuid),
        }
        return cpustate.encode_kvm_vcpu(self.index, sections)

    def restore(self, blob: bytes) -> None:
        """Every structure of a blob from ``save``, CPUID first (the order Firecracker restores in);
        each call's count checked."""
        self._check_still("restore")
        s = cpustate.decode_kvm_vcpu(blob, expect_vcpu=self.index)
        fd = self.fd
        cpuid = kvm.cpuid2_from_bytes(s["cpuid"])
        kvm.set_cpuid2(fd, cpuid)
        self.cpuid = cpuid
        mp = kvm.kvm_mp_state.from_buffer_copy(s["mp_state"])
        kvm.set_mp_state(fd, mp)
        kvm.set_regs(fd, kvm.kvm_regs.from_buffer_copy(s["regs"]))
        kvm.set_sregs(fd, kvm.kvm_sregs.from_buffer_copy(s["sregs"]))
        xsave = s["xsave"]
        if len(xsave) > max(self.xsave_size, kvm.KVM_XSAVE_SIZE):
            raise EngineError(f"kvm: vCPU {self.index}'s saved xsave is {len(xsave)} bytes, this KVM takes "
                              f"{self.xsave_size} (KVM_CAP_XSAVE2)")
        kvm.set_xsave(fd, xsave.ljust(max(self.xsave_size, kvm.KVM_XSAVE_SIZE), b"\0"))
        xcrs = kvm.kvm_xcrs.from_buffer_copy(s["xcrs"])
        if xcrs.nr_xcrs > kvm.KVM_MAX_XCRS:
            raise EngineError(f"kvm: vCPU {self.index}'s saved kvm_xcrs.nr_xcrs is {xcrs.nr_xcrs}, at most "
                              f"{kvm.KVM_MAX_XCRS}")
        kvm.set_xcrs(fd, xcrs)
        kvm.set_debugregs(fd, kvm.kvm_debugregs.from_buffer_copy(s["debugregs"]))
        raw = s["msrs"]
        n = int.from_bytes(raw[:4], "little")
        entries = (kvm.kvm_msr_entry * n).from_buffer_copy(raw, 8)
        kvm.set_msrs(fd, [(e.index, e.data) for e in entries])
        events = kvm.kvm_vcpu_events.from_buffer_copy(s["vcpu_events"])
        events.flags |= kvm.KVM_VCPUEVENT_VALID_NMI_PENDING  # GET never sets it; without it a pending NMI is lost
        kvm.set_vcpu_events(fd, events)

    # ------------------------------------------------------------------ inspection
    def get_regs(self) -> kvm.kvm_regs:
        self._check_still("get_regs")
        return kvm.get_regs(self.fd)

    def get_sregs(self) -> kvm.kvm_sregs:
        self._check_still("get_sregs")
        return kvm.get_sregs(self.fd)


def filter_msrs(vcpu_fd: int, indices: Sequence[int]) -> list[int]:
    """The MSRs of ``indices`` that this vCPU both reads and takes back: KVM_GET_MSRS and KVM_SET_MSRS each stop
    at the first MSR they refuse (drop it, go on after it). Some are readable only: without an in-kernel APIC,
    MSR_KVM_ASYNC_PF_INT reads but refuses even its own value. Run on a fresh vCPU: it writes back the values
    it read."""
    keep: list[tuple[int, int]] = []
    rest = list(indices)
    while rest:
        got = kvm.get_msrs(vcpu_fd, rest)
        keep.extend(got)
        if len(got) == len(rest):
            break
        log.debug("KVM_GET_MSRS refuses MSR %#x: not saved", rest[len(got)])
        rest = rest[len(got) + 1:]
    settable: list[int] = []
    while keep:
        m = kvm.msrs_of(keep)
        n = fcntl.ioctl(vcpu_fd, kvm.KVM_SET_MSRS, m)
        settable.extend(i for i, _ in keep[:n])
        if n == len(keep):
            break
        log.debug("KVM_SET_MSRS refuses MSR %#x: not saved", keep[n][0])
        keep = keep[n + 1:]
    return settable
