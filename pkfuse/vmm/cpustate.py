"""The vCPU state file: every vCPU of one VM, saved while paused, as one declared, versioned structure.

Live update keeps guest RAM in the image; what it must carry across the VMM's
restart besides is each vCPU's CPU state. That is this file. Layout (all
integers little-endian; offsets fixed by the dtypes below)::

    0        STATE_HEADER   magic, version, header size, engine, vm_uuid, guest RAM size,
                            nr_vcpus, CRC32, total size, (offset, length) of each vCPU's blob
    ...      blob of vCPU 0, 1, ... at the recorded offsets (8-aligned), opaque to this header:
             the engine's own declared layout (KVM_VCPU_HEADER below for "kvm")

The CRC32 (zlib) covers the whole file with the ``crc32`` field read as zero,
the header included: a flipped engine name or uuid is refused as surely as a
flipped register.

Protocol (../shared/KVM-NOTES.md, "Pause before you save"): the VMM pauses
every vCPU (each is out of KVM_RUN, pending I/O completed), saves, and keeps
them paused until ``write_state`` has returned: it writes a temporary file
beside the target, fsyncs it, renames it over the target and fsyncs the
directory. A reader, even after a crash at any instant, sees the old file or
the new one, never a torn one; and RAM never runs ahead of the state that
will be restored with it.

``decode`` refuses, with one line naming the structure, field and offset,
anything it cannot restore faithfully: bad magic, an unknown version, a bad
CRC, sizes or offsets outside the file, another VM's uuid, another vCPU
count, another engine's state, another RAM size.

The KVM engine's per-vCPU blob (``encode_kvm_vcpu`` / ``decode_kvm_vcpu``):
KVM_VCPU_HEADER, then each KVM structure as the kernel's ioctl passes it, at
the offset its section entry records (8-aligned), in KVM_SECTIONS order.
Fixed-size structures must have exactly the kernel's size; ``xsave`` is at
least 4096 bytes (KVM_CAP_XSAVE2 may make it larger), ``msrs`` is a
``kvm_msrs`` (8-byte header, 16 bytes an entry), ``cpuid`` a ``kvm_cpuid2``
(8-byte header, 40 bytes an entry).
"""

from __future__ import annotations

import dataclasses
import os
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from backing.errors import PkfuseError

from . import abi

STATE_MAGIC = int.from_bytes(b"PKVCPUST", "little")
STATE_VERSION = 1
MAX_VCPUS = abi.MAX_VCPUS
ENGINE_NAME_SIZE = 16

BLOB_ENTRY = np.dtype([("offset", "<u8"), ("length", "<u8")])

STATE_HEADER = np.dtype([
    ("magic", "<u8"),  # STATE_MAGIC
    ("version", "<u4"),  # STATE_VERSION
    ("header_size", "<u4"),  # STATE_HEADER.itemsize
    ("engine", f"S{ENGINE_NAME_SIZE}"),  # "kvm" or "unicorn", NUL-padded: whose blobs these are
    ("vm_uuid", "V16"),  # the guest CONFIG's vm_uuid
    ("ram_size", "<u8"),  # bytes of guest RAM the state belongs with
    ("nr_vcpus", "<u4"),  # 1..MAX_VCPUS
    ("crc32", "<u4"),  # zlib.crc32 of the whole file, this field read as 0
    ("total_size", "<u8"),  # bytes in the file
    ("vcpus", BLOB_ENTRY, (MAX_VCPUS,)),  # blob of vCPU i; entries from nr_vcpus on are zero
    ("reserved", "<u8", (4,)),  # zero
])
assert STATE_HEADER.itemsize == 360
BLOB_ALIGN = 8

KVM_VCPU_MAGIC = int.from_bytes(b"PKKVMCPU", "little")
KVM_VCPU_VERSION = 1
#: the sections of a KVM vCPU blob, in order; each is the named KVM structure's bytes
KVM_SECTIONS = ("regs", "sregs", "xsave", "xcrs", "msrs", "vcpu_events", "mp_state", "debugregs", "cpuid")
#: exact sizes of the fixed-size sections (pkfuse.vmm.kvm asserts the same sizes of its ctypes structures)
KVM_SECTION_SIZES = {"regs": 144, "sregs": 312, "xcrs": 392, "vcpu_events": 64, "mp_state": 4, "debugregs": 128}
SECTION_ENTRY = np.dtype([("offset", "<u4"), ("length", "<u4")])

KVM_VCPU_HEADER = np.dtype([
    ("magic", "<u8"),  # KVM_VCPU_MAGIC
    ("version", "<u4"),  # KVM_VCPU_VERSION
    ("vcpu", "<u4"),  # the vCPU's index (KVM_CREATE_VCPU's id)
    ("sections", SECTION_ENTRY, (len(KVM_SECTIONS),)),  # (offset from the blob's start, length), KVM_SECTIONS order
    ("reserved", "<u8", (2,)),  # zero
])
assert KVM_VCPU_HEADER.itemsize == 104


class CpuStateError(PkfuseError, ValueError):
    """A vCPU state that cannot be restored (one line: structure, field, offset, problem).

    ``structure`` and ``offset`` name where, when the refusal is about one field (else None).
    """

    def __init__(self, message: str, structure: str | None = None, offset: int | None = None) -> None:
        super().__init__(message)
        self.structure = structure
        self.offset = offset


def _field_offset(dtype: np.dtype, field: str) -> int:
    return int(dtype.fields[field][1])


def _refuse(struct: str, dtype: np.dtype, field: str, problem: str) -> CpuStateError:
    offset = _field_offset(dtype, field)
    return CpuStateError(f"vCPU state: {struct}.{field} at offset {offset}: {problem}", f"{struct}.{field}", offset)


def _align(n: int) -> int:
    return -(-n // BLOB_ALIGN) * BLOB_ALIGN


@dataclasses.dataclass(frozen=True)
class CpuState:
    """A decoded state file: whose it is and each vCPU's blob."""

    engine: str
    vm_uuid: bytes
    ram_size: int
    blobs: list[bytes]

    @property
    def nr_vcpus(self) -> int:
        return len(self.blobs)


def encode(engine: str, vm_uuid: bytes, ram_size: int, blobs: Sequence[bytes]) -> bytes:
    """The state file's bytes for these blobs (one per vCPU, from ``Engine.save``)."""
    if not 1 <= len(blobs) <= MAX_VCPUS:
        raise CpuStateError(f"vCPU state: {len(blobs)} vCPUs, a state holds 1 to {MAX_VCPUS}")
    name = engine.encode()
    if not name or len(name) > ENGINE_NAME_SIZE or b"\0" in name:
        raise CpuStateError(f"vCPU state: engine name {engine!r} must be 1 to {ENGINE_NAME_SIZE} bytes, no NUL")
    if len(vm_uuid) != 16:
        raise CpuStateError("vCPU state: vm_uuid is 16 bytes")
    h = np.zeros((), STATE_HEADER)
    h["magic"], h["version"], h["header_size"] = STATE_MAGIC, STATE_VERSION, STATE_HEADER.itemsize
    h["engine"], h["vm_uuid"], h["ram_size"], h["nr_vcpus"] = name, np.void(bytes(vm_uuid)), ram_size, len(blobs)
    at = _align(STATE_HEADER.itemsize)
    for i, b in enumerate(blobs):
        h["vcpus"][i] = (at, len(b))
        at = _align(at + len(b))
    h["total_size"] = at
    out = bytearray(at)
    for i, b in enumerate(blobs):
        off = int(h["vcpus"][i]["offset"])
        out[off:off + len(b)] = b
    out[:STATE_HEADER.itemsize] = h.tobytes()
    crc = zlib.crc32(out)
    off = _field_offset(STATE_HEADER, "crc32")
    out[off:off + 4] = crc.to_bytes(4, "little")
    return bytes(out)


def decode(data: bytes, *, expect_uuid: bytes, expect_vcpus: int, expect_engine: str | None = None,
           expect_ram_size: int | None = None) -> CpuState:
    """The state in ``data``, checked; ``CpuStateError`` (one line) for anything but this VM's state."""
    H, S = STATE_HEADER, "STATE_HEADER"  # noqa: N806
    if len(data) < H.itemsize:
        raise CpuStateError(f"vCPU state: {len(data)} bytes, shorter than {S} ({H.itemsize} bytes)")
    h = np.frombuffer(data, H, count=1)[0]
    if int(h["magic"]) != STATE_MAGIC:
        raise _refuse(S, H, "magic", f"{int(h['magic']):#018x} is not {STATE_MAGIC:#018x} (not a vCPU state file)")
    if int(h["version"]) != STATE_VERSION:
        raise _refuse(S, H, "version", f"unknown version {int(h['version'])} (this pkfuse reads {STATE_VERSION})")
    if int(h["header_size"]) != H.itemsize:
        raise _refuse(S, H, "header_size", f"{int(h['header_size'])}, version {STATE_VERSION} has {H.itemsize}")
    if int(h["total_size"]) != len(data):
        raise _refuse(S, H, "total_size", f"says {int(h['total_size'])} bytes, the file has {len(data)} (truncated?)")
    buf = bytearray(data)
    off = _field_offset(H, "crc32")
    buf[off:off + 4] = bytes(4)
    if zlib.crc32(buf) != int(h["crc32"]):
        raise _refuse(S, H, "crc32", f"{int(h['crc32']):#010x}, the file's is {zlib.crc32(buf):#010x} (corrupt)")
    if any(int(r) for r in h["reserved"]):
        raise _refuse(S, H, "reserved", "not zero")
    engine = bytes(h["engine"]).rstrip(b"\0").decode(errors="replace")
    if expect_engine is not None and engine != expect_engine:
        raise _refuse(S, H, "engine", f"a {engine!r} engine's state, this is the {expect_engine!r} engine")
    n = int(h["nr_vcpus"])
    if not 1 <= n <= MAX_VCPUS:
        raise _refuse(S, H, "nr_vcpus", f"{n}, not 1 to {MAX_VCPUS}")
    if n != expect_vcpus:
        raise _refuse(S, H, "nr_vcpus", f"the state has {n} vCPUs, the VM has {expect_vcpus}")
    uuid = bytes(h["vm_uuid"].tobytes())
    if uuid != bytes(expect_uuid):
        raise _refuse(S, H, "vm_uuid", f"another VM's state ({uuid.hex()}, this VM is {bytes(expect_uuid).hex()})")
    ram_size = int(h["ram_size"])
    if expect_ram_size is not None and ram_size != expect_ram_size:
        raise _refuse(S, H, "ram_size", f"the state is for {ram_size} bytes of guest RAM, the guest has "
                                        f"{expect_ram_size}")
    blobs = []
    base = _field_offset(H, "vcpus")
    end_prev = H.itemsize
    for i, (o, ln) in enumerate(h["vcpus"]):
        o, ln = int(o), int(ln)
        where = f"{S}.vcpus[{i}] at offset {base + i * BLOB_ENTRY.itemsize}"
        if i >= n:
            if o or ln:
                raise CpuStateError(f"vCPU state: {where}: set, but the state has {n} vCPUs")
            continue
        if o % BLOB_ALIGN or o < end_prev or o + ln > len(data) or ln == 0:
            raise CpuStateError(f"vCPU state: {where}: blob ({o}, {ln}) is empty, unaligned, overlapping or "
                                f"outside the {len(data)}-byte file")
        blobs.append(bytes(data[o:o + ln]))
        end_prev = o + ln
    return CpuState(engine, uuid, ram_size, blobs)


def write_state(path: str | os.PathLike[str], data: bytes) -> None:
    """Make ``data`` the file at ``path`` durably and atomically: temporary file, fsync, rename, fsync dir."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def read_state(path: str | os.PathLike[str], **expect: object) -> CpuState:
    """``decode`` of the file at ``path`` (keyword arguments as ``decode``'s)."""
    return decode(Path(path).read_bytes(), **expect)  # type: ignore[arg-type]


# ------------------------------------------------------------------ the KVM engine's per-vCPU blob


def encode_kvm_vcpu(vcpu: int, sections: Mapping[str, bytes]) -> bytes:
    """A KVM vCPU blob: KVM_VCPU_HEADER, then each of KVM_SECTIONS at its recorded offset."""
    missing = [s for s in KVM_SECTIONS if s not in sections]
    if missing or set(sections) - set(KVM_SECTIONS):
        raise CpuStateError(f"KVM vCPU blob: sections {sorted(sections)}, expected {list(KVM_SECTIONS)}")
    h = np.zeros((), KVM_VCPU_HEADER)
    h["magic"], h["version"], h["vcpu"] = KVM_VCPU_MAGIC, KVM_VCPU_VERSION, vcpu
    at = _align(KVM_VCPU_HEADER.itemsize)
    for k, name in enumerate(KVM_SECTIONS):
        h["sections"][k] = (at, len(sections[name]))
        at = _align(at + len(sections[name]))
    out = bytearray(at)
    out[:KVM_VCPU_HEADER.itemsize] = h.tobytes()
    for k, name in enumerate(KVM_SECTIONS):
        o = int(h["sections"][k]["offset"])
        out[o:o + len(sections[name])] = sections[name]
    return bytes(out)


def decode_kvm_vcpu(blob: bytes, *, expect_vcpu: int) -> dict[str, bytes]:
    """The sections of a KVM vCPU blob, each checked against its structure's size."""
    H, S = KVM_VCPU_HEADER, "KVM_VCPU_HEADER"  # noqa: N806
    if len(blob) < H.itemsize:
        raise CpuStateError(f"vCPU state: a KVM vCPU blob of {len(blob)} bytes, shorter than {S} ({H.itemsize})")
    h = np.frombuffer(blob, H, count=1)[0]
    if int(h["magic"]) != KVM_VCPU_MAGIC:
        raise _refuse(S, H, "magic", f"{int(h['magic']):#018x} is not {KVM_VCPU_MAGIC:#018x} (not a KVM vCPU)")
    if int(h["version"]) != KVM_VCPU_VERSION:
        raise _refuse(S, H, "version", f"unknown version {int(h['version'])} (this pkfuse reads {KVM_VCPU_VERSION})")
    if int(h["vcpu"]) != expect_vcpu:
        raise _refuse(S, H, "vcpu", f"the blob of vCPU {int(h['vcpu'])} given to vCPU {expect_vcpu}")
    if any(int(r) for r in h["reserved"]):
        raise _refuse(S, H, "reserved", "not zero")
    out = {}
    base = _field_offset(H, "sections")
    for k, name in enumerate(KVM_SECTIONS):
        o, ln = int(h["sections"][k]["offset"]), int(h["sections"][k]["length"])
        where = f"vCPU state: {S}.sections[{k}] ({name}) at offset {base + k * SECTION_ENTRY.itemsize}"
        if o % BLOB_ALIGN or o < H.itemsize or o + ln > len(blob):
            raise CpuStateError(f"{where}: ({o}, {ln}) is unaligned or outside the {len(blob)}-byte blob")
        fixed = KVM_SECTION_SIZES.get(name)
        if fixed is not None and ln != fixed:
            raise CpuStateError(f"{where}: {ln} bytes, struct kvm_{name} is {fixed}")
        if name == "xsave" and (ln < 4096 or ln % 4):
            raise CpuStateError(f"{where}: {ln} bytes, struct kvm_xsave is at least 4096, a multiple of 4")
        if name in ("msrs", "cpuid"):
            entry = 16 if name == "msrs" else 40
            count = int.from_bytes(blob[o:o + 4], "little") if ln >= 8 else -1
            if ln < 8 or (ln - 8) % entry or count != (ln - 8) // entry:
                raise CpuStateError(f"{where}: {ln} bytes with count {count}: a header of 8 and {entry}-byte "
                                    "entries")
        out[name] = bytes(blob[o:o + ln])
    return out
