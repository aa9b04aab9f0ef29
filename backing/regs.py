"""The simulated IOMMU's register block: a small file beside the image.

Hardware registers are not pkernfs memory, so they live outside the image
(default ``IMAGE + ".regs"``) and survive a restart of the daemon untouched:
RTADDR and GSTS.TES keep their values until an explicit command changes
them, exactly as a real IOMMU keeps translating through a kexec.

Layout: ``format.REGS_DTYPE`` (magic, RTADDR, GSTS, fault counter, a ring
of ``FAULT_LOG_ENTRIES`` fault records; then, from layout 2, the layout
word, the invalidation queue's tail and its ring of ``INV_QUEUE_ENTRIES``
descriptors). Each register is one aligned 8-byte word, written with one
store. Fault recording is serialized between processes with an exclusive
flock on the file (a walker in another process records faults too); the
records of a batch are written before the counter that publishes them, so
a reader never sees a half-written record counted.

The invalidation queue
----------------------
VT-d's queued invalidation, reduced to what a cache needs. The driver (the
daemon, ``backing.iommu``) changes tables, then posts descriptors --
``invalidate_context`` (context cache: global, domain- or
device-selective) and ``invalidate_iotlb`` (IOTLB: global, domain- or
page-selective). A post, under the same exclusive flock as the fault log:
the slot's ``seq`` word is zeroed, the descriptor's other three words are
written, ``seq`` is written, and only then ``iq_tail`` -- one aligned
8-byte store that publishes it. The hardware (``backing.iotlb``, in any
process) takes no lock: ``invalidations_since`` copies the slots past the
tail it saw and checks each slot's ``seq`` before and after the copy (a
seqlock per slot), so a slot rewritten under it -- the ring lapped it -- is
detected, never used torn.

Real hardware has a head register and the driver waits when the queue is
full. Here nothing knows the readers, so the ring simply keeps the last
``INV_QUEUE_ENTRIES`` descriptors; a reader that fell further behind is told
``overrun`` and must drop every cached translation (a global flush), which
is always safe. The driver never waits for completion (no wait descriptor):
the grace period ``backing.iommu.FREE_GRACE_S`` before a freed table page is
reused stands for it, so a device must poll at least that often -- in
practice before every request it translates.

Layout 1 (a block made before the queue, ``REGS_V1_BYTES`` long) is
extended by ``open``: under the flock the file grows to ``REGS_SIZE`` (the
new bytes read as zero: an empty queue) and then ``layout`` is set. Every
layout-1 offset is unchanged, so a process still holding the old-sized
mapping keeps working on its part.
"""

from __future__ import annotations

import dataclasses
import fcntl
import mmap
import os

import numpy as np

from . import format as fmt
from .errors import FormatError

REGS_SIZE = -(-fmt.REGS_DTYPE.itemsize // fmt.PAGE_SIZE) * fmt.PAGE_SIZE
_W_RTADDR, _W_GSTS, _W_FAULT_SEQ = 1, 2, 3  #: u64 word index of each register
_W_LAYOUT = fmt.REGS_DTYPE.fields["layout"][1] // 8
_W_IQ_TAIL = fmt.REGS_DTYPE.fields["iq_tail"][1] // 8
_IQ_WORDS = fmt.INV_DESC_DTYPE.itemsize // 8  #: u64 words per descriptor
assert [fmt.INV_DESC_DTYPE.fields[f][1] for f in ("seq", "type", "did", "addr")] == [0, 8, 16, 24]
EMPTY_INVALIDATIONS = np.zeros(0, fmt.INV_DESC_DTYPE)


def default_path(image_path: str | os.PathLike[str]) -> str:
    return os.fspath(image_path) + ".regs"


@dataclasses.dataclass(frozen=True)
class Fault:
    seq: int
    iova: int
    source_id: int
    reason: int
    write: bool

    @property
    def requester(self) -> str:
        return fmt.requester_name(self.source_id)

    def __str__(self) -> str:
        kind = "write" if self.write else "read"
        name = fmt.FR_NAMES.get(self.reason, "unknown")
        return (f"#{self.seq} {self.requester} {kind} iova {self.iova:#x}: "
                f"fault reason {self.reason:#04x} ({name})")


class Regs:
    """An open register block (read-write mmap shared with every user)."""

    def __init__(self, path: str, fd: int, mm: mmap.mmap) -> None:
        self.path = path
        self._fd = fd
        self._mm = mm
        self.block = np.frombuffer(mm, dtype=fmt.REGS_DTYPE, count=1)
        self._words = np.frombuffer(mm, dtype="<u8", count=_W_IQ_TAIL + 1)
        self._queue = self.block["inv_queue"][0]  #: the descriptor ring (structured view)
        self._queue64 = np.frombuffer(mm, dtype="<u8", count=fmt.INV_QUEUE_ENTRIES * _IQ_WORDS,
                                      offset=fmt.IQ_OFFSET)  #: the same ring as u64 words

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, create: bool = True) -> Regs:
        """Open the register block at ``path``; make a reset one (TE off) if missing.

        A layout-1 block (no invalidation queue) is extended to this layout
        in place (see the module docstring); a block of a later layout than
        this code knows, or too short to be any, is a FormatError."""
        path = os.fspath(path)
        flags = os.O_RDWR | (os.O_CREAT if create else 0)
        fd = os.open(path, flags, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                size = os.fstat(fd).st_size
                if size == 0:
                    os.ftruncate(fd, REGS_SIZE)
                    mm = mmap.mmap(fd, REGS_SIZE)
                    mm[:8] = fmt.REGS_MAGIC  # the rest reads as zero: reset state
                    _set_layout(mm)
                elif size < fmt.REGS_V1_BYTES:  # mmap would fail with a ValueError
                    raise FormatError("regs", 0, f"{path} is {size} bytes, not a register block")
                else:
                    with open(fd, "rb", buffering=0, closefd=False) as f:
                        head = f.read(8)
                    if head != fmt.REGS_MAGIC:
                        raise FormatError("regs.magic", 0, f"{path} is not a pkfuse register block")
                    if size < REGS_SIZE:  # layout 1: the queue's bytes appended, zero = empty
                        os.ftruncate(fd, REGS_SIZE)
                    mm = mmap.mmap(fd, REGS_SIZE)
                    layout = int(np.frombuffer(mm, "<u8", 1, _W_LAYOUT * 8)[0])
                    if layout == 0:
                        _set_layout(mm)
                    elif layout > fmt.REGS_LAYOUT:
                        mm.close()
                        raise FormatError("regs.layout", _W_LAYOUT * 8, f"{path} has register layout {layout}; "
                                          f"this pkfuse knows up to {fmt.REGS_LAYOUT}")
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, mm)

    def close(self) -> None:
        if self._mm.closed:
            return
        del self.block, self._words, self._queue, self._queue64
        try:
            self._mm.close()
        except BufferError:
            pass
        os.close(self._fd)

    def __enter__(self) -> Regs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ registers

    @property
    def rtaddr(self) -> int:
        return int(self._words[_W_RTADDR])

    @property
    def gsts(self) -> int:
        return int(self._words[_W_GSTS])

    @property
    def enabled(self) -> bool:
        return bool(self.gsts & fmt.GSTS_TES)

    @property
    def fault_seq(self) -> int:
        return int(self._words[_W_FAULT_SEQ])

    @property
    def layout(self) -> int:
        return int(self._words[_W_LAYOUT])

    @property
    def iq_tail(self) -> int:
        """Invalidation descriptors posted so far (IQT_REG)."""
        return int(self._words[_W_IQ_TAIL])

    def set_root_table(self, phys_addr: int) -> None:
        """SRTP: program RTADDR (4 KiB aligned)."""
        if phys_addr % fmt.PAGE_SIZE or phys_addr >> 52:
            raise ValueError(f"root table address {phys_addr:#x} is not a 4 KiB aligned 52-bit address")
        self._words[_W_RTADDR] = phys_addr

    def enable(self) -> None:
        """GCMD.TE: translation on; refused while RTADDR is unset."""
        if not self.rtaddr:
            raise ValueError("set the root table address before enabling translation")
        self._words[_W_GSTS] = self.gsts | fmt.GSTS_TES

    def disable(self) -> None:
        self._words[_W_GSTS] = self.gsts & ~fmt.GSTS_TES

    # ------------------------------------------------------------ fault log

    def record_faults(self, source_id: int, iovas: np.ndarray, reasons: np.ndarray,
                      write: bool | np.ndarray) -> None:
        """Append faults (vectorized); the ring keeps the last FAULT_LOG_ENTRIES."""
        iovas = np.asarray(iovas, np.uint64).ravel()
        m = iovas.size
        if m == 0:
            return
        reasons = np.broadcast_to(np.asarray(reasons, np.uint16), (m,))
        wr = np.broadcast_to(np.asarray(write, np.uint8), (m,))
        n = fmt.FAULT_LOG_ENTRIES
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            seq0 = self.fault_seq
            keep = slice(max(0, m - n), m)
            seqs = seq0 + 1 + np.arange(m, dtype=np.uint64)[keep]
            ring = self.block["faults"][0]
            slots = ((seqs - np.uint64(1)) % np.uint64(n)).astype(np.int64)
            ring["seq"][slots] = seqs
            ring["iova"][slots] = iovas[keep]
            ring["source_id"][slots] = source_id
            ring["reason"][slots] = reasons[keep]
            ring["write"][slots] = wr[keep]
            self._words[_W_FAULT_SEQ] = seq0 + m
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def faults(self) -> list[Fault]:
        """The recorded faults still in the ring, oldest first."""
        seq = self.fault_seq
        ring = self.block["faults"][0].copy()
        live = ring[(ring["seq"] != 0) & (ring["seq"] <= seq) & (ring["seq"] + fmt.FAULT_LOG_ENTRIES > seq)]
        live = live[np.argsort(live["seq"])]
        return [Fault(int(r["seq"]), int(r["iova"]), int(r["source_id"]), int(r["reason"]), bool(r["write"]))
                for r in live]

    def clear_faults(self) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            self.block["faults"][0] = np.zeros(fmt.FAULT_LOG_ENTRIES, fmt.FAULT_RECORD_DTYPE)
            self._words[_W_FAULT_SEQ] = 0
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    # --------------------------------------------------- invalidation queue

    def invalidate_context(self, granularity: int, *, did: int = 0, sid: int = 0) -> int:
        """Post a context-cache invalidate descriptor; returns its seq.

        ``INV_G_GLOBAL``; ``INV_G_DOMAIN`` (entries whose DID is ``did``);
        ``INV_G_DEVICE`` (requester ``sid``'s entry, whose DID was ``did``)."""
        if granularity not in (fmt.INV_G_GLOBAL, fmt.INV_G_DOMAIN, fmt.INV_G_DEVICE):
            raise ValueError(f"context-cache invalidation granularity {granularity} unknown")
        return self._post(fmt.INV_TYPE_CC, granularity, did, sid, 0, 0)

    def invalidate_iotlb(self, granularity: int, *, did: int = 0, addr: int = 0, am: int = 0) -> int:
        """Post an IOTLB invalidate descriptor; returns its seq.

        ``INV_G_GLOBAL``; ``INV_G_DOMAIN`` (entries tagged ``did``);
        ``INV_G_PAGE`` (entries tagged ``did`` overlapping IOVA ``[addr, addr +
        4096 << am)``, ``addr`` aligned to that size, ``am`` <= ``INV_MAX_AM``).
        An invalidation also drops the paging-structure caches' entries it covers."""
        if granularity == fmt.INV_G_PAGE:
            if not 0 <= am <= fmt.INV_MAX_AM or addr % (fmt.PAGE_SIZE << am) or addr >> fmt.VTD_IOVA_BITS:
                raise ValueError(f"page-selective invalidation of {addr:#x}, am {am}: not aligned or out of range")
        elif granularity not in (fmt.INV_G_GLOBAL, fmt.INV_G_DOMAIN):
            raise ValueError(f"IOTLB invalidation granularity {granularity} unknown")
        return self._post(fmt.INV_TYPE_IOTLB, granularity, did, 0, am, addr)

    def _post(self, kind: int, granularity: int, did: int, sid: int, am: int, addr: int) -> int:
        """Write one descriptor into its slot, then publish it with the tail (module docstring)."""
        w1 = kind | granularity << 32
        w2 = (did & 0xFFFF) | (sid & 0xFFFF) << 16 | am << 32
        q = self._queue64
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            seq = int(self._words[_W_IQ_TAIL]) + 1
            at = ((seq - 1) % fmt.INV_QUEUE_ENTRIES) * _IQ_WORDS
            q[at] = 0  # the slot is being rewritten: a reader copying it sees the change
            q[at + 1] = w1
            q[at + 2] = w2
            q[at + 3] = addr
            q[at] = seq
            self._words[_W_IQ_TAIL] = seq  # the publishing store
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        return seq

    def invalidations_since(self, seq: int) -> tuple[np.ndarray, int, bool]:
        """The descriptors posted after descriptor ``seq``: (descriptors, new_seq, overrun).

        ``descriptors`` is an ``INV_DESC_DTYPE`` array in posting order and
        ``new_seq`` the tail to pass next time. ``overrun`` is True when the
        reader fell more than ``INV_QUEUE_ENTRIES`` behind, so some of the
        descriptors it needed were overwritten (also when the tail is behind
        ``seq``: not the block the reader was reading). Real hardware would
        have made the driver wait; here the reader has missed descriptors and
        must flush everything it caches (a global context-cache and IOTLB
        invalidation) -- then the descriptors returned (none) do not matter.
        Takes no lock (see the module docstring)."""
        tail = int(self._words[_W_IQ_TAIL])
        if tail == seq:
            return EMPTY_INVALIDATIONS, seq, False
        if tail < seq or tail - seq > fmt.INV_QUEUE_ENTRIES:
            return EMPTY_INVALIDATIONS, tail, True
        seqs = np.arange(seq + 1, tail + 1, dtype=np.uint64)
        slots = ((seqs - np.uint64(1)) % np.uint64(fmt.INV_QUEUE_ENTRIES)).astype(np.int64)
        q = self._queue
        before = q["seq"][slots]
        rows = q[slots]  # a copy
        after = q["seq"][slots]
        if not ((before == seqs).all() and (after == seqs).all() and (rows["seq"] == seqs).all()):
            return EMPTY_INVALIDATIONS, tail, True  # lapped while copying
        return rows, tail, False


def _set_layout(mm: mmap.mmap) -> None:
    """Mark a block (new, or layout 1 just extended: its queue reads zero) as this layout."""
    np.frombuffer(mm, "<u8", 1, _W_LAYOUT * 8)[0] = fmt.REGS_LAYOUT
