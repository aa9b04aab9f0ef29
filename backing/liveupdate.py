"""The Live Update Orchestrator of one daemon: sessions, freeze at reboot(), restore at mount.

This is the logic behind ``/dev/liveupdate`` and IOMMU_HWPT_LU_SET_PRESERVE,
kept apart from the socket (``pkfuse.daemon.liveupdate`` is its transport).
It follows the merged LUO (``kernel/liveupdate``) and adds what the unmerged
IOMMU series left open: the userspace reclaim of a preserved HWPT.

Before the restart (outgoing sessions)
--------------------------------------
``create_session`` names a session; ``preserve_file`` adds a file on the
mount (its size frozen and its pages pinned while preserved, as memfd
preservation does); ``preserve_hwpt`` adds a HWPT with the devices attached
to it -- only if every map of its IOAS is a file preserved in the same
session -- and makes the IOAS immutable (map/unmap EBUSY). ``cancel`` (the
session fd closed) unpreserves everything in it. A context closed while one
of its HWPTs is preserved keeps that HWPT, its IOAS and its devices.

``reboot`` serializes every session into ``iommu/lu-state``
(``backing.lustate``, one rename: the commit point) and then halts: the
kernel is gone, nothing is released any more, every later call is
ESHUTDOWN. In the ephemeral design it first copies each preserved domain into
a fixed domain in the image (DOMF_SAVED) and switches its devices to the copy
hitlessly. A failure is EAGAIN and leaves everything as it was.

After the restart (incoming sessions)
-------------------------------------
``restore`` (at mount) validates each session against the store and the
IOMMU state: its files (live guest-RAM inodes of the same generation and
size), its HWPTs' domains (present, of the design recorded, translating
exactly the recorded maps), their devices (context entries pointing at
that domain). A session that fails is refused with a finding: its devices
are blocked and its domains freed, never adopted; the others proceed.
Domains of the previous daemon that were not preserved are freed.

``retrieve_session`` / ``retrieve_file`` hand them back; a preserved HWPT is
reclaimed either by *adopt* (pkernfs: ``Context.hwpt_alloc`` for one of its
devices from an IOAS with exactly the recorded maps takes the restored
domain over as the new HWPT) or by *replace* (the review: the device is
attached to a new HWPT, switching its context entry hitlessly, and the
restored domain -- in the ephemeral design the fixed copy -- is freed at
finish). ``finish`` is all or nothing: EBUSY until every file was retrieved
and every HWPT reclaimed.

Every method holds ``store.lock`` and raises ``StoreError`` with the
kernel's errno.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
from collections.abc import Callable

import numpy as np

from . import format as fmt
from . import lustate, vtd
from .errors import Finding, FormatError, PkfuseError, StoreError
from .iommu import Domain
from .iommufd import Context, Device, Hwpt, Ioas, Iommufd
from .lustate import SavedFile, SavedHwpt, SavedMap, SavedSession, SavedState
from .store import Store

PS = fmt.PAGE_SIZE


log = logging.getLogger(__name__)

MAX_SESSIONS = 64
NAME_MAX = 63  #: bytes of a session name (the uAPI's name[64] holds a NUL)
MODES = {"persistent": fmt.LU_DOMAINS_PERSISTENT, "ephemeral": fmt.LU_DOMAINS_EPHEMERAL}


def _err(code: int, msg: str) -> StoreError:
    return StoreError(code, msg)


class _Refused(Exception):
    """A session restore refuses: ``finding`` names the structure and its image byte offset."""

    def __init__(self, finding: Finding) -> None:
        super().__init__(str(finding))
        self.finding = finding


@dataclasses.dataclass
class OutgoingSession:
    name: bytes
    files: dict[int, SavedFile] = dataclasses.field(default_factory=dict)  #: token -> file
    hwpts: dict[int, Hwpt] = dataclasses.field(default_factory=dict)  #: token -> preserved HWPT
    maps: dict[int, tuple[SavedMap, ...]] = dataclasses.field(default_factory=dict)  #: token -> its IOAS's maps
    closed: bool = False

    def tokens(self) -> set[int]:
        return set(self.files) | set(self.hwpts)


@dataclasses.dataclass
class RestoredHwpt:
    """A preserved HWPT after the restart: its domain holds the devices until it is reclaimed."""

    saved: SavedHwpt
    domain: Domain
    adopted: Hwpt | None = None  #: the new HWPT that took the domain over

    def reclaimed(self, device_hwpt: Callable[[int], Hwpt | None]) -> bool:
        """Adopted, with every requester still attached to the domain attached through the
        adopter (a requester left without a device object could never be bound again);
        or replaced: no requester left on the domain. ``device_hwpt(rid)``: the HWPT the
        bound device of ``rid`` is attached to, if any."""
        if self.adopted is not None:
            return all(device_hwpt(rid) is self.adopted for rid in self.domain.attached)
        return not self.domain.attached


@dataclasses.dataclass
class IncomingSession:
    name: bytes
    files: dict[int, SavedFile]
    hwpts: dict[int, RestoredHwpt]
    retrieved_files: set[int] = dataclasses.field(default_factory=set)
    open: bool = False  #: a session fd is out (a second retrieve_session is EBUSY)

    def pending(self, device_hwpt: Callable[[int], Hwpt | None]) -> list[str]:
        out = [f"file token {t} not retrieved" for t in sorted(set(self.files) - self.retrieved_files)]
        out += [f"HWPT token {t} (domain {r.domain.domain_id}) not reclaimed"
                for t, r in sorted(self.hwpts.items()) if not r.reclaimed(device_hwpt)]
        return out


class LiveUpdate:
    """The LUO of one daemon (see the module docstring). Install after ``Iommufd``."""

    def __init__(self, store: Store, iommufd: Iommufd, *, mode: str = "persistent") -> None:
        if mode not in MODES:
            raise ValueError(f"domains must be one of {', '.join(MODES)}, not {mode!r}")
        self.store = store
        self.iommufd = iommufd
        self.mode = mode
        self.outgoing: dict[bytes, OutgoingSession] = {}
        self.incoming: dict[bytes, IncomingSession] = {}
        self.refused: dict[bytes, Finding] = {}  #: session name -> why restore refused it
        self.state_refused: Finding | None = None  #: the state did not decode: every session lost
        self.findings: list[str] = []  #: what restore did, one line each
        self.boot = 0  #: reboot()s this image has seen
        self.rebooted = False
        self.restored_mode = fmt.LU_DOMAINS_PERSISTENT
        self._state_pages = np.zeros(0, np.int64)  #: iommu/lu-state's image pages, as restore read it
        store.frozen_hook = self.frozen
        iommufd.lu = self

    # ---------------------------------------------------------- hooks

    def frozen(self, ino: int) -> bool:
        """Store.frozen_hook: a session preserves ``ino`` (size frozen, pages pinned)."""
        return any(f.ino == ino for s in self.outgoing.values() for f in s.files.values()) or \
            any(f.ino == ino for s in self.incoming.values() for f in s.files.values())

    def keeps(self, obj: object) -> bool:
        """Whether a closing context keeps ``obj``: a preserved HWPT, its IOAS, its devices."""
        preserved = [h for s in self.outgoing.values() for h in s.hwpts.values()]
        if isinstance(obj, Hwpt):
            return any(h is obj for h in preserved)
        if isinstance(obj, Ioas):
            return any(h.ioas is obj for h in preserved)
        if isinstance(obj, Device):
            return obj.hwpt is not None and any(h is obj.hwpt for h in preserved)
        return False

    def _restored(self) -> list[RestoredHwpt]:
        return [r for s in self.incoming.values() for r in s.hwpts.values()]

    def _device_hwpt(self, rid: int) -> Hwpt | None:
        """The HWPT the device object bound to ``rid`` is attached to, if any."""
        ctx = self.iommufd.bound.get(rid)
        if ctx is None:
            return None
        dev = next((o for o in ctx.objects.values() if isinstance(o, Device) and o.rid == rid), None)
        return dev.hwpt if dev is not None else None

    def may_bind(self, rid: int) -> bool:
        """A requester still attached to a restored domain may be bound (to reclaim it)."""
        return any(rid in r.saved.rids and r.domain.domain_id == self.iommufd.iommu.attached.get(rid)
                   for r in self._restored())

    def holds(self, domain_id: int) -> bool:
        """A restored domain not yet finished: no one but its reclaim may touch it."""
        return any(r.domain.domain_id == domain_id and r.adopted is None for r in self._restored())

    def adopt(self, dev: Device, ioas: Ioas) -> RestoredHwpt | None:
        """The restored HWPT that a new HWPT of ``dev`` from ``ioas`` takes over, if any.

        Only in the pkernfs design (the domain is the live one, not a copy),
        only for a device of that HWPT, and only if the IOAS maps exactly what
        the domain maps: the same areas (iova, length, file, offset, write).
        """
        want = sorted((a.iova, a.length, a.ino, a.offset, a.writeable) for a in ioas.areas)
        for r in self._restored():
            if r.adopted is not None or dev.rid not in r.saved.rids or r.domain.flags & fmt.DOMF_SAVED:
                continue
            if r.domain.domain_id != self.iommufd.iommu.attached.get(dev.rid):
                continue
            if want == sorted((m.iova, m.length, m.ino, m.offset, m.write) for m in r.saved.maps):
                return r
        return None

    def give_back(self, hwpt: Hwpt) -> bool:
        """A context that adopted ``hwpt`` closes before the session finished: the domain
        goes back to the session (devices stay attached), to be reclaimed again."""
        for r in self._restored():
            if r.adopted is hwpt:
                r.adopted = None
                return True
        return False

    # ------------------------------------------------- outgoing sessions

    def _check_live(self) -> None:
        if self.rebooted:
            raise _err(errno.ESHUTDOWN, "reboot() was called: this kernel is gone")

    def create_session(self, name: bytes) -> OutgoingSession:
        with self.store.lock:
            self._check_live()
            if not name or len(name) > NAME_MAX or b"\0" in name:
                raise _err(errno.EINVAL, f"session name {name!r} must be 1..{NAME_MAX} bytes without NUL")
            if name in self.outgoing or name in self.incoming:
                raise _err(errno.EEXIST, f"session {name.decode(errors='replace')} exists")
            if len(self.outgoing) >= MAX_SESSIONS:
                raise _err(errno.ENOSPC, f"{MAX_SESSIONS} sessions already")
            s = OutgoingSession(name)
            self.outgoing[name] = s
            return s

    def preserve_file(self, s: OutgoingSession, ino: int, token: int) -> None:
        """PRESERVE_FD of a file on the mount: EEXIST duplicate token or file, ENOSPC full."""
        with self.store.lock:
            self._check_live()
            if token in s.tokens():
                raise _err(errno.EEXIST, f"token {token} is in use in session {s.name.decode()}")
            if len(s.files) >= fmt.LU_MAX_FILES:
                raise _err(errno.ENOSPC, f"session {s.name.decode()} holds {fmt.LU_MAX_FILES} files")
            a = self.store.getattr(ino)
            if a.kind != fmt.KIND_GUEST:
                raise _err(errno.ENOENT, "no live-update handler for that kind of file")
            if self.frozen(ino):
                raise _err(errno.EEXIST, f"inode {ino} is preserved already")
            s.files[token] = SavedFile(token, ino, a.igen, a.size)

    def preserve_hwpt(self, s: OutgoingSession, ctx: Context, hwpt_id: int, token: int) -> None:
        """IOMMU_HWPT_LU_SET_PRESERVE: ENOENT no such HWPT, EEXIST token or HWPT preserved,
        EBUSY it adopted a domain of an unfinished session, EINVAL a map of its IOAS is not a
        file preserved in the session."""
        with self.store.lock:
            self._check_live()
            hwpt = ctx.hwpt(hwpt_id)
            if token in s.tokens():
                raise _err(errno.EEXIST, f"token {token} is in use in session {s.name.decode()}")
            if any(h is hwpt for o in self.outgoing.values() for h in o.hwpts.values()):
                raise _err(errno.EEXIST, f"HWPT {hwpt_id} is preserved already")
            if any(r.adopted is hwpt for r in self._restored()):
                # its IOAS stays frozen until the old session finishes; a cancel of this one
                # must not be able to unfreeze it under a domain the old session still holds
                raise _err(errno.EBUSY, f"HWPT {hwpt_id} adopted a domain of a session not finished yet")
            inos = {f.ino for f in s.files.values()}
            for a in hwpt.ioas.areas:
                if a.ino not in inos:
                    raise _err(errno.EINVAL, f"IOAS {hwpt.ioas.id} maps inode {a.ino} at {a.iova:#x}, which session "
                                             f"{s.name.decode()} does not preserve")
            igen = {ino: self.store.getattr(ino).igen for ino in {a.ino for a in hwpt.ioas.areas}}
            # the IOAS is immutable from now on and its files cannot go: its maps are final here,
            # which keeps their cost (thousands for a big guest) out of reboot()
            s.maps[token] = tuple(SavedMap(a.iova, a.length, a.offset, a.ino, igen[a.ino], a.writeable)
                                  for a in hwpt.ioas.areas)
            s.hwpts[token] = hwpt
            hwpt.ioas.frozen = True

    def cancel(self, s: OutgoingSession) -> None:
        """The outgoing session fd closed: everything in it unpreserved."""
        with self.store.lock:
            if s.closed or self.rebooted:
                return
            s.closed = True
            self.outgoing.pop(s.name, None)
            still = [h for o in self.outgoing.values() for h in o.hwpts.values()]
            for h in s.hwpts.values():
                if not any(x.ioas is h.ioas for x in still):
                    h.ioas.frozen = False
            self.iommufd.collect()  # what closed contexts kept for this session

    # ------------------------------------------------------------ reboot

    def reboot(self) -> SavedState:
        """Freeze every session into the image (EAGAIN and nothing changed on failure)."""
        with self.store.lock:
            self._check_live()
            if self.incoming:
                names = ", ".join(n.decode(errors="replace") for n in self.incoming)
                raise _err(errno.EAGAIN, f"sessions of the previous boot are not finished: {names}")
            copies: list[tuple[Hwpt, Domain]] = []
            try:
                if self.mode == "ephemeral":
                    copies = self._save_copies()
                state = self._serialize({h: d for h, d in copies})
                _write_state(self.store, state)
            except (StoreError, PkfuseError, OSError) as exc:
                self._unsave_copies(copies)
                raise _err(errno.EAGAIN, f"freeze failed: {exc}") from exc
            self.rebooted = True
            self.iommufd.halted = True
            self.boot = state.boot
            log.info("reboot: %d sessions preserved, state committed (boot %d)", len(state.sessions), state.boot)
            return state

    def _save_copies(self) -> list[tuple[Hwpt, Domain]]:
        """Ephemeral design: each preserved domain copied into a fixed one in the image,
        its devices switched to the copy (hitless replace)."""
        io = self.iommufd.iommu
        out: list[tuple[Hwpt, Domain]] = []
        try:
            for s in self.outgoing.values():
                for h in s.hwpts.values():
                    fixed = io.copy_domain(h.domain)
                    out.append((h, fixed))
                    for rid in h.domain.attached:
                        io.attach(fixed, rid >> 8, (rid >> 3) & 0x1F, rid & 7, replace=True)
        except BaseException:
            self._unsave_copies(out)
            raise
        return out

    def _unsave_copies(self, copies: list[tuple[Hwpt, Domain]]) -> None:
        io = self.iommufd.iommu
        for h, fixed in copies:
            if io.domains.get(fixed.domain_id) is not fixed:
                continue
            for rid in fixed.attached:
                io.attach(h.domain, rid >> 8, (rid >> 3) & 0x1F, rid & 7, replace=True)
            self.iommufd.dying.append(fixed)

    def _serialize(self, fixed: dict[Hwpt, Domain]) -> SavedState:
        io = self.iommufd.iommu
        sessions = []
        kept: set[int] = set()
        for s in self.outgoing.values():
            hwpts = []
            for token, h in s.hwpts.items():
                dom = fixed.get(h, h.domain)
                kept.add(dom.domain_id)
                hwpts.append(SavedHwpt(token, dom.domain_id, s.maps[token], tuple(dom.attached)))
            files = tuple(SavedFile(f.token, f.ino, f.igen, self.store.getattr(f.ino).size) for f in s.files.values())
            sessions.append(SavedSession(s.name, files, tuple(hwpts)))
        owned = {h.domain.domain_id for c in self.iommufd.contexts for h in c.objects.values()
                 if getattr(h, "domain", None) is not None}
        owned |= {d.domain_id for d in self.iommufd.dying}
        drops = tuple(sorted(d for d in owned - kept if d in io.domains))
        return SavedState(self.boot + 1, MODES[self.mode], tuple(sessions), drops)

    # ----------------------------------------------------------- restore

    def restore(self) -> list[str]:
        """Load ``iommu/lu-state`` at mount: sessions validated one by one (see the module
        docstring). Returns the findings, one line each (also kept in ``findings``).

        Every byte of the state and of the domains is untrusted: a session
        is adopted only if each of its records resolves and its domains
        translate exactly its maps, and nothing it names is claimed by an
        earlier session (a file, a domain, a requester); else it is refused
        with a finding naming the structure and image offset, its devices
        blocked and its domains freed. A state that does not decode refuses
        every session: then no record can say whose a domain is, and every
        iommufd domain (DOMF_IOMMUFD) of the previous boot is freed, its
        devices blocked (domains made through the admin socket stay).
        """
        with self.store.lock:
            if not self.store.read_only:  # a reboot() killed before its rename: never committed
                _remove(self.store, _dir(self.store), fmt.LU_STATE_NEW_NAME)
            self._state_pages = _state_pages(self.store)
            try:
                state = _read_state(self.store)
            except FormatError as exc:
                self.state_refused = Finding(exc.structure, self._image_off(exc.offset), exc.problem)
                self._finding(f"live-update state refused: {self.state_refused}; every session in it is lost")
                self._block_iommufd_domains()
                if not self.store.read_only:
                    _remove_state(self.store)
                return self.findings
            if state is None:
                self._free_stray_copies({})
                return self.findings
            self.boot = state.boot
            self.restored_mode = state.domains
            claimed: dict[int, bytes] = {}  #: DID -> session
            taken_files: set[int] = set()  #: inodes of the sessions adopted so far
            taken_rids: set[int] = set()
            for s in state.sessions:
                try:
                    sess = self._restore_session(state, s, claimed, taken_files, taken_rids)
                except _Refused as exc:
                    self.refused[s.name] = exc.finding
                    self._finding(f"session {s.name.decode(errors='replace')} refused: {exc.finding}")
                    continue  # its domains go below, once no later session can claim them
                self.incoming[s.name] = sess
                for r in sess.hwpts.values():
                    claimed[r.domain.domain_id] = s.name
                    taken_rids.update(r.saved.rids)
                taken_files.update(f.ino for f in sess.files.values())
            self._free_unclaimed(claimed, set(state.drops))
            self._block_strangers()
            self._rewrite()
            return self.findings

    def _finding(self, line: str) -> None:
        log.warning("%s", line)
        self.findings.append(line)

    def _image_off(self, off: int) -> int:
        """The image byte offset of byte ``off`` of ``iommu/lu-state`` (as read at restore)."""
        pages = self._state_pages
        return int(pages[off // PS]) * PS + off % PS if 0 <= off // PS < pages.size else 0

    def _restore_session(self, state: SavedState, s: SavedSession, claimed: dict[int, bytes],
                         taken_files: set[int], taken_rids: set[int]) -> IncomingSession:
        st = self.store

        def refuse(array: str, index: int, field: str, why: str) -> _Refused:
            structure, off = state.where(array, index, field)
            return _Refused(Finding(structure, self._image_off(off), why))

        files: dict[int, SavedFile] = {}
        for i, f in enumerate(s.files, s.file_first):
            why = self._check_file(f.ino, f.igen, f"file token {f.token}")
            if why:
                raise refuse("files", i, "ino", why)
            if f.ino in taken_files:
                raise refuse("files", i, "ino", f"file token {f.token}: inode {f.ino} is preserved by an "
                                                "earlier session too")
            a = st.getattr(f.ino)
            if a.size != f.size:
                raise refuse("files", i, "size", f"file token {f.token} (inode {f.ino}) is {a.size} bytes, "
                                                 f"preserved {f.size}")
            files[f.token] = f
        by_ino = {f.ino: f for f in s.files}
        hwpts: dict[int, RestoredHwpt] = {}
        io = self.iommufd.iommu
        rids_seen: set[int] = set()
        for h in s.hwpts:
            what = f"HWPT token {h.token}"
            dom = io.domains.get(h.domain_id)
            if dom is None:
                gone = next((f for f in io.refused if f.structure.startswith(f"iommu/dom-{h.domain_id} ")), None)
                raise refuse("hwpts", h.index, "domain_id", f"{what}: domain {h.domain_id} " + (
                    f"was refused at open ({gone})" if gone else "does not exist"))
            if h.domain_id in claimed or any(r.domain is dom for r in hwpts.values()):
                raise refuse("hwpts", h.index, "domain_id", f"{what}: domain {h.domain_id} is preserved twice")
            saved_copy = bool(dom.flags & fmt.DOMF_SAVED)
            if saved_copy != (state.domains == fmt.LU_DOMAINS_EPHEMERAL):
                raise refuse("hwpts", h.index, "domain_id", f"{what}: domain {h.domain_id} is "
                             f"{'a' if saved_copy else 'not a'} fixed copy, against the design the state records")
            if dom.ephemeral:
                raise refuse("hwpts", h.index, "domain_id", f"{what}: domain {h.domain_id} has no tables in the image")
            for k, m in enumerate(h.maps, h.map_first):
                f = by_ino.get(m.ino)
                if f is None or f.igen != m.igen:
                    raise refuse("maps", k, "ino", f"{what}: map at {m.iova:#x} is of inode {m.ino}, "
                                                   "not a file of the session")
                if m.offset + m.length > f.size:
                    raise refuse("maps", k, "length", f"{what}: map at {m.iova:#x} runs past the end of inode {m.ino}")
            order = sorted(range(len(h.maps)), key=lambda i: h.maps[i].iova)
            for a, b in zip(order, order[1:]):
                if h.maps[a].iova + h.maps[a].length > h.maps[b].iova:  # an IOAS's areas never overlap
                    raise refuse("maps", h.map_first + b, "iova", f"{what}: map at {h.maps[b].iova:#x} overlaps "
                                                                  f"the one at {h.maps[a].iova:#x}")
            want = self._expected_runs(h.maps)
            have = _merge([(r.iova, r.phys_addr, r.length, r.write) for r in dom.mappings()])
            if want != have:
                w, v = next((w, v) for w, v in zip(want + [None], have + [None]) if w != v)
                raise _Refused(self._mismatch(state, h, dom, w, v))
            for d, rid in enumerate(h.rids, h.dev_first):
                if rid in rids_seen or rid in taken_rids:
                    raise refuse("devices", d, "rid", f"{what}: requester {fmt.requester_name(rid)} is preserved "
                                                      "twice")
                rids_seen.add(rid)
                if io.attached.get(rid) != h.domain_id:
                    raise refuse("devices", d, "rid", f"{what}: requester {fmt.requester_name(rid)} is not "
                                                      f"attached to domain {h.domain_id}")
            hwpts[h.token] = RestoredHwpt(h, dom)
        return IncomingSession(s.name, files, hwpts)

    def _mismatch(self, state: SavedState, h: SavedHwpt, dom: Domain, want: tuple | None,
                  have: tuple | None) -> Finding:
        """The finding for a domain that does not translate what ``h`` preserved: at the
        domain's leaf for the first IOVA where they differ if it maps one there, else at
        the map record that covers it."""
        if want is None or have is None:
            iova = (want or have)[0]  # type: ignore[index] - one of them is a run
        elif want[0] != have[0]:
            iova = min(want[0], have[0])
        elif (want[1], want[3]) != (have[1], have[3]):
            iova = want[0]  # its first page goes elsewhere, or with other rights
        else:
            iova = want[0] + min(want[2], have[2])  # one run is longer
        why = (f"HWPT token {h.token}: domain {h.domain_id} does not translate what was preserved "
               f"(first difference: preserved {_run_str(want)}, domain {_run_str(have)})")
        leaf = dom.leaf_at(iova)
        if leaf is not None:
            level, where = leaf
            return Finding(f"{dom.path} {vtd.LEVEL_NAMES[level]}", where * 8, why)
        k = next((h.map_first + i for i, m in enumerate(h.maps) if m.iova <= iova < m.iova + m.length), h.map_first)
        structure, off = state.where("maps", k, "iova")
        return Finding(structure, self._image_off(off), why)

    def _check_file(self, ino: int, igen: int, what: str) -> str:
        """Why inode ``ino`` is not the preserved guest file of generation ``igen`` ('' if it is)."""
        st = self.store
        if not 2 <= ino < st.geometry.inode_count:
            return f"{what}: inode {ino} is outside the inode table"
        try:
            a = st.getattr(ino)
        except StoreError:
            return f"{what}: inode {ino} is free"
        if a.kind != fmt.KIND_GUEST or a.igen != igen or st.is_orphan(ino):
            return (f"{what}: inode {ino} is not the preserved file (kind {fmt.KIND_NAMES.get(a.kind, a.kind)}, "
                    f"generation {a.igen}, preserved {igen})")
        return ""

    def _expected_runs(self, maps: tuple[SavedMap, ...]) -> list[tuple[int, int, int, bool]]:
        """(iova, phys_addr, length, write) runs that the maps make through the files' extents."""
        runs = []
        extents = {ino: self.store.extents(ino) for ino in {m.ino for m in maps}}  # once per file, not per map
        for m in sorted(maps, key=lambda m: m.iova):
            for e in extents[m.ino]:
                lo, hi = max(m.offset, e.file_offset), min(m.offset + m.length, e.file_offset + e.length)
                if lo < hi:
                    runs.append((m.iova + lo - m.offset, e.phys_addr + lo - e.file_offset, hi - lo, m.write))
        return _merge(runs)

    def _free_unclaimed(self, claimed: dict[int, bytes], drops: set[int]) -> None:
        """After a committed state, every domain of the previous kernel's iommufd (DOMF_IOMMUFD)
        and every saved copy (DOMF_SAVED) is a restored session's, or nobody's: dropped, of
        a refused session (whatever its records named), or not named at all. Nobody's are
        freed, their devices blocked -- never adopted. Admin-made domains stay."""
        if self.store.read_only:
            return
        for d in sorted(self.iommufd.iommu.domains.values(), key=lambda d: d.domain_id):
            if d.domain_id in claimed or d.ephemeral or not d.flags & (fmt.DOMF_IOMMUFD | fmt.DOMF_SAVED):
                continue
            owners = list(self.refused)
            why = "not preserved" if d.domain_id in drops else \
                "a saved copy no restored session holds" if d.flags & fmt.DOMF_SAVED else \
                "held by no restored session" + (f" (refused: {b', '.join(owners).decode(errors='replace')})"
                                                 if owners else "")
            self._free(d, why)

    def _block_strangers(self) -> None:
        """A requester attached to a restored session's domain that the session did not preserve
        (garbage put a copy of its context entry in that requester's slot) would reach that VM's
        memory: blocked, the context entry refused by name and offset."""
        if self.store.read_only:
            return
        io = self.iommufd.iommu
        own: dict[int, tuple[bytes, set[int]]] = {}
        for name, sess in self.incoming.items():
            for r in sess.hwpts.values():
                own.setdefault(r.domain.domain_id, (name, set()))[1].update(r.saved.rids)
        for did, (name, rids) in sorted(own.items()):
            d = io.domains.get(did)
            for rid in sorted(set(d.attached) - rids) if d is not None else ():
                f = io.refuse_attachment(rid, f"attached to domain {did} of session "
                                              f"{name.decode(errors='replace')}, which did not preserve it")
                self._finding(f"requester {fmt.requester_name(rid)} blocked: {f}")

    def _block_iommufd_domains(self) -> None:
        """The state itself is unreadable: nothing can say which iommufd domain is whose, or
        whether it was preserved at all; every one is freed, its devices blocked."""
        if self.store.read_only:
            return
        for d in sorted(self.iommufd.iommu.domains.values(), key=lambda d: d.domain_id):
            if d.flags & (fmt.DOMF_IOMMUFD | fmt.DOMF_SAVED) and not d.ephemeral:
                self._free(d, "named by a live-update state that was refused")

    def _free_stray_copies(self, claimed: dict[int, bytes]) -> None:
        """Saved copies (DOMF_SAVED) no restored session holds: a freeze killed between the copy and its
        reboot() (an unplanned crash) left them. Nothing can ever claim one: freed, its requesters
        blocked (a copy the hardware was already switched to translated for a kernel that is gone)."""
        if self.store.read_only:
            return
        for d in list(self.iommufd.iommu.domains.values()):
            if d.flags & fmt.DOMF_SAVED and d.domain_id not in claimed:
                self._free(d, "a saved copy no committed session holds (a freeze cut before its reboot())")

    def _free(self, d: Domain, why: str) -> None:
        io = self.iommufd.iommu
        for rid in d.attached:
            io.detach(d, rid >> 8, (rid >> 3) & 0x1F, rid & 7)
            self._finding(f"requester {fmt.requester_name(rid)} blocked: its domain {d.domain_id} was {why}")
        d._quiet_after = 0.0  # a restart took longer than any walk
        io.destroy_domain(d)
        self._finding(f"domain {d.domain_id} freed: {why}")

    def _rewrite(self) -> None:
        """The state on disk = the incoming sessions not finished (none: no file)."""
        if self.store.read_only:
            return
        if not self.incoming:
            _remove_state(self.store)
            return
        sessions = tuple(SavedSession(s.name, tuple(s.files.values()), tuple(r.saved for r in s.hwpts.values()))
                         for s in self.incoming.values())
        _write_state(self.store, SavedState(self.boot, self.restored_mode, sessions))

    # ---------------------------------------------------- incoming sessions

    def retrieve_session(self, name: bytes) -> IncomingSession:
        with self.store.lock:
            self._check_live()
            s = self.incoming.get(name)
            if s is None:
                why = self.refused.get(name)
                raise _err(errno.ENOENT, f"no preserved session {name!r}" + (f" (refused: {why})" if why else ""))
            if s.open:
                raise _err(errno.EBUSY, f"session {name!r} is retrieved already")
            s.open = True
            return s

    def retrieve_file(self, s: IncomingSession, token: int) -> SavedFile:
        """RETRIEVE_FD: the file to hand back (the caller opens it, once, and keeps the fd)."""
        with self.store.lock:
            self._check_live()
            f = s.files.get(token)
            if f is None:
                raise _err(errno.ENOENT, f"no file token {token} in session {s.name.decode(errors='replace')}")
            s.retrieved_files.add(token)
            return f

    def finish(self, s: IncomingSession) -> None:
        """FINISH: EBUSY (nothing changed) unless every object was reclaimed; then the session
        goes, its files thaw, and the domains its devices left (a replace) are freed."""
        with self.store.lock:
            self._check_live()
            if self.incoming.get(s.name) is not s:
                raise _err(errno.ENOENT, f"session {s.name!r} is finished already")
            pending = s.pending(self._device_hwpt)
            if pending:
                raise _err(errno.EBUSY, f"session {s.name.decode(errors='replace')}: {'; '.join(pending)}")
            del self.incoming[s.name]
            preserved = [h for o in self.outgoing.values() for h in o.hwpts.values()]
            for r in s.hwpts.values():
                if r.adopted is not None and not any(h.ioas is r.adopted.ioas for h in preserved):
                    r.adopted.ioas.frozen = False  # reclaimed: the VMM owns its maps again
                if r.adopted is None and self.iommufd.iommu.domains.get(r.domain.domain_id) is r.domain:
                    self.iommufd.dying.append(r.domain)  # replaced: the restored copy goes after the grace
            self.iommufd.reap()
            self._rewrite()

    def close_session(self, s: OutgoingSession | IncomingSession) -> None:
        """The session fd closed: cancel an outgoing one; try to finish a retrieved one."""
        with self.store.lock:
            if isinstance(s, OutgoingSession):
                self.cancel(s)
                return
            s.open = False
            if self.rebooted or self.incoming.get(s.name) is not s:
                return
            try:
                self.finish(s)
            except StoreError as exc:
                log.info("session %s closed unfinished: %s", s.name.decode(errors="replace"), exc)

    # ------------------------------------------------------------- views

    def summary(self) -> str:
        """One line: the boot, the design, each session's name and state."""
        states = [f"{s.name.decode(errors='replace')} {'frozen' if self.rebooted else 'outgoing'}"
                  for s in self.outgoing.values()]
        states += [f"{s.name.decode(errors='replace')} incoming" for s in self.incoming.values()]
        states += [f"{n.decode(errors='replace')} refused" for n in self.refused]
        return (f"boot {self.boot}, domains {self.mode}, "
                f"{len(states)} sessions{': ' + ', '.join(states) if states else ''}")

    def describe(self) -> list[str]:
        """One line per session, for ``.pkernfs/status`` and ``.pkernfs/iommu``."""
        out = []
        for s in self.outgoing.values():
            state = "frozen" if self.rebooted else "outgoing"
            out.append(f"session {s.name.decode(errors='replace')}: {state}, {len(s.files)} files, "
                       f"{len(s.hwpts)} hwpts")
        for s in self.incoming.values():
            pending = s.pending(self._device_hwpt)
            out.append(f"session {s.name.decode(errors='replace')}: incoming{' (retrieved)' if s.open else ''}, "
                       f"{len(s.files)} files, {len(s.hwpts)} hwpts, "
                       + (f"{len(pending)} objects to reclaim" if pending else "ready to finish"))
        for name, why in self.refused.items():
            out.append(f"session {name.decode(errors='replace')}: refused: {why}")
        if self.state_refused is not None:
            out.append(f"state refused, every session in it lost: {self.state_refused}")
        return out


def _merge(runs: list[tuple[int, int, int, bool]]) -> list[tuple[int, int, int, bool]]:
    """Coalesce runs contiguous in IOVA and physical address with the same write bit."""
    out: list[tuple[int, int, int, bool]] = []
    for iova, phys, length, write in sorted(runs):
        if out and out[-1][0] + out[-1][2] == iova and out[-1][1] + out[-1][2] == phys and out[-1][3] == write:
            p = out[-1]
            out[-1] = (p[0], p[1], p[2] + length, write)
        else:
            out.append((iova, phys, length, write))
    return out


def _run_str(run: tuple[int, int, int, bool] | None) -> str:
    if run is None:
        return "nothing"
    iova, phys, length, write = run
    return f"{iova:#x}+{length:#x} -> {phys:#x} {'rw' if write else 'r'}"


# ------------------------------------------------------ the state file

def _dir(store: Store) -> int:
    return store.lookup(fmt.ROOT_INO, fmt.IOMMU_DIR_NAME)


def _state_pages(store: Store) -> np.ndarray:
    """The image pages of ``iommu/lu-state`` (none if there is no such file)."""
    with store.lock:
        try:
            return store.image_pages(store.lookup(_dir(store), fmt.LU_STATE_NAME))
        except StoreError:
            return np.zeros(0, np.int64)


def _read_state(store: Store) -> SavedState | None:
    """The committed state, None if there is none; FormatError if it does not decode."""
    with store.lock:
        try:
            ino = store.lookup(_dir(store), fmt.LU_STATE_NAME)
        except StoreError:
            return None
        a = store.getattr(ino)
        if a.kind != fmt.KIND_LU_STATE:
            raise FormatError(lustate.WHERE, 0, f"kind {fmt.KIND_NAMES.get(a.kind, a.kind)}, not liveupdate-state")
        return lustate.decode(store.read(ino, 0, a.size))


def _write_state(store: Store, state: SavedState) -> None:
    """Commit ``state`` as ``iommu/lu-state`` (replacing any), in one rename (see the module docstring)."""
    raw = lustate.encode(state)
    with store.lock:
        d = _dir(store)
        _remove(store, d, fmt.LU_STATE_NEW_NAME)
        ino = store.create(d, fmt.LU_STATE_NEW_NAME, 0o400, 0, 0, kind=fmt.KIND_LU_STATE)
        try:
            npages = -(-len(raw) // PS)
            store.grow(ino, npages)  # zeroed pages; size = npages * 4 KiB
            buf = np.zeros(npages * PS, np.uint8)
            buf[: len(raw)] = np.frombuffer(raw, np.uint8)
            pages = store.image_pages(ino)
            store.image.reshape(-1, PS)[pages] = buf.reshape(-1, PS)  # unreachable under lu-state until the rename
            store.rename(d, fmt.LU_STATE_NEW_NAME, d, fmt.LU_STATE_NAME, managed=True)  # the commit point
        except BaseException:
            _remove(store, d, fmt.LU_STATE_NEW_NAME)
            raise


def _remove_state(store: Store) -> None:
    """Drop the committed state (every session finished) and any half-written one."""
    with store.lock:
        d = _dir(store)
        _remove(store, d, fmt.LU_STATE_NAME)
        _remove(store, d, fmt.LU_STATE_NEW_NAME)


def _remove(store: Store, d: int, name: bytes) -> None:
    try:
        ino = store.lookup(d, name)
    except StoreError as exc:
        if exc.errno == errno.ENOENT:
            return
        raise
    if store.getattr(ino).kind != fmt.KIND_LU_STATE:
        raise FormatError(f"iommu/{name.decode()}", 0, "is not a liveupdate-state file")
    store.unlink(d, name, managed=True)
