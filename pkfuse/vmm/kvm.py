"""KVM's uAPI from Python: the structures, the ioctl numbers, one thin wrapper per ioctl.

The layer rust-vmm's ``kvm-ioctls`` is for its VMMs: nothing here decides
anything. Structures carry the kernel's names, field order and sizes
(``include/uapi/linux/kvm.h``, ``arch/x86/include/uapi/asm/kvm.h``; sizes
asserted at import); ioctl numbers are computed with ``_IO``/``_IOR``/
``_IOW``/``_IOWR`` as the kernel does; each wrapper is named after its ioctl
(``KVM_GET_REGS`` -> ``get_regs``) and raises ``OSError(errno, "<IOCTL>:
<strerror>")`` when the kernel refuses. ``check_capabilities`` names every
capability the engine relies on and fails with one line (``EngineError``).

Two calls are not plain ``fcntl.ioctl``:

* ``run`` (``KVM_RUN``) goes through ctypes' ``libc.ioctl``: ctypes releases
  the GIL around a foreign call, so every vCPU thread is in the guest at the
  same time, and a signal sent to the thread ends the call with EINTR
  (KVM returns ``-EINTR``, never ``-ERESTARTSYS``, so SA_RESTART cannot make
  the kernel restart it). ``run`` returns ``errno.EINTR`` then instead of
  raising: a kick is not an error.
* Buffers are always mutable (ctypes instances, bytearrays): ``fcntl.ioctl``
  refuses an immutable buffer over 1024 bytes, and a mutable one is passed
  to the kernel in place.

Variable-length structures (``kvm_msrs``, ``kvm_msr_list``, ``kvm_cpuid2``)
are built by ``msrs_of``, ``msr_list_of`` and ``cpuid2_of``: the header and
``n`` entries, one ctypes class per ``n`` (cached).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import functools
import os
from collections.abc import Iterable, Sequence

from .engine import EngineError

# ------------------------------------------------------------------ ioctl numbers (include/uapi/asm-generic/ioctl.h)
_IOC_NRBITS, _IOC_TYPEBITS, _IOC_SIZEBITS = 8, 8, 14
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS
_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2


def _IOC(direction: int, type_: int, nr: int, size: int) -> int:  # noqa: N802 -- the kernel's macro names
    assert 0 <= size < 1 << _IOC_SIZEBITS
    return direction << _IOC_DIRSHIFT | type_ << _IOC_TYPESHIFT | nr << _IOC_NRSHIFT | size << _IOC_SIZESHIFT


def _IO(type_: int, nr: int) -> int:  # noqa: N802
    return _IOC(_IOC_NONE, type_, nr, 0)


def _IOR(type_: int, nr: int, struct: type[ctypes._CData] | int) -> int:  # noqa: N802
    return _IOC(_IOC_READ, type_, nr, struct if isinstance(struct, int) else ctypes.sizeof(struct))


def _IOW(type_: int, nr: int, struct: type[ctypes._CData] | int) -> int:  # noqa: N802
    return _IOC(_IOC_WRITE, type_, nr, struct if isinstance(struct, int) else ctypes.sizeof(struct))


def _IOWR(type_: int, nr: int, struct: type[ctypes._CData] | int) -> int:  # noqa: N802
    return _IOC(_IOC_READ | _IOC_WRITE, type_, nr, struct if isinstance(struct, int) else ctypes.sizeof(struct))


KVMIO = 0xAE
KVM_API_VERSION = 12

u8, u16, u32, u64 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64


class _Struct(ctypes.Structure):
    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{n}={getattr(self, n)!r}' for n, *_ in self._fields_)})"


# ------------------------------------------------------------------ asm/kvm.h (x86)
class kvm_regs(_Struct):  # noqa: N801 -- the kernel's struct names
    _fields_ = [(n, u64) for n in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10",
                                   "r11", "r12", "r13", "r14", "r15", "rip", "rflags")]


class kvm_segment(_Struct):  # noqa: N801
    _fields_ = [("base", u64), ("limit", u32), ("selector", u16), ("type", u8), ("present", u8), ("dpl", u8),
                ("db", u8), ("s", u8), ("l", u8), ("g", u8), ("avl", u8), ("unusable", u8), ("padding", u8)]


class kvm_dtable(_Struct):  # noqa: N801
    _fields_ = [("base", u64), ("limit", u16), ("padding", u16 * 3)]


KVM_NR_INTERRUPTS = 256


class kvm_sregs(_Struct):  # noqa: N801
    _fields_ = ([(n, kvm_segment) for n in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")]
                + [("gdt", kvm_dtable), ("idt", kvm_dtable)]
                + [(n, u64) for n in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")]
                + [("interrupt_bitmap", u64 * ((KVM_NR_INTERRUPTS + 63) // 64))])


class kvm_msr_entry(_Struct):  # noqa: N801
    _fields_ = [("index", u32), ("reserved", u32), ("data", u64)]


class kvm_msrs(_Struct):  # noqa: N801 -- header; entries follow (msrs_of)
    _fields_ = [("nmsrs", u32), ("pad", u32)]


class kvm_msr_list(_Struct):  # noqa: N801 -- header; indices follow (msr_list_of)
    _fields_ = [("nmsrs", u32)]


class kvm_cpuid_entry2(_Struct):  # noqa: N801
    _fields_ = [("function", u32), ("index", u32), ("flags", u32), ("eax", u32), ("ebx", u32), ("ecx", u32),
                ("edx", u32), ("padding", u32 * 3)]


KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1 << 0  # sic: the kernel's spelling


class kvm_cpuid2(_Struct):  # noqa: N801 -- header; entries follow (cpuid2_of)
    _fields_ = [("nent", u32), ("padding", u32)]


class _exception(_Struct):  # noqa: N801
    _fields_ = [("injected", u8), ("nr", u8), ("has_error_code", u8), ("pending", u8), ("error_code", u32)]


class _interrupt(_Struct):  # noqa: N801
    _fields_ = [("injected", u8), ("nr", u8), ("soft", u8), ("shadow", u8)]


class _nmi(_Struct):  # noqa: N801
    _fields_ = [("injected", u8), ("pending", u8), ("masked", u8), ("pad", u8)]


class _smi(_Struct):  # noqa: N801
    _fields_ = [("smm", u8), ("pending", u8), ("smm_inside_nmi", u8), ("latched_init", u8)]


class _triple_fault(_Struct):  # noqa: N801
    _fields_ = [("pending", u8)]


# kvm_vcpu_events.flags: which optional fields KVM_SET_VCPU_EVENTS takes (KVM_GET_VCPU_EVENTS sets some)
KVM_VCPUEVENT_VALID_NMI_PENDING = 0x01
KVM_VCPUEVENT_VALID_SIPI_VECTOR = 0x02
KVM_VCPUEVENT_VALID_SHADOW = 0x04
KVM_VCPUEVENT_VALID_SMM = 0x08
KVM_VCPUEVENT_VALID_PAYLOAD = 0x10
KVM_VCPUEVENT_VALID_TRIPLE_FAULT = 0x20


class kvm_vcpu_events(_Struct):  # noqa: N801
    _fields_ = [("exception", _exception), ("interrupt", _interrupt), ("nmi", _nmi), ("sipi_vector", u32),
                ("flags", u32), ("smi", _smi), ("triple_fault", _triple_fault), ("reserved", u8 * 26),
                ("exception_has_payload", u8), ("exception_payload", u64)]


class kvm_debugregs(_Struct):  # noqa: N801
    _fields_ = [("db", u64 * 4), ("dr6", u64), ("dr7", u64), ("flags", u64), ("reserved", u64 * 9)]


KVM_XSAVE_SIZE = 4096  #: sizeof(struct kvm_xsave): the region without the XSAVE2 extra


class kvm_xsave(_Struct):  # noqa: N801 -- with KVM_CAP_XSAVE2 the kernel may use more (a bytearray here)
    _fields_ = [("region", u32 * 1024)]


KVM_MAX_XCRS = 16


class kvm_xcr(_Struct):  # noqa: N801
    _fields_ = [("xcr", u32), ("reserved", u32), ("value", u64)]


class kvm_xcrs(_Struct):  # noqa: N801
    _fields_ = [("nr_xcrs", u32), ("flags", u32), ("xcrs", kvm_xcr * KVM_MAX_XCRS), ("padding", u64 * 16)]


# ------------------------------------------------------------------ linux/kvm.h
class kvm_userspace_memory_region(_Struct):  # noqa: N801
    _fields_ = [("slot", u32), ("flags", u32), ("guest_phys_addr", u64), ("memory_size", u64),
                ("userspace_addr", u64)]


KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1


class kvm_mp_state(_Struct):  # noqa: N801
    _fields_ = [("mp_state", u32)]


KVM_MP_STATE_RUNNABLE = 0
KVM_MP_STATE_UNINITIALIZED = 1
KVM_MP_STATE_HALTED = 3


class _hw(_Struct):  # noqa: N801
    _fields_ = [("hardware_exit_reason", u64)]


class _fail_entry(_Struct):  # noqa: N801
    _fields_ = [("hardware_entry_failure_reason", u64), ("cpu", u32)]


class _ex(_Struct):  # noqa: N801
    _fields_ = [("exception", u32), ("error_code", u32)]


class _io(_Struct):  # noqa: N801
    _fields_ = [("direction", u8), ("size", u8), ("port", u16), ("count", u32), ("data_offset", u64)]


class _mmio(_Struct):  # noqa: N801
    _fields_ = [("phys_addr", u64), ("data", u8 * 8), ("len", u32), ("is_write", u8)]


class _internal(_Struct):  # noqa: N801
    _fields_ = [("suberror", u32), ("ndata", u32), ("data", u64 * 16)]


class _system_event(_Struct):  # noqa: N801
    _fields_ = [("type", u32), ("ndata", u32), ("data", u64 * 16)]


class _kvm_run_exit(ctypes.Union):  # noqa: N801 -- the anonymous union of struct kvm_run (the parts we read)
    _fields_ = [("hw", _hw), ("fail_entry", _fail_entry), ("ex", _ex), ("io", _io), ("mmio", _mmio),
                ("internal", _internal), ("system_event", _system_event), ("padding", ctypes.c_char * 256)]


SYNC_REGS_SIZE_BYTES = 2048


class kvm_run(_Struct):  # noqa: N801 -- mmap(vcpu_fd, 0): KVM_GET_VCPU_MMAP_SIZE bytes, this at the start
    _anonymous_ = ("u",)
    _fields_ = [("request_interrupt_window", u8), ("immediate_exit", u8), ("padding1", u8 * 6),
                ("exit_reason", u32), ("ready_for_interrupt_injection", u8), ("if_flag", u8), ("flags", u16),
                ("cr8", u64), ("apic_base", u64), ("u", _kvm_run_exit),
                ("kvm_valid_regs", u64), ("kvm_dirty_regs", u64), ("s", ctypes.c_char * SYNC_REGS_SIZE_BYTES)]


KVM_EXIT_IO_IN, KVM_EXIT_IO_OUT = 0, 1

KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HYPERCALL = 3
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_IRQ_WINDOW_OPEN = 7
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_NMI = 16
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24
KVM_EXIT_X86_RDMSR = 29
KVM_EXIT_X86_WRMSR = 30
KVM_EXIT_X86_BUS_LOCK = 33
KVM_EXIT_NOTIFY = 37

EXIT_NAMES = {v: k[len("KVM_EXIT_"):].lower() for k, v in globals().items()
              if k.startswith("KVM_EXIT_") and not k.startswith("KVM_EXIT_IO_")}

KVM_INTERNAL_ERROR_EMULATION = 1
KVM_INTERNAL_ERROR_NAMES = {1: "emulation", 2: "simultaneous exceptions", 3: "delivery event",
                            4: "unexpected exit reason"}

# ------------------------------------------------------------------ sizes (checked against the headers and the notes)
_SIZES = {kvm_regs: 144, kvm_segment: 24, kvm_dtable: 16, kvm_sregs: 312, kvm_msr_entry: 16, kvm_msrs: 8,
          kvm_msr_list: 4, kvm_cpuid_entry2: 40, kvm_cpuid2: 8, kvm_vcpu_events: 64, kvm_debugregs: 128,
          kvm_xsave: 4096, kvm_xcr: 16, kvm_xcrs: 392, kvm_userspace_memory_region: 32, kvm_mp_state: 4,
          _io: 16, _mmio: 24, _kvm_run_exit: 256, kvm_run: 2352}
for _t, _n in _SIZES.items():
    assert ctypes.sizeof(_t) == _n, (_t.__name__, ctypes.sizeof(_t), _n)
assert kvm_run.exit_reason.offset == 8 and kvm_run.u.offset == 32 and kvm_run.immediate_exit.offset == 1
assert kvm_sregs.gdt.offset == 192 and kvm_sregs.efer.offset == 264
assert kvm_vcpu_events.exception_payload.offset == 56

# ------------------------------------------------------------------ ioctls
# system (/dev/kvm)
KVM_GET_API_VERSION = _IO(KVMIO, 0x00)
KVM_CREATE_VM = _IO(KVMIO, 0x01)
KVM_GET_MSR_INDEX_LIST = _IOWR(KVMIO, 0x02, kvm_msr_list)
KVM_CHECK_EXTENSION = _IO(KVMIO, 0x03)
KVM_GET_VCPU_MMAP_SIZE = _IO(KVMIO, 0x04)
KVM_GET_SUPPORTED_CPUID = _IOWR(KVMIO, 0x05, kvm_cpuid2)
# VM
KVM_CREATE_VCPU = _IO(KVMIO, 0x41)
KVM_SET_USER_MEMORY_REGION = _IOW(KVMIO, 0x46, kvm_userspace_memory_region)
KVM_SET_TSS_ADDR = _IO(KVMIO, 0x47)
KVM_SET_IDENTITY_MAP_ADDR = _IOW(KVMIO, 0x48, 8)
# vCPU
KVM_RUN = _IO(KVMIO, 0x80)
KVM_GET_REGS = _IOR(KVMIO, 0x81, kvm_regs)
KVM_SET_REGS = _IOW(KVMIO, 0x82, kvm_regs)
KVM_GET_SREGS = _IOR(KVMIO, 0x83, kvm_sregs)
KVM_SET_SREGS = _IOW(KVMIO, 0x84, kvm_sregs)
KVM_GET_MSRS = _IOWR(KVMIO, 0x88, kvm_msrs)
KVM_SET_MSRS = _IOW(KVMIO, 0x89, kvm_msrs)
KVM_SET_CPUID2 = _IOW(KVMIO, 0x90, kvm_cpuid2)
KVM_GET_CPUID2 = _IOWR(KVMIO, 0x91, kvm_cpuid2)
KVM_GET_MP_STATE = _IOR(KVMIO, 0x98, kvm_mp_state)
KVM_SET_MP_STATE = _IOW(KVMIO, 0x99, kvm_mp_state)
KVM_GET_VCPU_EVENTS = _IOR(KVMIO, 0x9F, kvm_vcpu_events)
KVM_SET_VCPU_EVENTS = _IOW(KVMIO, 0xA0, kvm_vcpu_events)
KVM_GET_DEBUGREGS = _IOR(KVMIO, 0xA1, kvm_debugregs)
KVM_SET_DEBUGREGS = _IOW(KVMIO, 0xA2, kvm_debugregs)
KVM_GET_XSAVE = _IOR(KVMIO, 0xA4, kvm_xsave)
KVM_SET_XSAVE = _IOW(KVMIO, 0xA5, kvm_xsave)
KVM_GET_XCRS = _IOR(KVMIO, 0xA6, kvm_xcrs)
KVM_SET_XCRS = _IOW(KVMIO, 0xA7, kvm_xcrs)
KVM_GET_XSAVE2 = _IOR(KVMIO, 0xCF, kvm_xsave)

# ------------------------------------------------------------------ capabilities (KVM_CHECK_EXTENSION)
KVM_CAP_USER_MEMORY = 3
KVM_CAP_SET_TSS_ADDR = 4
KVM_CAP_EXT_CPUID = 7
KVM_CAP_NR_VCPUS = 9
KVM_CAP_NR_MEMSLOTS = 10
KVM_CAP_MP_STATE = 14
KVM_CAP_SET_IDENTITY_MAP_ADDR = 37
KVM_CAP_VCPU_EVENTS = 41
KVM_CAP_DEBUGREGS = 50
KVM_CAP_XSAVE = 55
KVM_CAP_XCRS = 56
KVM_CAP_MAX_VCPUS = 66
KVM_CAP_IMMEDIATE_EXIT = 136
KVM_CAP_XSAVE2 = 208

#: what the engine relies on, and for what (every one checked at open; one line names a missing one)
REQUIRED_CAPABILITIES = {
    KVM_CAP_USER_MEMORY: ("KVM_CAP_USER_MEMORY", "guest RAM is a userspace mapping (KVM_SET_USER_MEMORY_REGION)"),
    KVM_CAP_EXT_CPUID: ("KVM_CAP_EXT_CPUID", "KVM_GET_SUPPORTED_CPUID / KVM_SET_CPUID2"),
    KVM_CAP_IMMEDIATE_EXIT: ("KVM_CAP_IMMEDIATE_EXIT", "pause: a race-free kick out of KVM_RUN, pending I/O "
                                                       "completed"),
    KVM_CAP_MP_STATE: ("KVM_CAP_MP_STATE", "saved vCPU state: mp_state"),
    KVM_CAP_VCPU_EVENTS: ("KVM_CAP_VCPU_EVENTS", "saved vCPU state: pending exceptions, interrupt shadow"),
    KVM_CAP_DEBUGREGS: ("KVM_CAP_DEBUGREGS", "saved vCPU state: debug registers"),
    KVM_CAP_XSAVE: ("KVM_CAP_XSAVE", "saved vCPU state: FPU/SSE/AVX (xsave)"),
    KVM_CAP_XCRS: ("KVM_CAP_XCRS", "saved vCPU state: XCR0"),
}
#: used when present: KVM_CAP_SET_TSS_ADDR (VMX without unrestricted guest), KVM_CAP_XSAVE2 (xsave size > 4096),
#: KVM_CAP_NR_VCPUS / KVM_CAP_MAX_VCPUS (how many vCPUs), KVM_CAP_NR_MEMSLOTS (one slot is enough)
OPTIONAL_CAPABILITIES = {KVM_CAP_SET_TSS_ADDR: "KVM_CAP_SET_TSS_ADDR", KVM_CAP_XSAVE2: "KVM_CAP_XSAVE2",
                         KVM_CAP_NR_VCPUS: "KVM_CAP_NR_VCPUS", KVM_CAP_MAX_VCPUS: "KVM_CAP_MAX_VCPUS",
                         KVM_CAP_NR_MEMSLOTS: "KVM_CAP_NR_MEMSLOTS"}

# ------------------------------------------------------------------ variable-length structures


@functools.cache
def _msrs_type(n: int) -> type[ctypes.Structure]:
    return type(f"kvm_msrs_{n}", (_Struct,), {"_fields_": [("nmsrs", u32), ("pad", u32),
                                                           ("entries", kvm_msr_entry * n)]})


@functools.cache
def _msr_list_type(n: int) -> type[ctypes.Structure]:
    return type(f"kvm_msr_list_{n}", (_Struct,), {"_fields_": [("nmsrs", u32), ("indices", u32 * n)]})


@functools.cache
def _cpuid2_type(n: int) -> type[ctypes.Structure]:
    return type(f"kvm_cpuid2_{n}", (_Struct,), {"_fields_": [("nent", u32), ("padding", u32),
                                                             ("entries", kvm_cpuid_entry2 * n)]})


def msrs_of(entries: Iterable[tuple[int, int]]) -> ctypes.Structure:
    """A ``kvm_msrs`` holding ``(index, data)`` pairs."""
    entries = list(entries)
    m = _msrs_type(len(entries))()
    m.nmsrs = len(entries)
    for e, (index, data) in zip(m.entries, entries):
        e.index, e.data = index, data
    return m


def msr_list_of(n: int) -> ctypes.Structure:
    """A ``kvm_msr_list`` with room for ``n`` indices."""
    m = _msr_list_type(n)()
    m.nmsrs = n
    return m


def cpuid2_of(entries: Sequence[kvm_cpuid_entry2] | int) -> ctypes.Structure:
    """A ``kvm_cpuid2`` with room for ``entries`` (a count) or holding copies of ``entries``."""
    n = entries if isinstance(entries, int) else len(entries)
    c = _cpuid2_type(n)()
    c.nent = n
    if not isinstance(entries, int):
        for i, e in enumerate(entries):
            c.entries[i] = e
    return c


def cpuid2_from_bytes(data: bytes) -> ctypes.Structure:
    """A ``kvm_cpuid2`` from its bytes (header, then nent entries)."""
    if len(data) < 8 or (len(data) - 8) % ctypes.sizeof(kvm_cpuid_entry2):
        raise ValueError(f"kvm_cpuid2 of {len(data)} bytes: a header of 8, then entries of 40")
    n = (len(data) - 8) // ctypes.sizeof(kvm_cpuid_entry2)
    c = _cpuid2_type(n).from_buffer_copy(data)
    if c.nent != n:
        raise ValueError(f"kvm_cpuid2.nent is {c.nent}, the data holds {n} entries")
    return c


# ------------------------------------------------------------------ the calls
_libc = ctypes.CDLL(None, use_errno=True)  # no find_library: it forks ldconfig (~6 ms)
_libc.ioctl.restype = ctypes.c_int
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong]
_libc_ioctl = _libc.ioctl


def _ioctl(fd: int, name: str, request: int, arg: object = 0) -> int:
    if isinstance(arg, int):  # an unsigned long argument: fcntl.ioctl takes only a C int
        rc = _libc_ioctl(fd, request, arg)
        if rc < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"{name}: {os.strerror(err)}")
        return rc
    try:
        return fcntl.ioctl(fd, request, arg)  # type: ignore[call-overload]
    except OSError as e:
        raise OSError(e.errno, f"{name}: {os.strerror(e.errno or 0)}") from None


def open_kvm(path: str = "/dev/kvm") -> int:
    """``open("/dev/kvm", O_RDWR | O_CLOEXEC)``; EngineError (one line) when there is no KVM."""
    try:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        raise EngineError(f"kvm: cannot open {path}: {e.strerror} (no KVM here: use the unicorn engine)") from None


def get_api_version(kvm_fd: int) -> int:
    return _ioctl(kvm_fd, "KVM_GET_API_VERSION", KVM_GET_API_VERSION)


def check_extension(fd: int, cap: int) -> int:
    """KVM_CHECK_EXTENSION on /dev/kvm or a VM fd (some answers, e.g. XSAVE2's size, are per VM)."""
    return _ioctl(fd, "KVM_CHECK_EXTENSION", KVM_CHECK_EXTENSION, cap)


def create_vm(kvm_fd: int, machine_type: int = 0) -> int:
    return _ioctl(kvm_fd, "KVM_CREATE_VM", KVM_CREATE_VM, machine_type)


def get_vcpu_mmap_size(kvm_fd: int) -> int:
    return _ioctl(kvm_fd, "KVM_GET_VCPU_MMAP_SIZE", KVM_GET_VCPU_MMAP_SIZE)


def get_msr_index_list(kvm_fd: int) -> list[int]:
    """Every MSR index KVM may save and restore (asks the count first: E2BIG fills nmsrs)."""
    probe = msr_list_of(0)
    try:
        fcntl.ioctl(kvm_fd, KVM_GET_MSR_INDEX_LIST, probe)
    except OSError as e:
        if e.errno != errno.E2BIG:
            raise OSError(e.errno, f"KVM_GET_MSR_INDEX_LIST: {os.strerror(e.errno or 0)}") from None
    lst = msr_list_of(probe.nmsrs)
    _ioctl(kvm_fd, "KVM_GET_MSR_INDEX_LIST", KVM_GET_MSR_INDEX_LIST, lst)
    return list(lst.indices[:lst.nmsrs])


def get_supported_cpuid(kvm_fd: int, max_entries: int = 128) -> ctypes.Structure:
    """The CPUID leaves KVM supports (a ``kvm_cpuid2``); doubles the room while the kernel says E2BIG."""
    while True:
        c = cpuid2_of(max_entries)
        try:
            fcntl.ioctl(kvm_fd, KVM_GET_SUPPORTED_CPUID, c)
        except OSError as e:
            if e.errno == errno.E2BIG and max_entries < 4096:
                max_entries *= 2
                continue
            raise OSError(e.errno, f"KVM_GET_SUPPORTED_CPUID: {os.strerror(e.errno or 0)}") from None
        return cpuid2_of(list(c.entries[:c.nent]))


def set_tss_addr(vm_fd: int, addr: int) -> None:
    _ioctl(vm_fd, "KVM_SET_TSS_ADDR", KVM_SET_TSS_ADDR, addr)


def set_identity_map_addr(vm_fd: int, addr: int) -> None:
    _ioctl(vm_fd, "KVM_SET_IDENTITY_MAP_ADDR", KVM_SET_IDENTITY_MAP_ADDR, bytearray(addr.to_bytes(8, "little")))


def set_user_memory_region(vm_fd: int, region: kvm_userspace_memory_region) -> None:
    _ioctl(vm_fd, "KVM_SET_USER_MEMORY_REGION", KVM_SET_USER_MEMORY_REGION, region)


def create_vcpu(vm_fd: int, vcpu_id: int) -> int:
    return _ioctl(vm_fd, "KVM_CREATE_VCPU", KVM_CREATE_VCPU, vcpu_id)


def run(vcpu_fd: int) -> int:
    """KVM_RUN with the GIL released: 0 when the vCPU exited (see ``kvm_run.exit_reason``), ``errno.EINTR``
    when a signal or ``immediate_exit`` ended it; any other failure raises."""
    if _libc_ioctl(vcpu_fd, KVM_RUN, 0) == 0:
        return 0
    err = ctypes.get_errno()
    if err == errno.EINTR:
        return err
    raise OSError(err, f"KVM_RUN: {os.strerror(err)}")


def get_regs(vcpu_fd: int) -> kvm_regs:
    r = kvm_regs()
    _ioctl(vcpu_fd, "KVM_GET_REGS", KVM_GET_REGS, r)
    return r


def set_regs(vcpu_fd: int, regs: kvm_regs) -> None:
    _ioctl(vcpu_fd, "KVM_SET_REGS", KVM_SET_REGS, regs)


def get_sregs(vcpu_fd: int) -> kvm_sregs:
    s = kvm_sregs()
    _ioctl(vcpu_fd, "KVM_GET_SREGS", KVM_GET_SREGS, s)
    return s


def set_sregs(vcpu_fd: int, sregs: kvm_sregs) -> None:
    _ioctl(vcpu_fd, "KVM_SET_SREGS", KVM_SET_SREGS, sregs)


def set_cpuid2(vcpu_fd: int, cpuid: ctypes.Structure) -> None:
    _ioctl(vcpu_fd, "KVM_SET_CPUID2", KVM_SET_CPUID2, cpuid)


def get_cpuid2(vcpu_fd: int, max_entries: int = 256) -> ctypes.Structure:
    c = cpuid2_of(max_entries)
    _ioctl(vcpu_fd, "KVM_GET_CPUID2", KVM_GET_CPUID2, c)
    return cpuid2_of(list(c.entries[:c.nent]))


def get_msrs(vcpu_fd: int, indices: Sequence[int]) -> list[tuple[int, int]]:
    """(index, value) of ``indices`` in order, up to the first one KVM refuses: a shorter list says which."""
    m = msrs_of((i, 0) for i in indices)
    n = _ioctl(vcpu_fd, "KVM_GET_MSRS", KVM_GET_MSRS, m)
    return [(e.index, e.data) for e in m.entries[:n]]


def set_msrs(vcpu_fd: int, entries: Sequence[tuple[int, int]]) -> None:
    """Set every ``(index, value)``; KVM stops at the first MSR it rejects and says how many it set: a short
    count raises, naming that MSR (every one after it was silently not set)."""
    m = msrs_of(entries)
    n = _ioctl(vcpu_fd, "KVM_SET_MSRS", KVM_SET_MSRS, m)
    if n != len(entries):
        index, value = entries[n]
        raise OSError(errno.EINVAL, f"KVM_SET_MSRS: set {n} of {len(entries)} MSRs, rejected MSR {index:#x} "
                                    f"= {value:#x}")


def get_xsave(vcpu_fd: int) -> bytearray:
    """KVM_GET_XSAVE: the 4096-byte ``kvm_xsave`` region."""
    buf = bytearray(KVM_XSAVE_SIZE)
    _ioctl(vcpu_fd, "KVM_GET_XSAVE", KVM_GET_XSAVE, buf)
    return buf


def get_xsave2(vcpu_fd: int, size: int) -> bytearray:
    """KVM_GET_XSAVE2: ``size`` bytes, the VM's ``check_extension(vm_fd, KVM_CAP_XSAVE2)`` (at least 4096)."""
    buf = bytearray(max(size, KVM_XSAVE_SIZE))
    _ioctl(vcpu_fd, "KVM_GET_XSAVE2", KVM_GET_XSAVE2, buf)
    return buf


def set_xsave(vcpu_fd: int, data: bytes | bytearray) -> None:
    """KVM_SET_XSAVE: reads 4096 bytes, or the XSAVE2 size when the VM's is larger (pass that many)."""
    _ioctl(vcpu_fd, "KVM_SET_XSAVE", KVM_SET_XSAVE, bytearray(data))


def get_xcrs(vcpu_fd: int) -> kvm_xcrs:
    x = kvm_xcrs()
    _ioctl(vcpu_fd, "KVM_GET_XCRS", KVM_GET_XCRS, x)
    return x


def set_xcrs(vcpu_fd: int, xcrs: kvm_xcrs) -> None:
    _ioctl(vcpu_fd, "KVM_SET_XCRS", KVM_SET_XCRS, xcrs)


def get_vcpu_events(vcpu_fd: int) -> kvm_vcpu_events:
    e = kvm_vcpu_events()
    _ioctl(vcpu_fd, "KVM_GET_VCPU_EVENTS", KVM_GET_VCPU_EVENTS, e)
    return e


def set_vcpu_events(vcpu_fd: int, events: kvm_vcpu_events) -> None:
    _ioctl(vcpu_fd, "KVM_SET_VCPU_EVENTS", KVM_SET_VCPU_EVENTS, events)


def get_mp_state(vcpu_fd: int) -> kvm_mp_state:
    m = kvm_mp_state()
    _ioctl(vcpu_fd, "KVM_GET_MP_STATE", KVM_GET_MP_STATE, m)
    return m


def set_mp_state(vcpu_fd: int, mp_state: kvm_mp_state) -> None:
    _ioctl(vcpu_fd, "KVM_SET_MP_STATE", KVM_SET_MP_STATE, mp_state)


def get_debugregs(vcpu_fd: int) -> kvm_debugregs:
    d = kvm_debugregs()
    _ioctl(vcpu_fd, "KVM_GET_DEBUGREGS", KVM_GET_DEBUGREGS, d)
    return d


def set_debugregs(vcpu_fd: int, debugregs: kvm_debugregs) -> None:
    _ioctl(vcpu_fd, "KVM_SET_DEBUGREGS", KVM_SET_DEBUGREGS, debugregs)


# ------------------------------------------------------------------ opening KVM with what the engine needs


def check_capabilities(kvm_fd: int, nr_vcpus: int = 1) -> dict[str, int]:
    """Check the API version and every capability the engine relies on; their values, by name.

    Raises ``EngineError`` with one line naming the first thing missing.
    """
    version = get_api_version(kvm_fd)
    if version != KVM_API_VERSION:
        raise EngineError(f"kvm: KVM_GET_API_VERSION is {version}, this engine speaks {KVM_API_VERSION}")
    caps: dict[str, int] = {}
    for cap, (name, why) in REQUIRED_CAPABILITIES.items():
        value = check_extension(kvm_fd, cap)
        if value <= 0:
            raise EngineError(f"kvm: {name} is missing (needed for {why})")
        caps[name] = value
    for cap, name in OPTIONAL_CAPABILITIES.items():
        caps[name] = check_extension(kvm_fd, cap)
    most = caps["KVM_CAP_MAX_VCPUS"] or caps["KVM_CAP_NR_VCPUS"] or 4  # the API: 4 when neither answers
    if nr_vcpus > most:
        raise EngineError(f"kvm: {nr_vcpus} vCPUs asked, KVM allows {most} per VM (KVM_CAP_MAX_VCPUS)")
    return caps
