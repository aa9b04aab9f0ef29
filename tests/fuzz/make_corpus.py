"""Writes ``corpus/requests.json``, ``sessions.json`` and ``images.json``: the nastiest cases, kept for replay.

``requests``: the control socket's call sequences.

Each sequence is a list of the steps ``pkfuse.fuzz.requests`` runs (plain
dicts, concrete arguments); the model computes every expected errno when it
is replayed (``test_requests_fuzz.py``), so a sequence states what is done,
not what must come back. Most were found by ``pkfuse fuzz --target requests``
or aimed at what it found; rerun this script after changing them:
``python tests/fuzz/make_corpus.py``.

``sessions`` and ``images``: edits to the frozen images of both designs
(``pkfuse.fuzz.preserved``, aimed by name: a session's leaf, a record's
field, a region's bytes), each with the outcome the next kernel must reach
(``refused``, or ``accepted`` for garbage it may ignore); the judge checks
the rest -- the hardware's view, the other session whole, fsck -- on replay
(``test_restore_fuzz.py``).
"""

from __future__ import annotations

import json
from pathlib import Path

from pkfuse.uapi import wire

MiB = 1 << 20
PS = 4096
U64_MAX = (1 << 64) - 1
TOP = 1 << 48
RW, RO, FIXED = 6, 4, 1
CORPUS = Path(__file__).with_name("corpus") / "requests.json"
SESSIONS_CORPUS = CORPUS.with_name("sessions.json")
IMAGES_CORPUS = CORPUS.with_name("images.json")


def opening(lu: bool = False) -> list[dict]:
    """Connections 0 and 1 on /dev/iommu, each with IOAS 1 and device 2 (00:03.0, 00:04.0); 2: /dev/liveupdate."""
    out = []
    for i, rid in enumerate((0x18, 0x20)):
        out += [{"op": "open", "c": -1, "path": "iommu"}, {"op": "ioas_alloc", "c": i},
                {"op": "bind", "c": i, "rid": rid}]
    if lu:
        out.append({"op": "open", "c": -1, "path": "lu"})
    return out


def m(c: int, fd: str, start: int, length: int, iova: int | None, flags: int = RW, ioas: int = 1,
      nfds: int = 1) -> dict:
    return {"op": "map_file", "c": c, "ioas": ioas, "fd": fd, "flags": flags | (FIXED if iova is not None else 0),
            "start": start, "length": length, "iova": iova or 0, "nfds": nfds}


def u(c: int, iova: int, length: int, ioas: int = 1) -> dict:
    return {"op": "unmap", "c": c, "ioas": ioas, "iova": iova, "length": length}


CHECK = {"op": "check"}
LU, S, X = 2, 3, 4  #: after opening(lu=True): /dev/liveupdate, the first session, the next connection

SEQUENCES: dict[str, list[dict]] = {
    # found: the whole daemon hung on an fstat of a file on its own mount, on its trio thread
    "a file on the mount sent as the session of hwpt_lu_set_preserve": opening(lu=True) + [
        {"op": "attach", "c": 0, "dev": 2, "pt": 1},
        {"op": "hwpt_preserve", "c": 0, "hwpt": 3, "token": 1, "fd": "view"},
        {"op": "hwpt_preserve", "c": 0, "hwpt": 3, "token": 1, "fd": "a"},
        {"op": "hwpt_preserve", "c": 0, "hwpt": 3, "token": 1, "fd": "iommufd"},
        {"op": "hwpt_preserve", "c": 0, "hwpt": 3, "token": 1, "fd": "dir"}, CHECK],
    # found: a preserved HWPT could be destroyed under its session, which reboot() then serialized
    "destroy of a preserved HWPT, then reboot()": opening(lu=True) + [
        {"op": "create_session", "c": LU, "name": "vm0"},
        {"op": "preserve_fd", "c": S, "fd": "a", "token": 1},
        m(0, "a", 0, 2 * MiB, 4 * MiB),
        {"op": "hwpt_alloc", "c": 0, "dev": 2, "pt": 1},
        {"op": "hwpt_preserve", "c": 0, "hwpt": 3, "token": 2, "session": S},
        {"op": "destroy", "c": 0, "id": 3}, u(0, 4 * MiB, 2 * MiB), m(0, "b", 0, PS, None),
        {"op": "destroy", "c": 0, "id": 1}, CHECK,
        {"op": "close", "c": 0}, CHECK,  # the closed context keeps the preserved HWPT and its IOAS
        {"op": "reboot", "c": LU}],
    "a cancelled session gives back what a closed context kept": opening(lu=True) + [
        {"op": "create_session", "c": LU, "name": "vm0"},
        {"op": "preserve_fd", "c": S, "fd": "c", "token": 1},
        m(0, "c", 0, MiB, 2 * MiB), {"op": "attach", "c": 0, "dev": 2, "pt": 1},
        {"op": "hwpt_preserve", "c": 0, "hwpt": 3, "token": 2, "session": S},
        {"op": "close", "c": 0}, CHECK, {"op": "close", "c": S}, CHECK],
    # found: a .pkernfs view mapped was ENOENT (no inode), not EINVAL as every file that is not guest RAM
    "descriptors of other files": opening() + [
        m(0, kind, 0, PS, None, RO) for kind in ("view", "iommu_file", "dir", "outside", "devnull", "pipe",
                                                 "iommufd", "d", "a_ro")] + [
        m(0, "a_ro", 0, PS, None, RW), m(0, "a", 0, PS, None, RW, nfds=0), m(0, "a", 0, PS, None, RW, nfds=2),
        {"op": "guest_mmap", "c": 0, "fd": "view"}, {"op": "guest_mmap", "c": 0, "fd": "d"},
        {"op": "guest_mmap", "c": 0, "fd": "a_ro"}, {"op": "guest_mmap", "c": 1, "fd": "b"}, CHECK],
    # found: descriptors on a call that takes none were accepted and dropped
    "descriptors on calls that take none": opening() + [
        {"op": "raw", "c": 0, "how": "extra_fds", "cmd": wire.IOMMU_IOAS_ALLOC},
        {"op": "raw", "c": 0, "how": "extra_fds", "cmd": wire.IOMMU_DESTROY},
        {"op": "raw", "c": 0, "how": "many_fds", "cmd": wire.IOMMU_IOAS_MAP_FILE},
        {"op": "open", "c": -1, "path": "iommu"},
        {"op": "raw", "c": 2, "how": "extra_fds", "cmd": wire.PKFUSE_OPEN}, CHECK],
    "lengths and IOVAs that overflow, at the top of 48 and 64 bits": opening() + [
        m(0, "a", 0, U64_MAX, None), m(0, "a", 0, PS, U64_MAX), m(0, "a", U64_MAX - PS + 1, 2 * PS, 0),
        m(0, "a", PS, U64_MAX - PS + 1, 0), m(0, "a", 0, 2 * PS, U64_MAX - PS + 1), m(0, "a", 0, PS, TOP),
        m(0, "a", 0, 2 * PS, TOP - PS), m(0, "a", 0, PS, TOP - PS), m(0, "a", 0, 2 * MiB, 1 << 63),
        m(0, "a", 1, PS, 0), m(0, "a", 0, PS + 1, 0), m(0, "a", 0, PS, 1), m(0, "a", 0, 0, 0),
        m(0, "a", 5 * MiB, PS, 0), m(0, "a", 4 * MiB, 2 * MiB, 0),
        u(0, U64_MAX, 1), u(0, 1, U64_MAX), u(0, U64_MAX - PS + 1, 2 * PS), u(0, 1 << 63, 1 << 63), u(0, PS, 0),
        u(0, TOP - PS, PS), {"op": "attach", "c": 0, "dev": 2, "pt": 1}, CHECK, u(0, 0, U64_MAX), CHECK],
    "overlapping maps and unmaps that cut them": opening() + [
        m(0, "a", 0, 2 * MiB, 2 * MiB), m(0, "b", 0, 2 * MiB, 3 * MiB), m(0, "b", 0, PS, 4 * MiB - PS),
        m(0, "b", 0, PS, 2 * MiB), m(0, "c", 0, MiB, 4 * MiB), m(0, "a", 2 * MiB, 3 * MiB, None),
        {"op": "attach", "c": 0, "dev": 2, "pt": 1}, CHECK,
        u(0, 2 * MiB, PS), u(0, 2 * MiB + PS, 2 * MiB), u(0, 3 * MiB, 2 * MiB), u(0, MiB, 2 * MiB),
        u(0, 2 * MiB, 3 * MiB), CHECK, u(0, 0, U64_MAX), CHECK],
    "ids of another connection and of the wrong kind": opening() + [
        {"op": "ioas_alloc", "c": 1}, {"op": "attach", "c": 1, "dev": 2, "pt": 3},
        {"op": "destroy", "c": 0, "id": 3}, {"op": "destroy", "c": 0, "id": 4}, {"op": "detach", "c": 0, "dev": 4},
        {"op": "attach", "c": 0, "dev": 2, "pt": 4}, {"op": "attach", "c": 0, "dev": 2, "pt": 2},
        {"op": "attach", "c": 0, "dev": 1, "pt": 1}, {"op": "hwpt_alloc", "c": 0, "dev": 2, "pt": 2},
        {"op": "hwpt_alloc", "c": 0, "dev": 1, "pt": 1}, {"op": "hwpt_alloc", "c": 1, "dev": 2, "pt": 4},
        m(0, "a", 0, PS, None, ioas=3), u(0, 0, U64_MAX, ioas=3), {"op": "destroy", "c": 0, "id": 0xFFFFFFFF},
        {"op": "bind", "c": 0, "rid": 0x20}, {"op": "bind", "c": 0, "rid": 0x10000},
        {"op": "bind", "c": 0, "rid": 0x21, "flags": 1}, CHECK],
    "a session's fd used as an iommufd, and the other way round": opening(lu=True) + [
        {"op": "create_session", "c": LU, "name": "vm0"},
        {"op": "ioas_alloc", "c": S}, {"op": "bind", "c": S, "rid": 0x21}, m(S, "a", 0, PS, None),
        {"op": "open", "c": S, "path": "iommu"}, {"op": "ioas_alloc", "c": LU},
        {"op": "preserve_fd", "c": 0, "fd": "a", "token": 1}, {"op": "create_session", "c": 0, "name": "vm1"},
        {"op": "session_call", "c": S, "call": "finish"}, {"op": "session_call", "c": S, "call": "retrieve_fd"},
        {"op": "session_call", "c": LU, "call": "retrieve_session"},
        {"op": "preserve_fd", "c": S, "fd": "view", "token": 1},
        {"op": "preserve_fd", "c": S, "fd": "iommufd", "token": 1},
        {"op": "preserve_fd", "c": S, "fd": "a_ro", "token": 1}, {"op": "preserve_fd", "c": S, "fd": "a", "token": 1},
        {"op": "preserve_fd", "c": S, "fd": "b", "token": 1},
        {"op": "create_session", "c": LU, "name": "vm0"}, {"op": "create_session", "c": LU, "name": ""},
        {"op": "create_session", "c": LU, "name": "x" * 64}, {"op": "open", "c": -1, "path": "lu"},
        {"op": "guest_mmap", "c": S, "fd": "c"}, CHECK],
    "every call after reboot(), and the wire's errnos still before it": opening(lu=True) + [
        {"op": "create_session", "c": LU, "name": "vm0"}, {"op": "preserve_fd", "c": S, "fd": "a", "token": 1},
        {"op": "guest_mmap", "c": 1, "fd": "b"}, m(0, "a", 0, MiB, PS), {"op": "attach", "c": 0, "dev": 2, "pt": 1},
        {"op": "reboot", "c": LU, "flags": 1}, {"op": "reboot", "c": LU},
        {"op": "ioas_alloc", "c": 0}, u(0, 0, U64_MAX), {"op": "detach", "c": 0, "dev": 2},
        {"op": "destroy", "c": 1, "id": 2}, {"op": "preserve_fd", "c": S, "fd": "b", "token": 2},
        {"op": "create_session", "c": LU, "name": "vm1"}, {"op": "reboot", "c": LU},
        {"op": "open", "c": -1, "path": "iommu"}, {"op": "guest_mmap", "c": 1, "fd": "c"},
        {"op": "raw", "c": 0, "how": "empty"}, {"op": "raw", "c": 0, "how": "oversized", "n": 1},
        {"op": "raw", "c": 0, "how": "many_fds"}, {"op": "raw", "c": 0, "how": "size_mismatch", "n": 1,
                                                    "cmd": wire.IOMMU_IOAS_ALLOC},
        {"op": "close", "c": 0}, {"op": "close", "c": S}, CHECK],
    "malformed datagrams on every kind of connection": opening(lu=True) + [
        {"op": "create_session", "c": LU, "name": "vm0"}, {"op": "open", "c": -1, "path": "bad"}] + [
        {"op": "raw", "c": c, "how": how, "cmd": cmd, "n": n}
        for c in (0, LU, S, X)
        for how, cmd, n in (("empty", 0, 0), ("short_header", 0, 3), ("oversized", wire.IOMMU_IOAS_ALLOC, 4096),
                            ("size_mismatch", wire.IOMMU_IOAS_MAP_FILE, 1),
                            ("size_mismatch", wire.LIVEUPDATE_SESSION_FINISH, -8),
                            ("size_small", wire.IOMMU_HWPT_ALLOC, 0),
                            ("tail_nonzero", wire.LIVEUPDATE_IOCTL_CREATE_SESSION, 0),
                            ("reserved", wire.IOMMU_IOAS_IOVA_RANGES, 0),
                            ("reserved", wire.LIVEUPDATE_SESSION_FINISH, 0),
                            ("reserved", wire.PKFUSE_GUEST_MMAP, 0),
                            ("unknown_cmd", wire.IOMMU_IOAS_ALLOC, 0))] + [
        {"op": "raw", "c": 0, "how": "size_field", "cmd": wire.IOMMU_IOAS_ALLOC, "size": 0xFFFFFFFF},
        {"op": "raw", "c": 0, "how": "tail_zero", "cmd": wire.IOMMU_IOAS_ALLOC},
        {"op": "open", "c": X, "path": "iommu", "flags": 2}, {"op": "open", "c": X, "path": "long"},
        {"op": "iova_ranges", "c": 0, "ioas": 1, "num": 0}, {"op": "pipeline", "c": 0, "n": 8}, CHECK],
    "pkfuse iommu calls served live, refused, and their reasons read back once": opening(lu=True) + [
        {"op": "last_error", "c": 0},
        {"op": "domain", "c": 0, "call": "create", "how": "flags"}, {"op": "last_error", "c": 0},
        {"op": "last_error", "c": 0}, {"op": "domain", "c": 0, "call": "attach", "how": "rid"},
        {"op": "domain", "c": 0, "call": "map", "how": "reserved"},  # struct rules: the attach's reason stays
        {"op": "last_error", "c": 1}, {"op": "last_error", "c": 0, "flags": 1}, {"op": "last_error", "c": 0}] + [
        {"op": "domain", "c": 1, "call": call, "how": "absent"}
        for call in ("destroy", "copy", "map", "map_file", "unmap", "attach", "detach")] + [
        {"op": "domain", "c": 1, "call": "create", "how": "range"}, {"op": "last_error", "c": 1},
        {"op": "domain", "c": LU, "call": "destroy", "how": "absent"}, {"op": "last_error", "c": LU}, CHECK],
    "concurrent conflicting calls": opening() + [
        {"op": "race_bind", "c": 0, "c2": 1, "rid": 0x21},
        {"op": "race_map_truncate", "c": 0, "ioas": 1, "file": "b", "iova": 64 * MiB},
        {"op": "race_map_truncate", "c": 1, "ioas": 1, "file": "c", "iova": 64 * MiB},
        {"op": "race_maps", "c": 0, "c2": 1, "ioas": 1, "ioas2": 1, "file": "a"},
        {"op": "guest_mmap", "c": 1, "fd": "a"},
        {"op": "race_map_truncate", "c": 1, "ioas": 1, "file": "a", "iova": 96 * MiB},
        {"op": "close", "c": 1}, {"op": "race_bind", "c": 0, "c2": 0, "rid": 0x20}, CHECK],
}


def entry(session: str, level: int, value: list, n: int = 0, **kw: object) -> dict:
    return {"kind": "entry", "session": session, "level": level, "n": n, "value": value, **kw}


def state(array: str, field: str, value: list, index: int = 0, **kw: object) -> dict:
    return {"kind": "state", "array": array, "index": index, "field": field, "value": value, **kw}


def both(name: str, edits: list[dict], expect: str = "refused") -> dict[str, dict]:
    return {f"{name} ({design})": {"design": design, "edits": edits, "expect": expect}
            for design in ("persistent", "ephemeral")}


SESSION_CASES: dict[str, dict] = {
    # found: vm1's context entry copied into vm0's slot kept 00:03.0 attached to vm1's restored domain
    **both("a context entry copied into the other requester's slot", [
        {"kind": "context", "session": "vm1", "devfn": 0x18}]),
    **both("a context entry copied into a requester no session has", [
        {"kind": "context", "session": "vm0", "devfn": 0x21}]),
    # found: a PML4E without W made every leaf read-only, and the domain was adopted
    **both("a table pointer without W", [entry("vm0", 0, ["xor", 2])]),
    **both("a leaf without R", [entry("vm1", 2, ["xor", 1], n=1)]),
    **{f"a leaf into {t} ({d})": {"design": d, "edits": [entry("vm0", 3, ["leaf", t, 1], n=7)], "expect": "refused"}
       for t in ("other-vm", "metadata", "free", "outside", "state", "superblock")
       for d in ("persistent", "ephemeral")},
    **both("a 2 MiB leaf into the other VM, read-only", [entry("vm1", 2, ["leaf", "other-vm", 0])]),
    **both("a table pointer into the other domain's tables", [entry("vm0", 2, ["table", "other-table"])]),
    **both("a table pointer to its own table (a loop)", [entry("vm0", 2, ["table", "own-table"])]),
    **both("a table pointer into guest RAM", [entry("vm1", 1, ["table", "own-vm"])]),
    **both("a new leaf in an empty slot", [entry("vm0", 3, ["leaf", "own-vm", 1], slot=511)]),
    **both("a file reference that does not resolve", [state("files", "ino", ["set", 40])]),
    **both("a token claimed by two files", [state("files", "token", ["copy", "files", 1, "token"], index=2)]),
    **both("a file claimed by both sessions", [state("files", "ino", ["copy", "files", 0, "ino"], index=1),
                                              state("files", "igen", ["copy", "files", 0, "igen"], index=1)]),
    **both("a map that disagrees with its domain", [state("maps", "iova", ["add", 2 * MiB])]),
    **both("a map made read-only", [state("maps", "flags", ["set", 0])]),
    **both("a domain id that names the other session's", [state("hwpts", "domain_id",
                                                               ["copy", "hwpts", 0, "domain_id"], index=1)]),
    **both("a requester claimed twice", [state("devices", "rid", ["copy", "devices", 0, "rid"], index=1)]),
    **{f"a huge {c} ({d})": {"design": d, "edits": [state("header", c, ["set", 0xFFFF_FFFF])], "expect": "refused"}
       for c in ("nsessions", "nfiles", "nhwpts", "nmaps", "ndevices", "ndrops") for d in ("persistent", "ephemeral")},
    **both("a session's file range past the files", [state("sessions", "file_count", ["set", 0xFFFF_FFFF])]),
    **both("a record edited without its checksum", [state("maps", "length", ["add", PS], seal=False)]),
    **both("an ignored bit in a leaf", [entry("vm0", 3, ["xor", 1 << 52], n=3)]),
    **both("an unknown SLPTPTR", [{"kind": "context", "session": "vm0", "word": 0, "value": ["slptptr", "free"]}]),
    **both("a root entry cleared", [{"kind": "root", "bus": 0, "word": 0, "value": ["set", 0]}]),
    # garbage the next kernel may take as it is: it changes nothing the hardware or a session relies on
    **both("a context entry's domain id changed (finished, as a replacing attach cut between its stores)", [
        {"kind": "context", "session": "vm0", "word": 1, "value": ["xor", 1 << 12]}], "accepted"),
    **both("a file's token changed, resealed (the file still resolves)", [
        state("files", "token", ["set", 0xFFFF_FFFF], index=1)], "accepted"),
}

IMAGE_CASES: dict[str, dict] = {
    **both("the state's checksum flipped", [{"kind": "flip", "region": "state", "at": 60, "bit": 0}]),
    **both("the state poisoned and resealed", [{"kind": "bytes", "region": "state", "at": 64, "data": "ff" * 8,
                                                "seal": True}]),
    **both("a domain's table page poisoned", [{"kind": "bytes", "region": "domain:vm0", "at": 4096, "data": "ff" * 8}]),
    **both("a context table word poisoned", [{"kind": "bytes", "region": "context", "at": 0x18 * 16,
                                              "data": "ff" * 8}]),
    **both("the superblock's magic flipped", [{"kind": "flip", "region": "superblock", "at": 0, "bit": 3}]),
    **both("the journal poisoned", [{"kind": "bytes", "region": "journal", "at": 0, "data": "ff" * 16}]),
    **both("a bitmap bit flipped", [{"kind": "flip", "region": "bitmap", "at": 3, "bit": 5}]),
    **both("an inode's bytes poisoned", [{"kind": "bytes", "region": "inodes", "at": 64 * 5, "data": "ff" * 8}]),
    **both("the root table poisoned", [{"kind": "bytes", "region": "root", "at": 0, "data": "ff" * 16}]),
    **both("a pool page no table uses poisoned", [{"kind": "bytes", "region": "domain:vm1", "at": 416848,
                                                   "data": "ff" * 8}], "accepted"),
}


def main() -> None:
    CORPUS.parent.mkdir(exist_ok=True)
    CORPUS.write_text(json.dumps(SEQUENCES, indent=1) + "\n")
    print(f"{CORPUS}: {len(SEQUENCES)} sequences, {sum(map(len, SEQUENCES.values()))} steps")
    for path, kept in ((SESSIONS_CORPUS, SESSION_CASES), (IMAGES_CORPUS, IMAGE_CASES)):
        path.write_text(json.dumps(kept, indent=1) + "\n")
        print(f"{path}: {len(kept)} cases")


if __name__ == "__main__":
    main()
