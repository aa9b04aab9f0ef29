"""The live-update state in the image: ``iommu/lu-state``, what ``reboot()`` preserved.

The minimum that must cross the restart, and nothing the next daemon can
rebuild: per session its name, its files (token, inode, inode generation,
size), and per preserved HWPT its token, the domain its devices stay
attached to, its maps as ``(iova, length, file, offset, write)`` and its
requester ids. Object ids are never kept: the VMM gets new ones.

Format (``backing/FORMAT.md``): ``LU_HEADER_DTYPE`` and then the record
arrays, packed from byte 0 of the file, with a CRC over the records.
``decode`` checks everything that can be checked without the store
(magic, compatible string, counts against the file size, the CRC, each
session's record ranges, names, tokens, flags, alignment, reserved fields)
and raises ``FormatError`` naming the structure and byte offset. What needs
the store (inodes, domains, translations, context entries) is checked by
``backing.liveupdate`` at restore, per session.

Commit (``backing.liveupdate`` writes it): the whole state goes into a fresh
file ``iommu/.lu-state-new`` (its pages are not reachable under the real name
until the rename), renamed over ``iommu/lu-state`` in one journal
transaction: after a kill at any instant the image holds the old state or
the new one, never a mix. A leftover ``.lu-state-new`` is removed at the
next write or restore. ``check`` is fsck's view of the same file.
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import NamedTuple

import numpy as np

from . import format as fmt
from .allocator import expand_runs
from .domainhdr import domain_file_name
from .errors import Finding, FormatError
from .fsckctx import FsckContext

PS = fmt.PAGE_SIZE
WHERE = "iommu/lu-state"
_ARRAYS = (("nsessions", fmt.LU_SESSION_DTYPE), ("nfiles", fmt.LU_FILE_DTYPE), ("nhwpts", fmt.LU_HWPT_DTYPE),
           ("nmaps", fmt.LU_MAP_DTYPE), ("ndevices", fmt.LU_DEVICE_DTYPE), ("ndrops", fmt.LU_DROP_DTYPE))
ARRAYS = tuple(count[1:] for count, _ in _ARRAYS)  #: the record arrays' names, in file order


class SavedMap(NamedTuple):
    """One IOAS area of a preserved HWPT, in LU_MAP_DTYPE's field order (a guest may have
    thousands: a tuple is made and packed several times faster than a dataclass)."""

    iova: int
    length: int  #: bytes
    offset: int  #: byte offset in the file
    ino: int
    igen: int
    write: bool


@dataclasses.dataclass(frozen=True)
class SavedHwpt:
    token: int
    domain_id: int  #: the domain its devices stay attached to across the restart
    maps: tuple[SavedMap, ...]
    rids: tuple[int, ...]
    index: int = dataclasses.field(default=0, compare=False)  #: its record in ``hwpts`` (decoded states)
    map_first: int = dataclasses.field(default=0, compare=False)  #: record of maps[0] in ``maps``
    dev_first: int = dataclasses.field(default=0, compare=False)  #: record of rids[0] in ``devices``


@dataclasses.dataclass(frozen=True)
class SavedFile:
    token: int
    ino: int
    igen: int
    size: int  #: bytes


@dataclasses.dataclass(frozen=True)
class SavedSession:
    name: bytes
    files: tuple[SavedFile, ...]
    hwpts: tuple[SavedHwpt, ...]
    index: int = dataclasses.field(default=0, compare=False)  #: its record in ``sessions`` (decoded states)
    file_first: int = dataclasses.field(default=0, compare=False)  #: record of files[0] in ``files``


@dataclasses.dataclass(frozen=True)
class SavedState:
    boot: int  #: reboot()s this image has seen, this one included
    domains: int  #: fmt.LU_DOMAINS_*
    sessions: tuple[SavedSession, ...]
    drops: tuple[int, ...] = ()  #: DIDs of iommufd domains that were not preserved: freed at restore
    #: byte offset in the file of each record array (ARRAYS order); () for a state not decoded
    layout: tuple[int, ...] = dataclasses.field(default=(), compare=False)

    def where(self, array: str, index: int, field: str) -> tuple[str, int]:
        """The structure name and byte offset (in the state file) of ``array[index].field``,
        for a finding about a decoded record: ``("iommu/lu-state maps[3].iova", 0x1c8)``."""
        k = ARRAYS.index(array)
        dtype = _ARRAYS[k][1]
        base = self.layout[k] if self.layout else 0
        return f"{WHERE} {array}[{index}].{field}", base + index * dtype.itemsize + dtype.fields[field][1]


def encode(state: SavedState) -> bytes:
    """The bytes of ``state`` as ``iommu/lu-state`` holds them."""
    sessions = np.zeros(len(state.sessions), fmt.LU_SESSION_DTYPE)
    files, hwpts, maps, devices = [], [], [], []
    for i, s in enumerate(state.sessions):
        sessions[i] = (s.name, len(files), len(s.files), len(hwpts), len(s.hwpts))
        files += [(f.token, f.ino, f.igen, f.size) for f in s.files]
        for h in s.hwpts:
            hwpts.append((h.token, h.domain_id, 0, len(maps), len(h.maps), len(devices), len(h.rids), 0))
            maps += [(*m, 0) for m in h.maps]  # write (a bool) is LU_MAP_WRITE (1) or 0
            devices += [(r, 0) for r in h.rids]
    arrays = [sessions, np.array(files, fmt.LU_FILE_DTYPE), np.array(hwpts, fmt.LU_HWPT_DTYPE),
              np.array(maps, fmt.LU_MAP_DTYPE), np.array(devices, fmt.LU_DEVICE_DTYPE),
              np.array([(d, 0) for d in state.drops], fmt.LU_DROP_DTYPE)]
    body = b"".join(a.tobytes() for a in arrays)
    hdr = np.zeros(1, fmt.LU_HEADER_DTYPE)
    hdr["magic"], hdr["compatible"], hdr["boot"], hdr["domains"] = fmt.LU_MAGIC, fmt.LU_COMPATIBLE, state.boot, state.domains
    for (count, _), a in zip(_ARRAYS, arrays):
        hdr[count] = a.size
    hdr["crc"] = zlib.crc32(body, zlib.crc32(hdr.tobytes()))  # over the header (crc 0) and the records
    return hdr.tobytes() + body


def decode(raw: bytes | memoryview, where: str = WHERE) -> SavedState:
    """Parse and check the state (see the module docstring); FormatError at the first problem."""
    raw = bytes(raw)
    hsize = fmt.LU_HEADER_DTYPE.itemsize
    if len(raw) < hsize:
        raise FormatError(f"{where} header", 0, f"{len(raw)} bytes, shorter than the {hsize}-byte header")
    hdr = np.frombuffer(raw, fmt.LU_HEADER_DTYPE, 1)[0]
    if bytes(hdr["magic"]) != fmt.LU_MAGIC:
        raise FormatError(f"{where} header.magic", 0, f"{bytes(hdr['magic'])!r} is not {fmt.LU_MAGIC!r}")
    if bytes(hdr["compatible"]) != fmt.LU_COMPATIBLE:
        raise FormatError(f"{where} header.compatible", 8,
                          f"format {bytes(hdr['compatible'])!r} is not {fmt.LU_COMPATIBLE!r}: refused")
    if int(hdr["domains"]) not in (fmt.LU_DOMAINS_PERSISTENT, fmt.LU_DOMAINS_EPHEMERAL):
        raise FormatError(f"{where} header.domains", fmt.LU_HEADER_DTYPE.fields["domains"][1],
                          f"unknown domain design {int(hdr['domains'])}")
    off = hsize
    arrays = []
    for count, dtype in _ARRAYS:
        n = int(hdr[count])
        if off + n * dtype.itemsize > len(raw):
            raise FormatError(f"{where} header.{count}", fmt.LU_HEADER_DTYPE.fields[count][1],
                              f"{n} records of {dtype.itemsize} bytes run past the file's {len(raw)} bytes")
        arrays.append(np.frombuffer(raw, dtype, n, off))
        off += n * dtype.itemsize
    crc = _crc(raw, off)
    if crc != int(hdr["crc"]):
        raise FormatError(f"{where} header.crc", fmt.LU_HEADER_DTYPE.fields["crc"][1],
                          f"header and records checksum to {crc:#010x}, header says {int(hdr['crc']):#010x}")
    sessions_a, files_a, hwpts_a, maps_a, devices_a, drops_a = arrays
    offsets = {}
    o = hsize
    for (count, dtype), a in zip(_ARRAYS, arrays):
        offsets[count] = o
        o += a.size * dtype.itemsize

    def bad(count: str, i: int, field: str, why: str) -> FormatError:
        dtype = dict(_ARRAYS)[count]
        return FormatError(f"{where} {count[1:]}[{i}].{field}",
                           offsets[count] + i * dtype.itemsize + dtype.fields[field][1], why)

    _check_ranges(sessions_a, "file", files_a.size, lambda i, f, w: bad("nsessions", i, f, w))
    _check_ranges(sessions_a, "hwpt", hwpts_a.size, lambda i, f, w: bad("nsessions", i, f, w))
    _check_ranges(hwpts_a, "map", maps_a.size, lambda i, f, w: bad("nhwpts", i, f, w))
    _check_ranges(hwpts_a, "dev", devices_a.size, lambda i, f, w: bad("nhwpts", i, f, w))
    for name, a in (("nhwpts", hwpts_a), ("nmaps", maps_a), ("ndevices", devices_a), ("ndrops", drops_a)):
        for field in [f for f in a.dtype.names if f.startswith("pad")]:
            nz = np.flatnonzero(a[field])
            if nz.size:
                raise bad(name, int(nz[0]), field, "reserved field is not zero")
    for i, m in enumerate(maps_a):
        if int(m["flags"]) & ~fmt.LU_MAP_WRITE:
            raise bad("nmaps", i, "flags", f"unknown flags {int(m['flags']):#x}")
        if int(m["iova"]) % PS or int(m["offset"]) % PS or int(m["length"]) % PS or not int(m["length"]):
            raise bad("nmaps", i, "length", "iova, offset and length must be non-zero multiples of 4 KiB")
        if int(m["iova"]) + int(m["length"]) > 1 << fmt.VTD_IOVA_BITS:
            raise bad("nmaps", i, "iova", "beyond the 48-bit IOVA space")
    sessions = []
    names: set[bytes] = set()
    for i, s in enumerate(sessions_a):
        name = bytes(s["name"])
        if not name or name in names:
            raise bad("nsessions", i, "name", "empty session name" if not name else f"session {name!r} twice")
        names.add(name)
        fs = files_a[int(s["file_first"]): int(s["file_first"]) + int(s["file_count"])]
        hs = hwpts_a[int(s["hwpt_first"]): int(s["hwpt_first"]) + int(s["hwpt_count"])]
        if fs.size > fmt.LU_MAX_FILES:
            raise bad("nsessions", i, "file_count", f"{fs.size} files, more than a session holds ({fmt.LU_MAX_FILES})")
        tokens = fs["token"].tolist() + hs["token"].tolist()
        if len(set(tokens)) != len(tokens):
            raise bad("nsessions", i, "name", f"session {name!r} has a token twice")
        files = tuple(SavedFile(int(f["token"]), int(f["ino"]), int(f["igen"]), int(f["size"])) for f in fs)
        hwpts = []
        for j, h in enumerate(hs, int(s["hwpt_first"])):
            mp = maps_a[int(h["map_first"]): int(h["map_first"]) + int(h["map_count"])]
            dv = devices_a[int(h["dev_first"]): int(h["dev_first"]) + int(h["dev_count"])]
            hwpts.append(SavedHwpt(int(h["token"]), int(h["domain_id"]), tuple(
                SavedMap(int(m["iova"]), int(m["length"]), int(m["offset"]), int(m["ino"]), int(m["igen"]),
                         bool(int(m["flags"]) & fmt.LU_MAP_WRITE)) for m in mp),
                tuple(int(r) for r in dv["rid"]), j, int(h["map_first"]), int(h["dev_first"])))
        sessions.append(SavedSession(name, files, tuple(hwpts), i, int(s["file_first"])))
    return SavedState(int(hdr["boot"]), int(hdr["domains"]), tuple(sessions),
                      tuple(int(d) for d in drops_a["domain_id"]), tuple(offsets[c] for c, _ in _ARRAYS))


def _crc(raw: bytes | bytearray, end: int) -> int:
    """The checksum of a state: over its header with ``crc`` 0, then its records up to ``end``."""
    hsize = fmt.LU_HEADER_DTYPE.itemsize
    zeroed = np.frombuffer(bytes(raw[:hsize]), fmt.LU_HEADER_DTYPE, 1).copy()
    zeroed["crc"] = 0
    return zlib.crc32(bytes(raw[hsize:end]), zlib.crc32(zeroed.tobytes()))


def record_views(raw: bytearray) -> dict[str, np.ndarray]:
    """Writable views of a state's header (``"header"``) and of each record array (``ARRAYS``' names) in
    ``raw``, counts clamped to the buffer: what a tool that edits a state on purpose changes in place,
    then ``seal``s."""
    views = {"header": np.frombuffer(raw, fmt.LU_HEADER_DTYPE, 1)}
    off = fmt.LU_HEADER_DTYPE.itemsize
    for name, (count, dtype) in zip(ARRAYS, _ARRAYS):
        n = min(int(views["header"][count][0]), max(0, (len(raw) - off) // dtype.itemsize))
        views[name] = np.frombuffer(raw, dtype, n, off)
        off += n * dtype.itemsize
    return views


def seal(raw: bytearray) -> None:
    """Recompute the ``crc`` of a state edited in place (its header's counts, clamped to the
    buffer, say where the records end): what a tool that tampers with a state on purpose --
    the fuzzer, the tests -- needs so that its edit reaches the checks past the checksum."""
    hdr = np.frombuffer(bytes(raw[: fmt.LU_HEADER_DTYPE.itemsize]), fmt.LU_HEADER_DTYPE, 1)[0]
    end = fmt.LU_HEADER_DTYPE.itemsize + sum(int(hdr[c]) * dt.itemsize for c, dt in _ARRAYS)
    crc = _crc(raw, min(end, len(raw)))
    off = fmt.LU_HEADER_DTYPE.fields["crc"][1]
    raw[off : off + 4] = crc.to_bytes(4, "little")


def _check_ranges(parents: np.ndarray, what: str, total: int, bad) -> None:  # noqa: ANN001 - the error factory
    """Each parent's ``<what>_first/_count`` follow each other and cover ``total`` records exactly."""
    expect = 0
    for i, p in enumerate(parents):
        if int(p[f"{what}_first"]) != expect:
            raise bad(i, f"{what}_first", f"is {int(p[f'{what}_first'])}, the records before end at {expect}")
        expect += int(p[f"{what}_count"])
    if expect != total:
        raise bad(max(len(parents) - 1, 0), f"{what}_count", f"the ranges cover {expect} of {total} records")


# ------------------------------------------------------------------ fsck

def check(ctx: FsckContext) -> list[Finding]:
    """fsck's checks of ``iommu/lu-state``: it decodes (``decode``), it is the only
    committed state, and what it names exists -- each file a live guest-RAM inode of
    the recorded generation and size, each HWPT's domain a domain file. Whether the
    domain translates what the maps say is checked at restore, not here."""
    iommu_dir = ctx.child(fmt.ROOT_INO, fmt.IOMMU_DIR_NAME)
    out: list[Finding] = []
    for ino in np.flatnonzero(ctx.live & (ctx.kind == fmt.KIND_LU_STATE)).tolist():
        d = ctx.dentries[ino]
        name = bytes(d["name"])[: min(int(d["name_len"]), fmt.NAME_MAX)]
        if int(d["parent"]) != iommu_dir or name not in (fmt.LU_STATE_NAME, fmt.LU_STATE_NEW_NAME):
            out.append(Finding("liveupdate.name", ctx.dentry_off(ino, "name"),
                               f"inode {ino} is a live-update state named {name!r}, not iommu/lu-state"))
    state_ino = ctx.child(iommu_dir, fmt.LU_STATE_NAME) if iommu_dir is not None else None
    if state_ino is None or int(ctx.kind[state_ino]) != fmt.KIND_LU_STATE:
        return out
    fp, page, n = ctx.file_map(state_ino)
    order = np.argsort(fp, kind="stable")
    pages = expand_runs(page[order].astype(np.int64), n[order].astype(np.int64))
    size = int(ctx.inodes["size"][state_ino])
    raw = ctx.image.reshape(-1, PS)[pages].tobytes()[:size] if pages.size else b""

    def image_off(off: int) -> int:
        return int(pages[off // PS]) * PS + off % PS if off // PS < pages.size else ctx.inode_off(state_ino, "size")

    try:
        state = decode(raw)
    except FormatError as exc:
        return out + [Finding(exc.structure, image_off(exc.offset), exc.problem)]
    for s in state.sessions:
        who = f"session {s.name.decode(errors='replace')}"
        for f in s.files:
            ok = 2 <= f.ino < ctx.kind.size and bool(ctx.live[f.ino]) and int(ctx.kind[f.ino]) == fmt.KIND_GUEST
            if not ok or int(ctx.inodes["igen"][f.ino]) != f.igen:
                out.append(Finding("liveupdate.file", ctx.inode_off(state_ino),
                                   f"{who}: file token {f.token} names inode {f.ino} generation {f.igen}, "
                                   "which is not a live guest-RAM file of that generation"))
            elif int(ctx.inodes["size"][f.ino]) != f.size:
                out.append(Finding("liveupdate.file", ctx.inode_off(f.ino, "size"),
                                   f"{who}: inode {f.ino} is {int(ctx.inodes['size'][f.ino])} bytes, "
                                   f"preserved at {f.size}"))
        for h in s.hwpts:
            dom = ctx.child(iommu_dir, domain_file_name(h.domain_id)) if 0 < h.domain_id else None
            if dom is None or int(ctx.kind[dom]) != fmt.KIND_IOMMU_DOMAIN:
                out.append(Finding("liveupdate.hwpt", ctx.inode_off(state_ino),
                                   f"{who}: HWPT token {h.token} names domain {h.domain_id}, which does not exist"))
    return out
