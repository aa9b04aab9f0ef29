"""The guest's ABI: where things are in guest-physical memory and what the guest keeps there.

This module is the one specification of the contract between the VMM (which
writes the boot structures and the config block before the first instruction),
the guest program (``guest/guest.c``, built by ``scripts/setup.sh``; its
``guest/abi.h`` mirrors this file and a test compiles it to compare), the
verifier (which reads guest RAM from outside) and the DMA device of the
restart harness (which serves the rings). Guest-physical address = offset in
the guest-RAM file = IOVA (the VMM maps guest RAM into its IOAS 1:1, as a
VFIO VMM does). All integers little-endian.

Layout (guest-physical)::

    0x000000  null page (mapped, never used)
    0x001000  CONFIG          written by the VMM before the first start; read-only to the guest
    0x002000  VCPU_STATE[i]   at VCPU_STATE_GPA + i * VCPU_STATE_STRIDE, written by vCPU i only
    0x008000  GDT             null, kernel code/data, user data (0x23), user code64 (0x2b), TSS (0x30)
    0x009000  TSS             64-bit TSS (no ring-0 code runs: its stacks are never used)
    0x010000  page tables     PML4, PDPT, then one PD per GiB: identity map, 2 MiB leaves, U/S set
    0x080000  stacks          vCPU i's stack grows down from STACK_TOP - i * STACK_SIZE
    0x100000  guest text      the flat binary; entry point = GUEST_TEXT_GPA
    0x200000  DMA rings       vCPU i's ring at RING_GPA + i * RING_STRIDE (header + descriptors,
                              then RING_ENTRIES buffers of BUFFER_SIZE)
    0x400000  records         the device's free-running writer: RECORDS_HEADER, then RECORDS_CAPACITY
                              RECORDs (nobody else writes here: not the guest, not the VMM)
    0x600000  dirty area      vCPU i owns dirty_pages pages from dirty_gpa + i * dirty_pages * 4096

How a vCPU starts (both engines): 64-bit long mode at CPL 3, flat segments,
IOPL 3 and a TSS I/O bitmap allowing every port (so ``out`` needs no ring-0
code: under PVM the guest's IOPL reads 0, and only the bitmap lets it through), RIP = GUEST_TEXT_GPA, RSP = its
stack top, RDI = vCPU index, RSI = CONFIG_GPA. No IDT (limit 0): any
exception is a triple fault, i.e. the VM shuts down: a guest bug is an exit,
never a hang. Under the hypervisor here ring-0 code is emulated an
instruction at a time and ring 3 runs natively (../shared/KVM-NOTES.md); the
guest never enters ring 0.

The step (mode RUN), one iteration of vCPU i's loop, in store order:

1. check that its state in RAM equals what its registers hold (``counter``,
   ``checksum``, ``pages``): a vCPU restored from registers older or newer
   than its RAM stops with ERROR_ROLLBACK (the check is made again before
   each store of steps 2 and 4: a vCPU restored in the middle of a step
   would otherwise store its own values first, and RAM would agree with
   them by step 1 of the next);
2. when dirty_pages > 0: from the second pass on, check that page ``pages %
   dirty_pages`` of its area still holds what the last pass wrote there (each
   qword the previous pass's pattern, or this pass's: a kill in the middle of
   the page's write leaves a prefix of it), else stop with ERROR_LOST naming
   the first qword that does not; write the page, every qword =
   ``pattern(gpa, pages // dirty_pages)``; then store ``pages + 1``. So a page
   lost under a running guest (a restart that did not keep it) is found by
   the guest when it comes back to it, and by the verifier before that;
3. every ``dma_every`` steps: collect completed descriptors of its ring
   (checking each, ``dma_ok``/``dma_errors``), then post one if a slot is free;
4. store ``checksum = F(counter + 1)``, then ``counter + 1``.

A SIGKILL of every process at any instant therefore leaves RAM in one of
few states, which the verifier accepts and nothing else: ``checksum`` is
F(counter) or F(counter + 1); every page of the area below the cursor holds
the current pass's pattern, the page at the cursor a prefix of it, the pages
above the previous pass's (or, in the first pass, anything). A cold boot over
such RAM continues from it (completing a torn step 4) and counts ``boots``.

The DMA ring of vCPU i (polled by the device, never a doorbell: an exit per
doorbell costs ~80 µs here): the guest fills a descriptor, sets its status
POSTED, then stores ``produced + 1``; the device handles descriptors in order
(DMA_WRITE: writes ``dma_pattern`` of the descriptor into the buffer;
DMA_READ: reads the buffer, which the guest filled with it), stores
``result`` (the sum of the buffer's qwords mod 2**64) and the status, then
``consumed + 1``. The guest checks ``result`` and, for a DMA_WRITE, the
buffer itself.

The guest's side of the ring, in store order (what a kill may cut, and a
cold boot completes). A post, when ``produced - dma_completed < entries``:
the slot's status FREE, its fields (seq = produced, op DMA_WRITE for an even
seq, DMA_READ for an odd one, the buffer of slot seq % entries), the buffer
for a DMA_READ, status POSTED, ``produced + 1``, ``dma_posted + 1``. A
collection, for each seq from ``dma_completed`` below ``consumed``:
``dma_ok`` or ``dma_errors + 1``, ``dma_completed + 1``, the slot's status
FREE. At the first start the guest writes the ring header (magic last, the
vCPU's DMA counters zeroed with it).

The records region (the device's free-running writer, ``pkfuse device
--records``): the device stamps sequence-numbered RECORDs into guest RAM at
its own pace whether or not the VMM and the guest run -- DMA goes on while
the host is between kernels. Record ``seq`` goes to slot ``seq %
RECORDS_CAPACITY`` at ``record_gpa(seq)``, in store order: its first seven
qwords (seq, time_ns, rid and pid, payload; among themselves in any order),
then ``check``, then the header's ``count = seq + 1``. At its first stamp
into a region whose header has no RECORDS_MAGIC, the device zeroes every
slot, writes the header's other fields, then the magic; a device finding the
magic continues from ``count``. So, with count = c: every record seq in
[max(0, c - capacity), c) is whole in its slot (``check ==
record_check``, payload ``record_payload(seq)``) with time_ns
non-decreasing in seq; the slot of seq c holds record c - capacity whole
(zeros when c < capacity), record c whole (stamped, not yet counted), or a
mix of the two whose ``check`` is not its contents' (``check`` is stored
last); every slot above c is zero while c < capacity. There is one writer
per region (the device given ``--records``).

A start at the entry point over a state: ``started + 1`` every time,
``boots + 1`` unless the state is fresh (never started, no step, no page).
ERROR_ROLLBACK, ERROR_TORN and ERROR_LOST are sticky: a start over them stops again
with the same error (only a fresh state clears them); a start with a valid
config clears an old ERROR_CONFIG. ERROR_CONFIG's error_value is the
offset of the bad field in CONFIG.
"""

from __future__ import annotations

import numpy as np

PAGE_SIZE = 4096
MiB = 1 << 20

# ------------------------------------------------------------------ layout
CONFIG_GPA = 0x1000
VCPU_STATE_GPA = 0x2000
VCPU_STATE_STRIDE = 256  #: bytes per vCPU (VCPU_STATE is smaller; the rest is reserved, zero)
GDT_GPA = 0x8000
TSS_GPA = 0x9000
PML4_GPA = 0x10000
PDPT_GPA = 0x11000
PD_GPA = 0x12000  #: PD of GiB g at PD_GPA + g * PAGE_SIZE
MAX_GIB = 64  #: PDs fit below STACK_BOTTOM: guest RAM up to 64 GiB
STACK_BOTTOM = 0x80000
STACK_TOP = 0x100000
STACK_SIZE = 0x4000  #: 16 KiB per vCPU
GUEST_TEXT_GPA = 0x100000
GUEST_TEXT_MAX = 0x100000  #: the binary must fit below RING_GPA
RING_GPA = 0x200000
RING_STRIDE = 0x20000  #: 128 KiB per vCPU: header page, then the buffers
RING_ENTRIES = 16
BUFFER_SIZE = PAGE_SIZE
RING_BUFFERS_OFFSET = PAGE_SIZE  #: buffer k of a ring at ring + RING_BUFFERS_OFFSET + k * BUFFER_SIZE
RECORDS_GPA = 0x400000
RECORDS_SIZE = 2 * MiB
RECORDS_OFFSET = PAGE_SIZE  #: record slot k at RECORDS_GPA + RECORDS_OFFSET + k * RECORD_SIZE
RECORD_SIZE = 64
RECORDS_CAPACITY = (RECORDS_SIZE - RECORDS_OFFSET) // RECORD_SIZE  #: 32704 slots
DIRTY_GPA = 0x600000
MAX_VCPUS = 16
MIN_RAM = 8 * MiB
RAM_ALIGN = 2 * MiB  #: guest RAM is mapped with 2 MiB leaves

assert VCPU_STATE_GPA + MAX_VCPUS * VCPU_STATE_STRIDE <= GDT_GPA
assert PD_GPA + MAX_GIB * PAGE_SIZE <= STACK_BOTTOM
assert STACK_TOP - MAX_VCPUS * STACK_SIZE >= STACK_BOTTOM
assert RING_GPA + MAX_VCPUS * RING_STRIDE <= RECORDS_GPA
assert RECORDS_GPA + RECORDS_SIZE <= DIRTY_GPA < MIN_RAM
assert RING_BUFFERS_OFFSET + RING_ENTRIES * BUFFER_SIZE <= RING_STRIDE

# ------------------------------------------------------------------ segments (GDT selectors)
SEL_KERNEL_CODE = 0x08
SEL_KERNEL_DATA = 0x10
SEL_USER_DATA = 0x20 | 3
SEL_USER_CODE = 0x28 | 3
SEL_TSS = 0x30
GDT_ENTRIES = 8  #: the TSS descriptor takes two

# ------------------------------------------------------------------ ports (OUT at CPL 3: IOPL 3, the TSS's I/O bitmap)
PORT_STARTED = 0x510  #: value = vCPU index; once per start (cold boot or not)
PORT_DONE = 0x511  #: value = vCPU index; mode FILL finished its area
PORT_ERROR = 0x512  #: value = an ERROR_* code; the vCPU's state has the detail; it stops there

ERROR_NONE = 0
ERROR_CONFIG = 1  #: CONFIG's magic, version or geometry is wrong
ERROR_ROLLBACK = 2  #: RAM and registers disagree (error_value = the field's offset in VCPU_STATE)
ERROR_TORN = 3  #: a cold boot found a checksum that is neither F(counter) nor F(counter + 1)
ERROR_LOST = 4  #: a page of its area lost what the last pass wrote (error_value = the qword's gpa)
ERROR_NAMES = {ERROR_NONE: "none", ERROR_CONFIG: "bad config", ERROR_ROLLBACK: "rollback",
               ERROR_TORN: "torn state", ERROR_LOST: "lost page"}

MODE_RUN = 1  #: the step loop, forever
MODE_FILL = 2  #: fill its dirty area with fill_value (rep stosq), OUT PORT_DONE, then spin on it

CONFIG_MAGIC = int.from_bytes(b"PKGUEST1", "little")
CONFIG_VERSION = 2  #: 2: the records region at 0x400000, the dirty area from 0x600000

CONFIG = np.dtype([
    ("magic", "<u8"),  # CONFIG_MAGIC
    ("version", "<u4"),  # CONFIG_VERSION
    ("nr_vcpus", "<u4"),  # 1..MAX_VCPUS
    ("ram_size", "<u8"),  # bytes, a multiple of RAM_ALIGN, >= MIN_RAM
    ("vm_uuid", "V16"),  # the VM's identity (a vCPU state file names it)
    ("mode", "<u4"),  # MODE_*
    ("dma_every", "<u4"),  # steps between DMA posts; 0: no DMA
    ("dirty_gpa", "<u8"),  # DIRTY_GPA
    ("dirty_pages", "<u8"),  # 4 KiB pages per vCPU; 0: no dirtying
    ("fill_value", "<u8"),  # mode FILL: the qword stored
    ("ring_entries", "<u4"),  # RING_ENTRIES
    ("dma_length", "<u4"),  # bytes per request, a multiple of 8, <= BUFFER_SIZE
    ("seed", "<u8"),  # mixed into the DMA pattern
    ("reserved", "<u8", (5,)),  # zero
])
assert CONFIG.itemsize == 128

VCPU_STATE = np.dtype([
    ("counter", "<u8"),  # steps completed
    ("checksum", "<u8"),  # F(counter) (or F(counter + 1) during step 4)
    ("pages", "<u8"),  # pages written in total: pass = pages // dirty_pages, cursor = pages % dirty_pages
    ("boots", "<u8"),  # cold boots over this state (a resume is not a boot)
    ("dma_posted", "<u8"),
    ("dma_completed", "<u8"),  # checked by the guest
    ("dma_ok", "<u8"),
    ("dma_errors", "<u8"),
    ("error", "<u4"),  # ERROR_*
    ("started", "<u4"),  # PORT_STARTED count
    ("error_value", "<u8"),
    ("reserved", "<u8", (6,)),
])
assert VCPU_STATE.itemsize == 128 <= VCPU_STATE_STRIDE

RING_MAGIC = int.from_bytes(b"PKRING01", "little")
RING_HEADER = np.dtype([
    ("magic", "<u8"),  # RING_MAGIC, written by the guest at its first start
    ("entries", "<u4"),  # RING_ENTRIES
    ("vcpu", "<u4"),
    ("produced", "<u8"),  # written by the guest: descriptors posted
    ("consumed", "<u8"),  # written by the device: descriptors done
    ("reserved", "<u8", (4,)),
])
assert RING_HEADER.itemsize == 64

DMA_WRITE = 1  #: the device writes the buffer (device -> memory)
DMA_READ = 2  #: the device reads the buffer (memory -> device)
DESC_FREE, DESC_POSTED, DESC_DONE, DESC_FAULT = 0, 1, 2, 3

DESCRIPTOR = np.dtype([
    ("seq", "<u8"),  # 0, 1, 2, ... per ring; descriptor seq % entries
    ("buffer_gpa", "<u8"),  # an IOVA (= guest-physical address)
    ("op", "<u4"),  # DMA_WRITE or DMA_READ
    ("length", "<u4"),  # bytes
    ("status", "<u4"),  # DESC_*
    ("reserved0", "<u4"),
    ("result", "<u8"),  # the device: sum of the buffer's qwords mod 2**64
    ("reserved", "<u8", (3,)),
])
assert DESCRIPTOR.itemsize == 64
DESCRIPTORS_OFFSET = RING_HEADER.itemsize  #: descriptor k of a ring at ring + 64 + k * 64
assert DESCRIPTORS_OFFSET + RING_ENTRIES * DESCRIPTOR.itemsize <= RING_BUFFERS_OFFSET

RECORDS_MAGIC = int.from_bytes(b"PKRECS01", "little")
RECORDS_HEADER = np.dtype([
    ("magic", "<u8"),  # RECORDS_MAGIC, stored last when the device initializes the region
    ("capacity", "<u4"),  # RECORDS_CAPACITY
    ("record_size", "<u4"),  # RECORD_SIZE
    ("count", "<u8"),  # records stamped: seq 0 .. count - 1 (the last RECORDS_CAPACITY of them kept)
    ("writer_rid", "<u4"),  # requester id of the device that initialized the region
    ("reserved0", "<u4"),
    ("reserved", "<u8", (4,)),
])
assert RECORDS_HEADER.itemsize == 64 <= RECORDS_OFFSET

RECORD = np.dtype([
    ("seq", "<u8"),  # 0, 1, 2, ...: slot seq % RECORDS_CAPACITY
    ("time_ns", "<u8"),  # CLOCK_MONOTONIC of the device when it stamped (non-decreasing in seq)
    ("rid", "<u4"),  # the writer's requester id
    ("pid", "<u4"),  # the writer's process id
    ("payload", "<u8", (4,)),  # record_payload(seq): the slot's qwords' pattern of generation seq
    ("check", "<u8"),  # record_check of the seven qwords before it; stored after them
])
assert RECORD.itemsize == RECORD_SIZE
RECORD_PAYLOAD_OFFSET = RECORD.fields["payload"][1]
RECORD_CHECK_OFFSET = RECORD.fields["check"][1]

# ------------------------------------------------------------------ the guest's arithmetic
K = 0x9E3779B97F4A7C15  #: golden-ratio constant of the patterns and the checksum
U64 = (1 << 64) - 1


def checksum(n: int, vcpu: int) -> int:
    """F(n) = sum over i = 1..n of (i * K + vcpu) mod 2**64: what ``checksum`` holds after n steps."""
    return (K * (n * (n + 1) // 2) + vcpu * n) & U64


def pattern(gpa: np.ndarray, generation: np.ndarray | int) -> np.ndarray:
    """The qword at ``gpa`` (uint64 array, 8-aligned) in pass/seq ``generation``: gpa ^ ((generation + 1) * K)."""
    with np.errstate(over="ignore"):
        g = np.asarray(generation, dtype=np.uint64) + np.uint64(1)
        return np.asarray(gpa, dtype=np.uint64) ^ (g * np.uint64(K))


def dma_pattern(gpa: np.ndarray, seq: int, seed: int) -> np.ndarray:
    """A DMA buffer's qwords in request ``seq``: ``pattern(gpa, (seed + seq) mod 2**64)``."""
    return pattern(gpa, (seed + seq) & U64)


def record_gpa(seq: int) -> int:
    """Where record ``seq`` goes: slot seq % RECORDS_CAPACITY."""
    return RECORDS_GPA + RECORDS_OFFSET + (seq % RECORDS_CAPACITY) * RECORD_SIZE


def record_payload(seq: np.ndarray | int) -> np.ndarray:
    """Record ``seq``'s payload, shape seq.shape + (4,): ``pattern`` of its qwords' gpas, generation seq."""
    seq = np.asarray(seq, dtype=np.uint64)
    slot = seq % np.uint64(RECORDS_CAPACITY)
    gpa = (np.uint64(RECORDS_GPA + RECORDS_OFFSET + RECORD_PAYLOAD_OFFSET) + slot * np.uint64(RECORD_SIZE))[..., None] \
        + np.arange(4, dtype=np.uint64) * np.uint64(8)
    return pattern(gpa, seq[..., None])


def record_check(words: np.ndarray) -> np.ndarray:
    """The check of records given as qwords, shape (..., 8) or (..., 7): K * sum((2j + 1) * w[j]) ^ magic."""
    w = np.asarray(words, dtype=np.uint64)[..., :7]
    with np.errstate(over="ignore"):
        s = (w * (np.arange(7, dtype=np.uint64) * np.uint64(2) + np.uint64(1))).sum(axis=-1, dtype=np.uint64)
        return (s * np.uint64(K)) ^ np.uint64(RECORDS_MAGIC)


def ring_gpa(vcpu: int) -> int:
    return RING_GPA + vcpu * RING_STRIDE


def buffer_gpa(vcpu: int, slot: int) -> int:
    return ring_gpa(vcpu) + RING_BUFFERS_OFFSET + slot * BUFFER_SIZE


def dirty_area(config: np.void, vcpu: int) -> tuple[int, int]:
    """(gpa, bytes) of vCPU ``vcpu``'s dirty area under ``config``."""
    size = int(config["dirty_pages"]) * PAGE_SIZE
    return int(config["dirty_gpa"]) + vcpu * size, size


def max_dirty_pages(ram_size: int, nr_vcpus: int) -> int:
    """The most pages per vCPU that fit between DIRTY_GPA and the end of RAM."""
    return (ram_size - DIRTY_GPA) // PAGE_SIZE // nr_vcpus
