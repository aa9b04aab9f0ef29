"""The verifier: reads guest RAM from outside and says whether every invariant of ``abi.py`` holds.

What is checked, one ``check_<structure>_<what>`` method each, every finding
naming the structure, its guest-physical address and the problem:

- ``config``: magic, version, vCPU count, RAM size (also against the RAM
  given), mode, dirty area inside RAM, ring entries, DMA length, reserved 0;
- per vCPU ``vcpu_state[i]``: no error; ``checksum`` is F(counter) or
  F(counter + 1) (a kill between the two stores of step 4);
- ``dirty_area[i]`` (mode RUN): with pass = pages // dirty_pages and
  cursor = pages % dirty_pages, every page below the cursor holds the
  current pass's pattern, the page at the cursor a prefix of it (the rest:
  the previous pass's), the pages above the previous pass's; in the first
  pass, what is not yet written is not checked. Vectorized over the area in
  chunks (no Python loop per page);
- ``ring[i]`` (once the guest initialized it: magic set; before its first
  start it may be anything): entries, vcpu, consumed <= produced,
  dma_completed <= consumed, produced - dma_completed <= entries, the
  state's dma_posted is produced or one behind (a kill between the two
  stores), dma_ok + dma_errors is dma_completed or one ahead;
- ``descriptor[i][k]``: each live descriptor (seq in [dma_completed,
  produced)) sits in slot seq % entries with its seq, buffer, op and length,
  and a status its place allows (below consumed DONE or FAULT, at consumed
  also POSTED, above it POSTED); every other slot is free, or the one just
  collected (seq = dma_completed - 1, not yet freed), or the next post
  written up to POSTED (seq = produced) but not yet counted;
- ``records`` (once the device initialized the region: magic set):
  capacity, record size, reserved 0; ``record[k]``: every record below the
  count (the last capacity of them) whole in its slot -- its seq, its
  payload, its check -- with time_ns non-decreasing in seq; the slot of the
  count the old record whole, the new one whole, or a mix of the two whose
  check is not its contents' (the check is stored last); every slot above
  zero while the count is below the capacity. The device may stamp while
  the verifier reads (it is not paused with the guest): the count is read
  before and after the slots, and every slot a record stamped in between
  may be in is held to the rule of the newest.

Read RAM of a paused, stopped or killed guest: a running one's stores race
the reads (a verdict over a running guest may flag a state the guest is
between). ``progressed(before, after)`` compares two verdicts of the same VM:
nothing went back (for a restart: the guest's counters continue from where
they stopped).
"""

from __future__ import annotations

import dataclasses
import mmap

import numpy as np

from . import abi

CHUNK_PAGES = 4096  #: pages compared per numpy step (16 MiB of RAM, 16 MiB of temporaries)
QWORDS = abi.PAGE_SIZE // 8


@dataclasses.dataclass(frozen=True)
class Finding:
    """An invariant that does not hold: which structure, where, what."""

    structure: str  #: e.g. "config", "vcpu_state[0]", "dirty_area[1]", "ring[0]", "descriptor[0][3]"
    gpa: int  #: guest-physical address of the field or qword at fault
    problem: str

    def __str__(self) -> str:
        return f"{self.structure} at {self.gpa:#x}: {self.problem}"


@dataclasses.dataclass(frozen=True)
class VcpuReport:
    """What one vCPU's state says (as read, whether or not it is consistent)."""

    index: int
    counter: int
    checksum: int
    pages: int
    pass_: int  #: pages // dirty_pages (0 without a dirty area)
    cursor: int  #: pages % dirty_pages
    boots: int
    started: int
    error: int
    error_value: int
    dma_posted: int
    dma_completed: int
    dma_ok: int
    dma_errors: int
    produced: int
    consumed: int


@dataclasses.dataclass
class Verdict:
    """The verifier's answer: ``ok`` when there is no finding."""

    config: np.void | None
    vcpus: list[VcpuReport]
    findings: list[Finding]

    @property
    def ok(self) -> bool:
        return not self.findings

    def summary(self) -> str:
        """One line, for a CLI status."""
        if self.findings:
            more = f" (+{len(self.findings) - 1} more)" if len(self.findings) > 1 else ""
            return f"guest state BAD, {len(self.findings)} finding(s): {self.findings[0]}{more}"
        mode = {abi.MODE_RUN: "run", abi.MODE_FILL: "fill"}.get(int(self.config["mode"]), "?") \
            if self.config is not None else "?"

        def each(field: str) -> str:
            return "/".join(str(getattr(v, field)) for v in self.vcpus)
        return (f"guest state ok: {len(self.vcpus)} vCPU(s), mode {mode}, steps {each('counter')}, "
                f"pages {each('pages')}, boots {each('boots')}, dma ok {each('dma_ok')} "
                f"errors {each('dma_errors')} posted {each('dma_posted')}")


def as_ram(ram: np.ndarray | mmap.mmap | bytes | memoryview) -> np.ndarray:
    """Guest RAM as a flat uint8 array (a GuestMemory's array, an mmap of the file, bytes)."""
    if isinstance(ram, np.ndarray):
        if ram.dtype != np.uint8 or ram.ndim != 1:
            raise ValueError("guest RAM must be a flat uint8 array")
        return ram
    return np.frombuffer(ram, np.uint8)


def _record(ram: np.ndarray, gpa: int, dtype: np.dtype, count: int | None = None) -> np.ndarray:
    """A copy of ``count`` records (one when None) of ``dtype`` at ``gpa``."""
    n = 1 if count is None else count
    a = np.frombuffer(ram[gpa:gpa + n * dtype.itemsize].tobytes(), dtype)
    return a[0] if count is None else a


def _offset(dtype: np.dtype, field: str) -> int:
    return dtype.fields[field][1]


class Verifier:
    """One pass over guest RAM; ``run()`` gives the verdict."""

    def __init__(self, ram: np.ndarray | mmap.mmap | bytes | memoryview, *, dirty: bool = True) -> None:
        self.ram = as_ram(ram)
        self.dirty = dirty
        self.findings: list[Finding] = []
        self.config: np.void | None = None
        self.vcpus: list[VcpuReport] = []

    def find(self, structure: str, gpa: int, problem: str) -> None:
        self.findings.append(Finding(structure, gpa, problem))

    def run(self) -> Verdict:
        if self.check_config():
            for i in range(int(self.config["nr_vcpus"])):
                self.check_vcpu(i)
            self.check_records()
        return Verdict(self.config, self.vcpus, self.findings)

    # ------------------------------------------------------------------ config
    def check_config(self) -> bool:
        """Is CONFIG usable? (False: nothing else can be checked.)"""
        ram = self.ram
        if len(ram) < abi.MIN_RAM:
            self.find("ram", 0, f"{len(ram)} bytes: guest RAM is at least {abi.MIN_RAM:#x}")
            return False
        c = _record(ram, abi.CONFIG_GPA, abi.CONFIG)
        self.config = c

        def at(field: str) -> int:
            return abi.CONFIG_GPA + _offset(abi.CONFIG, field)
        usable = True
        if int(c["magic"]) != abi.CONFIG_MAGIC:
            self.find("config", at("magic"), f"magic {int(c['magic']):#x}, expected {abi.CONFIG_MAGIC:#x}")
            return False
        if int(c["version"]) != abi.CONFIG_VERSION:
            self.find("config", at("version"), f"version {int(c['version'])}, expected {abi.CONFIG_VERSION}")
            return False
        nr = int(c["nr_vcpus"])
        if not 1 <= nr <= abi.MAX_VCPUS:
            self.find("config", at("nr_vcpus"), f"{nr} vCPUs, expected 1 to {abi.MAX_VCPUS}")
            return False
        size = int(c["ram_size"])
        if size != len(ram):
            self.find("config", at("ram_size"), f"ram_size {size:#x}, but guest RAM is {len(ram):#x} bytes")
            usable = False
        elif size % abi.RAM_ALIGN or size > abi.MAX_GIB << 30:
            self.find("config", at("ram_size"), f"ram_size {size:#x} is not a multiple of {abi.RAM_ALIGN:#x} "
                                                f"up to {abi.MAX_GIB} GiB")
        if int(c["mode"]) not in (abi.MODE_RUN, abi.MODE_FILL):
            self.find("config", at("mode"), f"mode {int(c['mode'])} is neither RUN nor FILL")
        dirty, pages = int(c["dirty_gpa"]), int(c["dirty_pages"])
        if dirty < abi.DIRTY_GPA or dirty % abi.PAGE_SIZE or dirty > len(ram):
            self.find("config", at("dirty_gpa"), f"dirty_gpa {dirty:#x} is not a page at or above "
                                                 f"{abi.DIRTY_GPA:#x} inside RAM")
            usable = False
        elif pages > (len(ram) - dirty) // abi.PAGE_SIZE // nr:
            self.find("config", at("dirty_pages"), f"{nr} areas of {pages} pages from {dirty:#x} overrun RAM")
            usable = False
        if int(c["ring_entries"]) != abi.RING_ENTRIES:
            self.find("config", at("ring_entries"), f"ring_entries {int(c['ring_entries'])}, "
                                                    f"expected {abi.RING_ENTRIES}")
        length = int(c["dma_length"])
        if length % 8 or not 8 <= length <= abi.BUFFER_SIZE:
            self.find("config", at("dma_length"), f"dma_length {length} is not a multiple of 8 "
                                                  f"from 8 to {abi.BUFFER_SIZE}")
        if np.any(c["reserved"]):
            self.find("config", at("reserved"), "reserved words are not zero")
        return usable

    # ------------------------------------------------------------------ per vCPU
    def check_vcpu(self, i: int) -> None:
        c = self.config
        gpa = abi.VCPU_STATE_GPA + i * abi.VCPU_STATE_STRIDE
        s = _record(self.ram, gpa, abi.VCPU_STATE)
        rg = abi.ring_gpa(i)
        h, d = self._ring_snapshot(rg)
        dp = int(c["dirty_pages"])
        pages = int(s["pages"])
        self.vcpus.append(VcpuReport(
            index=i, counter=int(s["counter"]), checksum=int(s["checksum"]), pages=pages,
            pass_=pages // dp if dp else 0, cursor=pages % dp if dp else 0, boots=int(s["boots"]),
            started=int(s["started"]), error=int(s["error"]), error_value=int(s["error_value"]),
            dma_posted=int(s["dma_posted"]), dma_completed=int(s["dma_completed"]), dma_ok=int(s["dma_ok"]),
            dma_errors=int(s["dma_errors"]), produced=int(h["produced"]), consumed=int(h["consumed"])))
        self.check_state_error(i, gpa, s)
        self.check_state_checksum(i, gpa, s)
        if int(c["mode"]) == abi.MODE_RUN and dp and self.dirty:
            self.check_dirty_area(i, pages)
        if int(h["magic"]) == abi.RING_MAGIC:
            self.check_ring_header(i, gpa, s, h)
            self.check_ring_descriptors(i, s, h, d)
        elif int(s["started"]):
            self.find(f"ring[{i}]", rg, f"magic {int(h['magic']):#x}: the guest started {int(s['started'])} "
                                        "time(s) and must have initialized its ring")

    def _ring_snapshot(self, rg: int) -> tuple[np.void, np.ndarray]:
        """The ring's header and descriptors as of one instant of a device that may still run.

        The guest is paused, but a device serving the ring may not be: it stores a descriptor's
        status, then consumed + 1. The header is read before and after the descriptors until
        both reads agree, so the descriptors are placed against the indices they were seen with.
        """
        for _ in range(1000):
            h = _record(self.ram, rg, abi.RING_HEADER)
            d = _record(self.ram, rg + abi.DESCRIPTORS_OFFSET, abi.DESCRIPTOR, abi.RING_ENTRIES)
            if _record(self.ram, rg, abi.RING_HEADER).tobytes() == h.tobytes():
                break
        return h, d

    def check_state_error(self, i: int, gpa: int, s: np.void) -> None:
        error = int(s["error"])
        if error != abi.ERROR_NONE:
            name = abi.ERROR_NAMES.get(error, f"unknown error {error}")
            self.find(f"vcpu_state[{i}]", gpa + _offset(abi.VCPU_STATE, "error"),
                      f"the guest stopped with {name} (error_value {int(s['error_value']):#x})")

    def check_state_checksum(self, i: int, gpa: int, s: np.void) -> None:
        n, got = int(s["counter"]), int(s["checksum"])
        if got not in (abi.checksum(n, i), abi.checksum(n + 1, i)):
            self.find(f"vcpu_state[{i}]", gpa + _offset(abi.VCPU_STATE, "checksum"),
                      f"checksum {got:#x} is neither F({n}) = {abi.checksum(n, i):#x} nor F({n + 1})")

    def check_dirty_area(self, i: int, pages: int) -> None:
        """Every page against the pattern its place under the cursor requires (vectorized in chunks)."""
        base, size = abi.dirty_area(self.config, i)
        dp = size // abi.PAGE_SIZE
        pass_, cursor = divmod(pages, dp)
        q = self.ram[base:base + size].view("<u8")
        current = int(abi.pattern(np.uint64(0), pass_))  # pattern(gpa, g) ^ gpa: the pass's key
        previous = int(abi.pattern(np.uint64(0), pass_ - 1)) if pass_ else None
        name = f"dirty_area[{i}]"
        self._compare(name, q, base, 0, cursor, current, f"below the cursor (page {cursor}), pass {pass_}")
        if previous is not None:
            self._compare(name, q, base, cursor + 1, dp, previous, f"above the cursor, pass {pass_ - 1}")
        # the page at the cursor: a prefix of the current pass, then the previous pass (or anything)
        lo = cursor * QWORDS
        x = q[lo:lo + QWORDS] ^ (np.uint64(base + lo * 8) + np.arange(QWORDS, dtype=np.uint64) * np.uint64(8))
        is_current = x == np.uint64(current)
        prefix = QWORDS if is_current.all() else int(np.argmin(is_current))
        if previous is not None:
            wrong = np.flatnonzero(x[prefix:] != np.uint64(previous))
            if len(wrong):
                at = base + (lo + prefix + int(wrong[0])) * 8
                self.find(name, at, f"the page at the cursor ({cursor}) holds pass {pass_} up to qword {prefix}, "
                                    f"then {len(wrong)} qword(s) of neither pass {pass_} nor {pass_ - 1} "
                                    f"(first {int(q[(at - base) // 8]):#x})")

    def _compare(self, name: str, q: np.ndarray, base: int, first: int, end: int, key: int, where: str) -> None:
        """Pages [first, end) of the area must be gpa ^ key, qword by qword."""
        bad, first_bad = 0, None
        offsets = np.arange(CHUNK_PAGES * QWORDS, dtype=np.uint64) * np.uint64(8)
        k = np.uint64(key)
        for a in range(first, end, CHUNK_PAGES):
            b = min(end, a + CHUNK_PAGES)
            n = (b - a) * QWORDS
            wrong = (q[a * QWORDS:b * QWORDS] ^ (offsets[:n] + np.uint64(base + a * abi.PAGE_SIZE))) != k
            count = int(np.count_nonzero(wrong))
            if count:
                if first_bad is None:
                    first_bad = a * QWORDS + int(np.argmax(wrong))
                bad += count
        if first_bad is not None:
            at = base + first_bad * 8
            want = (at ^ key) & abi.U64
            self.find(name, at, f"{bad} qword(s) {where} do not hold the pattern: the first is "
                                f"{int(q[first_bad]):#x}, expected {want:#x}")

    def check_ring_header(self, i: int, state_gpa: int, s: np.void, h: np.void) -> None:
        rg = abi.ring_gpa(i)
        name = f"ring[{i}]"

        def at(field: str) -> int:
            return rg + _offset(abi.RING_HEADER, field)

        def state_at(field: str) -> int:
            return state_gpa + _offset(abi.VCPU_STATE, field)
        produced, consumed = int(h["produced"]), int(h["consumed"])
        completed = int(s["dma_completed"])
        if int(h["entries"]) != abi.RING_ENTRIES:
            self.find(name, at("entries"), f"entries {int(h['entries'])}, expected {abi.RING_ENTRIES}")
        if int(h["vcpu"]) != i:
            self.find(name, at("vcpu"), f"vcpu {int(h['vcpu'])}, expected {i}")
        if consumed > produced:
            self.find(name, at("consumed"), f"consumed {consumed} is past produced {produced}")
        if completed > consumed:
            self.find(name, at("consumed"), f"consumed {consumed} is behind the guest's dma_completed {completed}")
        if produced < completed or produced - completed > abi.RING_ENTRIES:
            self.find(name, at("produced"), f"produced {produced} with {completed} completed: "
                                            f"more than {abi.RING_ENTRIES} in flight, or fewer than none")
        posted = int(s["dma_posted"])
        if posted not in (produced - 1, produced):
            self.find(f"vcpu_state[{i}]", state_at("dma_posted"),
                      f"dma_posted {posted} is neither produced ({produced}) nor one behind")
        counted = int(s["dma_ok"]) + int(s["dma_errors"])
        if counted not in (completed, completed + 1):
            self.find(f"vcpu_state[{i}]", state_at("dma_ok"),
                      f"dma_ok + dma_errors = {counted} is neither dma_completed ({completed}) nor one ahead")

    def check_ring_descriptors(self, i: int, s: np.void, h: np.void, d: np.ndarray) -> None:
        """Each slot's descriptor against what the indices say it may be (16 slots: a loop is fine)."""
        e = abi.RING_ENTRIES
        rg = abi.ring_gpa(i)
        produced, consumed, completed = int(h["produced"]), int(h["consumed"]), int(s["dma_completed"])
        if not completed <= consumed <= produced or produced - completed > e:
            return  # the header's findings say it; the slots cannot be placed
        live = {seq % e: seq for seq in range(completed, produced)}
        length = int(self.config["dma_length"])
        names = {abi.DESC_FREE: "FREE", abi.DESC_POSTED: "POSTED", abi.DESC_DONE: "DONE", abi.DESC_FAULT: "FAULT"}
        for k in range(e):
            gpa = rg + abi.DESCRIPTORS_OFFSET + k * abi.DESCRIPTOR.itemsize
            name = f"descriptor[{i}][{k}]"
            seq, status = int(d[k]["seq"]), int(d[k]["status"])
            status_name = names.get(status, str(status))
            status_gpa = gpa + _offset(abi.DESCRIPTOR, "status")
            if k in live:
                want = live[k]
                if seq != want:
                    self.find(name, gpa, f"seq {seq} in a live slot, expected {want}")
                    continue
                allowed = ({abi.DESC_DONE, abi.DESC_FAULT} if want < consumed else
                           {abi.DESC_POSTED, abi.DESC_DONE, abi.DESC_FAULT} if want == consumed else
                           {abi.DESC_POSTED})
                if status not in allowed:
                    self.find(name, status_gpa, f"status {status_name} for seq {want} with {consumed} consumed, "
                                                f"expected {'/'.join(names[a] for a in sorted(allowed))}")
                op = abi.DMA_WRITE if want % 2 == 0 else abi.DMA_READ
                if int(d[k]["op"]) != op or int(d[k]["length"]) != length \
                        or int(d[k]["buffer_gpa"]) != abi.buffer_gpa(i, k):
                    self.find(name, gpa, f"seq {want}: op {int(d[k]['op'])}, length {int(d[k]['length'])}, buffer "
                                         f"{int(d[k]['buffer_gpa']):#x}; expected op {op}, length {length}, "
                                         f"buffer {abi.buffer_gpa(i, k):#x}")
            elif status == abi.DESC_FREE:
                pass
            elif status in (abi.DESC_DONE, abi.DESC_FAULT) and seq == completed - 1:
                pass  # collected, not yet freed
            elif status == abi.DESC_POSTED and seq == produced and k == produced % e:
                pass  # posted, produced not yet stored
            else:
                self.find(name, status_gpa, f"status {status_name} (seq {seq}) in a slot with no live descriptor "
                                            f"(completed {completed}, produced {produced})")


    # ------------------------------------------------------------------ the records region
    def check_records(self) -> None:
        """The device's records (abi.py's docstring gives the store order); nothing before its magic."""
        g = abi.RECORDS_GPA
        h0 = _record(self.ram, g, abi.RECORDS_HEADER)
        if int(h0["magic"]) != abi.RECORDS_MAGIC:
            return
        words = self.ram[g + abi.RECORDS_OFFSET:g + abi.RECORDS_SIZE].view("<u8").reshape(-1, 8).copy()
        h1 = _record(self.ram, g, abi.RECORDS_HEADER)

        def at(field: str) -> int:
            return g + _offset(abi.RECORDS_HEADER, field)
        cap = abi.RECORDS_CAPACITY
        if int(h0["capacity"]) != cap or int(h0["record_size"]) != abi.RECORD_SIZE:
            self.find("records", at("capacity"), f"capacity {int(h0['capacity'])}, record size "
                                                 f"{int(h0['record_size'])}; expected {cap}, {abi.RECORD_SIZE}")
            return
        if int(h0["reserved0"]) or np.any(h0["reserved"]):
            self.find("records", at("reserved0"), "reserved words are not zero")
        c0, c1 = int(h0["count"]), int(h1["count"])
        if c1 < c0:
            self.find("records", at("count"), f"count went back from {c0} to {c1} while the slots were read")
            return
        seqs = np.arange(max(0, c1 + 1 - cap), c0, dtype=np.uint64)  # stamped before the first read, kept
        slots = (seqs % np.uint64(cap)).astype(np.int64)
        r = words[slots]
        whole = (r[:, 0] == seqs) & (r[:, 7] == abi.record_check(r)) \
            & (r[:, 3:7] == abi.record_payload(seqs)).all(axis=1)
        bad = np.flatnonzero(~whole)
        if bad.size:
            s = int(seqs[bad[0]])
            self.find(f"record[{s % cap}]", abi.record_gpa(s),
                      f"{bad.size} record(s) below the count ({c0}) are not whole and in place: the first is seq "
                      f"{s}, whose slot holds seq {int(r[bad[0], 0])}")
        elif seqs.size > 1:
            back = np.flatnonzero(np.diff(r[:, 1].astype(np.int64)) < 0)
            if back.size:
                s = int(seqs[back[0] + 1])
                self.find(f"record[{s % cap}]", abi.record_gpa(s),
                          f"record {s} was stamped at {int(r[back[0] + 1, 1])} ns, before record {s - 1} "
                          f"({int(r[back[0], 1])} ns)")
        for s in range(c0, c1 + 1):  # possibly being stamped while read: the rule of the newest
            problem = self._newest_problem(words[s % cap], s)
            if problem:
                self.find(f"record[{s % cap}]", abi.record_gpa(s), problem)
        if c1 + 1 < cap:
            rest = np.flatnonzero(words[c1 + 1:].any(axis=1))
            if rest.size:
                k = c1 + 1 + int(rest[0])
                self.find(f"record[{k}]", abi.record_gpa(k), f"{rest.size} slot(s) above the count ({c1}) "
                                                             f"are not zero: nothing was stamped there")

    @staticmethod
    def _newest_problem(w: np.ndarray, s: int) -> str:
        """'' if slot ``w`` (8 qwords) may hold what a stamp of record ``s`` leaves at some instant."""
        cap = abi.RECORDS_CAPACITY
        new = np.zeros(8, np.uint64)
        new[0], new[3:7] = s, abi.record_payload(s)
        old = np.zeros(8, np.uint64)
        if s >= cap:
            old[0], old[3:7] = s - cap, abi.record_payload(s - cap)
        check_ok = w[7] == abi.record_check(w)
        fixed = [0, 3, 4, 5, 6]  # seq and payload: known for both records
        if check_ok and (w[fixed] == new[fixed]).all():
            return ""  # record s whole (stamped, perhaps not yet counted)
        if s >= cap and check_ok and (w[fixed] == old[fixed]).all():
            return ""  # the old record whole
        if s < cap and not w.any():
            return ""  # never written
        if check_ok:
            return (f"the check matches the slot's contents (seq {int(w[0])}), which are neither record {s} nor "
                    f"{s - cap if s >= cap else 'zero'} whole: the check is stored last")
        mixed = (w[fixed] == new[fixed]) | (w[fixed] == old[fixed])
        if mixed.all():
            return ""  # torn: the check (stored last) not yet the new one's
        return (f"the slot of seq {s} holds qwords of neither record {s} nor {s - cap if s >= cap else 'zero'} "
                f"(seq {int(w[0])})")


def verify(ram: np.ndarray | mmap.mmap | bytes | memoryview, *, dirty: bool = True) -> Verdict:
    """Check every invariant of guest RAM ``ram``; the verdict lists what does not hold.

    ``dirty=False`` leaves the dirty areas out (and never reads them): the guest's state, its
    rings and the records in milliseconds, for a verdict taken inside a blackout; the areas are
    then checked by the guest itself as it rewrites each page (ERROR_LOST) and by a later
    verdict with ``dirty``."""
    return Verifier(ram, dirty=dirty).run()


def progressed(before: Verdict, after: Verdict, *, advanced: bool = False) -> list[Finding]:
    """What went back from ``before`` to ``after`` (the same VM, later): [] when nothing did.

    Counters, pages, boots, starts and DMA counts never decrease; with
    ``advanced`` every vCPU without an error also made at least one step.
    """
    findings: list[Finding] = []
    if before.config is not None and after.config is not None \
            and bytes(before.config["vm_uuid"]) != bytes(after.config["vm_uuid"]):
        findings.append(Finding("config", abi.CONFIG_GPA + _offset(abi.CONFIG, "vm_uuid"),
                                "a different VM (vm_uuid changed)"))
    after_by = {v.index: v for v in after.vcpus}
    for b in before.vcpus:
        a = after_by.get(b.index)
        gpa = abi.VCPU_STATE_GPA + b.index * abi.VCPU_STATE_STRIDE
        if a is None:
            findings.append(Finding(f"vcpu_state[{b.index}]", gpa, "the vCPU is gone"))
            continue
        for field in ("counter", "pages", "boots", "started", "dma_posted", "dma_completed", "dma_ok",
                      "dma_errors"):
            if getattr(a, field) < getattr(b, field):
                findings.append(Finding(f"vcpu_state[{b.index}]", gpa + _offset(abi.VCPU_STATE, field),
                                        f"{field} went back from {getattr(b, field)} to {getattr(a, field)}"))
        if advanced and a.error == abi.ERROR_NONE and a.counter <= b.counter:
            findings.append(Finding(f"vcpu_state[{b.index}]", gpa, f"counter did not advance ({b.counter})"))
    return findings
