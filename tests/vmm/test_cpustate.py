"""The vCPU state file (pkfuse.vmm.cpustate): its declared layout, every refusal, the atomic durable write."""

from __future__ import annotations

import os
import uuid as uuidlib
import zlib
from pathlib import Path

import numpy as np
import pytest

from backing.errors import PkfuseError
from pkfuse.vmm import cpustate
from pkfuse.vmm.cpustate import STATE_HEADER, CpuStateError

UUID = uuidlib.UUID("12345678-9abc-4def-8123-456789abcdef").bytes
RAM = 64 << 20


def blobs(n: int = 2) -> list[bytes]:
    return [bytes([i + 1]) * (100 + 7 * i) for i in range(n)]


def field(name: str) -> int:
    return STATE_HEADER.fields[name][1]


def recrc(data: bytearray) -> bytes:
    """``data`` with its CRC made right again: a tampered header reaches the check under test."""
    data[field("crc32"):field("crc32") + 4] = bytes(4)
    data[field("crc32"):field("crc32") + 4] = zlib.crc32(data).to_bytes(4, "little")
    return bytes(data)


def poke(data: bytes, offset: int, value: bytes) -> bytes:
    d = bytearray(data)
    d[offset:offset + len(value)] = value
    return recrc(d)


def refused(data: bytes, match: str, **expect: object) -> str:
    kw: dict[str, object] = {"expect_uuid": UUID, "expect_vcpus": 2, "expect_engine": "kvm", "expect_ram_size": RAM}
    kw.update(expect)
    with pytest.raises(CpuStateError, match=match) as e:
        cpustate.decode(data, **kw)  # type: ignore[arg-type]
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("vCPU state: ")
    return msg


def test_layout_is_declared_at_fixed_offsets() -> None:
    assert STATE_HEADER.itemsize == 360
    assert [(n, field(n)) for n in ("magic", "version", "header_size", "engine", "vm_uuid", "ram_size", "nr_vcpus",
                                    "crc32", "total_size", "vcpus", "reserved")] == [
        ("magic", 0), ("version", 8), ("header_size", 12), ("engine", 16), ("vm_uuid", 32), ("ram_size", 48),
        ("nr_vcpus", 56), ("crc32", 60), ("total_size", 64), ("vcpus", 72), ("reserved", 328)]
    assert cpustate.KVM_VCPU_HEADER.itemsize == 104
    assert cpustate.KVM_VCPU_HEADER.fields["sections"][1] == 16


def test_round_trip() -> None:
    data = cpustate.encode("kvm", UUID, RAM, blobs())
    assert data[:8] == b"PKVCPUST"
    s = cpustate.decode(data, expect_uuid=UUID, expect_vcpus=2, expect_engine="kvm", expect_ram_size=RAM)
    assert (s.engine, s.vm_uuid, s.ram_size, s.nr_vcpus, s.blobs) == ("kvm", UUID, RAM, 2, blobs())
    h = np.frombuffer(data, STATE_HEADER, count=1)[0]
    assert [int(o) % 8 for o, _ in h["vcpus"][:2]] == [0, 0] and not h["vcpus"][2:]["offset"].any()
    assert int(h["total_size"]) == len(data)


def test_refuses_bad_magic() -> None:
    data = cpustate.encode("kvm", UUID, RAM, blobs())
    refused(b"NOTSTATE" + data[8:], r"^vCPU state: STATE_HEADER\.magic at offset 0: .* \(not a vCPU state file\)$")
    with pytest.raises(PkfuseError) as e:  # the CLI's one-line errors
        cpustate.decode(b"NOTSTATE" + data[8:], expect_uuid=UUID, expect_vcpus=2)
    assert (e.value.structure, e.value.offset) == ("STATE_HEADER.magic", 0)  # type: ignore[attr-defined]


def test_refuses_an_unknown_version() -> None:
    data = poke(cpustate.encode("kvm", UUID, RAM, blobs()), field("version"), (2).to_bytes(4, "little"))
    refused(data, r"STATE_HEADER\.version at offset 8: unknown version 2 \(this pkfuse reads 1\)")


def test_refuses_a_bad_crc() -> None:
    data = bytearray(cpustate.encode("kvm", UUID, RAM, blobs()))
    data[-20] ^= 0x40  # a bit of vCPU 1's blob
    refused(bytes(data), r"STATE_HEADER\.crc32 at offset 60: 0x[0-9a-f]{8}, the file's is 0x[0-9a-f]{8} \(corrupt\)")
    # the header is covered too: a flipped engine name without a new CRC is corruption, not another engine
    data = bytearray(cpustate.encode("kvm", UUID, RAM, blobs()))
    data[field("engine")] ^= 1
    refused(bytes(data), r"STATE_HEADER\.crc32 at offset 60")


def test_refuses_another_vms_state() -> None:
    other = uuidlib.uuid4().bytes
    data = cpustate.encode("kvm", other, RAM, blobs())
    refused(data, rf"STATE_HEADER\.vm_uuid at offset 32: another VM's state \({other.hex()}, this VM is "
                  rf"{UUID.hex()}\)")


def test_refuses_another_vcpu_count() -> None:
    data = cpustate.encode("kvm", UUID, RAM, blobs(3))
    refused(data, r"STATE_HEADER\.nr_vcpus at offset 56: the state has 3 vCPUs, the VM has 2")
    refused(poke(data, field("nr_vcpus"), (17).to_bytes(4, "little")),
            r"STATE_HEADER\.nr_vcpus at offset 56: 17, not 1 to 16")


def test_refuses_another_engines_state() -> None:
    data = cpustate.encode("unicorn", UUID, RAM, blobs())
    refused(data, r"STATE_HEADER\.engine at offset 16: a 'unicorn' engine's state, this is the 'kvm' engine")
    assert cpustate.decode(data, expect_uuid=UUID, expect_vcpus=2, expect_engine="unicorn").engine == "unicorn"


def test_refuses_another_ram_size() -> None:
    data = cpustate.encode("kvm", UUID, RAM // 2, blobs())
    refused(data, rf"STATE_HEADER\.ram_size at offset 48: the state is for {RAM // 2} bytes of guest RAM, the "
                  rf"guest has {RAM}")


def test_refuses_truncated_and_short_files() -> None:
    data = cpustate.encode("kvm", UUID, RAM, blobs())
    refused(data[:-8], rf"STATE_HEADER\.total_size at offset 64: says {len(data)} bytes, the file has "
                       rf"{len(data) - 8} \(truncated\?\)")
    refused(data[:100], r"^vCPU state: 100 bytes, shorter than STATE_HEADER \(360 bytes\)$")
    refused(b"", r"^vCPU state: 0 bytes")


def test_refuses_reserved_bits_and_bad_blob_entries() -> None:
    data = cpustate.encode("kvm", UUID, RAM, blobs())
    refused(poke(data, field("reserved") + 8, b"\x01"), r"STATE_HEADER\.reserved at offset 328: not zero")
    refused(poke(data, field("header_size"), (400).to_bytes(4, "little")),
            r"STATE_HEADER\.header_size at offset 12: 400, version 1 has 360")
    entry1 = field("vcpus") + 16
    refused(poke(data, entry1 + 8, (1 << 20).to_bytes(8, "little")),
            r"STATE_HEADER\.vcpus\[1\] at offset 88: blob \(\d+, 1048576\) is empty, unaligned, overlapping or "
            r"outside the \d+-byte file")
    refused(poke(data, entry1, (8).to_bytes(8, "little")), r"STATE_HEADER\.vcpus\[1\] at offset 88")  # in the header
    refused(poke(data, field("vcpus") + 2 * 16, (368).to_bytes(8, "little")),
            r"STATE_HEADER\.vcpus\[2\] at offset 104: set, but the state has 2 vCPUs")


def test_encode_refuses_what_it_cannot_write() -> None:
    with pytest.raises(CpuStateError, match="17 vCPUs"):
        cpustate.encode("kvm", UUID, RAM, blobs(17))
    with pytest.raises(CpuStateError, match="engine name"):
        cpustate.encode("a-very-long-engine-name", UUID, RAM, blobs())
    with pytest.raises(CpuStateError, match="vm_uuid is 16 bytes"):
        cpustate.encode("kvm", b"short", RAM, blobs())


# ------------------------------------------------------------------ the KVM vCPU blob
def sections(**override: bytes) -> dict[str, bytes]:
    s = {"regs": bytes(range(144)), "sregs": b"\x02" * 312, "xsave": b"\x03" * 4096, "xcrs": b"\x04" * 392,
         "msrs": (2).to_bytes(4, "little") + bytes(4) + b"\x05" * 32, "vcpu_events": b"\x06" * 64,
         "mp_state": bytes(4), "debugregs": b"\x08" * 128, "cpuid": (1).to_bytes(4, "little") + bytes(4) + b"\x09" * 40}
    s.update(override)
    return s


def test_kvm_blob_round_trip_each_section_at_its_recorded_offset() -> None:
    blob = cpustate.encode_kvm_vcpu(3, sections())
    h = np.frombuffer(blob, cpustate.KVM_VCPU_HEADER, count=1)[0]
    assert int(h["vcpu"]) == 3
    for k, name in enumerate(cpustate.KVM_SECTIONS):
        o, n = int(h["sections"][k]["offset"]), int(h["sections"][k]["length"])
        assert o % 8 == 0 and blob[o:o + n] == sections()[name]
    assert cpustate.decode_kvm_vcpu(blob, expect_vcpu=3) == sections()


def test_kvm_blob_refusals() -> None:
    blob = cpustate.encode_kvm_vcpu(0, sections())
    with pytest.raises(CpuStateError, match=r"KVM_VCPU_HEADER\.magic at offset 0"):
        cpustate.decode_kvm_vcpu(b"X" * 8 + blob[8:], expect_vcpu=0)
    with pytest.raises(CpuStateError, match=r"KVM_VCPU_HEADER\.version at offset 8: unknown version 9"):
        cpustate.decode_kvm_vcpu(blob[:8] + (9).to_bytes(4, "little") + blob[12:], expect_vcpu=0)
    with pytest.raises(CpuStateError, match=r"KVM_VCPU_HEADER\.vcpu at offset 12: the blob of vCPU 0 given to "
                                            r"vCPU 1"):
        cpustate.decode_kvm_vcpu(blob, expect_vcpu=1)
    with pytest.raises(CpuStateError, match=r"sections\[1\] \(sregs\) at offset 24: 300 bytes, struct kvm_sregs is "
                                            r"312"):
        cpustate.decode_kvm_vcpu(cpustate.encode_kvm_vcpu(0, sections(sregs=bytes(300))), expect_vcpu=0)
    with pytest.raises(CpuStateError, match=r"\(xsave\) .* at least 4096"):
        cpustate.decode_kvm_vcpu(cpustate.encode_kvm_vcpu(0, sections(xsave=bytes(512))), expect_vcpu=0)
    with pytest.raises(CpuStateError, match=r"\(msrs\) .* 40 bytes with count 3"):
        cpustate.decode_kvm_vcpu(cpustate.encode_kvm_vcpu(0, sections(
            msrs=(3).to_bytes(4, "little") + bytes(36))), expect_vcpu=0)
    with pytest.raises(CpuStateError, match=r"shorter than KVM_VCPU_HEADER"):
        cpustate.decode_kvm_vcpu(blob[:50], expect_vcpu=0)
    with pytest.raises(CpuStateError, match=r"\(cpuid\) .* outside the"):
        cpustate.decode_kvm_vcpu(blob[:-8], expect_vcpu=0)
    with pytest.raises(CpuStateError, match="expected"):
        cpustate.encode_kvm_vcpu(0, {k: v for k, v in sections().items() if k != "xcrs"})


# ------------------------------------------------------------------ write_state
def test_write_state_replaces_atomically_and_durably(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "vcpus.state"
    old = cpustate.encode("kvm", UUID, RAM, blobs())
    cpustate.write_state(path, old)
    assert path.read_bytes() == old
    synced: list[str] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")),
                                                 real_fsync(fd))[1])
    new = cpustate.encode("kvm", UUID, RAM, blobs(3))
    cpustate.write_state(path, new)
    assert path.read_bytes() == new
    assert synced[0].startswith(str(tmp_path / ".vcpus.state.tmp-")) and synced[1] == str(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vcpus.state"]
    st = cpustate.read_state(path, expect_uuid=UUID, expect_vcpus=3)
    assert st.blobs == blobs(3)


def test_write_state_that_fails_leaves_the_old_file_and_no_temporary(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "vcpus.state"
    old = cpustate.encode("kvm", UUID, RAM, blobs())
    cpustate.write_state(path, old)

    def crash(*a: object) -> None:
        raise OSError(5, "injected")

    for name in ("fsync", "replace"):
        with monkeypatch.context() as m:
            m.setattr(os, name, crash)
            with pytest.raises(OSError, match="injected"):
                cpustate.write_state(path, cpustate.encode("kvm", UUID, RAM, blobs(3)))
        assert path.read_bytes() == old
        assert sorted(p.name for p in tmp_path.iterdir()) == ["vcpus.state"]
