"""The KVM engine: a KVM virtual machine over the guest's RAM, its vCPUs each in a thread of its own.

``Vm(ram, nr_vcpus, on_port)`` implements ``engine.Engine`` (name "kvm"):
construction opens ``/dev/kvm`` and checks the API version and every
capability relied on (``kvm.check_capabilities``: one line names what is
missing), creates the VM, gives it the TSS address VMX wants for real mode
when the guest leaves room for it below 4 GiB (the guest never enters real
mode; PVM and VT-x with unrestricted guest ignore it), registers one memory
slot over the whole guest range (``ram.address``, ``ram.size``), and creates
the vCPUs with the host's supported CPUID (each with its own APIC ID) and
their ``kvm_run`` pages mapped. The MSRs a save carries are those of
``KVM_GET_MSR_INDEX_LIST`` that ``KVM_GET_MSRS`` reads (filtered once, on
vCPU 0: e.g. the in-kernel-APIC ones go, as there is no in-kernel APIC).

The port handler runs in the vCPU's thread (each vCPU's calls in order, different vCPUs' at once); it
must not pause or close the VM (that would wait for its own thread: refused), it returns False to stop
its vCPU.

Then ``boot`` (``boot.initial_cpu`` per vCPU) or ``restore``, ``start``,
and ``pause`` / ``save`` / ``resume`` as often as wanted (pause asks every
vCPU at once, then waits for each: see ``vcpu``), ``close``. Guest RAM is
the caller's and is never touched here.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence

from . import boot, kvm
from .engine import EngineError, GuestRam, PortHandler
from .vcpu import IDLE, PAUSE_TIMEOUT, RUNNING, STOPPED, Vcpu, filter_msrs, install_kick_handler

log = logging.getLogger(__name__)

TSS_ADDR = 0xFFFBD000  #: three pages below the BIOS, as QEMU places it (the identity map's default is the page below)


class Vm:
    """A KVM VM whose guest-physical ``[0, ram.size)`` is ``ram``'s mapping; ``nr_vcpus`` vCPUs."""

    name = "kvm"

    def __init__(self, ram: GuestRam, nr_vcpus: int, on_port: PortHandler, *, device: str = "/dev/kvm") -> None:
        t0 = time.perf_counter_ns()
        if nr_vcpus < 1:
            raise EngineError(f"kvm: {nr_vcpus} vCPUs: at least one")
        install_kick_handler()
        self.closed = False
        self.ram = ram
        self.nr_vcpus = nr_vcpus
        self.vcpus: list[Vcpu] = []
        self.vm_fd = -1
        self.kvm_fd = kvm.open_kvm(device)
        try:
            self.capabilities = kvm.check_capabilities(self.kvm_fd, nr_vcpus)
            self.vm_fd = kvm.create_vm(self.kvm_fd)
            if self.capabilities["KVM_CAP_SET_TSS_ADDR"] and ram.size <= TSS_ADDR - 0x1000:
                kvm.set_tss_addr(self.vm_fd, TSS_ADDR)
            t1 = time.perf_counter_ns()
            kvm.set_user_memory_region(self.vm_fd, kvm.kvm_userspace_memory_region(
                slot=0, flags=0, guest_phys_addr=0, memory_size=ram.size, userspace_addr=ram.address))
            t2 = time.perf_counter_ns()
            xsave2 = kvm.check_extension(self.vm_fd, kvm.KVM_CAP_XSAVE2) if self.capabilities["KVM_CAP_XSAVE2"] else 0
            self.xsave_size = max(xsave2, kvm.KVM_XSAVE_SIZE)
            mmap_size = kvm.get_vcpu_mmap_size(self.kvm_fd)
            self.supported_cpuid = kvm.get_supported_cpuid(self.kvm_fd)
            for i in range(nr_vcpus):
                self.vcpus.append(Vcpu(self.vm_fd, i, mmap_size, self.supported_cpuid, on_port, self.xsave_size))
            msrs = filter_msrs(self.vcpus[0].fd, kvm.get_msr_index_list(self.kvm_fd))
            for v in self.vcpus:
                v.msr_indices = msrs
            t3 = time.perf_counter_ns()
        except BaseException:
            self.closed = True
            self._close_fds()
            raise
        self.creation_ns = {"vm": t1 - t0, "memslot": t2 - t1, "vcpus": t3 - t2, "total": t3 - t0}
        log.debug("kvm VM: %d vCPUs, %d MiB at %#x, %d MSRs saved, xsave %d bytes, created in %.2f ms",
                  nr_vcpus, ram.size >> 20, ram.address, len(msrs), self.xsave_size, (t3 - t0) / 1e6)

    # ------------------------------------------------------------------ Engine
    def boot(self) -> None:
        self._check_open()
        for v in self.vcpus:
            v.boot(boot.initial_cpu(v.index))

    def restore(self, states: Sequence[bytes]) -> None:
        self._check_open()
        if len(states) != self.nr_vcpus:
            raise EngineError(f"kvm: {len(states)} vCPU states for a VM of {self.nr_vcpus} vCPUs")
        for v, blob in zip(self.vcpus, states):
            v.restore(blob)

    def start(self) -> None:
        self._check_open()
        for v in self.vcpus:
            if v.state == IDLE:
                v.start()

    def pause(self) -> None:
        self._check_open()
        self._check_not_vcpu_thread("pause")
        for v in self.vcpus:
            v.request_pause()
        deadline = time.monotonic() + PAUSE_TIMEOUT
        for v in self.vcpus:
            v.wait_paused(deadline)

    def resume(self) -> None:
        self._check_open()
        for v in self.vcpus:
            v.request_resume()
        deadline = time.monotonic() + PAUSE_TIMEOUT
        for v in self.vcpus:
            v.wait_resumed(deadline)

    def save(self) -> list[bytes]:
        self._check_open()
        return [v.save() for v in self.vcpus]

    def stopped(self) -> dict[int, str]:
        return {v.index: v.stop_reason or "" for v in self.vcpus if v.state == STOPPED}

    def close(self) -> None:
        if self.closed:
            return
        self._check_not_vcpu_thread("close")
        self.closed = True
        for v in self.vcpus:  # every running vCPU kicked at once, then each joined
            v.request_pause()
        errors = []
        for v in self.vcpus:
            try:
                v.close()
            except EngineError as e:  # its thread is stuck (in a port handler?): its fd and page are left
                errors.append(str(e))
        self.vcpus = []
        self._close_fds()
        if errors:
            raise EngineError("; ".join(errors))

    # ------------------------------------------------------------------ more than Engine
    def paused(self) -> bool:
        """No vCPU thread is in (or about to enter) KVM_RUN."""
        return all(v.state != RUNNING for v in self.vcpus)

    def running(self) -> list[int]:
        return [v.index for v in self.vcpus if v.state == RUNNING]

    def statistics(self) -> dict[str, object]:
        """Per vCPU: KVM_RUN calls and time, exits by reason, port/MMIO counts, kicks, pauses; and the VM's
        creation times (ns)."""
        return {"engine": self.name, "creation_ns": dict(self.creation_ns),
                "vcpus": [dict(v.statistics.as_dict(), state=v.state, stop_reason=v.stop_reason)
                          for v in self.vcpus]}

    def __enter__(self) -> Vm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self.closed:
            raise EngineError("kvm: the VM is closed")

    def _check_not_vcpu_thread(self, what: str) -> None:
        me = threading.get_ident()
        if any(v.thread_ident == me for v in self.vcpus):
            raise EngineError(f"kvm: {what} from a vCPU's own thread (a port handler?) would wait for itself: "
                              "return False from the handler to stop that vCPU")

    def _close_fds(self) -> None:
        for v in self.vcpus:  # only on a failed construction: no thread was started
            v.close()
        self.vcpus = []
        for fd in (self.vm_fd, self.kvm_fd):
            if fd >= 0:
                os.close(fd)
        self.vm_fd = self.kvm_fd = -1
