"""iommufd in the kernel: IOAS, HWPT and device objects over the IOMMU driver state.

This is the logic behind the ``/dev/iommu`` calls of the control socket, kept
apart from any transport so that it can be tested and reasoned about alone.
It mirrors ``drivers/iommu/iommufd`` in the semantics a VMM relies on.

Objects
-------
``Iommufd`` is the kernel side of the whole subsystem for one open store: it
owns the ``Iommu`` driver state, knows which requester is bound to which
context, and adds the pins of IOAS areas to the store's pin hook.
``Context`` is one open ``/dev/iommu`` (an ``iommufd_ctx``); its objects have
ids from 1 that are never reused within the context, and an id of another
context is ENOENT, as a foreign id is to the kernel.

* ``Ioas`` -- an IO address space: the list of areas ``(iova, length, file,
  offset, writeable)`` mapped into it. The IOAS is the source of truth:
  every area is mirrored into every HWPT allocated from it, all or nothing.
  A file with an area is pinned (truncate-down and unlink give EBUSY) for as
  long as the area exists, whether or not a HWPT maps it.
  ``huge_pages`` is ``IOMMU_OPTION_HUGE_PAGES`` (``Context.option``): on by
  default; off, every HWPT maps it with 4 KiB leaves only.
* ``Hwpt`` -- a hardware page table: one ``Domain`` (VT-d second-level
  tables in ``iommu/dom-<DID>``) made from one IOAS. ``auto`` HWPTs are the
  ones ``device_attach`` makes for an IOAS; they go when no device uses them.
* ``Device`` -- a requester id (``bus << 8 | dev << 3 | fn``) bound to the
  context: a VFIO cdev bound with VFIO_DEVICE_BIND_IOMMUFD. One context at a
  time (EBUSY). Attached to at most one HWPT at a time.

Invariants (checked by the tests after every call sequence)
-----------------------------------------------------------
* for every HWPT, the domain's translations are exactly its IOAS's areas;
* a refused call changes no table, no pin and no object;
* a file's IOAS pins are the number of areas over it in all contexts.

Freeing a domain waits out ``iommu.FREE_GRACE_S`` after its last detach (the
stand-in for the IOTLB flush and its wait descriptor): ``destroy`` returns at
once and the domain joins ``Iommufd.dying``, which ``reap`` frees later.
"""

from __future__ import annotations

import bisect
import dataclasses
import enum
import errno
import itertools
import logging
from collections.abc import Callable, Iterator
from typing import Protocol

from . import format as fmt
from .errors import StoreError
from .iommu import Domain, Iommu
from .store import Store

log = logging.getLogger(__name__)

PS = fmt.PAGE_SIZE
IOVA_LIMIT = 1 << fmt.VTD_IOVA_BITS  #: the second-level tables translate 48 bits
U64_MAX = (1 << 64) - 1
#: the leaf sizes an automatically placed IOVA is aligned for, largest first
_LEAF_SIZES = (1 << 30, 1 << 21, PS)

#: ``enum iommufd_option`` and ``enum iommufd_option_ops`` (iommufd.h), for ``Context.option``
OPTION_RLIMIT_MODE, OPTION_HUGE_PAGES = 0, 1
OPTION_OP_SET, OPTION_OP_GET = 0, 1


def _err(code: int, msg: str) -> StoreError:
    return StoreError(code, msg)


def rid_str(rid: int) -> str:
    return f"{rid >> 8:02x}:{(rid >> 3) & 0x1F:02x}.{rid & 7}"


class ObjType(enum.Enum):
    IOAS = "ioas"
    HWPT = "hwpt"
    DEVICE = "device"


@dataclasses.dataclass(frozen=True)
class Area:
    """One IOAS_MAP_FILE: ``length`` bytes of file ``ino`` from ``offset``, at ``iova``."""

    iova: int
    length: int  #: bytes, a multiple of 4 KiB
    ino: int
    offset: int  #: byte offset in the file
    writeable: bool

    @property
    def last(self) -> int:
        return self.iova + self.length - 1


class Ioas:
    """An IO address space: its areas sorted by IOVA, and the HWPTs mirroring them."""

    kind = ObjType.IOAS

    def __init__(self, obj_id: int) -> None:
        self.id = obj_id
        self.areas: list[Area] = []  #: sorted by iova, never overlapping
        self.hwpts: list[Hwpt] = []
        self.frozen = False  #: preserved by a live-update session: map/unmap EBUSY
        self.huge_pages = True  #: IOMMU_OPTION_HUGE_PAGES: superpages where aligned; False: 4 KiB leaves only

    def overlapping(self, first: int, last: int) -> list[Area]:
        """Areas that share an IOVA with ``[first, last]``."""
        i = bisect.bisect_right([a.iova for a in self.areas], last)
        return [a for a in self.areas[:i] if a.last >= first]


class Hwpt:
    """A HWPT: a domain mirroring one IOAS."""

    kind = ObjType.HWPT

    def __init__(self, obj_id: int, ioas: Ioas, domain: Domain, *, auto: bool) -> None:
        self.id = obj_id
        self.ioas = ioas
        self.domain = domain
        self.auto = auto
        self.devices: set[int] = set()  #: device object ids attached


class Device:
    """A bound requester id, attached to at most one HWPT."""

    kind = ObjType.DEVICE

    def __init__(self, obj_id: int, rid: int) -> None:
        self.id = obj_id
        self.rid = rid
        self.hwpt: Hwpt | None = None

    @property
    def bdf(self) -> tuple[int, int, int]:
        return self.rid >> 8, (self.rid >> 3) & 0x1F, self.rid & 7


Obj = Ioas | Hwpt | Device


class Restored(Protocol):
    """A preserved HWPT after a restart (``backing.liveupdate.RestoredHwpt``)."""

    domain: Domain
    adopted: Hwpt | None


class LiveUpdateHooks(Protocol):
    """What iommufd asks live update (``backing.liveupdate.LiveUpdate``, which imports this module)."""

    def keeps(self, obj: Obj) -> bool: ...  # a session preserves it: a closing context leaves it
    def may_bind(self, rid: int) -> bool: ...  # attached to a restored domain: may be bound to reclaim it
    def adopt(self, dev: Device, ioas: Ioas) -> Restored | None: ...  # the restored HWPT a new HWPT takes over
    def give_back(self, hwpt: Hwpt) -> bool: ...  # an adopter closes before finish: back to the session


class Iommufd:
    """The iommufd subsystem of one daemon: contexts, bound requesters, IOAS pins.

    Install with ``Iommufd(store, iommu)`` after ``Iommu.open``; ``close``
    puts the previous pin hook back. Every method holds ``store.lock``.
    ``ephemeral``: HWPT domains are made in the IOMMU's ephemeral memory (the
    review's design; ``Iommu.open(..., ephemeral=...)`` must have opened it),
    not in ``iommu/dom-<DID>`` files of the image (pkernfs's).
    """

    def __init__(self, store: Store, iommu: Iommu, *, ephemeral: bool = False) -> None:
        if ephemeral and iommu.ephemeral is None:
            raise StoreError(errno.EINVAL, "ephemeral domains need the IOMMU opened with ephemeral memory")
        self.store = store
        self.iommu = iommu
        self.ephemeral = ephemeral
        self.contexts: list[Context] = []
        self.bound: dict[int, Context] = {}  #: rid -> the context it is bound to
        self.area_pins: dict[int, int] = {}  #: ino -> areas over it, in every context
        self.dying: list[Domain] = []  #: destroyed HWPTs' domains waiting out the grace period
        self.lu: LiveUpdateHooks | None = None  #: set by LiveUpdate: what sessions preserve and restored
        self.halted = False  #: reboot() committed: this kernel is gone, nothing is released any more
        self._prev_hook: Callable[[int], bool] | None = store.pin_hook
        store.pin_hook = self.pinned

    def pinned(self, ino: int) -> bool:
        """Store.pin_hook: an IOAS area or a domain maps a page of ``ino``."""
        return self.area_pins.get(ino, 0) > 0 or bool(self._prev_hook and self._prev_hook(ino))

    def enable_translation(self) -> None:
        """Root table in RTADDR and TE set, if a register block is loaded and TE is clear.

        Linux's driver does this at boot; pkfuse waits for the first device
        attached through iommufd, so an image programmed offline keeps the
        register state it was given until something is attached.
        """
        regs = self.iommu.regs
        if regs is not None and not regs.enabled:
            self.iommu.enable()

    def orphaned(self, domain_id: int) -> bool:
        """Whether domain ``domain_id`` is an unplanned restart's leftover: made for an iommufd HWPT
        (DOMF_IOMMUFD, not a saved copy), and now held by no HWPT of any context, not dying, not
        held by a live-update session. Its requesters may be bound again: the first attach replaces
        it hitlessly, and it is freed once nothing is attached to it."""
        d = self.iommu.domains.get(domain_id)
        if d is None or not d.flags & fmt.DOMF_IOMMUFD or d.flags & fmt.DOMF_SAVED:
            return False
        if any(x is d for x in self.dying):
            return False
        if any(isinstance(o, Hwpt) and o.domain is d for c in self.contexts for o in c.objects.values()):
            return False
        holds = getattr(self.lu, "holds", None)
        return not (holds is not None and holds(domain_id))

    def open_context(self) -> Context:
        ctx = Context(self)
        self.contexts.append(ctx)
        return ctx

    def reap(self) -> float:
        """Free the domains whose grace period has passed; seconds until the next one can be."""
        with self.store.lock:
            left = []
            wait = 0.0
            for d in self.dying:
                if self.iommu.domains.get(d.domain_id) is not d:
                    continue
                w = self.iommu.try_destroy_domain(d)
                if w > 0:
                    left.append(d)
                    wait = w if not wait else min(wait, w)
            self.dying = left
            return wait

    def keeps(self, obj: Obj) -> bool:
        """A live-update session preserves ``obj``: a closing context leaves it as it is."""
        return self.lu is not None and self.lu.keeps(obj)

    def collect(self) -> None:
        """Release what closed contexts kept for a session that no longer preserves it."""
        with self.store.lock:
            for ctx in [c for c in self.contexts if c.closed]:
                ctx._release()

    def close(self) -> None:
        """Close every context (as the processes holding them exiting would), then free what died.

        After a committed reboot() nothing is released: the tables stay as the
        kexec leaves them, for the next daemon to restore."""
        if self.halted:
            return
        with self.store.lock:
            if self.lu is not None:
                self.lu.outgoing.clear()  # an unmount without reboot(): nothing is preserved
            for ctx in list(self.contexts):
                ctx.close()
                ctx._release()
            if self.store.pin_hook == self.pinned:
                self.store.pin_hook = self._prev_hook
        # the grace period is a stand-in for a flush: nothing walks after the daemon stops
        for d in self.dying:
            if self.iommu.domains.get(d.domain_id) is d:
                self.iommu.destroy_domain(d)
        self.dying = []

    def _pin(self, area: Area, delta: int) -> None:
        n = self.area_pins.get(area.ino, 0) + delta
        if n:
            self.area_pins[area.ino] = n
        else:
            self.area_pins.pop(area.ino, None)


class Context:
    """One open ``/dev/iommu``: its objects by id.

    Every public method is one ioctl; each validates everything before it
    changes anything, and raises ``StoreError`` with the kernel's errno.
    """

    def __init__(self, fd: Iommufd) -> None:
        self.fd = fd
        self.objects: dict[int, Obj] = {}
        self._ids = itertools.count(1)
        self.closed = False
        self.rlimit_mode = 0  #: IOMMU_OPTION_RLIMIT_MODE, kept only: pkfuse accounts no pinned memory

    @property
    def _lock(self):  # noqa: ANN202 - the store's RLock
        return self.fd.store.lock

    def _new_id(self) -> int:
        return next(self._ids)

    def _get(self, obj_id: int, *kinds: ObjType) -> Obj:
        obj = self.objects.get(obj_id)
        if obj is None or (kinds and obj.kind not in kinds):
            want = "/".join(k.value for k in kinds) or "object"
            raise _err(errno.ENOENT, f"no {want} with id {obj_id}")
        return obj

    def ioas(self, obj_id: int) -> Ioas:
        obj = self._get(obj_id, ObjType.IOAS)
        assert isinstance(obj, Ioas)
        return obj

    def hwpt(self, obj_id: int) -> Hwpt:
        obj = self._get(obj_id, ObjType.HWPT)
        assert isinstance(obj, Hwpt)
        return obj

    def device(self, obj_id: int) -> Device:
        obj = self._get(obj_id, ObjType.DEVICE)
        assert isinstance(obj, Device)
        return obj

    def statistics(self) -> dict[str, int]:
        kinds = [o.kind.value for o in self.objects.values()]
        return {k.value: kinds.count(k.value) for k in ObjType}

    # ------------------------------------------------------------- IOAS

    def ioas_alloc(self) -> int:
        with self._lock:
            ioas = Ioas(self._new_id())
            self.objects[ioas.id] = ioas
            return ioas.id

    def ioas_map_file(self, ioas_id: int, ino: int, start: int, length: int, iova: int | None, *,
                      writeable: bool) -> int:
        """Map ``length`` bytes of guest file ``ino`` from byte ``start``; returns the IOVA.

        ``iova`` None: the daemon picks the lowest free non-zero IOVA congruent to the
        file's physical address modulo the largest leaf the length allows
        (1 GiB, 2 MiB), so the domain uses superpages wherever the file's
        extents do. Errnos as the kernel's: EINVAL misaligned, zero length,
        outside the file or the IOVA space; EOVERFLOW arithmetic overflow;
        EEXIST a fixed IOVA range in use; ENOSPC no free range; EBUSY the
        IOAS is preserved. As in ioas.c, an ``iova`` or ``length`` of U64_MAX
        is EOVERFLOW before the IOAS is even looked up, and the last byte
        (``start + length - 1``, ``iova + length - 1``) is what must not wrap.
        """
        with self._lock:
            if length >= U64_MAX or (iova is not None and iova >= U64_MAX):
                raise _err(errno.EOVERFLOW, "iova and length must be below U64_MAX")  # ioas.c, before the lookup
            ioas = self.ioas(ioas_id)
            if ioas.frozen:
                raise _err(errno.EBUSY, f"IOAS {ioas_id} is preserved for live update: its maps are fixed")
            if length == 0:
                raise _err(errno.EINVAL, "length 0 maps nothing")
            if start + length - 1 > U64_MAX or (iova is not None and iova + length - 1 > U64_MAX):
                raise _err(errno.EOVERFLOW, "start + length or iova + length overflows 64 bits")
            if start % PS or length % PS or (iova is not None and iova % PS):
                raise _err(errno.EINVAL, "start, length and iova must be 4 KiB aligned")
            store = self.fd.store
            try:
                a = store.getattr(ino)
            except StoreError:  # a descriptor of a file that is no inode of the image (a .pkernfs view)
                raise _err(errno.EINVAL, f"inode {ino} is no file of the image: only guest-RAM files can be "
                                         "mapped") from None
            if a.kind != fmt.KIND_GUEST:
                raise _err(errno.EINVAL, "only guest-RAM files can be mapped")
            if start + length > a.npages * PS:
                raise _err(errno.EINVAL, f"the file has {a.npages * PS:#x} bytes of pages, not "
                                         f"{start:#x}..{start + length:#x}")
            if iova is None:
                iova = self._place(ioas, ino, start, length)
            else:
                if iova + length > IOVA_LIMIT:
                    raise _err(errno.EINVAL, f"iova {iova:#x}+{length:#x} is beyond the 48-bit IOVA space")
                if ioas.overlapping(iova, iova + length - 1):
                    raise _err(errno.EEXIST, f"iova {iova:#x}..{iova + length:#x} is already mapped")
            area = Area(iova, length, ino, start, writeable)
            done: list[Domain] = []
            try:
                for h in ioas.hwpts:
                    h.domain.map_file(ino, start, length, iova, write=writeable, huge=ioas.huge_pages)
                    done.append(h.domain)
            except BaseException:
                for d in done:  # all or nothing across the domains
                    d.unmap(iova, length)
                raise
            bisect.insort(ioas.areas, area, key=lambda x: x.iova)
            self.fd._pin(area, +1)
            return iova

    def _place(self, ioas: Ioas, ino: int, start: int, length: int) -> int:
        """The lowest free IOVA for an automatic map, aligned like the file's physical pages.

        Never IOVA 0, as the kernel's ``iopt_alloc_iova`` never returns it (its search
        starts at PAGE_SIZE): to drivers and VMMs a DMA address of 0 means none.
        """
        phys = next(e.phys_addr + start - e.file_offset for e in self.fd.store.extents(ino)
                    if e.file_offset <= start < e.file_offset + e.length)
        align = next(s for s in _LEAF_SIZES if s <= length or s == PS)
        want = phys % align
        cand = PS
        for ar in ioas.areas + [Area(IOVA_LIMIT, PS, 0, 0, False)]:
            cand += (want - cand) % align
            if cand + length <= ar.iova:
                return cand
            cand = max(cand, ar.iova + ar.length)
        raise _err(errno.ENOSPC, f"no free IOVA range of {length:#x} bytes")

    def ioas_unmap(self, ioas_id: int, iova: int, length: int) -> int:
        """Unmap every area inside ``[iova, iova + length)``; returns the bytes unmapped.

        The range must cover whole areas (ENOENT if it cuts one, as the
        kernel never splits a map); ``iova == 0, length == U64_MAX`` unmaps
        everything (and succeeds on an empty IOAS); nothing there ENOENT. Any
        other ``iova`` or ``length`` of U64_MAX is EOVERFLOW (ioas.c), so that
        ``(1, U64_MAX)`` is not a second way to say "everything".
        """
        with self._lock:
            ioas = self.ioas(ioas_id)
            if ioas.frozen:
                raise _err(errno.EBUSY, f"IOAS {ioas_id} is preserved for live update: its maps are fixed")
            if iova == 0 and length == U64_MAX:
                victims = list(ioas.areas)
            else:
                if iova >= U64_MAX or length >= U64_MAX:
                    raise _err(errno.EOVERFLOW, "iova and length must be below U64_MAX, "
                                                "unless 0 and U64_MAX: everything")
                if length == 0:
                    raise _err(errno.EINVAL, "length 0 unmaps nothing")
                if iova + length - 1 > U64_MAX:
                    raise _err(errno.EOVERFLOW, "iova + length overflows 64 bits")
                victims = ioas.overlapping(iova, iova + length - 1)
                if any(a.iova < iova or a.last > iova + length - 1 for a in victims):
                    raise _err(errno.ENOENT, "the range cuts a map: unmap whole maps")
                if not victims:
                    raise _err(errno.ENOENT, f"nothing is mapped in {iova:#x}..{iova + length:#x}")
            for a in victims:
                self._drop_area(ioas, a)
            return sum(a.length for a in victims)

    def _drop_area(self, ioas: Ioas, area: Area) -> None:
        for h in ioas.hwpts:
            h.domain.unmap(area.iova, area.length)
        ioas.areas.remove(area)
        self.fd._pin(area, -1)

    def option(self, option_id: int, op: int, object_id: int, val64: int) -> int:
        """IOMMU_OPTION: set or get one option; returns its value (``val64`` back on a set).

        ``OPTION_HUGE_PAGES`` is per IOAS (``object_id``): 1 (the default) lets
        maps use superpages, 0 maps everything with 4 KiB leaves. As
        ``iopt_disable_large_pages``: turning it off is EINVAL once the IOAS
        has both areas and HWPTs (what is mapped may be in superpages already);
        turning it on is always allowed (later maps may use superpages). A
        preserved IOAS is EBUSY (pkfuse: its HWPT's tables are fixed).
        ``OPTION_RLIMIT_MODE`` is global (``object_id`` 0, else EOPNOTSUPP):
        pkfuse accounts no pinned memory, so it only keeps the value. Other
        options or ops EOPNOTSUPP, a value other than 0 or 1 EINVAL, an
        ``object_id`` that is no IOAS ENOENT, as main.c and ioas.c answer.
        """
        with self._lock:
            if option_id == OPTION_RLIMIT_MODE:
                if object_id:
                    raise _err(errno.EOPNOTSUPP, "IOMMU_OPTION_RLIMIT_MODE is global: object_id must be 0")
                if op == OPTION_OP_GET:
                    return self.rlimit_mode
                if op != OPTION_OP_SET:
                    raise _err(errno.EOPNOTSUPP, f"unknown option op {op}")
                if val64 not in (0, 1):
                    raise _err(errno.EINVAL, f"IOMMU_OPTION_RLIMIT_MODE is 0 or 1, not {val64}")
                self.rlimit_mode = val64
                return val64
            if option_id != OPTION_HUGE_PAGES:
                raise _err(errno.EOPNOTSUPP, f"unknown option {option_id}")
            ioas = self.ioas(object_id)
            if op == OPTION_OP_GET:
                return int(ioas.huge_pages)
            if op != OPTION_OP_SET:
                raise _err(errno.EOPNOTSUPP, f"unknown option op {op}")
            if val64 not in (0, 1):
                raise _err(errno.EINVAL, f"IOMMU_OPTION_HUGE_PAGES is 0 or 1, not {val64}")
            if ioas.frozen and bool(val64) != ioas.huge_pages:
                raise _err(errno.EBUSY, f"IOAS {object_id} is preserved for live update: its maps are fixed")
            if not val64 and ioas.huge_pages and ioas.areas and ioas.hwpts:
                raise _err(errno.EINVAL, f"IOAS {object_id} has areas mapped into HWPTs already: huge pages "
                                         "can be turned off only before")
            ioas.huge_pages = bool(val64)
            return val64

    def ioas_iova_ranges(self, ioas_id: int) -> tuple[list[tuple[int, int]], int]:
        """The IOVA ranges a map may use, as (start, last), and the IOVA alignment in bytes."""
        with self._lock:
            self.ioas(ioas_id)
            return [(0, IOVA_LIMIT - 1)], PS

    # ------------------------------------------------------------- HWPT

    def hwpt_alloc(self, dev_id: int, pt_id: int, *, auto: bool = False) -> int:
        """A HWPT for device ``dev_id`` from IOAS ``pt_id``, mapping every area of it.

        Errnos as hw_pagetable.c's: ENOENT no such device; EINVAL ``pt_id`` is no
        object, or one that is neither an IOAS nor a HWPT; EOPNOTSUPP a HWPT (a
        nested HWPT needs driver data, and pkfuse's driver takes none). A failure
        part way (no table memory) destroys the new domain: nothing changes.
        """
        with self._lock:
            self.device(dev_id)
            obj = self.objects.get(pt_id)
            if obj is None or isinstance(obj, Device):
                raise _err(errno.EINVAL, f"{pt_id} is neither an IOAS nor a HWPT")
            if isinstance(obj, Hwpt):
                raise _err(errno.EOPNOTSUPP, f"{pt_id} is a HWPT: nesting is not supported")
            return self._new_hwpt(obj, auto=auto, dev=self.device(dev_id)).id

    def _new_hwpt(self, ioas: Ioas, *, auto: bool, dev: Device) -> Hwpt:
        """A new HWPT; after a live update, the restored domain of ``dev`` if the IOAS maps
        exactly what it maps (the pkernfs design's reclaim: adopt)."""
        io = self.fd.iommu
        restored = self.fd.lu.adopt(dev, ioas) if self.fd.lu is not None else None
        if restored is not None:
            h = Hwpt(self._new_id(), ioas, restored.domain, auto=auto)
            restored.adopted = h
            ioas.frozen = True  # until finish: a session given back must be what was preserved
            self.objects[h.id] = h
            ioas.hwpts.append(h)
            return h
        domain = io.create_domain(ephemeral=True) if self.fd.ephemeral else io.create_domain(flags=fmt.DOMF_IOMMUFD)
        try:
            for a in ioas.areas:
                domain.map_file(a.ino, a.offset, a.length, a.iova, write=a.writeable, huge=ioas.huge_pages)
        except BaseException:
            io.destroy_domain(domain)  # never attached: no grace period to wait out
            raise
        h = Hwpt(self._new_id(), ioas, domain, auto=auto)
        self.objects[h.id] = h
        ioas.hwpts.append(h)
        return h

    # ------------------------------------------------------------ devices

    def device_bind(self, rid: int) -> int:
        """Bind requester ``rid`` to this context (EBUSY if bound elsewhere or kernel-owned)."""
        with self._lock:
            if not 0 <= rid <= 0xFFFF:
                raise _err(errno.EINVAL, f"requester id {rid:#x} is not 16 bits")
            if rid in self.fd.bound:
                raise _err(errno.EBUSY, f"requester {rid_str(rid)} is bound to an iommufd already")
            if rid in self.fd.iommu.attached and not (self.fd.lu is not None and self.fd.lu.may_bind(rid)) \
                    and not self.fd.orphaned(self.fd.iommu.attached[rid]):
                raise _err(errno.EBUSY, f"requester {rid_str(rid)} is attached to domain "
                                        f"{self.fd.iommu.attached[rid]}, which no iommufd owns")
            dev = Device(self._new_id(), rid)
            self.objects[dev.id] = dev
            self.fd.bound[rid] = self
            return dev.id

    def device_attach(self, dev_id: int, pt_id: int) -> int:
        """Attach (or re-attach: replace) ``dev_id`` to a HWPT, or to an IOAS through an
        automatic HWPT (an existing one of that IOAS is shared); returns the HWPT id.
        ENOENT no such device or ``pt_id``; EINVAL ``pt_id`` is a device (device.c)."""
        with self._lock:
            dev = self.device(dev_id)
            obj = self._get(pt_id)
            if isinstance(obj, Device):
                raise _err(errno.EINVAL, f"{pt_id} is a device, neither an IOAS nor a HWPT")
            if isinstance(obj, Hwpt):
                hwpt = obj
            else:
                assert isinstance(obj, Ioas)
                hwpt = next((h for h in obj.hwpts if h.auto), None) or self._new_hwpt(obj, auto=True, dev=dev)
            old = dev.hwpt
            if old is hwpt:
                return hwpt.id
            left = self.fd.iommu.attached.get(dev.rid) if old is None else None
            orphan = self.fd.iommu.domains[left] if left is not None and self.fd.orphaned(left) else None
            try:
                # a device still attached to its restored domain switches hitlessly, too
                replace = old is not None or dev.rid in self.fd.iommu.attached
                self.fd.iommu.attach(hwpt.domain, *dev.bdf, replace=replace)
            except BaseException:
                self._drop_if_unused(hwpt)
                raise
            self.fd.enable_translation()
            hwpt.devices.add(dev.id)
            dev.hwpt = hwpt
            if old is not None:
                old.devices.discard(dev.id)
                self._drop_if_unused(old)
            if orphan is not None and not orphan.attached:  # replaced on its last requester: freed after grace
                self.fd.dying.append(orphan)
                self.fd.reap()
            return hwpt.id

    def device_detach(self, dev_id: int) -> None:
        """Block the device's DMA (its context entry cleared); a no-op if it is not attached."""
        with self._lock:
            dev = self.device(dev_id)
            self._detach(dev)

    def _detach(self, dev: Device) -> None:
        hwpt = dev.hwpt
        if hwpt is None:
            return
        self.fd.iommu.detach(hwpt.domain, *dev.bdf)
        hwpt.devices.discard(dev.id)
        dev.hwpt = None
        self._drop_if_unused(hwpt)

    def _drop_if_unused(self, hwpt: Hwpt) -> None:
        """An automatic HWPT goes with its last device, as the kernel's does."""
        if hwpt.auto and not hwpt.devices and self.objects.get(hwpt.id) is hwpt:
            self._free_hwpt(hwpt)

    def _free_hwpt(self, hwpt: Hwpt) -> None:
        del self.objects[hwpt.id]
        hwpt.ioas.hwpts.remove(hwpt)
        self.fd.dying.append(hwpt.domain)
        self.fd.reap()

    # ------------------------------------------------------------ destroy

    def destroy(self, obj_id: int) -> None:
        """Destroy any object not in use: EBUSY for an IOAS with HWPTs, a HWPT with devices or
        preserved by a live-update session, an attached device. A device is unbound (pkfuse has no VFIO device fd to close)."""
        with self._lock:
            obj = self._get(obj_id)
            if isinstance(obj, Ioas):
                if obj.hwpts:
                    raise _err(errno.EBUSY, f"IOAS {obj_id} has HWPTs {', '.join(str(h.id) for h in obj.hwpts)}")
                if obj.frozen:
                    raise _err(errno.EBUSY, f"IOAS {obj_id} is preserved for live update")
                for a in list(obj.areas):
                    self._drop_area(obj, a)
                del self.objects[obj_id]
            elif isinstance(obj, Hwpt):
                if obj.devices:
                    raise _err(errno.EBUSY, f"HWPT {obj_id} is attached to devices "
                                            f"{', '.join(str(d) for d in sorted(obj.devices))}")
                if self.fd.keeps(obj):  # the session holds it: freed, its domain would be gone at reboot()
                    raise _err(errno.EBUSY, f"HWPT {obj_id} is preserved by a live-update session")
                self._free_hwpt(obj)
            else:
                if obj.hwpt is not None:
                    raise _err(errno.EBUSY, f"device {obj_id} is attached to HWPT {obj.hwpt.id}")
                del self.objects[obj_id]
                del self.fd.bound[obj.rid]

    # -------------------------------------------------------------- close

    def close(self) -> None:
        """Release what this context holds, as closing the fd does: devices blocked and
        unbound, HWPTs' domains freed, areas (and their pins) dropped -- except what a
        live-update session preserves (``Iommufd.keeps``), which stays until the session
        is cancelled (``Iommufd.collect``) or the reboot() carries it over. After a
        committed reboot() nothing is released."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            if not self.fd.halted:
                self._release()

    def _release(self) -> None:
        with self._lock:
            if self.fd.halted:
                return
            keep = self.fd.keeps
            lu = self.fd.lu
            for h in [o for o in self.objects.values() if isinstance(o, Hwpt)]:
                if lu is not None and lu.give_back(h):
                    # adopted from a session not yet finished: the domain, and its devices'
                    # entries, go back to the session; only the objects go
                    for dev_id in list(h.devices):
                        dev = self.device(dev_id)
                        del self.objects[dev_id]
                        del self.fd.bound[dev.rid]
                    h.devices.clear()
                    h.ioas.hwpts.remove(h)
                    del self.objects[h.id]
            for dev in [o for o in self.objects.values() if isinstance(o, Device) and not keep(o)]:
                self._detach(dev)
                del self.objects[dev.id]
                del self.fd.bound[dev.rid]
            for h in [o for o in self.objects.values() if isinstance(o, Hwpt) and not keep(o)]:
                if not h.devices:
                    self._free_hwpt(h)
            for ioas in [o for o in self.objects.values() if isinstance(o, Ioas) and not keep(o)]:
                if not ioas.hwpts:
                    ioas.frozen = False
                    for a in list(ioas.areas):
                        self._drop_area(ioas, a)
                    del self.objects[ioas.id]
            if self in self.fd.contexts and not self.objects:
                self.fd.contexts.remove(self)

    def iter_objects(self) -> Iterator[Obj]:
        return iter(sorted(self.objects.values(), key=lambda o: o.id))
