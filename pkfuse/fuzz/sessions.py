"""``pkfuse fuzz --target sessions``: preserved sessions tampered with between the kernels, structurally.

Each case makes one to three edits to a frozen image (``preserved``) that
garbage in persistent memory -- or a hostile previous kernel -- could
leave, each aimed at what the next kernel reads back about the sessions:

- a field of a record of ``iommu/lu-state`` (a session, a file, a HWPT, a
  map, a device, a drop, the header's counts): 0, 1, all ones, a neighbour
  (+-1, +-4 KiB, +-2 MiB), another record's value, a random number;
  resealed with its checksum (so the edit reaches the checks past it) nine
  times in ten;
- an entry of a preserved domain's tables, at any level, present or not: a
  leaf into the other VM's file, its own, the metadata, a free page, the
  state file, past the image; a table pointer into the other domain's
  tables, its own (a loop), a guest page; reserved, ignored or random bits;
- a session's context entry (reserved bits, translation type, address
  width, domain id, a pointer elsewhere, cleared, copied to another
  requester's slot) and the root table's entries.

The judge (``preserved.judge``) then holds the next kernel to the issue's
rule: garbage refused with a finding naming its structure, never adopted; a
refused session's device blocked, the other session whole.
"""

from __future__ import annotations

from typing import Any

from backing import format as fmt
from backing import lustate

from . import preserved
from .common import Entropy

MiB = 1 << 20
PS = fmt.PAGE_SIZE
#: the record arrays an edit picks from, with their fields (the header's: its counts and words)
FIELDS: dict[str, tuple[str, ...]] = {
    "header": ("compatible", "boot", "nsessions", "nfiles", "nhwpts", "nmaps", "ndevices", "ndrops", "domains"),
    **{name: dtype.names for name, (_, dtype) in zip(lustate.ARRAYS, lustate._ARRAYS)},
}
LEAF_TARGETS = ("other-vm", "own-vm", "metadata", "free", "outside", "state", "superblock")
TABLE_TARGETS = ("other-table", "own-table", "own-vm", "other-vm", "free", "outside", "metadata")
SLPT_TARGETS = ("other-table", "own-table", "free", "outside", "own-vm", "metadata")
RSVD_BITS = (7, 11, 62)  #: PS (reserved in a PML4E and a 4 KiB leaf's neighbours), SNP, bit 62
IGNORED_BITS = (10, 52, 60, 63)
RIDS = (0x18, 0x20, 0x21, 0x28, 0x100, 0x502, 0xFFFF)


def generate(e: Entropy, frozen: preserved.Frozen) -> list[dict[str, Any]]:
    """One to three edits, each of a kind drawn by weight."""
    out = []
    for _ in range(e.weighted([(1, 6), (2, 3), (3, 1)])):
        kind = e.weighted([("state", 45), ("entry", 35), ("context", 15), ("root", 5)])
        out.append({"state": _state, "entry": _entry, "context": _context, "root": _root}[kind](e, frozen))
    return out


def _session(e: Entropy, frozen: preserved.Frozen) -> str:
    return e.choice(sorted(frozen.sessions)).decode()


def _state(e: Entropy, frozen: preserved.Frozen) -> dict[str, Any]:
    array = e.weighted([("header", 2), ("sessions", 3), ("files", 4), ("hwpts", 4), ("maps", 5), ("devices", 3),
                        ("drops", 1)])
    field = e.choice(FIELDS[array])
    value = e.weighted([
        (["set", 0], 3), (["set", 1], 1), (["set", (1 << 64) - 1], 2), (["set", 0xFFFF_FFFF], 2),
        (["add", e.choice((1, -1, PS, -PS, 2 * MiB, -2 * MiB))], 6),
        (["copy", array, e.int(0, 4), field], 4), (["set", e.int(0, (1 << 64) - 1)], 2),
        (["set", e.int(0, 64)], 2),
    ])
    edit = {"kind": "state", "array": array, "index": e.int(0, 4), "field": field, "value": value}
    if e.chance(0.1):
        edit["seal"] = False
    return edit


def _entry(e: Entropy, frozen: preserved.Frozen) -> dict[str, Any]:
    name = _session(e, frozen)
    levels = [lv for lv, ent in enumerate(frozen.sessions[name.encode()].entries) if ent.size]
    level = e.choice(levels)
    edit: dict[str, Any] = {"kind": "entry", "session": name, "level": level}
    if e.chance(0.2):
        edit["slot"] = e.int(0, 511)  # a slot that may hold nothing yet
    else:
        edit["n"] = e.int(0, 1 << 16)
    leaf_ok = level > 0
    edit["value"] = e.weighted([
        (["leaf", e.choice(LEAF_TARGETS), e.int(0, 1)], 8 if leaf_ok else 0),
        (["table", e.choice(TABLE_TARGETS)], 6 if level < 3 else 0),
        (["xor", 1 << e.choice(RSVD_BITS)], 3), (["xor", 1 << e.choice(IGNORED_BITS)], 2),
        (["xor", 1 << e.int(0, 63)], 3), (["and", ~3 & ((1 << 64) - 1)], 2), (["set", 0], 2),
        (["set", e.int(0, (1 << 64) - 1)], 2), (["or", 1 << 7], 2),
    ])
    return edit


def _context(e: Entropy, frozen: preserved.Frozen) -> dict[str, Any]:
    edit: dict[str, Any] = {"kind": "context", "session": _session(e, frozen)}
    if e.chance(0.15):
        edit["devfn"] = e.choice(RIDS)
        return edit
    edit["word"] = e.int(0, 1)
    if edit["word"] == 0:
        edit["value"] = e.weighted([
            (["or", 1 << e.int(4, 11)], 3), (["xor", 0b11 << 2], 2), (["xor", 1 << 1], 1),
            (["slptptr", e.choice(SLPT_TARGETS)], 4), (["set", 0], 1), (["xor", 1 << e.int(12, 63)], 2)])
    else:
        edit["value"] = e.weighted([
            (["xor", e.int(1, 7)], 3), (["xor", 1 << e.int(8, 23)], 3), (["or", 1 << e.int(24, 63)], 2),
            (["set", 0], 1)])
    return edit


def _root(e: Entropy, frozen: preserved.Frozen) -> dict[str, Any]:
    return {"kind": "root", "bus": e.choice((0, 0, 1, 5, e.int(0, 255))), "word": e.int(0, 1),
            "value": e.weighted([(["xor", 1 << e.int(0, 63)], 4), (["set", 0], 2), (["or", 1 << e.int(1, 11)], 2),
                                 (["set", e.int(0, (1 << 64) - 1)], 1)])}
