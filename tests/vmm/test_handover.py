"""The handover file: two slots, the newest valid record wins, a torn save loses nothing older."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from pkfuse.vmm import handover
from pkfuse.vmm.handover import FILE_SIZE, SLOT_SIZE, Handover, HandoverError


def _record(payload: bytes = b"vcpu state", **kw: object) -> Handover:
    fields = dict(generation=0, nr_vcpus=2, memory=64 << 20, vm_uuid=bytes(range(16)), engine="kvm",
                  guest="guest_mem/vm0", rid=0x18, ram_token=1, state_token=2, hwpt_token=3,
                  saved_ns=123, payload=payload)
    fields.update(kw)
    return Handover(**fields)  # type: ignore[arg-type]


@pytest.fixture
def fd(tmp_path: Path) -> Iterator[int]:
    f = os.open(tmp_path / "vm0.vmstate", os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(f, FILE_SIZE)
    yield f
    os.close(f)


def test_a_file_never_saved_into_has_no_record(fd: int) -> None:
    assert handover.read(fd) is None


def test_a_record_reads_back_whole(fd: int) -> None:
    assert handover.write(fd, _record()) == 1
    got = handover.read(fd)
    assert got == _record(generation=1)


def test_a_resumed_record_keeps_its_flag_and_is_the_newest(fd: int) -> None:
    handover.write(fd, _record())
    handover.write(fd, _record(flags=handover.FLAG_RESUMED))  # what a successor writes before its vCPUs run
    got = handover.read(fd)
    assert got is not None and got.flags == handover.FLAG_RESUMED and got.payload == b"vcpu state"


def test_saves_alternate_slots_and_the_newest_wins(fd: int) -> None:
    handover.write(fd, _record(b"first"))
    handover.write(fd, _record(b"second"))
    assert os.pread(fd, 8, 0) == os.pread(fd, 8, SLOT_SIZE) == b"PKVMHAND"
    got = handover.read(fd)
    assert got is not None and (got.generation, got.payload) == (2, b"second")


def test_a_torn_save_leaves_the_previous_record(fd: int) -> None:
    handover.write(fd, _record(b"first"))
    handover.write(fd, _record(b"second"))  # generation 2, slot A
    os.pwrite(fd, b"\xff", handover.HANDOVER_RECORD.itemsize + 3)  # its payload torn
    got = handover.read(fd)
    assert got is not None and (got.generation, got.payload) == (1, b"first")
    assert handover.write(fd, _record(b"third")) == 2  # overwrites the torn slot, not the good one
    assert handover.read(fd).payload == b"third"  # type: ignore[union-attr]


def test_a_damaged_only_record_is_refused_naming_slot_and_offset(fd: int) -> None:
    handover.write(fd, _record())  # generation 1: slot B
    os.pwrite(fd, b"\7", SLOT_SIZE + 16)  # its generation
    with pytest.raises(HandoverError, match=r"slot B \(offset 0x40000\)\+12: CRC mismatch"):
        handover.read(fd, "vm0.vmstate")


def test_another_version_is_refused(fd: int) -> None:
    handover.write(fd, _record())
    os.pwrite(fd, (9).to_bytes(4, "little"), SLOT_SIZE + 8)
    with pytest.raises(HandoverError, match="handover version 9, this VMM reads 1"):
        handover.read(fd)


def test_a_state_larger_than_a_slot_is_refused() -> None:
    with pytest.raises(HandoverError, match="does not fit"):
        handover.encode(_record(b"x" * SLOT_SIZE))


def test_no_device_reads_back_as_none(fd: int) -> None:
    handover.write(fd, _record(rid=None))
    assert handover.read(fd).rid is None  # type: ignore[union-attr]
