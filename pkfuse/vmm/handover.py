"""The handover file: what a VMM leaves its successor (or its own next start) besides guest RAM.

A small file on the mount beside the guest-RAM file (``GUEST.vmstate``),
preserved in the same live-update session. Its size is fixed when it is
created, because a preserved file's size is frozen: the state is written into
it in place, never by a rename (a renamed file would be another inode, not
the one the session holds).

Two slots, A at offset 0 and B at ``SLOT_SIZE``: a save writes the slot that
does *not* hold the newest valid record, with a generation one higher, so a
SIGKILL in the middle of a save leaves the previous record whole; a reader
takes the valid record with the highest generation. A record is
``HANDOVER_RECORD`` followed by ``payload_length`` bytes (the vCPU state file
of ``pkfuse.vmm.cpustate``); its CRC32 covers the record with ``crc`` = 0 and
the payload. A slot whose magic, version or CRC is wrong is not a record.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass

import numpy as np

MAGIC = int.from_bytes(b"PKVMHAND", "little")
VERSION = 1
SLOT_SIZE = 256 << 10
FILE_SIZE = 2 * SLOT_SIZE
NO_DEVICE = 0xFFFFFFFF
#: a successor resumed these vCPUs: the VM has run since, so this state is stale -- a second
#: successor (the new kernel died before finish) must boot the VM over its RAM, never restore it
FLAG_RESUMED = 1

HANDOVER_RECORD = np.dtype([
    ("magic", "<u8"),  # MAGIC
    ("version", "<u4"),  # VERSION
    ("crc", "<u4"),  # CRC32 of the record with crc = 0, then the payload
    ("generation", "<u8"),  # 1, 2, ...: the newest valid slot wins
    ("payload_length", "<u4"),  # bytes after the record
    ("nr_vcpus", "<u4"),
    ("memory", "<u8"),  # guest RAM, bytes
    ("vm_uuid", "V16"),  # the guest CONFIG's
    ("engine", "S16"),  # "kvm" / "unicorn"
    ("guest", "S256"),  # the guest-RAM file, relative to the mountpoint
    ("rid", "<u4"),  # the device's requester id, NO_DEVICE without one
    ("flags", "<u4"),  # FLAG_RESUMED
    ("ram_token", "<u8"),  # live-update tokens of the session (0 when saved without one)
    ("state_token", "<u8"),
    ("hwpt_token", "<u8"),
    ("saved_ns", "<u8"),  # CLOCK_REALTIME when the vCPUs were paused (the blackout's start)
    ("reserved", "<u8", (8,)),
])
assert HANDOVER_RECORD.itemsize == 432


class HandoverError(ValueError):
    """The handover file holds no usable record (names the file, slot and offset)."""


@dataclass(frozen=True)
class Handover:
    generation: int
    nr_vcpus: int
    memory: int
    vm_uuid: bytes
    engine: str
    guest: str
    rid: int | None
    ram_token: int
    state_token: int
    hwpt_token: int
    saved_ns: int
    payload: bytes
    flags: int = 0  #: FLAG_RESUMED


def encode(h: Handover) -> bytes:
    rec = np.zeros((), HANDOVER_RECORD)
    rec["magic"], rec["version"], rec["generation"] = MAGIC, VERSION, h.generation
    rec["payload_length"], rec["nr_vcpus"], rec["memory"] = len(h.payload), h.nr_vcpus, h.memory
    rec["vm_uuid"] = np.void(h.vm_uuid)
    rec["engine"], rec["guest"] = h.engine.encode(), h.guest.encode()
    rec["rid"] = NO_DEVICE if h.rid is None else h.rid
    rec["ram_token"], rec["state_token"], rec["hwpt_token"] = h.ram_token, h.state_token, h.hwpt_token
    rec["saved_ns"], rec["flags"] = h.saved_ns, h.flags
    if len(h.guest.encode()) >= 256:
        raise HandoverError(f"guest path {h.guest!r} is longer than the record's 255 bytes")
    if HANDOVER_RECORD.itemsize + len(h.payload) > SLOT_SIZE:
        raise HandoverError(f"a vCPU state of {len(h.payload)} bytes does not fit a {SLOT_SIZE}-byte slot")
    raw = rec.tobytes() + h.payload
    crc = zlib.crc32(raw)
    rec["crc"] = crc
    return rec.tobytes() + h.payload


def decode_slot(data: bytes, where: str) -> Handover:
    """The record at the start of ``data`` (one slot); ``HandoverError`` naming ``where`` otherwise."""
    size = HANDOVER_RECORD.itemsize
    if len(data) < size:
        raise HandoverError(f"{where}: {len(data)} bytes, a record is {size}")
    rec = np.frombuffer(data[:size], HANDOVER_RECORD)[0]
    if int(rec["magic"]) != MAGIC:
        raise HandoverError(f"{where}+0: no handover record (magic {int(rec['magic']):#x})")
    if int(rec["version"]) != VERSION:
        raise HandoverError(f"{where}+8: handover version {int(rec['version'])}, this VMM reads {VERSION}")
    n = int(rec["payload_length"])
    if size + n > len(data):
        raise HandoverError(f"{where}+24: payload of {n} bytes runs past the slot")
    zeroed = bytearray(data[:size])
    zeroed[12:16] = b"\0\0\0\0"
    if zlib.crc32(bytes(zeroed) + data[size:size + n]) != int(rec["crc"]):
        raise HandoverError(f"{where}+12: CRC mismatch (a torn or damaged record)")
    rid = int(rec["rid"])
    return Handover(int(rec["generation"]), int(rec["nr_vcpus"]), int(rec["memory"]), bytes(rec["vm_uuid"]),
                    bytes(rec["engine"]).decode(errors="replace"), bytes(rec["guest"]).decode(errors="replace"),
                    None if rid == NO_DEVICE else rid, int(rec["ram_token"]), int(rec["state_token"]),
                    int(rec["hwpt_token"]), int(rec["saved_ns"]), bytes(data[size:size + n]), int(rec["flags"]))


def read(fd: int, name: str = "handover file") -> Handover | None:
    """The newest valid record of the file, None if neither slot holds one (a file never saved into).

    ``HandoverError`` when a slot holds a record that is damaged and no valid one is newer.
    """
    records: list[Handover] = []
    errors: list[str] = []
    for slot in (0, 1):
        data = os.pread(fd, SLOT_SIZE, slot * SLOT_SIZE)
        if not data.strip(b"\0"):
            continue
        try:
            records.append(decode_slot(data, f"{name} slot {'AB'[slot]} (offset {slot * SLOT_SIZE:#x})"))
        except HandoverError as exc:
            errors.append(str(exc))
    if records:
        return max(records, key=lambda r: r.generation)
    if errors:
        raise HandoverError(errors[0])
    return None


def write(fd: int, h: Handover) -> int:
    """Write ``h`` into the slot not holding the newest record; return its generation.

    ``h.generation`` is ignored: it becomes the newest valid generation + 1.
    The bytes are in the image when ``pwrite`` returns (direct_io); an
    ``fdatasync`` orders them before what the caller does next.
    """
    try:
        newest = read(fd)
    except HandoverError:
        newest = None
    gen = (newest.generation if newest is not None else 0) + 1
    slot = gen % 2  # the newest is in the other one
    data = encode(Handover(**{**h.__dict__, "generation": gen}))
    written = os.pwrite(fd, data, slot * SLOT_SIZE)
    if written != len(data):
        raise OSError(f"short write of the handover record: {written} of {len(data)} bytes")
    os.fdatasync(fd)
    return gen
