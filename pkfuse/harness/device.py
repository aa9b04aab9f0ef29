"""The simulated DMA device: hardware, not software of the host (issue 13).

One process per requester id (``pkfuse device``). It never talks to the
daemon: like a PCI device behind VT-d it sees only physical memory and the
IOMMU's registers. It maps the image read-write with plain ``mmap`` (never
through ``Store``, never under the image's lock: the daemon may be dead or
restarting), the ephemeral memory file when there is one (physical addresses
above the image; re-mapped when its header says another boot), and the
register block. Every access is a DMA at an IOVA, translated for the
device's requester id by the IOMMU's walk of the root, context and
second-level tables in that memory -- cached, as VT-d hardware caches them,
in the context cache and IOTLB of ``backing.iotlb`` (``Translator``; polled
for the driver's invalidation descriptors before each request; ``iotlb=False``
walks every time) -- then a load or store through a numpy view of the
mapping at the physical address reached. A DMA spanning pages translates
each page; if any page faults, the DMA is not performed: it is logged with
the fault reason, and the fault is recorded in the register block's fault
ring (``Regs.record_faults``, by the cache or the walker).

Two kinds of work, paced by a token bucket at ``rate`` DMA operations per
second (each logged DMA, faulted or not, costs one; a round starts once
``ROUND_TOKENS`` have accrued):

- serving the guest's descriptor rings (``pkfuse.vmm.abi``): per ring and
  round, DMA read of the header, then for the descriptor at ``consumed`` if
  it is posted: DMA read of the descriptor, then DMA_WRITE: write of
  ``dma_pattern`` into the buffer, DMA_READ: read of the buffer; then, in
  abi.py's order, writes of ``result``, ``status`` (DONE, or FAULT when the
  buffer's DMA faulted), ``consumed + 1``. A descriptor whose completion
  cannot be written is left as it is. The pattern's seed is CONFIG's, read
  by DMA at most every ``CONFIG_REFRESH`` seconds;
- with ``records``, the free-running writer: one record per round into the
  records region (abi.py: the 56 bytes, then ``check``, then ``count``),
  whether or not the VMM and the guest are alive: DMA goes on while the host
  is between kernels.

A round costs 1 op per ring, 5 more per descriptor served, 3 per record:
with one busy ring, descriptors and records each go at about ``rate / 9``
per second; with idle rings, records at ``rate / (3 + rings)``.

Every DMA goes to the log (``DmaLog``): one ``LOG_ENTRY`` per page-piece,
appended in batches, flushed at least every ``FLUSH_SECONDS`` (a SIGKILL
loses at most that much; an entry says whether the IOTLB hit); ``read_log`` reads it back, ``summarize`` counts
(``python -m pkfuse.harness.device LOG`` prints that as JSON).
SIGTERM and SIGINT stop the device cleanly (log flushed).
"""

from __future__ import annotations

import dataclasses
import logging
import mmap
import os
import signal
import time
from collections import Counter
from typing import Any

import numpy as np

from backing import format as fmt
from backing import walker
from backing.ephemeral import EPHEMERAL_HEADER_DTYPE, EPHEMERAL_MAGIC
from backing.errors import PkfuseError
from backing.iotlb import TranslationCache
from backing.regs import Regs
from pkfuse.vmm import abi

log = logging.getLogger(__name__)

PS = fmt.PAGE_SIZE
U64 = np.uint64
FLUSH_SECONDS = 0.1  #: the log reaches its file at least this often
ROUND_TOKENS = 8  #: DMA operations a round waits for (a round: every ring once, then a record)
EPHEMERAL_RECHECK = 0.5  #: seconds between looks at the ephemeral memory's header
CONFIG_REFRESH = 0.5  #: seconds a DMA read of the guest's CONFIG (its pattern seed) is used for

# ---------------------------------------------------------------- the DMA log

LOG_MAGIC = b"PKDMALOG"
LOG_VERSION = 1
LOG_HEADER = np.dtype([
    ("magic", "S8"),  # LOG_MAGIC
    ("version", "<u4"),  # LOG_VERSION
    ("entry_size", "<u4"),  # LOG_ENTRY.itemsize
    ("rid", "<u4"),  # the device's requester id
    ("pid", "<u4"),
    ("start_ns", "<u8"),  # CLOCK_MONOTONIC at the device's start
    ("reserved", "<u8", (4,)),
])
assert LOG_HEADER.itemsize == 64

OP_READ, OP_WRITE = 1, 2  #: memory -> device, device -> memory
IOTLB_NONE, IOTLB_HIT, IOTLB_MISS = 0, 1, 2  #: no cache in the path / served by it / walked
#: what a DMA was for
KIND_RING_HEADER, KIND_CONFIG, KIND_DESCRIPTOR, KIND_BUFFER, KIND_RESULT, KIND_STATUS, KIND_CONSUMED, \
    KIND_RECORDS_HEADER, KIND_RECORD, KIND_RECORD_CHECK, KIND_RECORDS_COUNT, KIND_RECORDS_ZERO = range(1, 13)
KIND_NAMES = {KIND_RING_HEADER: "ring header", KIND_CONFIG: "config", KIND_DESCRIPTOR: "descriptor",
              KIND_BUFFER: "buffer", KIND_RESULT: "result", KIND_STATUS: "status", KIND_CONSUMED: "consumed",
              KIND_RECORDS_HEADER: "records header", KIND_RECORD: "record", KIND_RECORD_CHECK: "record check",
              KIND_RECORDS_COUNT: "records count", KIND_RECORDS_ZERO: "records zeroing"}
NO_RING = 0xFF

LOG_ENTRY = np.dtype([
    ("time_ns", "<u8"),  # CLOCK_MONOTONIC when the DMA was made
    ("iova", "<u8"),  # first byte of this page-piece
    ("phys", "<u8"),  # the physical address it translated to; 0 when it faulted
    ("checksum", "<u8"),  # sum of the data's qwords (the last zero-padded) mod 2**64; a read not made: 0
    ("length", "<u4"),  # bytes of this piece (within one page)
    ("fault", "<u2"),  # FR_* reason of this piece's translation, 0 = none
    ("rid", "<u2"),  # requester id
    ("op", "u1"),  # OP_READ or OP_WRITE
    ("done", "u1"),  # 1: performed; 0: not (this piece or another of the DMA faulted)
    ("iotlb", "u1"),  # IOTLB_*
    ("kind", "u1"),  # KIND_*
    ("ring", "u1"),  # the ring's vCPU, NO_RING for the records
    ("reserved", "u1", (3,)),
])
assert LOG_ENTRY.itemsize == 48


def checksum(data: np.ndarray) -> int:
    """Sum of ``data``'s (uint8) little-endian qwords, the last zero-padded, mod 2**64."""
    n = data.size
    if n % 8:
        data = np.concatenate([data, np.zeros(8 - n % 8, np.uint8)])
    return int(data.view("<u8").sum(dtype=U64))


class DmaLog:
    """The DMA log being written: a header, then ``LOG_ENTRY`` records appended in batches."""

    def __init__(self, path: str | None, rid: int, batch: int = 4096) -> None:
        self.path = path
        self.entries = np.zeros(batch, LOG_ENTRY)
        self.pending = 0
        self.written = 0
        self.last_flush = time.monotonic()
        self.fd = -1
        if path is not None:
            self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC, 0o644)
            h = np.zeros(1, LOG_HEADER)
            h["magic"], h["version"], h["entry_size"] = LOG_MAGIC, LOG_VERSION, LOG_ENTRY.itemsize
            h["rid"], h["pid"], h["start_ns"] = rid, os.getpid(), time.monotonic_ns()
            os.write(self.fd, h.tobytes())

    def append(self, rows: np.ndarray) -> None:
        """Entries for the log (a LOG_ENTRY array); written when the batch fills or at the next flush."""
        while rows.size:
            room = self.entries.size - self.pending
            k = min(room, rows.size)
            self.entries[self.pending:self.pending + k] = rows[:k]
            self.pending += k
            rows = rows[k:]
            if self.pending == self.entries.size:
                self.flush()

    def append_one(self, row: tuple) -> None:
        """One entry, as a tuple in LOG_ENTRY's field order."""
        self.entries[self.pending] = row
        self.pending += 1
        if self.pending == self.entries.size:
            self.flush()

    def flush(self) -> None:
        if self.pending and self.fd >= 0:
            os.write(self.fd, self.entries[:self.pending].tobytes())
        self.written += self.pending
        self.pending = 0
        self.last_flush = time.monotonic()

    def flush_if_due(self) -> None:
        if time.monotonic() - self.last_flush >= FLUSH_SECONDS:
            self.flush()

    def close(self) -> None:
        self.flush()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def read_log(path: str | os.PathLike[str]) -> np.ndarray:
    """The entries of a DMA log (a LOG_ENTRY array); a piece torn by a kill at the end is left out."""
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < LOG_HEADER.itemsize or data[:8] != LOG_MAGIC:
        raise PkfuseError(f"{os.fspath(path)} is not a pkfuse DMA log")
    h = np.frombuffer(data[:LOG_HEADER.itemsize], LOG_HEADER)[0]
    if int(h["version"]) != LOG_VERSION or int(h["entry_size"]) != LOG_ENTRY.itemsize:
        raise PkfuseError(f"{os.fspath(path)}: DMA log version {int(h['version'])}, entries of "
                          f"{int(h['entry_size'])} bytes; this pkfuse reads version {LOG_VERSION}")
    body = data[LOG_HEADER.itemsize:]
    n = len(body) // LOG_ENTRY.itemsize
    return np.frombuffer(body[:n * LOG_ENTRY.itemsize], LOG_ENTRY).copy()


def summarize(entries: np.ndarray) -> dict[str, Any]:
    """DMAs (page-pieces), bytes moved, faults by reason, pieces by kind."""
    done = entries["done"] == 1
    reads, writes = done & (entries["op"] == OP_READ), done & (entries["op"] == OP_WRITE)
    faulted = entries["fault"] != 0
    reasons = Counter(int(r) for r in entries["fault"][faulted])
    return {
        "entries": int(entries.size), "performed": int(done.sum()), "not_performed": int((~done).sum()),
        "bytes_read": int(entries["length"][reads].sum()), "bytes_written": int(entries["length"][writes].sum()),
        "faults": int(faulted.sum()),
        "faults_by_reason": {f"{r:#04x} {fmt.FR_NAMES.get(r, 'unknown')}": c for r, c in sorted(reasons.items())},
        "by_kind": {KIND_NAMES.get(k, str(k)): int(c) for k, c in
                    zip(*np.unique(entries["kind"], return_counts=True))},
        "iotlb_hits": int((entries["iotlb"] == IOTLB_HIT).sum()),
        "iotlb_misses": int((entries["iotlb"] == IOTLB_MISS).sum()),
    }


# ---------------------------------------------------------------- physical memory


class PhysicalMemory:
    """The image (read-write ``mmap``) and, when present, the ephemeral memory: what DMA reaches.

    ``locate(phys, n)`` gives the uint8 view of ``n`` bytes at a physical
    address inside one page; the walker reads ``image_u64`` and
    ``ephemeral_region()``. The ephemeral file is opened when it appears and
    mapped again when its header's boot_id, base or size changes (a restart
    of the daemon poisons it and may move it).
    """

    def __init__(self, image: str, ephemeral: str | None) -> None:
        self.image_path = image
        fd = os.open(image, os.O_RDWR | os.O_CLOEXEC)
        try:
            size = os.fstat(fd).st_size
            self._mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self.u8 = np.frombuffer(self._mm, np.uint8)
        sb = self.u8[:fmt.SUPERBLOCK_DTYPE.itemsize].view(fmt.SUPERBLOCK_DTYPE)[0]
        if bytes(sb["magic"]) != fmt.MAGIC:
            raise PkfuseError(f"{image} is not a pkfuse image")
        self.base_phys = int(sb["base_phys"])
        self.npages = min(int(sb["npages"]), size // PS)
        self.image_u64 = self.u8[:self.npages * PS].view("<u8")
        self.ephemeral_path = ephemeral
        self._eph_mm: mmap.mmap | None = None
        self._eph_u8: np.ndarray | None = None
        self._eph_hdr: tuple[int, int, int] | None = None  #: (base_phys, npages, boot_id) as mapped
        self._eph_checked = 0.0
        self.ephemeral_maps = 0  #: how many times the ephemeral memory was (re)mapped
        self.recheck_ephemeral(force=True)

    def _read_eph_header(self) -> tuple[int, int, int] | None:
        try:
            with open(self.ephemeral_path, "rb") as f:  # type: ignore[arg-type]
                raw = f.read(EPHEMERAL_HEADER_DTYPE.itemsize)
        except OSError:
            return None
        if len(raw) < EPHEMERAL_HEADER_DTYPE.itemsize or raw[:8] != EPHEMERAL_MAGIC:
            return None
        h = np.frombuffer(raw, EPHEMERAL_HEADER_DTYPE)[0]
        return int(h["base_phys"]), int(h["npages"]), int(h["boot_id"])

    def recheck_ephemeral(self, force: bool = False) -> bool:
        """Map the ephemeral memory again if its header changed (at most every EPHEMERAL_RECHECK s);
        True when the mapping changed."""
        if self.ephemeral_path is None:
            return False
        now = time.monotonic()
        if not force and now - self._eph_checked < EPHEMERAL_RECHECK:
            return False
        self._eph_checked = now
        hdr = self._read_eph_header()
        if hdr == self._eph_hdr:
            return False
        self._eph_u8 = None
        if self._eph_mm is not None:
            try:
                self._eph_mm.close()
            except BufferError:
                pass  # a view still alive: the mapping goes with it
            self._eph_mm = None
        self._eph_hdr = None
        if hdr is None:
            return True
        try:
            fd = os.open(self.ephemeral_path, os.O_RDWR | os.O_CLOEXEC)  # type: ignore[arg-type]
            try:
                want = (1 + hdr[1]) * PS
                if os.fstat(fd).st_size < want:
                    return True
                self._eph_mm = mmap.mmap(fd, want)
            finally:
                os.close(fd)
        except OSError as exc:
            log.warning("ephemeral memory %s: %s", self.ephemeral_path, exc)
            return True
        self._eph_u8 = np.frombuffer(self._eph_mm, np.uint8)[PS:]
        self._eph_hdr = hdr
        self.ephemeral_maps += 1
        return True

    def ephemeral_region(self) -> walker.Region | None:
        if self._eph_u8 is None or self._eph_hdr is None:
            return None
        return self._eph_u8.view("<u8"), self._eph_hdr[0], self._eph_hdr[1]

    def locate(self, phys: int, n: int) -> np.ndarray | None:
        """The uint8 view of ``n`` bytes at ``phys`` (inside one page), None outside memory."""
        off = phys - self.base_phys
        if 0 <= off and off + n <= self.npages * PS:
            return self.u8[off:off + n]
        if self._eph_u8 is not None and self._eph_hdr is not None:
            off = phys - self._eph_hdr[0]
            if 0 <= off and off + n <= self._eph_hdr[1] * PS:
                return self._eph_u8[off:off + n]
        return None

    def close(self) -> None:
        self.u8 = self.image_u64 = self._eph_u8 = None  # type: ignore[assignment]
        for mm in (self._mm, self._eph_mm):
            if mm is not None:
                try:
                    mm.close()
                except BufferError:
                    pass


# ---------------------------------------------------------------- translation


class Translator:
    """IOVA -> physical address for one requester: the seam between the device and the IOMMU.

    With ``iotlb`` (the default) every translation goes through a
    ``backing.iotlb.TranslationCache`` -- the context cache and IOTLB this
    device's remapping unit holds, as VT-d hardware does: it is polled for
    the driver's invalidation descriptors before each request, a hit is
    served from it, a miss walks the tables and fills it; entries go only by
    invalidation, so a translation the driver changed without invalidating
    stays served, as on a real machine. Without ``iotlb`` every request is
    ``backing.walker.translate``'s walk of the tables in memory (``hit`` is
    IOTLB_NONE). Either way a fault is recorded in the register block's
    fault ring (unless the context entry sets FPD).
    """

    def __init__(self, memory: PhysicalMemory, regs: Regs, rid: int, iotlb: bool = True) -> None:
        self.memory = memory
        self.regs = regs
        self.rid = rid
        self.walks = 0
        self.cache: TranslationCache | None = None
        if iotlb:
            self.cache = TranslationCache(memory.image_u64, memory.base_phys, memory.npages, regs,
                                          memory.ephemeral_region())

    def remapped(self) -> None:
        """The ephemeral memory was mapped again: the cache reads it through the new mapping."""
        if self.cache is not None:
            self.cache.set_ephemeral(self.memory.ephemeral_region())

    def translate(self, iovas: np.ndarray, write: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(phys uint64, fault uint16, iotlb uint8) per IOVA; faults are recorded in the registers."""
        m = self.memory
        if self.cache is not None:
            self.cache.poll()
            phys, fault, hit = self.cache.translate(self.rid, iovas, write)
            return phys, fault, np.where(hit, IOTLB_HIT, IOTLB_MISS).astype(np.uint8)
        self.walks += 1
        phys, fault = walker.translate(m.image_u64, m.base_phys, m.npages, self.regs, self.rid, iovas, write,
                                       ephemeral=m.ephemeral_region())
        return phys, fault, np.full(phys.size, IOTLB_NONE, np.uint8)

    def statistics(self) -> dict[str, int]:
        if self.cache is not None:
            return dict(self.cache.statistics())
        return {"walks": self.walks}


# ---------------------------------------------------------------- the device


def parse_rid(text: str) -> int:
    """A requester id from 'bb:dd.f' (hex, as lspci prints it)."""
    try:
        bus, rest = text.split(":")
        dev, fn = rest.split(".")
        b, d, f = int(bus, 16), int(dev, 16), int(fn, 16)
    except ValueError:
        raise ValueError(f"not a requester id 'bb:dd.f': {text!r}") from None
    if not (0 <= b <= 0xFF and 0 <= d <= 0x1F and 0 <= f <= 7):
        raise ValueError(f"not a requester id 'bb:dd.f': {text!r}")
    return fmt.requester_id(b, d, f)


@dataclasses.dataclass
class DeviceStats:
    dmas: int = 0  #: DMAs attempted (each may be several log entries)
    performed: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    faults: Counter[int] = dataclasses.field(default_factory=Counter)  #: FR_* -> faulted DMAs
    descriptors: Counter[int] = dataclasses.field(default_factory=Counter)  #: ring -> completed DONE
    descriptor_faults: Counter[int] = dataclasses.field(default_factory=Counter)  #: ring -> completed FAULT
    records: int = 0  #: records stamped (and counted) by this process
    record_seq: int | None = None  #: the next record's seq


class Device:
    """A DMA device on requester id ``rid``; ``run()`` works until stopped or ``seconds`` are over."""

    def __init__(self, image: str, rid: int, *, regs: str | None = None, ephemeral: str | None = None,
                 rate: float = 2000.0, rings: int = 1, records: bool = False, log_path: str | None = None,
                 iotlb: bool = True) -> None:
        if rate <= 0:
            raise ValueError(f"rate {rate}: DMA operations per second must be positive")
        if not 0 <= rings <= abi.MAX_VCPUS:
            raise ValueError(f"{rings} rings: from 0 to {abi.MAX_VCPUS}")
        regs_path = regs or image + ".regs"
        self.memory = PhysicalMemory(image, ephemeral if ephemeral is not None else image + ".ephemeral")
        try:
            self.regs = Regs.open(regs_path, create=False)
        except FileNotFoundError:
            self.memory.close()
            raise PkfuseError(f"no register block at {regs_path} (the IOMMU's registers; --regs)") from None
        except BaseException:
            self.memory.close()
            raise
        self.rid = rid
        self.rate = float(rate)
        self.rings = rings
        self.records = records
        self.translator = Translator(self.memory, self.regs, rid, iotlb)
        self.log = DmaLog(log_path, rid)
        self.stats = DeviceStats()
        self.stopping = False
        self.started = time.monotonic()
        self.elapsed = 0.0
        self.per_round = 1  #: descriptors served per ring per round: the records keep their share
        self._seed_value: int | None = None
        self._seed_at = 0.0
        self._seed_read = False

    # ------------------------------------------------------------ DMA

    def _pieces(self, iova: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(first IOVA, length) of each page-piece of [iova, iova + n)."""
        if iova % PS + n <= PS:  # the common case: one page
            return np.array([iova], U64), np.array([n], np.int64)
        first = iova & ~(PS - 1)
        starts = np.arange(first, iova + n, PS, dtype=np.int64)
        starts[0] = iova
        ends = np.minimum(starts - starts % PS + PS, iova + n)
        return starts.astype(U64), (ends - starts).astype(np.int64)

    def _log(self, iovas: np.ndarray, lengths: np.ndarray, phys: np.ndarray, fault: np.ndarray,
             hit: np.ndarray, op: int, done: bool, sums: list[int], kind: int, ring: int) -> None:
        if iovas.size == 1:
            self.log.append_one((time.monotonic_ns(), int(iovas[0]), int(phys[0]), sums[0], int(lengths[0]),
                                 int(fault[0]), self.rid, op, int(done), int(hit[0]), kind, ring, (0, 0, 0)))
            return
        rows = np.zeros(iovas.size, LOG_ENTRY)
        rows["time_ns"] = time.monotonic_ns()
        rows["iova"], rows["phys"], rows["length"], rows["fault"] = iovas, phys, lengths, fault
        rows["checksum"] = np.array(sums, dtype=U64)
        rows["rid"], rows["op"], rows["done"], rows["iotlb"] = self.rid, op, int(done), hit
        rows["kind"], rows["ring"] = kind, ring
        self.log.append(rows)

    def _account(self, fault: np.ndarray, done: bool, op: int, n: int) -> None:
        self.stats.dmas += 1
        if done:
            self.stats.performed += 1
            if op == OP_READ:
                self.stats.bytes_read += n
            else:
                self.stats.bytes_written += n
        else:
            self.stats.faults[int(fault[fault != 0][0])] += 1

    def dma_read(self, iova: int, n: int, kind: int, ring: int = NO_RING) -> np.ndarray | None:
        """``n`` bytes at ``iova`` (a copy), or None when a page of it faulted (nothing read)."""
        iovas, lengths = self._pieces(iova, n)
        phys, fault, hit = self.translator.translate(iovas, False)
        views = None
        if not fault.any():
            views = [self.memory.locate(int(p), int(k)) for p, k in zip(phys, lengths)]
            if any(v is None for v in views):  # cannot happen: the walker checks leaves are in memory
                views = None
        if views is None:
            self._log(iovas, lengths, phys, fault, hit, OP_READ, False, [0] * iovas.size, kind, ring)
            self._account(fault if fault.any() else np.array([fmt.FR_NEXT_PT_INVALID]), False, OP_READ, n)
            return None
        data = np.concatenate([v.copy() for v in views]) if len(views) > 1 else views[0].copy()
        sums = [checksum(data[o:o + int(k)]) for o, k in zip(np.cumsum(lengths) - lengths, lengths)]
        self._log(iovas, lengths, phys, fault, hit, OP_READ, True, sums, kind, ring)
        self._account(fault, True, OP_READ, n)
        return data

    def dma_write(self, iova: int, data: np.ndarray, kind: int, ring: int = NO_RING) -> bool:
        """Write ``data`` (uint8) at ``iova``; False when a page of it faulted (nothing written)."""
        data = np.ascontiguousarray(data).view(np.uint8).ravel()
        n = data.size
        iovas, lengths = self._pieces(iova, n)
        phys, fault, hit = self.translator.translate(iovas, True)
        offsets = np.cumsum(lengths) - lengths
        sums = [checksum(data[o:o + int(k)]) for o, k in zip(offsets, lengths)]
        views = None
        if not fault.any():
            views = [self.memory.locate(int(p), int(k)) for p, k in zip(phys, lengths)]
            if any(v is None for v in views):
                views = None
        if views is None:
            self._log(iovas, lengths, phys, fault, hit, OP_WRITE, False, sums, kind, ring)
            self._account(fault if fault.any() else np.array([fmt.FR_NEXT_PT_INVALID]), False, OP_WRITE, n)
            return False
        for v, o, k in zip(views, offsets, lengths):
            v[:] = data[o:o + int(k)]
        self._log(iovas, lengths, phys, fault, hit, OP_WRITE, True, sums, kind, ring)
        self._account(fault, True, OP_WRITE, n)
        return True

    # ------------------------------------------------------------ the rings

    def serve_ring(self, vcpu: int, budget: int) -> int:
        """Complete posted descriptors of vCPU ``vcpu``'s ring; the DMA operations used."""
        rg = abi.ring_gpa(vcpu)
        used = 1
        raw = self.dma_read(rg, abi.RING_HEADER.itemsize, KIND_RING_HEADER, vcpu)
        if raw is None:
            return used
        h = raw.view(abi.RING_HEADER)[0]
        if int(h["magic"]) != abi.RING_MAGIC or int(h["entries"]) != abi.RING_ENTRIES:
            return used
        consumed, produced = int(h["consumed"]), int(h["produced"])
        served = 0
        while consumed < produced and served < self.per_round and budget - used >= 6:
            seed = self._seed(vcpu)
            used += 1 if seed is None or self._seed_read else 0
            if seed is None:
                return used
            da = rg + abi.DESCRIPTORS_OFFSET + (consumed % abi.RING_ENTRIES) * abi.DESCRIPTOR.itemsize
            used += 1
            raw = self.dma_read(da, abi.DESCRIPTOR.itemsize, KIND_DESCRIPTOR, vcpu)
            if raw is None:
                return used
            d = raw.view(abi.DESCRIPTOR)[0]
            if int(d["status"]) != abi.DESC_POSTED or int(d["seq"]) != consumed:
                return used  # not posted yet (or not a descriptor of ours): next round
            gpa, length, op = int(d["buffer_gpa"]), int(d["length"]), int(d["op"])
            used += 1
            status, result = abi.DESC_FAULT, 0
            if length % 8 == 0 and 0 < length <= abi.BUFFER_SIZE and op in (abi.DMA_WRITE, abi.DMA_READ):
                if op == abi.DMA_WRITE:
                    q = abi.dma_pattern(np.arange(gpa, gpa + length, 8, dtype=U64), consumed, seed)
                    if self.dma_write(gpa, q.view(np.uint8), KIND_BUFFER, vcpu):
                        status, result = abi.DESC_DONE, int(q.sum(dtype=U64))
                else:
                    buf = self.dma_read(gpa, length, KIND_BUFFER, vcpu)
                    if buf is not None:
                        status, result = abi.DESC_DONE, int(buf.view("<u8").sum(dtype=U64))
            # abi.py's order: result, status, then consumed + 1
            used += 3
            off = abi.DESCRIPTOR.fields
            if not self.dma_write(da + off["result"][1], np.array([result], "<u8").view(np.uint8), KIND_RESULT, vcpu):
                return used
            if not self.dma_write(da + off["status"][1], np.array([status], "<u4").view(np.uint8), KIND_STATUS,
                                  vcpu):
                return used
            if not self.dma_write(rg + abi.RING_HEADER.fields["consumed"][1],
                                  np.array([consumed + 1], "<u8").view(np.uint8), KIND_CONSUMED, vcpu):
                return used
            (self.stats.descriptors if status == abi.DESC_DONE else self.stats.descriptor_faults)[vcpu] += 1
            consumed += 1
            served += 1
        return used

    def _seed(self, vcpu: int) -> int | None:
        """The guest's DMA pattern seed: CONFIG read by DMA at most every CONFIG_REFRESH seconds
        (as a driver would program it into the device); None when CONFIG cannot be read or is not one."""
        now = time.monotonic()
        self._seed_read = False
        if self._seed_value is None or now - self._seed_at >= CONFIG_REFRESH:
            self._seed_read = True
            self._seed_value = None
            cfg = self.dma_read(abi.CONFIG_GPA, abi.CONFIG.itemsize, KIND_CONFIG, vcpu)
            if cfg is None:
                return None
            c = cfg.view(abi.CONFIG)[0]
            if int(c["magic"]) != abi.CONFIG_MAGIC:
                return None
            self._seed_value, self._seed_at = int(c["seed"]), now
        return self._seed_value

    # ------------------------------------------------------------ the free-running writer

    def _records_start(self) -> tuple[int, int | None]:
        """(ops used, the next seq): read the header; initialize the region if it has no magic."""
        g = abi.RECORDS_GPA
        raw = self.dma_read(g, abi.RECORDS_HEADER.itemsize, KIND_RECORDS_HEADER)
        if raw is None:
            return 1, None
        h = raw.view(abi.RECORDS_HEADER)[0]
        if int(h["magic"]) == abi.RECORDS_MAGIC and int(h["capacity"]) == abi.RECORDS_CAPACITY \
                and int(h["record_size"]) == abi.RECORD_SIZE:
            return 1, int(h["count"])
        # a region nobody stamped: every slot zero, the header's fields, then the magic
        if not self.dma_write(g + abi.RECORDS_OFFSET, np.zeros(abi.RECORDS_SIZE - abi.RECORDS_OFFSET, np.uint8),
                              KIND_RECORDS_ZERO):
            return 2, None
        new = np.zeros(1, abi.RECORDS_HEADER)
        new["capacity"], new["record_size"], new["writer_rid"] = abi.RECORDS_CAPACITY, abi.RECORD_SIZE, self.rid
        b = new.view(np.uint8)
        if not self.dma_write(g + 8, b[8:], KIND_RECORDS_HEADER):
            return 3, None
        if not self.dma_write(g, np.array([abi.RECORDS_MAGIC], "<u8").view(np.uint8), KIND_RECORDS_HEADER):
            return 4, None
        return 4, 0

    def stamp_record(self) -> int:
        """Stamp the next record (56 bytes, check, count); the DMA operations used."""
        used = 0
        if self.stats.record_seq is None:
            used, self.stats.record_seq = self._records_start()
            if self.stats.record_seq is None:
                return used
        seq = self.stats.record_seq
        r = np.zeros(1, abi.RECORD)
        r["seq"], r["time_ns"], r["rid"], r["pid"] = seq, time.monotonic_ns(), self.rid, os.getpid()
        r["payload"][0] = abi.record_payload(seq)
        w = r.view("<u8")
        w[7] = abi.record_check(w)
        at = abi.record_gpa(seq)
        used += 3
        b = r.view(np.uint8)
        if not self.dma_write(at, b[:abi.RECORD_CHECK_OFFSET], KIND_RECORD) \
                or not self.dma_write(at + abi.RECORD_CHECK_OFFSET, b[abi.RECORD_CHECK_OFFSET:], KIND_RECORD_CHECK) \
                or not self.dma_write(abi.RECORDS_GPA + abi.RECORDS_HEADER.fields["count"][1],
                                      np.array([seq + 1], "<u8").view(np.uint8), KIND_RECORDS_COUNT):
            self.stats.record_seq = None  # read the header again once DMA works
            return used
        self.stats.records += 1
        self.stats.record_seq = seq + 1
        return used

    # ------------------------------------------------------------ running

    def round(self, budget: int) -> int:
        """Every ring once (serving what it can within ``budget``), then one record; the ops used."""
        used = 0
        for v in range(self.rings):
            used += self.serve_ring(v, budget - used)
        if self.records:
            used += self.stamp_record()
        return max(used, 1)

    def run(self, seconds: float | None = None) -> None:
        """Work at ``rate`` DMA operations per second until ``stop()`` or ``seconds`` are over."""
        t0 = last = time.monotonic()
        tokens = float(ROUND_TOKENS)
        burst = max(ROUND_TOKENS * 4, self.rate * 0.05)
        try:
            while not self.stopping:
                now = time.monotonic()
                if seconds is not None and now - t0 >= seconds:
                    break
                tokens = min(burst, tokens + (now - last) * self.rate)
                last = now
                if tokens < ROUND_TOKENS:
                    self.log.flush_if_due()
                    time.sleep(min(0.01, (ROUND_TOKENS - tokens) / self.rate))
                    continue
                if self.memory.recheck_ephemeral():
                    self.translator.remapped()
                tokens -= self.round(int(tokens))
                self.log.flush_if_due()
        finally:
            self.elapsed += time.monotonic() - t0
            self.log.flush()

    def stop(self) -> None:
        self.stopping = True

    def install_signal_handlers(self) -> None:
        """SIGTERM and SIGINT end ``run()`` after the DMA in progress (the log is flushed)."""
        def handler(signum: int, frame: object) -> None:
            self.stop()
        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    def summary(self) -> dict[str, Any]:
        s = self.stats
        t = max(self.elapsed, 1e-9)
        return {
            "rid": fmt.requester_name(self.rid), "pid": os.getpid(), "seconds": round(self.elapsed, 3),
            "rate_asked": self.rate, "dmas": s.dmas, "performed": s.performed,
            "dma_per_second": round(s.dmas / t, 1), "bytes_read": s.bytes_read, "bytes_written": s.bytes_written,
            "faults": sum(s.faults.values()),
            "faults_by_reason": {f"{r:#04x} {fmt.FR_NAMES.get(r, 'unknown')}": c for r, c in sorted(s.faults.items())},
            "descriptors_done": {str(k): v for k, v in sorted(s.descriptors.items())},
            "descriptors_faulted": {str(k): v for k, v in sorted(s.descriptor_faults.items())},
            "descriptors_per_second": round(sum(s.descriptors.values()) / t, 1),
            "records": s.records, "next_record_seq": s.record_seq, "records_per_second": round(s.records / t, 1),
            "log": self.log.path, "log_entries": self.log.written + self.log.pending,
            "translator": self.translator.statistics(), "ephemeral_maps": self.memory.ephemeral_maps,
        }

    def close(self) -> None:
        self.log.close()
        self.regs.close()
        self.memory.close()

    def __enter__(self) -> Device:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["Device", "DmaLog", "LOG_ENTRY", "LOG_HEADER", "PhysicalMemory", "Translator", "parse_rid",
           "read_log", "summarize"]


def main(argv: list[str] | None = None) -> int:
    """``python -m pkfuse.harness.device LOG...``: each DMA log's summary as JSON."""
    import json
    import sys

    paths = sys.argv[1:] if argv is None else argv
    if not paths:
        print("usage: python -m pkfuse.harness.device LOG...", file=sys.stderr)
        return 2
    try:
        out = {p: summarize(read_log(p)) for p in paths}
    except (PkfuseError, OSError) as exc:
        print(f"pkfuse: error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
