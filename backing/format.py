"""The pkfuse image format: every persistent structure, its dtype and its place.

This module is the specification. It holds constants, little-endian numpy
dtypes with size asserts, and the arithmetic that places each region; no
logic that reads or writes an image lives here. ``backing/FORMAT.md``
mirrors these tables in prose; keep the two in step.

An image models a reserved range of physical memory. Page ``n`` of the
image file is page frame ``pfn = base_phys // PAGE_SIZE + n``; a physical
address is ``base_phys + image_offset``. Every pointer stored *inside*
metadata is an image page index (relative to the region base, never an
absolute address), except the VT-d tables, whose entries hold physical
addresses because the (simulated) hardware reads them.

Layout, in pages, all regions page aligned and fixed at mkfs::

    0                 superblock (static geometry + checksum, then dynamic words)
    journal_page      redo journal: header page, then record pages
    bitmap_page       allocation bitmap, 1 bit per image page, 1 = in use
    inode_page        inode table, INODE_DTYPE records, indexed by ino
    dentry_page       dentry table, DENTRY_DTYPE records, indexed by ino
    extent_page       extent table, EXTENT_DTYPE records, unordered
    data_page         first page of the pool (2 MiB aligned); file pages and
                      IOMMU table pages are all allocated from here on
"""

from __future__ import annotations

import dataclasses
import zlib

import numpy as np

# --------------------------------------------------------------------------
# Geometry constants
# --------------------------------------------------------------------------

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT  #: bytes per page; the only page size
HUGE_SHIFT = 21
HUGE_PAGE = 1 << HUGE_SHIFT  #: 2 MiB: preferred extent alignment (VT-d 2 MiB leaf)
PAGES_PER_HUGE = HUGE_PAGE // PAGE_SIZE  #: 512
GIGA_PAGE = 1 << 30  #: 1 GiB: VT-d 1 GiB leaf

MAGIC = b"PKFUSE\x00\x01"  #: superblock bytes 0..7
FORMAT_VERSION = 1  #: bumped on any incompatible change of this module
DEFAULT_BASE_PHYS = 4 << 30  #: 4 GiB: an image offset is never mistaken for an address
MIN_IMAGE_SIZE = 8 << 20  #: 8 MiB: metadata plus a few data pages
MAX_IMAGE_SIZE = 1 << 46  #: 64 TiB: keeps every pfn in 32 bits of page index
NAME_MAX = 247  #: longest file name in bytes (DENTRY name field minus NUL)

ROOT_INO = 1  #: inode 1 is "/", as FUSE's ROOT_ID; inode 0 is never used
GUEST_DIR_NAME = b"guest_mem"  #: pkernfs's directory for guest-RAM files
IOMMU_DIR_NAME = b"iommu"  #: pkernfs's directory for IOMMU files
ROOT_PGTABLES_NAME = b"root-pgtables"  #: VT-d root table + context tables

# --------------------------------------------------------------------------
# Superblock (page 0)
# --------------------------------------------------------------------------
# The static part (geometry) is written once by mkfs and covered by
# ``checksum`` (CRC-32 of bytes 0 .. SB_CHECKSUM_OFFSET). The dynamic words
# after it are each updated with one aligned 8-byte store, so no checksum
# can be torn by a kill.

SUPERBLOCK_DTYPE = np.dtype(
    [
        ("magic", "S8"),  # MAGIC
        ("version", "<u4"),  # FORMAT_VERSION
        ("page_size", "<u4"),  # PAGE_SIZE
        ("npages", "<u8"),  # image size in pages
        ("base_phys", "<u8"),  # physical address of image page 0; 2 MiB aligned
        ("uuid", "S16"),  # random at mkfs; names the image
        ("journal_page", "<u8"),  # first page of the journal region
        ("journal_npages", "<u8"),
        ("bitmap_page", "<u8"),
        ("bitmap_npages", "<u8"),
        ("inode_page", "<u8"),
        ("inode_count", "<u8"),  # records in the inode table (= dentry table)
        ("dentry_page", "<u8"),
        ("extent_page", "<u8"),
        ("extent_count", "<u8"),  # records in the extent table
        ("data_page", "<u8"),  # first pool page; every earlier page is metadata
        ("mkfs_time_ns", "<i8"),
        ("checksum", "<u4"),  # zlib.crc32 of the bytes before this field
        ("_pad0", "<u4"),
        # dynamic words, one aligned 8-byte store each, outside the checksum
        ("generation", "<u8"),  # +1 on every read-write open (a "boot count")
        ("clean", "<u8"),  # 1 after a clean close, 0 while open read-write
    ]
)
SB_CHECKSUM_OFFSET = SUPERBLOCK_DTYPE.fields["checksum"][1]
assert SUPERBLOCK_DTYPE.itemsize == 160
assert SUPERBLOCK_DTYPE.fields["generation"][1] % 8 == 0

# --------------------------------------------------------------------------
# Journal (redo log; protocol in backing/journal.py)
# --------------------------------------------------------------------------
# Page journal_page holds the header; records start at the next page. A
# record is JREC_DTYPE followed by ``length`` bytes of new contents, padded
# to 8 bytes. Records may only target metadata outside the journal: pages
# before journal_page or from bitmap_page up to data_page.

JOURNAL_MAGIC = b"PKJOURNL"
JOURNAL_HEADER_DTYPE = np.dtype(
    [
        ("magic", "S8"),  # JOURNAL_MAGIC
        ("commit_seq", "<u8"),  # COMMIT POINT: one 8-byte store of txn_seq
        ("applied_seq", "<u8"),  # == commit_seq once the records are in place
        ("txn_seq", "<u8"),  # sequence number of the records in the body
        ("body_bytes", "<u8"),  # bytes of records in the body
        ("body_crc", "<u4"),  # zlib.crc32(body, txn_seq & 0xffffffff)
        ("nrecords", "<u4"),
    ]
)
assert JOURNAL_HEADER_DTYPE.itemsize == 48
JREC_DTYPE = np.dtype(
    [
        ("offset", "<u8"),  # byte offset in the image of the first new byte
        ("length", "<u4"),  # bytes of new contents that follow
        ("_pad", "<u4"),
    ]
)
assert JREC_DTYPE.itemsize == 16

# --------------------------------------------------------------------------
# Allocation bitmap
# --------------------------------------------------------------------------
# Bit ``n % 8`` of byte ``n // 8`` (little bit order) is 1 when image page n
# is in use: metadata (n < data_page), a file's page, or an IOMMU table
# page. Bits past npages are 0.

# --------------------------------------------------------------------------
# Inode table, indexed by ino; record 0 unused
# --------------------------------------------------------------------------

KIND_FREE = 0
KIND_DIR = 1  #: a directory
KIND_GUEST = 2  #: a guest-RAM file (regular file; may be mapped by domains)
KIND_IOMMU_ROOT = 3  #: iommu/root-pgtables: VT-d root table + 256 context tables
KIND_IOMMU_DOMAIN = 4  #: iommu/dom-N: a domain header page and its page tables
KIND_LU_STATE = 5  #: iommu/lu-state: the sessions a reboot() preserved (LU_HEADER_DTYPE ...)
KIND_NAMES = {
    KIND_FREE: "free",
    KIND_DIR: "directory",
    KIND_GUEST: "guest-ram",
    KIND_IOMMU_ROOT: "iommu-root",
    KIND_IOMMU_DOMAIN: "iommu-domain",
    KIND_LU_STATE: "liveupdate-state",
}
KINDS_WITH_PAGES = (KIND_GUEST, KIND_IOMMU_ROOT, KIND_IOMMU_DOMAIN, KIND_LU_STATE)  #: kinds whose inodes own extents
IOMMU_KINDS = (KIND_IOMMU_ROOT, KIND_IOMMU_DOMAIN)  #: IOMMU tables (counted as such by statfs)
DAEMON_KINDS = (*IOMMU_KINDS, KIND_LU_STATE)  #: written only by pkfuse (the kernel), read-only to every user

IFLAG_ORPHAN = 1  #: unlinked while still open; freed at release or next open

INODE_DTYPE = np.dtype(
    [
        ("kind", "<u2"),  # KIND_*; KIND_FREE marks a free record
        ("flags", "<u2"),  # IFLAG_*
        ("mode", "<u4"),  # st_mode including S_IFDIR / S_IFREG
        ("uid", "<u4"),
        ("gid", "<u4"),
        ("size", "<u8"),  # bytes; for files <= npages * PAGE_SIZE
        ("npages", "<u8"),  # pages held in extents (sum of extent lengths)
        ("nextents", "<u4"),  # extent records owned by this inode
        ("igen", "<u4"),  # +1 each time the record is reused
        ("atime_ns", "<i8"),
        ("mtime_ns", "<i8"),
        ("ctime_ns", "<i8"),
    ]
)
assert INODE_DTYPE.itemsize == 64
# a data write stamps these in place, one aligned 8-byte store each (Store.stamp_write)
assert INODE_DTYPE.fields["mtime_ns"][1] % 8 == 0 and INODE_DTYPE.fields["ctime_ns"][1] % 8 == 0

# --------------------------------------------------------------------------
# Dentry table, indexed by ino: the one name of each inode
# --------------------------------------------------------------------------
# pkernfs has no hard links, so each live inode but the root has exactly one
# dentry, stored at the inode's own index. A directory's children are the
# records whose ``parent`` is its ino (indexed in memory at open).

DENTRY_DTYPE = np.dtype(
    [
        ("parent", "<u4"),  # ino of the containing directory; 0 for root/free
        ("name_len", "<u2"),  # 1..NAME_MAX
        ("_pad", "<u2"),
        ("name", "S248"),  # bytes, no '/' and no NUL, not "." or ".."
    ]
)
assert DENTRY_DTYPE.itemsize == 256

# --------------------------------------------------------------------------
# Extent table, unordered; a record with npages == 0 is free
# --------------------------------------------------------------------------

EXTENT_DTYPE = np.dtype(
    [
        ("ino", "<u4"),  # owning inode; 0 when free
        ("_pad", "<u4"),
        ("file_page", "<u8"),  # first page of the file covered
        ("page", "<u8"),  # first image page (physical = base_phys + page * PAGE_SIZE)
        ("npages", "<u8"),  # length in pages; 0 = free record
    ]
)
assert EXTENT_DTYPE.itemsize == 32


# --------------------------------------------------------------------------
# Intel VT-d, legacy translation mode (VT-d spec rev 4, ch. 9)
# --------------------------------------------------------------------------
# Field names follow the specification. Entries are little-endian; 128-bit
# entries are two 64-bit words, "lo" (bits 63:0) then "hi" (bits 127:64).

VTD_ROOT_ENTRIES = 256  #: root table: one entry per bus
VTD_CONTEXT_ENTRIES = 256  #: context table: one entry per devfn
VTD_PT_ENTRIES = 512  #: second-level table: 9 bits of IOVA per level
ADDR_MASK = 0x000F_FFFF_FFFF_F000  #: bits 51:12, a 4 KiB aligned address

# Root entry (RE), 128 bits
RE_LO_P = 1 << 0  #: Present
RE_LO_CTP_MASK = ADDR_MASK  #: Context-table Pointer, bits 63:12 (51:12 used)
RE_LO_RSVD = 0xFFE  #: bits 11:1 reserved
RE_HI_RSVD = 0xFFFF_FFFF_FFFF_FFFF  #: bits 127:64 reserved in legacy mode

# Context entry (CE), 128 bits
CE_LO_P = 1 << 0  #: Present
CE_LO_FPD = 1 << 1  #: Fault Processing Disable
CE_LO_TT_SHIFT = 2  #: Translation Type, bits 3:2
CE_LO_TT_MASK = 0b11 << 2
CE_TT_UNTRANSLATED = 0b00  #: untranslated requests use second-level tables
CE_TT_PASSTHROUGH = 0b10  #: not used by pkfuse; reported as unsupported
CE_LO_SLPTPTR_MASK = ADDR_MASK  #: Second Level Page Translation Pointer
CE_LO_RSVD = 0xFF0  #: bits 11:4 reserved
CE_HI_AW_MASK = 0b111  #: Address Width, bits 66:64
CE_AW_39 = 0b001  #: 3-level, 39-bit
CE_AW_48 = 0b010  #: 4-level, 48-bit: the only width pkfuse programs
CE_HI_DID_SHIFT = 8  #: Domain Identifier, bits 87:72
CE_HI_DID_MASK = 0xFFFF << 8
CE_HI_RSVD = ~(CE_HI_AW_MASK | (0b1111 << 3) | CE_HI_DID_MASK) & 0xFFFF_FFFF_FFFF_FFFF
#: bits 70:67 are "ignored" (available to software); all others reserved

# Second-level paging entries (SL-PML4E, SL-PDPE, SL-PDE, SL-PTE), 64 bits
SL_R = 1 << 0  #: Read
SL_W = 1 << 1  #: Write
SL_X = 1 << 2  #: Execute: Ignored in legacy mode (see SL_IGNORED)
SL_PS = 1 << 7  #: Page Size: leaf at SL-PDPE (1 GiB) or SL-PDE (2 MiB)
SL_SNP = 1 << 11  #: Snoop behaviour (leaf only); reserved here, as pkfuse reports no ECAP.SC
SL_ADDR_MASK = ADDR_MASK  #: next-level table or 4 KiB page, bits 51:12
SL_ADDR_MASK_2M = 0x000F_FFFF_FFE0_0000  #: bits 51:21 for a 2 MiB leaf
SL_ADDR_MASK_1G = 0x000F_FFFF_C000_0000  #: bits 51:30 for a 1 GiB leaf
#: bits 63, 61:52 and 10: "Ignored" in every second-level entry (software may
#: keep its own bits there). Hardware translates whatever they hold, so the
#: walker does not fault on them; pkfuse never sets them and fsck (and
#: Iommu.open) report them as garbage. Bit 61 is Ignored, not reserved, per
#: qemu/qemu hw/i386/intel_iommu_internal.h (VTD_SL_IGN_COM =
#: 0xbff0000000000000: bits 63, 61:52), mirror/vbox include/VBox/iommu-intel.h
#: (VTD_BF_SL_*_IGN_61_52 for every SL entry kind) and Xen
#: xen/drivers/passthrough/vtd/iommu.h (struct dma_pte: "52-61: available").
#: X (bit 2) is Ignored too: it means something only with SLEE set in an
#: extended context entry, which legacy mode (and pkfuse) does not have --
#: qemu/qemu hw/i386/intel_iommu_internal.h (no VTD_SPTE_PAGE_L1..L4_RSVD_MASK
#: nor VTD_SPTE_LPAGE_L2/L3_RSVD_MASK holds bit 2) and mirror/vbox
#: include/VBox/iommu-intel.h (VTD_BF_SL_*_X in every SL entry kind's valid
#: mask). Xen's struct dma_pte comment ("2-6: reserved") disagrees, but it
#: describes what that driver writes, not what the hardware checks.
SL_IGNORED = (1 << 63) | (0x3FF << 52) | (1 << 10) | SL_X
#: a 4 KiB leaf (SL-PTE) also has bit 7 Ignored (PS exists only in SL-PDPE and
#: SL-PDE): mirror/vbox include/VBox/iommu-intel.h (VTD_BF_SL_PTE_IGN_7), and
#: qemu/qemu hw/i386/intel_iommu_internal.h, whose VTD_SPTE_PAGE_L1_RSVD_MASK
#: (0x800 | bits above HAW) leaves it out
SL_IGNORED_PTE = SL_IGNORED | SL_PS
#: a non-leaf entry (SL-PML4E; SL-PDPE/SL-PDE with PS 0) also has bits 6:3
#: Ignored (in a leaf they are EMT/IPAT): mirror/vbox include/VBox/iommu-intel.h
#: (VTD_BF_SL_PML4E/PDPE/PDE_IGN_6_3), and qemu/qemu
#: hw/i386/intel_iommu_internal.h, whose non-leaf reserved masks
#: (VTD_SPTE_PAGE_L2..L4_RSVD_MASK = 0x800/0x880 | bits above HAW) leave them out
SL_IGNORED_NONLEAF = SL_IGNORED | (0b1111 << 3)
#: bits the walker faults on (FR_PT_RSVD), by entry kind. Bit 62 is reserved
#: in every entry: TM (transient mapping) of a leaf exists only with
#: Device-TLB support (ECAP.DT), which pkfuse does not model -- qemu/qemu
#: hw/i386/intel_iommu_internal.h (VTD_SL_TM excluded from the reserved masks
#: only when dt_supported), mirror/vbox include/VBox/iommu-intel.h
#: (VTD_BF_SL_*_RSVD_62), Xen xen/drivers/passthrough/vtd/iommu.h ("62: reserved").
SL_RSVD_HIGH = 1 << 62
#: non-leaf: PS in an SL-PML4E, and bit 11, reserved in non-leaf entries
#: (SNP exists only in leaves): mirror/vbox include/VBox/iommu-intel.h
#: (VTD_BF_SL_PML4E/PDPE/PDE_RSVD_11), qemu/qemu hw/i386/intel_iommu_internal.h
#: (0x800 in every VTD_SPTE_PAGE_*_RSVD_MASK, 0x880 in L4's)
SL_RSVD_NONLEAF = SL_PS | SL_SNP | SL_RSVD_HIGH
#: leaves: SNP is reserved unless the IOMMU reports snoop control (ECAP.SC),
#: and pkfuse's register block (backing/regs.py) has no CAP/ECAP register, so
#: it reports none -- qemu/qemu hw/i386/intel_iommu_internal.h (VTD_SPTE_SNP
#: 0x800 in VTD_SPTE_PAGE_L1_RSVD_MASK and VTD_SPTE_LPAGE_L2/L3_RSVD_MASK;
#: hw/i386/intel_iommu.c clears it only for scalable mode or snoop-control,
#: which also sets VTD_ECAP_SC), mirror/vbox include/VBox/iommu-intel.h
#: (VTD_BF_SL_PTE/PDE2M/PDPE1G_RSVD_11; src/VBox/Devices/Bus/DevIommuIntel.cpp
#: sets ECAP.SC 0, "Snoop control not supported")
SL_RSVD_LEAF_4K = SL_SNP | SL_RSVD_HIGH  #: EMT/IPAT (bits 6:3) allowed
SL_RSVD_LEAF_2M = SL_RSVD_LEAF_4K | 0x001F_F000  #: bits 20:12 must be 0
SL_RSVD_LEAF_1G = SL_RSVD_LEAF_4K | 0x3FFF_F000  #: bits 29:12 must be 0
VTD_LEVELS = 4  #: SL-PML4 -> SL-PDPT -> SL-PD -> SL-PT
VTD_IOVA_BITS = 48
VTD_LEVEL_SHIFT = (39, 30, 21, 12)  #: IOVA shift of each level, top first

# Domain file (KIND_IOMMU_DOMAIN): page 0 is DOMAIN_HEADER_DTYPE, page 1 is
# the SL-PML4; the remaining pages of the file are table pages handed out
# by the domain's page allocator. Which of them are in use is not stored:
# it is rebuilt at open by walking the tree from the SL-PML4.
DOMAIN_COMPATIBLE = b"intel,vtd-legacy-sl4-v1"  #: KHO-style versioned format name
DOMAIN_MAGIC = b"PKDOMAIN"
DOMAIN_HEADER_DTYPE = np.dtype(
    [
        ("magic", "S8"),  # DOMAIN_MAGIC
        ("compatible", "S32"),  # DOMAIN_COMPATIBLE; restore refuses others
        ("domain_id", "<u2"),  # VT-d DID written into context entries
        ("address_width", "<u2"),  # CE_AW_48
        ("flags", "<u4"),  # DOMF_*
        ("pml4_file_page", "<u8"),  # file page of the SL-PML4 (always 1)
    ]
)
assert DOMAIN_HEADER_DTYPE.itemsize == 56
DOMF_SAVED = 1  #: a fixed copy made by the save/restore flow
#: made for an iommufd HWPT (userspace's). One that a restart finds with no HWPT and no session
#: holding it was left by an unplanned restart (the kernel died without a reboot()): it keeps
#: translating for its requesters (what pkernfs promises) until a device bind replaces it
DOMF_IOMMUFD = 2

# Live-update state (KIND_LU_STATE, iommu/lu-state): what reboot() preserved,
# read back by the next daemon at mount (backing/lustate.py). The bytes are
# LU_HEADER_DTYPE, then nsessions LU_SESSION_DTYPE, nfiles LU_FILE_DTYPE,
# nhwpts LU_HWPT_DTYPE, nmaps LU_MAP_DTYPE, ndevices LU_DEVICE_DTYPE and
# ndrops LU_DROP_DTYPE records, packed in that order from byte 0 of the file;
# the rest of the last page is zero. A new state is written to
# iommu/.lu-state-new and renamed over iommu/lu-state: that rename (one
# journal transaction) is the commit point of reboot().
LU_STATE_NAME = b"lu-state"
LU_STATE_NEW_NAME = b".lu-state-new"
LU_MAGIC = b"PKLUSTAT"
LU_COMPATIBLE = b"pkfuse-luo-v1"  #: KHO-style versioned format name; restore refuses others
LU_MAX_FILES = 128  #: files per session, as the merged LUO's session limit
LU_HEADER_DTYPE = np.dtype(
    [
        ("magic", "S8"),  # LU_MAGIC
        ("compatible", "S32"),  # LU_COMPATIBLE
        ("boot", "<u8"),  # how many reboot()s this image has seen, this one included
        ("nsessions", "<u4"),
        ("nfiles", "<u4"),
        ("nhwpts", "<u4"),
        ("nmaps", "<u4"),
        ("ndevices", "<u4"),
        ("ndrops", "<u4"),
        ("domains", "<u4"),  # LU_DOMAINS_*: where the previous daemon's domains lived
        ("crc", "<u4"),  # zlib.crc32 of the header (this field 0) and every record byte after it
    ]
)
assert LU_HEADER_DTYPE.itemsize == 80
LU_DOMAINS_PERSISTENT = 0  #: pkernfs: HWPT domains in image pages, adopted after the restart
LU_DOMAINS_EPHEMERAL = 1  #: the review's: HWPT domains in host RAM; a fixed copy in the image
LU_SESSION_DTYPE = np.dtype(
    [
        ("name", "S64"),  # NUL-padded, non-empty, unique
        ("file_first", "<u4"),  # index of its first LU_FILE record
        ("file_count", "<u4"),
        ("hwpt_first", "<u4"),
        ("hwpt_count", "<u4"),
    ]
)
assert LU_SESSION_DTYPE.itemsize == 80
LU_FILE_DTYPE = np.dtype(
    [
        ("token", "<u8"),  # the user's token, unique in its session
        ("ino", "<u4"),  # a guest-RAM file
        ("igen", "<u4"),  # its inode generation: a reused inode number is refused
        ("size", "<u8"),  # bytes; frozen while preserved
    ]
)
assert LU_FILE_DTYPE.itemsize == 24
LU_HWPT_DTYPE = np.dtype(
    [
        ("token", "<u8"),  # the hwpt_token of IOMMU_HWPT_LU_SET_PRESERVE
        ("domain_id", "<u2"),  # the domain the devices are attached to across the restart
        ("pad", "<u2"),
        ("map_first", "<u4"),  # index of its first LU_MAP record
        ("map_count", "<u4"),
        ("dev_first", "<u4"),  # index of its first LU_DEVICE record
        ("dev_count", "<u4"),
        ("pad2", "<u4"),
    ]
)
assert LU_HWPT_DTYPE.itemsize == 32
LU_MAP_DTYPE = np.dtype(
    [
        ("iova", "<u8"),
        ("length", "<u8"),  # bytes, a multiple of 4 KiB
        ("offset", "<u8"),  # byte offset in the file
        ("ino", "<u4"),  # a file preserved in the same session
        ("igen", "<u4"),
        ("flags", "<u4"),  # LU_MAP_*
        ("pad", "<u4"),
    ]
)
assert LU_MAP_DTYPE.itemsize == 40
LU_MAP_WRITE = 1  #: the device may write (IOMMU_IOAS_MAP_WRITEABLE)
LU_DEVICE_DTYPE = np.dtype([("rid", "<u2"), ("pad", "<u2")])  # requester id attached to the HWPT
assert LU_DEVICE_DTYPE.itemsize == 4
LU_DROP_DTYPE = np.dtype([("domain_id", "<u2"), ("pad", "<u2")])  # an iommufd domain not preserved
assert LU_DROP_DTYPE.itemsize == 4

# Root-pgtables file (KIND_IOMMU_ROOT): file page 0 is the root table, file
# page 1 + bus is the context table of that bus. 257 pages, made at mkfs.
ROOT_PGTABLES_PAGES = 1 + VTD_ROOT_ENTRIES

# Register block of the simulated IOMMU: a separate small file, not part
# of the image, because hardware registers are not pkernfs memory.
REGS_MAGIC = b"PKVTDREG"
FAULT_LOG_ENTRIES = 256
FAULT_RECORD_DTYPE = np.dtype(
    [
        ("seq", "<u8"),  # 1-based fault number; 0 = empty slot
        ("iova", "<u8"),  # faulting IOVA (FRCD FI)
        ("source_id", "<u2"),  # requester id bus<<8 | dev<<3 | fn (FRCD SID)
        ("reason", "<u2"),  # FR_* fault reason
        ("write", "<u1"),  # 1 for a write request
        ("_pad", "u1", (3,)),
    ]
)
assert FAULT_RECORD_DTYPE.itemsize == 24
# The invalidation queue (VT-d queued invalidation, spec ch. 6.5.2): the driver
# writes a descriptor into slot (seq - 1) % INV_QUEUE_ENTRIES, then publishes
# it by storing seq into ``iq_tail`` (one aligned 8-byte store). The hardware
# (a device's TranslationCache, backing/iotlb.py) reads the descriptors past
# the last tail it saw and drops what they cover. There is no head register:
# a reader more than INV_QUEUE_ENTRIES behind has lost descriptors (overrun)
# and must flush everything. Types and granularities are VT-d's codes.
INV_QUEUE_ENTRIES = 256
INV_TYPE_CC = 0x1  #: context-cache invalidate descriptor (cc_inv_dsc)
INV_TYPE_IOTLB = 0x2  #: IOTLB invalidate descriptor (iotlb_inv_dsc)
INV_G_GLOBAL = 0b01  #: every entry (CC and IOTLB)
INV_G_DOMAIN = 0b10  #: the entries tagged ``did`` (CC and IOTLB)
INV_G_DEVICE = 0b11  #: CC only: the context entry of requester ``sid`` (function mask 0)
INV_G_PAGE = 0b11  #: IOTLB only: tag ``did``, IOVA pages [addr, addr + 2**am pages)
INV_MAX_AM = 18  #: largest address mask (CAP.MAMV, as qemu reports): 1 GiB; above it, domain-selective
INV_DESC_DTYPE = np.dtype(
    [
        ("seq", "<u8"),  # 1-based descriptor number; 0 while the slot is being rewritten
        ("type", "<u4"),  # INV_TYPE_*
        ("granularity", "<u4"),  # INV_G_*
        ("did", "<u2"),  # domain id (domain- and page-selective; device-selective: the entry's old DID)
        ("sid", "<u2"),  # requester id bus<<8 | dev<<3 | fn (CC device-selective)
        ("am", "<u4"),  # page-selective: 2**am pages, 0..INV_MAX_AM
        ("addr", "<u8"),  # page-selective: first IOVA, 4 KiB << am aligned
    ]
)
assert INV_DESC_DTYPE.itemsize == 32
REGS_LAYOUT = 2  #: the block's layout version: 2 added the invalidation queue
REGS_V1_BYTES = 2 * PAGE_SIZE  #: a layout-1 block's file (no queue; its ``layout`` word reads 0)
IQ_OFFSET = 2 * PAGE_SIZE  #: the queue starts on a page, as IQA_REG requires (4 KiB aligned)
REGS_DTYPE = np.dtype(
    [
        ("magic", "S8"),
        ("rtaddr", "<u8"),  # RTADDR_REG: physical address of the root table
        ("gsts", "<u8"),  # GSTS_REG: GSTS_TES when translation is enabled
        ("fault_seq", "<u8"),  # faults recorded so far; slot = (seq-1) % N
        ("faults", FAULT_RECORD_DTYPE, (FAULT_LOG_ENTRIES,)),
        # layout 2, appended: zero in a layout-1 block, whose file ends at REGS_V1_BYTES
        ("layout", "<u8"),  # REGS_LAYOUT; 0 = layout 1 (Regs.open extends the file and sets it)
        ("iq_tail", "<u8"),  # IQT_REG: descriptors posted so far; slot = (seq-1) % INV_QUEUE_ENTRIES
        ("_pad_iq", "u1", (IQ_OFFSET - 32 - FAULT_LOG_ENTRIES * FAULT_RECORD_DTYPE.itemsize - 16,)),
        ("inv_queue", INV_DESC_DTYPE, (INV_QUEUE_ENTRIES,)),  # the ring of descriptors
    ]
)
assert REGS_DTYPE.fields["layout"][1] == 32 + FAULT_LOG_ENTRIES * FAULT_RECORD_DTYPE.itemsize
assert REGS_DTYPE.fields["layout"][1] + 16 <= REGS_V1_BYTES  # both words lie inside a layout-1 file
assert REGS_DTYPE.fields["iq_tail"][1] % 8 == 0
assert REGS_DTYPE.fields["inv_queue"][1] == IQ_OFFSET
assert REGS_DTYPE.itemsize == IQ_OFFSET + INV_QUEUE_ENTRIES * INV_DESC_DTYPE.itemsize
GSTS_TES = 1 << 31  #: Translation Enable Status
# Fault reasons (VT-d spec appendix A, legacy mode; the Linux driver's
# dma_remap_fault_reasons strings). An untranslated request that meets a
# second-level entry with R=W=0 (not present) is reported as the missing
# permission (FR_WRITE / FR_READ), as hardware does. pkfuse's memory is the
# image: an address outside it is "beyond the host address width".
FR_ROOT_NOT_PRESENT = 0x1  #: Present bit in root entry is clear
FR_CONTEXT_NOT_PRESENT = 0x2  #: Present bit in context entry is clear
FR_CONTEXT_INVALID = 0x3  #: invalid programming of a context entry (TT, AW)
FR_ADDR_BEYOND_AW = 0x4  #: input address above 2**AW - 1
FR_WRITE = 0x5  #: write to a page without W (or not present)
FR_READ = 0x6  #: read of a page without R (or not present)
FR_NEXT_PT_INVALID = 0x7  #: a second-level pointer (or leaf) outside host memory
FR_ROOT_TABLE_INVALID = 0x8  #: RTADDR outside host memory
FR_CONTEXT_TABLE_INVALID = 0x9  #: root entry's CTP outside host memory
FR_ROOT_RSVD = 0xA  #: non-zero reserved field in a present root entry
FR_CONTEXT_RSVD = 0xB  #: non-zero reserved field in a present context entry
FR_PT_RSVD = 0xC  #: non-zero reserved field in a present second-level entry
FR_TRANSLATION_DISABLED = 0xFF  #: pkfuse's own: TE clear, request blocked
FR_NAMES = {
    FR_ROOT_NOT_PRESENT: "Present bit in root entry is clear",
    FR_CONTEXT_NOT_PRESENT: "Present bit in context entry is clear",
    FR_CONTEXT_INVALID: "Invalid context entry",
    FR_ADDR_BEYOND_AW: "Access beyond MGAW",
    FR_WRITE: "PTE Write access is not set",
    FR_READ: "PTE Read access is not set",
    FR_NEXT_PT_INVALID: "Next page table ptr is invalid",
    FR_ROOT_TABLE_INVALID: "Root table address invalid",
    FR_CONTEXT_TABLE_INVALID: "Context table ptr is invalid",
    FR_ROOT_RSVD: "non-zero reserved fields in RTP",
    FR_CONTEXT_RSVD: "non-zero reserved fields in CTP",
    FR_PT_RSVD: "non-zero reserved fields in PTE",
    FR_TRANSLATION_DISABLED: "translation disabled (GSTS.TES clear)",
}


# --------------------------------------------------------------------------
# Placement
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Where each region lives, in image pages; derived only from mkfs inputs."""

    npages: int
    base_phys: int
    journal_page: int
    journal_npages: int
    bitmap_page: int
    bitmap_npages: int
    inode_page: int
    inode_count: int
    dentry_page: int
    extent_page: int
    extent_count: int
    data_page: int

    @property
    def size(self) -> int:
        return self.npages * PAGE_SIZE

    @property
    def bitmap_bytes(self) -> int:
        return (self.npages + 7) // 8

    @property
    def journal_body_bytes(self) -> int:
        return (self.journal_npages - 1) * PAGE_SIZE

    @property
    def base_pfn(self) -> int:
        """Page frame number of image page 0 (``base_phys >> 12``): image page = pfn - base_pfn."""
        return self.base_phys >> PAGE_SHIFT

    def phys_addr(self, page: int) -> int:
        return self.base_phys + page * PAGE_SIZE

    def page_of(self, phys_addr: int) -> int:
        return (phys_addr - self.base_phys) // PAGE_SIZE

    # image byte offsets of record fields (the journal's targets, fsck's finding offsets)
    def inode_off(self, ino: int, field: str = "kind") -> int:
        return self.inode_page * PAGE_SIZE + int(ino) * INODE_DTYPE.itemsize + INODE_DTYPE.fields[field][1]

    def dentry_off(self, ino: int, field: str = "parent") -> int:
        return self.dentry_page * PAGE_SIZE + int(ino) * DENTRY_DTYPE.itemsize + DENTRY_DTYPE.fields[field][1]

    def extent_off(self, rec: int, field: str = "ino") -> int:
        return self.extent_page * PAGE_SIZE + int(rec) * EXTENT_DTYPE.itemsize + EXTENT_DTYPE.fields[field][1]


def _pages(nbytes: int) -> int:
    return (nbytes + PAGE_SIZE - 1) // PAGE_SIZE


def compute_geometry(
    size: int,
    base_phys: int = DEFAULT_BASE_PHYS,
    inode_count: int | None = None,
    extent_count: int | None = None,
) -> Geometry:
    """Place every region for an image of ``size`` bytes.

    Defaults scale with the image: one inode per 256 KiB (at least 1024,
    at most 2**20) and one extent record per 128 KiB (at least 1024). The
    journal holds the largest possible transaction: the whole bitmap, a
    third of the extent table, and 64 KiB for inode/dentry records.
    """
    if size % PAGE_SIZE:
        raise ValueError(f"image size {size} is not a multiple of {PAGE_SIZE}")
    if not MIN_IMAGE_SIZE <= size <= MAX_IMAGE_SIZE:
        raise ValueError(f"image size {size} outside {MIN_IMAGE_SIZE}..{MAX_IMAGE_SIZE}")
    if base_phys % HUGE_PAGE or base_phys + size > 1 << 52:
        raise ValueError(f"base_phys {base_phys:#x} must be 2 MiB aligned and below 2**52")
    npages = size // PAGE_SIZE
    if inode_count is None:
        inode_count = min(max(1024, size // (256 << 10)), 1 << 20)
    if extent_count is None:
        extent_count = max(1024, size // (128 << 10))
    bitmap_npages = _pages((npages + 7) // 8)
    extent_bytes = extent_count * EXTENT_DTYPE.itemsize
    journal_npages = 1 + _pages(bitmap_npages * PAGE_SIZE + extent_bytes // 3 + (64 << 10))
    page = 1
    journal_page, page = page, page + journal_npages
    bitmap_page, page = page, page + bitmap_npages
    inode_page, page = page, page + _pages(inode_count * INODE_DTYPE.itemsize)
    dentry_page, page = page, page + _pages(inode_count * DENTRY_DTYPE.itemsize)
    extent_page, page = page, page + _pages(extent_bytes)
    data_page = -(-page // PAGES_PER_HUGE) * PAGES_PER_HUGE
    if data_page + ROOT_PGTABLES_PAGES + 16 > npages:
        raise ValueError(f"image size {size} leaves no room for data after metadata")
    return Geometry(
        npages=npages,
        base_phys=base_phys,
        journal_page=journal_page,
        journal_npages=journal_npages,
        bitmap_page=bitmap_page,
        bitmap_npages=bitmap_npages,
        inode_page=inode_page,
        inode_count=inode_count,
        dentry_page=dentry_page,
        extent_page=extent_page,
        extent_count=extent_count,
        data_page=data_page,
    )


def superblock_checksum(sb_bytes: bytes) -> int:
    """CRC-32 of the static part of a superblock."""
    return zlib.crc32(sb_bytes[:SB_CHECKSUM_OFFSET])


def requester_id(bus: int, dev: int, fn: int) -> int:
    """PCI requester id (source id): bus 15:8, device 7:3, function 2:0."""
    return (bus << 8) | (dev << 3) | fn


def requester_name(source_id: int) -> str:
    """``bb:dd.f`` (hex bus and device) of a source id, as lspci writes it."""
    return f"{source_id >> 8:02x}:{(source_id >> 3) & 0x1F:02x}.{source_id & 7}"
