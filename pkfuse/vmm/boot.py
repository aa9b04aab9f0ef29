"""The guest's first instant: boot structures in its RAM and each vCPU's initial CPU state.

Engine-neutral: the KVM engine turns ``initial_cpu`` into ``kvm_regs`` and
``kvm_sregs``, the Unicorn engine into register writes. What is written and
where is ``pkfuse.vmm.abi``'s layout. A cold boot writes the page tables, the
GDT, the TSS, the config block and the text; it never touches the vCPU state
blocks, the rings or the dirty area (a guest booted over existing RAM
continues from it), except ``fresh=True``, which zeroes the state blocks and
ring headers.
"""

from __future__ import annotations

import dataclasses
import uuid as uuidlib

import numpy as np

from . import abi

# control-register and EFER bits (Intel SDM vol. 3, 2.5 and 2.2.1)
CR0_PE, CR0_MP, CR0_ET, CR0_NE, CR0_WP, CR0_PG = 1 << 0, 1 << 1, 1 << 4, 1 << 5, 1 << 16, 1 << 31
CR4_PAE, CR4_OSFXSR, CR4_OSXMMEXCPT = 1 << 5, 1 << 9, 1 << 10
EFER_LME, EFER_LMA = 1 << 8, 1 << 10
RFLAGS_FIXED, RFLAGS_IOPL3 = 1 << 1, 3 << 12

CR0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG
CR4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT
EFER = EFER_LME | EFER_LMA
RFLAGS = RFLAGS_FIXED | RFLAGS_IOPL3

# page-table entry bits
PTE_P, PTE_RW, PTE_US, PTE_PS = 1 << 0, 1 << 1, 1 << 2, 1 << 7


class BootError(ValueError):
    """The guest cannot boot with these parameters (one line, says which)."""


@dataclasses.dataclass(frozen=True)
class Segment:
    """A segment register's hidden part, as ``struct kvm_segment`` holds it."""

    base: int
    limit: int
    selector: int
    type: int
    present: int
    dpl: int
    db: int
    s: int
    l: int  # noqa: E741 -- the kernel's field name
    g: int

    def descriptor(self) -> int:
        """The 8-byte GDT descriptor of a code or data segment (SDM vol. 3, 3.4.5)."""
        limit = self.limit >> 12 if self.g else self.limit
        return ((limit & 0xFFFF) | (self.base & 0xFFFFFF) << 16 | self.type << 40 | self.s << 44
                | self.dpl << 45 | self.present << 47 | ((limit >> 16) & 0xF) << 48 | self.l << 53
                | self.db << 54 | self.g << 55 | ((self.base >> 24) & 0xFF) << 56)


USER_CODE = Segment(0, 0xFFFFFFFF, abi.SEL_USER_CODE, 0xB, 1, 3, 0, 1, 1, 1)
USER_DATA = Segment(0, 0xFFFFFFFF, abi.SEL_USER_DATA, 0x3, 1, 3, 1, 1, 0, 1)
KERNEL_CODE = Segment(0, 0xFFFFFFFF, abi.SEL_KERNEL_CODE, 0xB, 1, 0, 0, 1, 1, 1)
KERNEL_DATA = Segment(0, 0xFFFFFFFF, abi.SEL_KERNEL_DATA, 0x3, 1, 0, 1, 1, 0, 1)
# The TSS carries an I/O permission bitmap allowing every port: under PVM (../shared/KVM-NOTES.md) the
# guest's RFLAGS.IOPL reads 0 at CPL 3 whatever the VMM sets, so an OUT is allowed by the bitmap or not at
# all (measured: #GP, i.e. a triple fault, without it). On VT-x, IOPL 3 allows it before the bitmap is read.
TSS_IOMAP_OFFSET = 0x68  #: iomap_base (the u16 at TSS + 0x66): the bitmap right after the 104-byte TSS
TSS_IOMAP_BYTES = 0x10000 // 8  #: one bit per port, 0 = allowed; then one 0xFF byte, as the SDM asks
TSS_LIMIT = TSS_IOMAP_OFFSET + TSS_IOMAP_BYTES  #: inclusive: the terminating byte is the last
assert abi.TSS_GPA + TSS_LIMIT < abi.PML4_GPA
TSS = Segment(abi.TSS_GPA, TSS_LIMIT, abi.SEL_TSS, 0xB, 1, 0, 0, 0, 0, 0)  # 64-bit TSS, busy
LDT = Segment(0, 0, 0, 0x2, 0, 0, 0, 0, 0, 0)  # unusable


@dataclasses.dataclass(frozen=True)
class CpuInit:
    """A vCPU's state at its first instruction: 64-bit mode, CPL 3, IOPL 3, no IDT."""

    rip: int
    rsp: int
    rdi: int  #: the vCPU index
    rsi: int  #: CONFIG_GPA
    rflags: int = RFLAGS
    cr0: int = CR0
    cr3: int = abi.PML4_GPA
    cr4: int = CR4
    efer: int = EFER
    cs: Segment = USER_CODE
    ds: Segment = USER_DATA  #: also es, fs, gs, ss
    tr: Segment = TSS
    ldt: Segment = LDT
    gdt: tuple[int, int] = (abi.GDT_GPA, abi.GDT_ENTRIES * 8 - 1)  #: (base, limit)
    idt: tuple[int, int] = (0, 0)


def initial_cpu(vcpu: int) -> CpuInit:
    return CpuInit(rip=abi.GUEST_TEXT_GPA, rsp=abi.STACK_TOP - vcpu * abi.STACK_SIZE, rdi=vcpu, rsi=abi.CONFIG_GPA)


@dataclasses.dataclass(frozen=True)
class GuestParams:
    """What the VMM chooses for a guest; ``config()`` checks it and gives the CONFIG record."""

    nr_vcpus: int
    ram_size: int
    dirty_share: float = 0.5  #: of the RAM above DIRTY_GPA, split evenly between the vCPUs
    mode: int = abi.MODE_RUN
    dma_every: int = 64
    dma_length: int = abi.BUFFER_SIZE
    fill_value: int = 0
    seed: int = 0
    vm_uuid: bytes = dataclasses.field(default_factory=lambda: uuidlib.uuid4().bytes)

    def config(self) -> np.ndarray:
        if not 1 <= self.nr_vcpus <= abi.MAX_VCPUS:
            raise BootError(f"{self.nr_vcpus} vCPUs: the guest supports 1 to {abi.MAX_VCPUS}")
        if self.ram_size < abi.MIN_RAM or self.ram_size % abi.RAM_ALIGN:
            raise BootError(f"guest RAM of {self.ram_size} bytes: it must be a multiple of 2 MiB, at least "
                            f"{abi.MIN_RAM >> 20} MiB")
        if self.ram_size > abi.MAX_GIB << 30:
            raise BootError(f"guest RAM of {self.ram_size >> 30} GiB: the guest maps at most {abi.MAX_GIB} GiB")
        if not 0.0 <= self.dirty_share <= 1.0:
            raise BootError(f"dirty share {self.dirty_share}: it is a fraction from 0 to 1")
        if self.dma_length % 8 or not 8 <= self.dma_length <= abi.BUFFER_SIZE:
            raise BootError(f"DMA length {self.dma_length}: a multiple of 8 from 8 to {abi.BUFFER_SIZE}")
        if len(self.vm_uuid) != 16:
            raise BootError("vm_uuid is 16 bytes")
        c = np.zeros((), abi.CONFIG)
        c["magic"], c["version"], c["nr_vcpus"], c["ram_size"] = (abi.CONFIG_MAGIC, abi.CONFIG_VERSION,
                                                                  self.nr_vcpus, self.ram_size)
        c["vm_uuid"] = np.void(self.vm_uuid)
        c["mode"], c["dma_every"] = self.mode, self.dma_every
        c["dirty_gpa"] = abi.DIRTY_GPA
        c["dirty_pages"] = int(abi.max_dirty_pages(self.ram_size, self.nr_vcpus) * self.dirty_share)
        c["fill_value"], c["ring_entries"], c["dma_length"], c["seed"] = (self.fill_value, abi.RING_ENTRIES,
                                                                          self.dma_length, self.seed)
        return c


def page_tables(ram_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(PML4, PDPT, PDs) as uint64 arrays: guest RAM identity-mapped with 2 MiB user pages."""
    gib = -(-ram_size // (1 << 30))
    pml4 = np.zeros(512, np.uint64)
    pml4[0] = abi.PDPT_GPA | PTE_P | PTE_RW | PTE_US
    pdpt = np.zeros(512, np.uint64)
    pdpt[:gib] = (abi.PD_GPA + np.arange(gib, dtype=np.uint64) * abi.PAGE_SIZE) | (PTE_P | PTE_RW | PTE_US)
    leaves = ram_size // abi.RAM_ALIGN
    pds = np.zeros(gib * 512, np.uint64)
    pds[:leaves] = (np.arange(leaves, dtype=np.uint64) * abi.RAM_ALIGN) | (PTE_P | PTE_RW | PTE_US | PTE_PS)
    return pml4, pdpt, pds


def gdt() -> np.ndarray:
    """The GDT as uint64 descriptors: null, kernel code, kernel data, (unused), user data, user code, TSS."""
    g = np.zeros(abi.GDT_ENTRIES, np.uint64)
    g[abi.SEL_KERNEL_CODE >> 3] = KERNEL_CODE.descriptor()
    g[abi.SEL_KERNEL_DATA >> 3] = KERNEL_DATA.descriptor()
    g[abi.SEL_USER_DATA >> 3] = USER_DATA.descriptor()
    g[abi.SEL_USER_CODE >> 3] = USER_CODE.descriptor()
    g[abi.SEL_TSS >> 3] = TSS.descriptor()  # a system descriptor: the same bit layout, s = 0
    g[(abi.SEL_TSS >> 3) + 1] = TSS.base >> 32
    return g


def write_boot(ram: np.ndarray, params: GuestParams | None, text: bytes, *, fresh: bool = False) -> np.ndarray:
    """Write the boot structures, ``text`` and CONFIG into ``ram`` (uint8, guest-physical); return CONFIG.

    ``params`` None: the CONFIG in RAM is kept as it is (the same VM booted again over its RAM).

    ``fresh`` also zeroes every vCPU state block and ring header: a new guest,
    not a cold boot over an old one's RAM.
    """
    config = params.config() if params is not None else read_config(ram)
    if params is None:  # a reboot over RAM: CONFIG as it is
        params = GuestParams(int(config["nr_vcpus"]), int(config["ram_size"]))
    if len(ram) != params.ram_size:
        raise BootError(f"guest RAM is {len(ram)} bytes, the parameters say {params.ram_size}")
    if len(text) > abi.GUEST_TEXT_MAX:
        raise BootError(f"the guest binary is {len(text)} bytes: at most {abi.GUEST_TEXT_MAX}")
    pml4, pdpt, pds = page_tables(params.ram_size)
    ram[abi.PML4_GPA:abi.PML4_GPA + 4096] = pml4.view(np.uint8)
    ram[abi.PDPT_GPA:abi.PDPT_GPA + 4096] = pdpt.view(np.uint8)
    ram[abi.PD_GPA:abi.PD_GPA + pds.nbytes] = pds.view(np.uint8)
    g = gdt()
    ram[abi.GDT_GPA:abi.GDT_GPA + g.nbytes] = g.view(np.uint8)
    ram[abi.TSS_GPA:abi.TSS_GPA + TSS_LIMIT] = 0
    ram[abi.TSS_GPA + 0x66:abi.TSS_GPA + 0x68] = np.frombuffer(TSS_IOMAP_OFFSET.to_bytes(2, "little"), np.uint8)
    ram[abi.TSS_GPA + TSS_LIMIT] = 0xFF
    ram[abi.GUEST_TEXT_GPA:abi.GUEST_TEXT_GPA + len(text)] = np.frombuffer(text, np.uint8)
    if fresh:
        ram[abi.VCPU_STATE_GPA:abi.VCPU_STATE_GPA + abi.MAX_VCPUS * abi.VCPU_STATE_STRIDE] = 0
        for i in range(abi.MAX_VCPUS):
            ram[abi.ring_gpa(i):abi.ring_gpa(i) + abi.RING_BUFFERS_OFFSET] = 0
    ram[abi.CONFIG_GPA:abi.CONFIG_GPA + abi.CONFIG.itemsize] = np.frombuffer(np.asarray(config).tobytes(), np.uint8)
    return config


def read_config(ram: np.ndarray) -> np.void:
    """The CONFIG record in ``ram`` (not checked: the verifier checks it)."""
    return np.frombuffer(ram[abi.CONFIG_GPA:abi.CONFIG_GPA + abi.CONFIG.itemsize].tobytes(), abi.CONFIG)[0]
