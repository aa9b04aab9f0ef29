"""Two frozen VMs a restore fuzzer tampers with, the next kernel that reads them back, and the judge.

``freeze`` builds, once per design, what a ``reboot()`` leaves for the next
kernel: a sparse image (1 GiB by default) with two sessions, ``vm0``
(requester 00:03.0, one 4 MiB guest file mapped with 4 KiB leaves) and
``vm1`` (00:04.0, a 4 MiB file with 2 MiB leaves and a 2 MiB file mapped
read-only), each with its HWPT preserved; the register block with
translation on. ``persistent``: the sessions' domains are the iommufd
domains themselves, in the image; ``ephemeral``: the fixed copies the
save/restore flow made in the image (the live ones were in host RAM, lost).
It records, from before any tampering, what each requester reaches
(``device_reach``) and where everything lives, so that an edit can be
stated by what it aims at (``vm0``'s leaf at an IOVA, ``vm1``'s context
entry, record ``maps[2].length``) and replayed on a new build.

A case copies the frozen image (its data only: the file is sparse), applies
its edits (``apply``), starts the next kernel as the daemon does
(``Kernel``: Store, Iommu, Iommufd, LiveUpdate.restore) and ``judge``s it
against the hardware, asking the kernel nothing it could get wrong:

- every frozen session is either restored or refused (all of them when the
  state as a whole is refused), none twice; a restored session holds exactly
  the files one frozen session held, and no requester another did;
- the requesters the hardware would translate for (every valid context entry
  under the root table the registers name) are exactly those of the restored
  sessions, and each reaches exactly what it reached before the tampering:
  a restored session is whole, a refused one blocked, nothing else is live;
- after the kernel closes, fsck finds the image clean.

An image the kernel refuses as a whole (``FormatError`` at open: a damaged
superblock, journal or domain header) is a refusal too, as long as the error
names the structure; anything else raised is a crash.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from backing import ephemeral, fsck, lustate, regs, vtd
from backing import format as fmt
from backing.errors import Finding, FormatError
from backing.iommu import Iommu
from backing.iommufd import OPTION_HUGE_PAGES, OPTION_OP_SET, Iommufd
from backing.liveupdate import LiveUpdate
from backing.mkfs import mkfs
from backing.store import Store
from pkfuse.harness.tables import Reach, device_reach

PS = fmt.PAGE_SIZE
MiB = 1 << 20
DESIGNS = ("persistent", "ephemeral")
IMAGE_SIZE = 1 << 30
IOVA = 1 << 30  #: where each VM's first file is mapped
IOVA_RO = 2 << 30  #: where vm1's read-only file is mapped
#: session -> (requester, [(file name, size, iova, writeable, 4 KiB leaves)])
VMS: dict[bytes, tuple[int, list[tuple[bytes, int, int, bool, bool]]]] = {
    b"vm0": (0x18, [(b"vm0-ram", 4 * MiB, IOVA, True, True)]),
    b"vm1": (0x20, [(b"vm1-ram", 4 * MiB, IOVA, True, False), (b"vm1-rom", 2 * MiB, IOVA_RO, False, False)]),
}


class Violation(Exception):
    """What the next kernel let through: an IOMMU or filesystem invariant broken."""


@dataclasses.dataclass
class FrozenSession:
    rid: int
    inos: frozenset[int]
    did: int  #: the domain its requester stays attached to through the restart
    entries: list[np.ndarray]  #: per level, u64 indices in the image of its domain's present entries
    table_pages: np.ndarray  #: image pages of its domain's tables
    context: int  #: u64 index of its context entry's low word
    ram_pages: np.ndarray  #: image pages of its files, in inode order


@dataclasses.dataclass
class Frozen:
    """One design's frozen image and everything about it a case aims at or is judged against."""

    design: str
    image: Path
    sessions: dict[bytes, FrozenSession]
    reach: dict[int, Reach]  #: requester -> what it reached before any tampering
    geometry: fmt.Geometry
    state_pages: np.ndarray  #: image pages of iommu/lu-state
    state_size: int
    root_pages: np.ndarray  #: the root table, then each bus's context table
    free_page: int  #: an image page no one owns

    def copy_to(self, image: Path) -> None:
        """The frozen image (its data extents: it is sparse) and register block, at ``image``."""
        _copy_sparse(self.image, image)
        shutil.copyfile(regs.default_path(self.image), regs.default_path(image))
        with_ram = Path(ephemeral.default_path(image))
        if with_ram.exists():
            with_ram.unlink()  # host RAM does not survive a kexec

    def phys(self, page: int) -> int:
        return (self.geometry.base_pfn + page) << fmt.PAGE_SHIFT


class Kernel:
    """The next kernel on ``image``, started as the daemon starts it (``pkfuse.daemon.serve``)."""

    def __init__(self, image: Path, design: str) -> None:
        self.store = Store.open(image)
        try:
            host_ram = ephemeral.default_path(image) if design == "ephemeral" else None
            self.io = Iommu.open(self.store, regs.default_path(image), ephemeral=host_ram)
        except BaseException:
            self.store.close()
            raise
        self.fd = Iommufd(self.store, self.io, ephemeral=design == "ephemeral")
        self.lu = LiveUpdate(self.store, self.fd, mode=design)
        self.closed = False
        try:
            self.findings = self.lu.restore()
        except BaseException:  # a crash (or a hang's alarm) mid-restore: the next case must find nothing open
            with contextlib.suppress(Exception):
                self.close()
            raise

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.fd.close()
        self.io.close()
        self.store.close()


def freeze(workdir: Path, design: str, size: int = IMAGE_SIZE) -> Frozen:
    """Build ``design``'s frozen image in ``workdir`` (see the module's docstring)."""
    image = workdir / f"frozen-{design}.img"
    for stale in (image, Path(regs.default_path(image)), Path(ephemeral.default_path(image))):
        stale.unlink(missing_ok=True)
    mkfs(image, size)
    store = Store.open(image)
    io = Iommu.open(store, regs.default_path(image),
                    ephemeral=ephemeral.default_path(image) if design == "ephemeral" else None)
    fd = Iommufd(store, io, ephemeral=design == "ephemeral")
    lu = LiveUpdate(store, fd, mode=design)
    lu.restore()
    guest_dir = store.lookup(fmt.ROOT_INO, fmt.GUEST_DIR_NAME)
    inos: dict[bytes, frozenset[int]] = {}
    for name, (rid, files) in VMS.items():
        ctx = fd.open_context()
        sess = lu.create_session(name)
        mine = []
        ioas = ctx.ioas_alloc()
        if any(small for *_, small in files):
            ctx.option(OPTION_HUGE_PAGES, OPTION_OP_SET, ioas, 0)  # 4 KiB leaves: one page, one entry
        for token, (fname, fsize, iova, write, _small) in enumerate(files, 1):
            ino = store.create(guest_dir, fname, 0o644, 0, 0)
            store.truncate(ino, fsize)
            ctx.ioas_map_file(ioas, ino, 0, fsize, iova, writeable=write)
            lu.preserve_file(sess, ino, token)
            mine.append(ino)
        dev = ctx.device_bind(rid)
        hwpt = ctx.hwpt_alloc(dev, ioas)
        ctx.device_attach(dev, hwpt)
        lu.preserve_hwpt(sess, ctx, hwpt, 100)
        inos[name] = frozenset(mine)
    io.enable()
    state = lu.reboot()
    fd.close()
    io.close()
    store.close()
    Path(ephemeral.default_path(image)).unlink(missing_ok=True)  # lost with the kexec
    dids = {s.name: s.hwpts[0].domain_id for s in state.sessions}
    with Store.open(image, read_only=True) as s, Iommu.open(s) as io:
        sessions = {}
        for name, (rid, _files) in VMS.items():
            dom = io.domains[dids[name]]
            entries = _present_entries(s.image_u64, s.geometry.base_pfn, dom.pml4_page)
            bus, devfn = rid >> 8, rid & 0xFF
            sessions[name] = FrozenSession(rid, inos[name], dids[name], entries, s.image_pages(dom.ino),
                                           int(io.root_pages[1 + bus]) * 512 + devfn * 2,
                                           np.concatenate([s.image_pages(i) for i in sorted(inos[name])]))
        state_ino = s.lookup(s.lookup(fmt.ROOT_INO, fmt.IOMMU_DIR_NAME), fmt.LU_STATE_NAME)
        free = np.flatnonzero(s.page_owner(np.arange(s.geometry.npages - 64, s.geometry.npages))[0] == 0)
        frozen = Frozen(design, image, sessions, device_reach(image), s.geometry, s.image_pages(state_ino),
                        s.getattr(state_ino).size, io.root_pages.copy(), int(s.geometry.npages - 64 + free[-1]))
        for name, fs in sessions.items():  # the judge's baseline must itself be right
            r = frozen.reach.get(fs.rid)
            assert r is not None and r.pages() and np.isin(r.page_set()[0], fs.ram_pages + s.geometry.base_pfn).all(), \
                (name, r)
    return frozen


def _present_entries(u64: np.ndarray, base_pfn: int, pml4_page: int) -> list[np.ndarray]:
    """Per level, the u64 indices of a (well-formed) domain's present entries, top first."""
    out, tables = [], np.array([pml4_page], np.int64)
    for level in range(fmt.VTD_LEVELS):
        where = (tables[:, None] * 512 + np.arange(512)).ravel()
        e = u64[where]
        present = (e & np.uint64(vtd.RW)) != 0
        out.append(where[present])
        nonleaf = present & ~vtd.is_leaf(level, e)
        tables = vtd.entry_pages(e[nonleaf], base_pfn).astype(np.int64)
    return out


def _copy_sparse(src: Path, dst: Path) -> None:
    """``src``'s data extents into a new sparse ``dst`` of the same size (SEEK_DATA / SEEK_HOLE)."""
    size = src.stat().st_size
    dst.unlink(missing_ok=True)  # a new inode: whatever a crashed case left mapped or locked is not it
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        fo.truncate(size)
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fi.fileno(), pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:
                    break
                raise
            end = os.lseek(fi.fileno(), start, os.SEEK_HOLE)
            n = end - start
            while n:
                n -= os.copy_file_range(fi.fileno(), fo.fileno(), n, start + (end - start - n),
                                        start + (end - start - n))
            pos = end


# ------------------------------------------------------------------ edits


def apply(frozen: Frozen, image: Path, edit: dict[str, Any]) -> None:
    """Apply one edit to the copy at ``image``, aimed by name at what ``frozen`` recorded: ``state`` (a
    record's field), ``entry`` (a domain's table entry), ``context`` and ``root`` (the hardware's entries),
    ``bytes`` (hex ``data`` at offset ``at`` of a ``region``, mod its length) and ``flip`` (one bit there)."""
    kind = edit["kind"]
    mm = np.memmap(image, np.uint8, mode="r+")
    try:
        u64 = mm[: mm.size // 8 * 8].view("<u8")
        if kind == "state":
            _edit_state(frozen, mm, edit)
        elif kind == "entry":
            where = _entry_index(frozen, edit)
            u64[where] = np.uint64(_value(frozen, edit, int(u64[where])))
        elif kind == "context":
            ce = frozen.sessions[edit["session"].encode()].context
            if "devfn" in edit:  # the whole entry copied to another requester's slot
                bus, devfn = edit["devfn"] >> 8, edit["devfn"] & 0xFF
                dst = int(frozen.root_pages[1 + bus]) * 512 + devfn * 2
                u64[dst : dst + 2] = u64[ce : ce + 2]
            else:
                where = ce + edit.get("word", 0)
                u64[where] = np.uint64(_value(frozen, edit, int(u64[where])))
        elif kind == "root":
            where = int(frozen.root_pages[0]) * 512 + edit["bus"] * 2 + edit.get("word", 0)
            u64[where] = np.uint64(_value(frozen, edit, int(u64[where])))
        elif kind in ("bytes", "flip"):
            data = bytes.fromhex(edit.get("data", "00"))
            at = locate(frozen, edit["region"], edit["at"], len(data))
            if kind == "flip":
                mm[at] ^= np.uint8(1 << edit["bit"] % 8)
            else:
                mm[at : at + len(data)] = np.frombuffer(data, np.uint8)
            if edit.get("seal") and edit["region"] == "state":
                _reseal(frozen, mm)
        else:
            raise ValueError(f"unknown edit kind {kind!r}")
        mm.flush()
    finally:
        del mm


def locate(frozen: Frozen, name: str, at: int, n: int = 1) -> int:
    """The image byte offset where ``n`` bytes at offset ``at`` (mod the region's size) of a named region
    go: ``state`` (the state file's bytes), ``domain:vmN`` (that session's table pages), ``context`` (the
    sessions' context table), ``root``, or a metadata region. Never across a page of a scattered region."""
    g = frozen.geometry
    if name == "state":
        off = at % max(1, frozen.state_size)
        return int(frozen.state_pages[off // PS]) * PS + min(off % PS, PS - n)
    if name.startswith("domain:"):
        pages = frozen.sessions[name.split(":", 1)[1].encode()].table_pages
        return int(pages[at // PS % pages.size]) * PS + min(at % PS, PS - n)
    first, count = {"context": (frozen.sessions[b"vm0"].context // 512, 1), "root": (int(frozen.root_pages[0]), 1),
                    "superblock": (0, 1), "journal": (g.journal_page, g.journal_npages),
                    "bitmap": (g.bitmap_page, g.bitmap_npages), "inodes": (g.inode_page, 1),
                    "dentries": (g.dentry_page, 1), "extents": (g.extent_page, 1)}[name]
    return first * PS + at % max(1, count * PS - n + 1)


def _entry_index(frozen: Frozen, edit: dict[str, Any]) -> int:
    """u64 index of the entry an ``entry`` edit names: ``session``'s present entry number ``n`` (mod the
    count) at ``level``, or with ``slot``, entry ``slot`` of that level's first table (present or not)."""
    entries = frozen.sessions[edit["session"].encode()].entries[edit["level"]]
    if "slot" in edit:
        return int(entries[0]) // 512 * 512 + edit["slot"] % 512
    return int(entries[edit.get("n", 0) % entries.size])


def _target_phys(frozen: Frozen, target: str, edit: dict[str, Any]) -> int:
    """A physical address an edit points an entry at, by what it is."""
    other = next(n for n in frozen.sessions if n != edit.get("session", "vm0").encode())
    me = frozen.sessions[edit.get("session", "vm0").encode()]
    o = frozen.sessions[other]
    page = {
        "other-vm": lambda: int(o.ram_pages[0]),
        "own-vm": lambda: int(me.ram_pages[1]),
        "metadata": lambda: 1,
        "free": lambda: frozen.free_page,
        "outside": lambda: frozen.geometry.npages + 5,
        "state": lambda: int(frozen.state_pages[0]),
        "other-table": lambda: int(o.entries[3 if o.entries[3].size else 2][0]) // 512,
        "own-table": lambda: int(me.entries[edit.get("level", 1)][0]) // 512,
        "superblock": lambda: 0,
    }[target]()
    return frozen.phys(page)


def _value(frozen: Frozen, edit: dict[str, Any], old: int) -> int:
    """The new u64 an edit stores, from the old one: ``set``, ``xor``, ``or``, ``and`` a number, or ``leaf``
    / ``table`` / ``slptptr`` pointed at a target (see ``_target_phys``)."""
    op, arg = edit["value"][0], edit["value"][1]
    mask = (1 << 64) - 1
    if op == "set":
        return arg & mask
    if op == "xor":
        return (old ^ arg) & mask
    if op == "or":
        return (old | arg) & mask
    if op == "and":
        return old & arg & mask
    phys = _target_phys(frozen, arg, edit)
    if op == "leaf":
        level = edit["level"]
        return vtd.leaf_entry(level, phys & vtd.LEAF_ADDR[level], bool(edit["value"][2]))
    if op == "table":
        return vtd.table_entry(phys)
    if op == "slptptr":
        return old & ~fmt.CE_LO_SLPTPTR_MASK & mask | phys
    raise ValueError(f"unknown value op {op!r}")


def _read_state(frozen: Frozen, mm: np.ndarray) -> bytearray:
    pages = frozen.state_pages
    return bytearray(mm.reshape(-1, PS)[pages].tobytes()[: frozen.state_size])


def _write_state(frozen: Frozen, mm: np.ndarray, raw: bytearray) -> None:
    buf = np.zeros(frozen.state_pages.size * PS, np.uint8)
    buf[: len(raw)] = np.frombuffer(bytes(raw), np.uint8)
    mm.reshape(-1, PS)[frozen.state_pages] = buf.reshape(-1, PS)


def _edit_state(frozen: Frozen, mm: np.ndarray, edit: dict[str, Any]) -> None:
    """Store a value in ``array[index].field`` of the state (index mod the count), resealed unless
    ``seal`` is false: a ``set`` number, an ``add``, or ``copy`` of another record's field."""
    raw = _read_state(frozen, mm)
    v = lustate.record_views(raw)
    arr = v[edit["array"]]
    field = edit["field"]
    if len(arr) and field in arr.dtype.names:
        i = edit.get("index", 0) % len(arr)
        cur = arr[field][i]
        op, arg = edit["value"][0], edit["value"][1]
        width = arr.dtype[field].itemsize
        if op == "copy":
            src = v[arg][edit["value"][2] % len(v[arg])] if len(v[arg]) else None
            new = src[edit["value"][3]] if src is not None and edit["value"][3] in src.dtype.names else cur
        elif op == "add":
            new = int(cur) + arg if arr.dtype[field].kind != "S" else bytes([(cur[:1] or b"\0")[0] ^ 1]) + cur[1:]
        else:
            new = arg
        if arr.dtype[field].kind == "S":  # a name, a compatible string: bytes, an int as its bytes
            data = new if isinstance(new, bytes) else int(new).to_bytes(8, "little", signed=int(new) < 0)
            arr[field][i] = data[:width]
        elif isinstance(new, bytes):
            arr[field][i] = int.from_bytes(new[:width].ljust(width, b"\0"), "little")
        else:
            arr[field][i] = int(new) % (1 << 8 * width)
    if edit.get("seal", True):
        lustate.seal(raw)
    _write_state(frozen, mm, raw)


def _reseal(frozen: Frozen, mm: np.ndarray) -> None:
    raw = _read_state(frozen, mm)
    lustate.seal(raw)
    _write_state(frozen, mm, raw)


# ------------------------------------------------------------------ the judge


@dataclasses.dataclass
class Verdict:
    """What the next kernel did with a case: ``refused`` names each refusal's structure (the key a
    report counts by: indices and domain numbers dropped), empty when it adopted everything."""

    refused: list[str]
    findings: list[Finding]


def judge(frozen: Frozen, image: Path, kernel: Kernel) -> Verdict:
    """Hold ``kernel``'s restore of ``image`` against the hardware and the frozen record; Violation if
    anything the module's docstring promises does not hold. Closes ``kernel``."""
    lu = kernel.lu
    try:
        findings = [*kernel.io.refused, *lu.refused.values(), *([lu.state_refused] if lu.state_refused else [])]
        for f in findings:
            check_named(f, image)
        matched: dict[bytes, bytes] = {}  #: restored name -> the frozen session it is
        for name, sess in lu.incoming.items():
            files = frozenset(f.ino for f in sess.files.values())
            frm = [n for n, fs in frozen.sessions.items() if fs.inos == files]
            if not frm:
                raise Violation(f"session {name!r} restored holding files {sorted(files)}, which no preserved "
                                "session held together")
            rids = {rid for r in sess.hwpts.values() for rid in r.saved.rids}
            if not rids <= {frozen.sessions[frm[0]].rid}:
                raise Violation(f"session {name!r} restored with requesters {sorted(map(hex, rids))}, not its own")
            if frm[0] in matched.values():
                raise Violation(f"preserved session {frm[0]!r} restored twice")
            matched[name] = frm[0]
        if lu.state_refused is None:
            lost = set(frozen.sessions) - set(matched.values()) - set(lu.refused)
            if lost and len(lu.refused) < len(frozen.sessions) - len(matched):
                raise Violation(f"sessions {sorted(lost)} neither restored nor refused")
        live = {frozen.sessions[f].rid: f for f in matched.values()}
        reach = device_reach(image)
        for sid, r in reach.items():
            who = fmt.requester_name(sid)
            if sid not in live:
                raise Violation(f"requester {who} reaches {r.pages()} pages with no restored session holding it")
            if not r.same(frozen.reach[sid]):
                raise Violation(f"requester {who} of restored session {live[sid]!r} reaches other pages than "
                                f"before the restart ({r.pages()} pages, was {frozen.reach[sid].pages()})")
        for sid, name in live.items():
            if sid not in reach:
                raise Violation(f"restored session {name!r}'s requester {fmt.requester_name(sid)} is blocked: "
                                "not whole")
    finally:
        kernel.close()
    status, bad = fsck.check_image(image)
    if status or bad:
        raise Violation("fsck after the restore: " + "; ".join(str(f) for f in bad[:3]))
    return Verdict(sorted({_kind(f.structure) for f in findings}), findings)


def check_named(f: Finding | FormatError, image: Path) -> None:
    """A refusal names its structure and an offset inside the image, in one line (else Violation)."""
    if not f.structure or "\n" in f.problem or not isinstance(f.offset, int) \
            or not 0 <= f.offset < image.stat().st_size:
        raise Violation(f"a refusal that does not name its structure and image offset in one line: "
                        f"{f.structure!r} @{f.offset!r}: {f.problem!r}")


def refusal_of(exc: FormatError) -> str:
    """The report key of an image refused as a whole at open."""
    return "image: " + _kind(exc.structure)


def _kind(structure: str) -> str:
    """A structure with its record indices and domain numbers dropped: what the counts group by."""
    s = re.sub(r"\[\d+\]", "[]", structure)
    s = re.sub(r"dom-\d+", "dom-N", s)
    s = re.sub(r"context entry [0-9a-f]{2}:[0-9a-f]{2}\.\d", "context entry", s)
    return re.sub(r"root entry [0-9a-f]{2}", "root entry", s)
