"""fsck: clean images pass; each hand-corrupted structure gives its own finding.

Every corruption test changes exactly one structure of a real image (made by
mkfs and the Store), then asserts three things: ``check_image`` returns the
right status, a finding names the corrupted structure, and ``Store.open``
refuses the image with a ``FormatError``. A hypothesis test corrupts random
metadata bytes and requires an answer, never an exception.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backing import format as fmt
from backing import fsck
from backing.errors import Finding, FormatError
from backing.journal import Journal, Transaction
from backing.store import Store
from pkfuse.cli import main as cli_main

PS = fmt.PAGE_SIZE
FINDING_LINE = re.compile(r"^\S.* @0x[0-9a-f]+: \S.*$")  #: structure @0xOFFSET: problem


# ------------------------------------------------------------------ helpers


class Raw:
    """Writable numpy views of an image's structures, for corrupting it by hand."""

    def __init__(self, path: Path) -> None:
        self.mm = np.memmap(path, np.uint8, mode="r+")
        g, findings = fsck.check_superblock(bytes(self.mm[: fmt.SUPERBLOCK_DTYPE.itemsize]), self.mm.size)
        assert g is not None, findings
        self.g = g
        self.sb = self.mm[: fmt.SUPERBLOCK_DTYPE.itemsize].view(fmt.SUPERBLOCK_DTYPE)
        jh = g.journal_page * PS
        self.journal = self.mm[jh : jh + fmt.JOURNAL_HEADER_DTYPE.itemsize].view(fmt.JOURNAL_HEADER_DTYPE)
        self.bitmap = self.mm[g.bitmap_page * PS : (g.bitmap_page + g.bitmap_npages) * PS]
        self.inodes = self._table(g.inode_page, g.inode_count, fmt.INODE_DTYPE)
        self.dentries = self._table(g.dentry_page, g.inode_count, fmt.DENTRY_DTYPE)
        self.extents = self._table(g.extent_page, g.extent_count, fmt.EXTENT_DTYPE)

    def _table(self, page: int, count: int, dtype: np.dtype) -> np.ndarray:
        return self.mm[page * PS : page * PS + count * dtype.itemsize].view(dtype)

    def set_bit(self, page: int, value: bool) -> None:
        byte, bit = divmod(page, 8)
        if value:
            self.bitmap[byte] |= 1 << bit
        else:
            self.bitmap[byte] &= ~np.uint8(1 << bit)

    def reseal_superblock(self) -> None:
        """Recompute the checksum, so a changed field is the only thing wrong."""
        self.sb["checksum"] = fmt.superblock_checksum(self.sb.tobytes())

    def extent_of(self, ino: int) -> int:
        """Index of the first extent record of ``ino``."""
        return int(np.flatnonzero((self.extents["ino"] == ino) & (self.extents["npages"] != 0))[0])

    def close(self) -> None:
        self.mm.flush()
        del self.sb, self.journal, self.bitmap, self.inodes, self.dentries, self.extents, self.mm


@contextlib.contextmanager
def raw(path: Path) -> Iterator[Raw]:
    r = Raw(path)
    try:
        yield r
    finally:
        r.close()


def structures(findings: list[Finding]) -> set[str]:
    return {f.structure for f in findings}


def assert_refused(path: Path, status: int, structure: str) -> list[Finding]:
    """check_image gives ``status`` and a finding on ``structure``; Store.open refuses."""
    got, findings = fsck.check_image(path)
    assert got == status, findings
    assert structure in structures(findings), findings
    with pytest.raises(FormatError):
        Store.open(path).close()
    return findings


class Tree:
    """Inode numbers of the populated image's entries."""

    guest: int
    vm0: int
    vm1: int
    ram0: int  # 4 pages, size not page aligned
    ram1: int  # 512 pages (one 2 MiB extent)
    top: int  # 1 page
    orphan: int  # unlinked while open: no dentry, still holds 2 pages
    iommu: int


@pytest.fixture
def populated(make_image: Callable[..., Path]) -> tuple[Path, Tree]:
    """A 16 MiB image with directories, files of several sizes and an orphan."""
    path = make_image("16M")
    t = Tree()
    with Store.open(path) as s:
        t.guest = s.lookup(fmt.ROOT_INO, fmt.GUEST_DIR_NAME)
        t.iommu = s.lookup(fmt.ROOT_INO, fmt.IOMMU_DIR_NAME)
        t.vm0 = s.mkdir(t.guest, b"vm0", 0o755, 0, 0)
        t.vm1 = s.mkdir(t.guest, b"vm1", 0o755, 0, 0)
        t.ram0 = s.create(t.vm0, b"ram0", 0o644, 0, 0)
        s.truncate(t.ram0, 3 * PS + 100)
        s.write(t.ram0, 5, b"guest bytes")
        t.ram1 = s.create(t.vm0, b"ram1", 0o644, 0, 0)
        s.truncate(t.ram1, fmt.HUGE_PAGE)
        t.top = s.create(t.guest, b"top", 0o600, 0, 0)
        s.write(t.top, 0, b"x" * 10)
        t.orphan = s.create(t.vm1, b"open-then-unlinked", 0o644, 0, 0)
        s.truncate(t.orphan, 2 * PS)
        s.unlink(t.vm1, b"open-then-unlinked", keep_open=True)
    return path, t


# ------------------------------------------------------------ clean images


def test_fresh_image_is_clean(image: Path) -> None:
    assert fsck.check_image(image) == (0, [])


def test_populated_image_with_an_orphan_is_clean(populated: tuple[Path, Tree]) -> None:
    path, t = populated
    with raw(path) as r:
        assert r.inodes["flags"][t.orphan] & fmt.IFLAG_ORPHAN
    assert fsck.check_image(path) == (0, [])


def test_image_with_bits_past_npages_in_its_last_bitmap_byte_is_clean(make_image: Callable[..., Path]) -> None:
    path = make_image((16 << 20) + 3 * PS)  # npages not a multiple of 8
    assert fsck.check_image(path) == (0, [])


def test_check_metadata_of_an_open_store_is_clean(populated: tuple[Path, Tree]) -> None:
    path, _ = populated
    with Store.open(path) as s:
        assert fsck.check_metadata(s.image, s.geometry) == []


# --------------------------------------------------------------- superblock


def test_bad_magic_is_unusable(image: Path) -> None:
    with raw(image) as r:
        r.sb["magic"] = b"NOTPKFS!"
    findings = assert_refused(image, 2, "superblock.magic")
    assert all(f.fatal for f in findings)


def test_unknown_version_is_unusable(image: Path) -> None:
    with raw(image) as r:
        r.sb["version"] = fmt.FORMAT_VERSION + 1
        r.reseal_superblock()
    assert_refused(image, 2, "superblock.version")


def test_other_page_size_is_unusable(image: Path) -> None:
    with raw(image) as r:
        r.sb["page_size"] = 2 * PS
        r.reseal_superblock()
    assert_refused(image, 2, "superblock.page_size")


def test_checksum_mismatch_is_unusable(image: Path) -> None:
    with raw(image) as r:
        r.sb["uuid"] = b"\xff" * 16  # covered by the checksum, checked by nothing else
    assert_refused(image, 2, "superblock.checksum")


def test_geometry_field_off_the_layout_rule_is_unusable(image: Path) -> None:
    with raw(image) as r:
        r.sb["dentry_page"] += 1
        r.reseal_superblock()
    findings = assert_refused(image, 2, "superblock.dentry_page")
    assert findings[0].offset == fmt.SUPERBLOCK_DTYPE.fields["dentry_page"][1]


def test_inode_count_larger_than_the_image_is_unusable(image: Path) -> None:
    with raw(image) as r:
        r.sb["inode_count"] = 1 << 62
        r.reseal_superblock()
    assert_refused(image, 2, "superblock.inode_count")


def test_unaligned_base_phys_is_unusable(image: Path) -> None:
    with raw(image) as r:
        r.sb["base_phys"] += PS
        r.reseal_superblock()
    assert_refused(image, 2, "superblock.base_phys")


def test_truncated_image_is_unusable(image: Path) -> None:
    os.truncate(image, os.path.getsize(image) // 2)
    assert_refused(image, 2, "superblock.npages")


def test_check_superblock_of_short_bytes_is_a_fatal_finding() -> None:
    geometry, findings = fsck.check_superblock(b"PKFUSE", 1 << 30)
    assert geometry is None and findings[0].fatal and findings[0].structure == "superblock"


def test_dirty_clean_word_is_a_finding(image: Path) -> None:
    with raw(image) as r:
        r.sb["clean"] = 7
    assert_refused(image, 1, "superblock.clean")


# ------------------------------------------------------------------ journal


def _commit_without_applying(path: Path, build: Callable[[Raw], Transaction]) -> None:
    """Leave a committed but unapplied transaction, as a kill after the commit point does."""
    with raw(path) as r:
        shadow = np.array(r.mm)  # commit into a copy, then keep only its journal region
        Journal(shadow, r.g).commit(build(r))
        lo, hi = r.g.journal_page * PS, (r.g.journal_page + r.g.journal_npages) * PS
        r.mm[lo:hi] = shadow[lo:hi]
        r.journal["applied_seq"] -= 1


def _chmod_txn(ino: int, mode: int) -> Callable[[Raw], Transaction]:
    def build(r: Raw) -> Transaction:
        rec = r.inodes[ino : ino + 1].copy()
        rec["mode"] = stat.S_IFDIR | mode
        txn = Transaction()
        txn.put(r.g.inode_page * PS + ino * fmt.INODE_DTYPE.itemsize, rec)
        return txn

    return build


def test_committed_unapplied_transaction_is_replayed_privately_and_clean(image: Path) -> None:
    _commit_without_applying(image, _chmod_txn(2, 0o700))
    before = image.read_bytes()
    assert fsck.check_image(image) == (0, [])
    assert image.read_bytes() == before  # the replay happened in a private copy
    with Store.open(image) as s:
        assert s.journal_recovered and s.getattr(2).mode == stat.S_IFDIR | 0o700


def test_committed_transaction_with_a_bad_body_crc_is_unusable(image: Path) -> None:
    _commit_without_applying(image, _chmod_txn(2, 0o700))
    with raw(image) as r:
        r.journal["body_crc"] ^= 1
    assert_refused(image, 2, "journal.body_crc")


def test_bad_journal_magic_is_unusable(image: Path) -> None:
    with raw(image) as r:
        r.journal["magic"] = b"GARBAGE!"
    assert_refused(image, 2, "journal.magic")


def test_journal_txn_seq_out_of_protocol_order_is_unusable(image: Path) -> None:
    with raw(image) as r:
        r.journal["txn_seq"] = 5
    assert_refused(image, 2, "journal.txn_seq")


def test_journal_body_bytes_beyond_the_body_is_unusable(image: Path) -> None:
    with raw(image) as r:
        r.journal["body_bytes"] = 1 << 40
    assert_refused(image, 2, "journal.body_bytes")


def test_uncommitted_body_whose_fields_disagree_is_ignored(image: Path) -> None:
    """A writer killed between the body's field stores (txn_seq already the next) is a crash, not garbage."""
    with raw(image) as r:
        r.journal["txn_seq"] = r.journal["commit_seq"] + 1
        r.journal["body_bytes"] = 80
        r.journal["nrecords"] = 8
    assert fsck.check_image(image) == (0, [])
    with Store.open(image) as s:
        assert not s.journal_recovered


def test_committed_body_whose_records_cannot_fit_it_is_unusable(image: Path) -> None:
    with Store.open(image) as s:
        s.mkdir(s.lookup(fmt.ROOT_INO, fmt.GUEST_DIR_NAME), b"d", 0o755, 0, 0)  # one transaction: the body is the committed one
    with raw(image) as r:
        assert int(r.journal["txn_seq"][0]) == int(r.journal["commit_seq"][0])
        r.journal["nrecords"] = 1000
    assert_refused(image, 2, "journal.nrecords")


def test_replayed_transaction_that_rewrites_the_geometry_is_unusable(image: Path) -> None:
    def build(r: Raw) -> Transaction:
        sb = r.sb.copy()
        sb["dentry_page"] += 1
        sb["checksum"] = fmt.superblock_checksum(sb.tobytes())
        txn = Transaction()
        txn.put(0, sb)
        return txn

    _commit_without_applying(image, build)
    assert_refused(image, 2, "superblock.dentry_page")


def test_pending_transaction_seen_by_check_metadata_is_a_finding(image: Path) -> None:
    _commit_without_applying(image, _chmod_txn(2, 0o700))
    with raw(image) as r:
        findings = fsck.check_metadata(np.asarray(r.mm), r.g)
    assert structures(findings) == {"journal.commit_seq"}


# ------------------------------------------------------------------- bitmap


def test_free_page_marked_used_is_a_finding(populated: tuple[Path, Tree]) -> None:
    path, _ = populated
    with raw(path) as r:
        r.set_bit(r.g.npages - 1, True)
    findings = assert_refused(path, 1, "bitmap.used")
    assert len(findings) == 1 and f"pages {4095}..{4095}" in findings[0].problem


def test_owned_page_marked_free_is_a_finding(populated: tuple[Path, Tree]) -> None:
    path, t = populated
    with raw(path) as r:
        page = int(r.extents["page"][r.extent_of(t.ram1)]) + 7
        r.set_bit(page, False)
    findings = assert_refused(path, 1, "bitmap.owned")
    assert findings[0].offset == r.g.bitmap_page * PS + page // 8


def test_metadata_page_marked_free_is_a_finding(image: Path) -> None:
    with raw(image) as r:
        r.set_bit(r.g.inode_page, False)
    assert_refused(image, 1, "bitmap.metadata")


def test_bit_past_the_last_page_is_a_finding(make_image: Callable[..., Path]) -> None:
    path = make_image((16 << 20) + 3 * PS)
    with raw(path) as r:
        r.set_bit(r.g.npages, True)
    assert_refused(path, 1, "bitmap.tail")


def test_bytes_past_the_bitmap_in_its_page_are_a_finding(make_image: Callable[..., Path]) -> None:
    image = make_image("16M")  # 512 bitmap bytes in a 4096-byte page
    with raw(image) as r:
        r.bitmap[r.g.bitmap_bytes + 3] = 0x10
    assert_refused(image, 1, "bitmap.tail")


def test_a_mismatching_run_is_one_finding(populated: tuple[Path, Tree]) -> None:
    path, _ = populated
    with raw(path) as r:
        r.bitmap[(r.g.npages - 1024) // 8 : r.g.npages // 8] = 0xFF  # the last 1024 pages, all free
    status, findings = fsck.check_image(path)
    assert status == 1 and [str(f).split(": ", 1)[1] for f in findings] == [
        "pages 3072..4095: pages marked used that no extent owns"]


def test_many_mismatching_runs_are_capped_with_a_total(populated: tuple[Path, Tree]) -> None:
    path, _ = populated
    with raw(path) as r:
        r.bitmap[(r.g.npages - 1024) // 8 : r.g.npages // 8 : 2] = 0xFF  # 64 runs of 8 pages
    status, findings = fsck.check_image(path)
    assert status == 1 and len(findings) == fsck.MAX_PER_CHECK + 1
    assert findings[-1].problem.startswith("... 64 ranges, 512 pages in all")


def test_bitmap_compared_in_windows_reports_the_same_ranges(
    populated: tuple[Path, Tree], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, t = populated
    with raw(path) as r:
        first = int(r.extents["page"][r.extent_of(t.ram1)])
        for page in (first + 60, first + 61, first + 64, r.g.npages - 70, r.g.npages - 1):
            r.set_bit(page, page >= r.g.npages - 70)  # owned pages cleared, free pages set
    whole = fsck.check_image(path)
    monkeypatch.setattr(fsck, "BITMAP_WINDOW", 64)
    windowed = fsck.check_image(path)
    assert [str(f) for f in windowed[1]] == [str(f) for f in whole[1]]
    assert {f.structure for f in whole[1]} == {"bitmap.owned", "bitmap.used"} and len(whole[1]) == 4


# ------------------------------------------------------------------ extents


def test_overlapping_extents_are_a_finding(populated: tuple[Path, Tree]) -> None:
    path, t = populated
    with raw(path) as r:
        r.extents["page"][r.extent_of(t.top)] = r.extents["page"][r.extent_of(t.ram1)] + 1
    assert_refused(path, 1, "extent.overlap")


def test_extent_past_the_image_is_a_finding(populated: tuple[Path, Tree]) -> None:
    path, t = populated
    with raw(path) as r:
        r.extents["page"][r.extent_of(t.top)] = r.g.npages
    assert_refused(path, 1, "extent.range")


def test_extent_over_metadata_is_a_finding(populated: tuple[Path, Tree]) -> None:
    path, t = populated
    with raw(path) as r:
        r.extents["page"][r.extent_of(t.top)] = r.g.inode_page
    assert_refused(path, 1, "extent.range")


def test_extent_whose_end_wraps_64_bits_is_a_finding(populated: tuple[Path, Tree]) -> None:
    path, t = populated
    with raw(path) as r:
        r.extents["npages"][r.extent_of(t.top)] = (1 << 64) - 1
    assert_refused(path, 1, "extent.range")


def test_extent_of_a_free_inode_is_a_finding(populated: tuple[Path, Tree]) -> None:
    path, t = populated
    with raw(path) as r:
        free = int(np.flatnonzero(r.inodes["kind"][2:] == fmt.KIND_FREE)[0]) + 2
        r.extents["ino"][r.extent_of(t.top)] = free
    assert_refused(path, 1, "extent.owner")


def test_extent_of_a_directory_is_a_finding(populated: tuple[Path, Tree]) -> None:
    path, t = populated
    with raw(path) as r:
        r.extents["ino"][r.extent_of(t.top)] = t.vm1
    assert_refused(path, 1, "extent.owner")


def test_file_pages_not_covered_are_a_finding(populated: tuple[Path, Tree]) -> None:
    path, t = populated
    with raw(path) as r:
        r.extents["file_page"][r.extent_of(t.top)] = 1  # a gap at file page 0
    assert_refused(path, 1, "extent.coverage")


def test_free_extent_record_with_stray_bytes_is_a_finding(image: Path) -> None:
    with raw(image) as r:
        r.extents["page"][500] = 12345
    assert_refused(image, 1, "extent.free")


# ------------------------------------------------------------------- inodes


def test_size_beyond_pages_is_a_finding(populated: tuple[Path, Tree]) -> None:
    path, t = populated
    with raw(path) as r:
        r.inodes["size"][t.ram0] = 4 * PS + 1
    assert_refused(path, 1, "inode.size")


def test_unknown_kind_is_a_finding(populated: tuple[Path, Tree]) -> None:
    path, t = populated
    with raw(path) as r:
        r.inodes["kind"][t.top] = 99
    assert_refused(path, 1, "inode.kind")


def test_mode_type_not_matching_kind_is_a_finding(populated: tuple[Path, Tree]) -> None:
    path, t = populated
    with raw(path) as r:
        r.inodes["mode"][t.top] = stat.S_IFDIR | 0o755
    assert_refused(path, 1, "inode.mode")


def test_unknown_flags_are_a_finding(populated: tuple[Path, Tree]) -> None:
    path, t = populated
    with raw(path) as r:
        r.inodes["flags"][t.top] = 0x80
    assert_refused(path, 1, "inode.flags")


def test_page_count_not_matching_extents_is_a_finding(populated: tuple[Path, Tree]) -> None:
    path, t = populated
    with raw(path) as r:
        r.inodes["npages"][t.ram1] += 1
    assert_refused(path, 1, "inode.npages")


def test_extent_count_not_matching_extents_is_a_finding(populated: tuple[Path, Tree]) -> None:
    path, t = populated
    with raw(path) as r:
        r.inodes["nextents"][t.ram0] = 3
    assert_refused(path, 1, "inode.nextents")


def test_free_inode_record_with_stray_bytes_is_a_finding(image: Path) -> None:
    with raw(image) as r:
        r.inodes["size"][100] = 4096
    assert_refused(image, 1, "inode.free")


def test_root_that_is_not_a_directory_is_unusable(image: Path) -> None:
    with raw(image) as r:
        r.inodes["kind"][fmt.ROOT_INO] = fmt.KIND_GUEST
    assert_refused(image, 2, "inode.root")


# ----------------------------------------------------------------- dentries


@pytest.mark.parametrize("name", [b"a/b", b"nul\0byte", b".", b".."])
def test_bad_name_is_a_finding(populated: tuple[Path, Tree], name: bytes) -> None:
    path, t = populated
    with raw(path) as r:
        r.dentries["name"][t.top] = name
        r.dentries["name_len"][t.top] = len(name)
    assert_refused(path, 1, "dentry.name")


@pytest.mark.parametrize("name_len", [0, fmt.NAME_MAX + 1, 0xFFFF])
def test_name_length_out_of_range_is_a_finding(populated: tuple[Path, Tree], name_len: int) -> None:
    path, t = populated
    with raw(path) as r:
        r.dentries["name_len"][t.top] = name_len
    assert_refused(path, 1, "dentry.name")


def test_bytes_after_the_name_are_a_finding(populated: tuple[Path, Tree]) -> None:
    path, t = populated
    with raw(path) as r:
        r.dentries["name_len"][t.top] = 1  # "top" -> "t" followed by "op"
    assert_refused(path, 1, "dentry.name")


def test_duplicate_name_in_a_directory_is_a_finding(populated: tuple[Path, Tree]) -> None:
    path, t = populated
    with raw(path) as r:
        r.dentries["name"][t.ram1] = b"ram0"
    findings = assert_refused(path, 1, "dentry.duplicate")
    assert [f.structure for f in findings] == ["dentry.duplicate"]


def test_same_name_in_two_directories_is_clean(populated: tuple[Path, Tree]) -> None:
    path, t = populated
    with Store.open(path) as s:
        s.create(t.vm1, b"ram0", 0o644, 0, 0)
    assert fsck.check_image(path) == (0, [])


def test_parent_that_is_a_file_is_a_finding(populated: tuple[Path, Tree]) -> None:
    path, t = populated
    with raw(path) as r:
        r.dentries["parent"][t.ram1] = t.top
    assert_refused(path, 1, "dentry.parent")


def test_parent_beyond_the_inode_table_is_a_finding(populated: tuple[Path, Tree]) -> None:
    path, t = populated
    with raw(path) as r:
        r.dentries["parent"][t.ram1] = 0xFFFFFFFF
    assert_refused(path, 1, "dentry.parent")


def test_cycle_in_the_directory_graph_is_a_finding(populated: tuple[Path, Tree]) -> None:
    path, t = populated
    with raw(path) as r:
        r.dentries["parent"][t.vm0] = t.vm1  # vm1 is in guest_mem; make the pair a cycle
        r.dentries["parent"][t.vm1] = t.vm0
    findings = assert_refused(path, 1, "dentry.tree")
    assert {t.vm0, t.vm1} <= {int(m) for f in findings for m in re.findall(r"inode (\d+)", f.problem)}


def test_directory_that_is_its_own_parent_is_a_finding(populated: tuple[Path, Tree]) -> None:
    path, t = populated
    with raw(path) as r:
        r.dentries["parent"][t.vm1] = t.vm1
    assert_refused(path, 1, "dentry.tree")


def test_free_inode_with_a_dentry_is_a_finding(image: Path) -> None:
    with raw(image) as r:
        r.dentries["parent"][200] = fmt.ROOT_INO
        r.dentries["name_len"][200] = 1
        r.dentries["name"][200] = b"x"
    assert_refused(image, 1, "dentry.unnamed")


def test_orphan_with_a_dentry_is_a_finding(populated: tuple[Path, Tree]) -> None:
    path, t = populated
    with raw(path) as r:
        r.dentries["parent"][t.orphan] = t.vm1
        r.dentries["name_len"][t.orphan] = 1
        r.dentries["name"][t.orphan] = b"o"
    assert_refused(path, 1, "dentry.unnamed")


def test_missing_guest_mem_is_a_finding(image: Path) -> None:
    with raw(image) as r:
        r.dentries["name"][2] = b"guest_meX"
    assert_refused(image, 1, "namespace.guest_mem")


def test_missing_iommu_dir_is_a_finding(image: Path) -> None:
    with raw(image) as r:
        r.dentries["name"][3] = b"iommX"
    assert_refused(image, 1, "namespace.iommu")


def test_root_pgtables_of_the_wrong_kind_is_a_finding(populated: tuple[Path, Tree]) -> None:
    path, _ = populated
    with raw(path) as r:
        pgt = int(np.flatnonzero(r.inodes["kind"] == fmt.KIND_IOMMU_ROOT)[0])
        r.inodes["kind"][pgt] = fmt.KIND_GUEST
    assert_refused(path, 1, "namespace.root-pgtables")


# ------------------------------------------------------------------ context


def test_context_page_owner_names_file_metadata_and_free_pages(populated: tuple[Path, Tree]) -> None:
    path, t = populated
    with raw(path) as r:
        ctx = fsck.FsckContext.build(np.asarray(r.mm), r.g)
        first = int(r.extents["page"][r.extent_of(t.ram1)])
        owner, kind = ctx.page_owner(np.array([0, first, first + 511, r.g.npages - 1]))
        del ctx
    assert owner.tolist() == [0, t.ram1, t.ram1, 0]
    assert kind.tolist()[1] == fmt.KIND_GUEST


def test_context_page_owner_of_an_extent_owned_beyond_the_inode_table_is_nobody(populated: tuple[Path, Tree]) -> None:
    path, t = populated
    with raw(path) as r:
        rec = r.extent_of(t.top)
        r.extents["ino"][rec] = 0xFFFFFFFF
        ctx = fsck.FsckContext.build(np.asarray(r.mm), r.g)
        owner, kind = ctx.page_owner(np.array([int(r.extents["page"][rec])]))
        del ctx
    assert owner.tolist() == [0] and kind.tolist() == [fmt.KIND_FREE]
    assert fsck.check_image(path)[0] == 1  # and the deep checks that use the context do not trip on it


# ------------------------------------------------------- garbage in general


class Pristine(bytes):
    """Metadata bytes that do not flood a failure report."""

    def __repr__(self) -> str:
        return f"<{len(self)} pristine metadata bytes>"


@pytest.fixture(scope="module")
def garbage_base(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, fmt.Geometry, bytes]:
    """A populated 16 MiB image and its pristine metadata bytes, corrupted per example."""
    path = tmp_path_factory.mktemp("garbage") / "pk.img"
    from backing.mkfs import mkfs

    g = mkfs(path, 16 << 20)
    with Store.open(path) as s:
        guest = s.lookup(fmt.ROOT_INO, fmt.GUEST_DIR_NAME)
        vm = s.mkdir(guest, b"vm", 0o755, 0, 0)
        for i in range(6):
            f = s.create(vm if i % 2 else guest, b"f%d" % i, 0o644, 0, 0)
            s.truncate(f, (i * 37 + 1) * PS + i)
        s.unlink(vm, b"f1", keep_open=True)
    with open(path, "rb") as f:
        meta = Pristine(f.read(g.data_page * PS))
    return path, g, meta


def _hot_offsets(g: fmt.Geometry) -> st.SearchStrategy[int]:
    """Offsets in the populated parts of each structure, and anywhere in metadata."""
    regions = [
        (0, fmt.SUPERBLOCK_DTYPE.itemsize),
        (g.journal_page * PS, g.journal_page * PS + fmt.JOURNAL_HEADER_DTYPE.itemsize),
        (g.bitmap_page * PS, g.bitmap_page * PS + g.bitmap_bytes),
        (g.inode_page * PS, g.inode_page * PS + 16 * fmt.INODE_DTYPE.itemsize),
        (g.dentry_page * PS, g.dentry_page * PS + 16 * fmt.DENTRY_DTYPE.itemsize),
        (g.extent_page * PS, g.extent_page * PS + 16 * fmt.EXTENT_DTYPE.itemsize),
        (0, g.data_page * PS),
    ]
    return st.one_of(*(st.integers(lo, hi - 1) for lo, hi in regions))


@pytest.mark.timeout(300)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_metadata_corruption_gives_findings_never_an_exception(
    garbage_base: tuple[Path, fmt.Geometry, bytes], data: st.DataObject
) -> None:
    path, g, meta = garbage_base
    writes = data.draw(st.lists(st.tuples(_hot_offsets(g), st.binary(min_size=1, max_size=16)), min_size=1, max_size=6))
    fd = os.open(path, os.O_RDWR)
    try:
        for off, blob in writes:
            os.pwrite(fd, blob[: g.data_page * PS - off], off)
        status, findings = fsck.check_image(path)
        assert status in (0, 1, 2)
        assert status == fsck.status_of(findings)
        assert all(isinstance(f, Finding) and FINDING_LINE.match(str(f)) for f in findings)
        # what fsck passes the store can open; what it refuses the store refuses (Store.open
        # runs the metadata checks, not the deep checks of the IOMMU tables)
        if fsck.check_image(path, deep=False)[0] == 0:
            Store.open(path, read_only=True).close()
        else:
            with pytest.raises(FormatError):
                Store.open(path, read_only=True).close()
    finally:
        os.pwrite(fd, meta, 0)
        os.close(fd)


def _field_edits(g: fmt.Geometry) -> st.SearchStrategy[list[tuple[int, str, int, int]]]:
    """(table page, field, record, value) edits with values near the boundaries that matter."""
    tables = [(g.inode_page, fmt.INODE_DTYPE), (g.dentry_page, fmt.DENTRY_DTYPE), (g.extent_page, fmt.EXTENT_DTYPE)]
    boundaries = [0, 1, 2, 3, 4, 5, 7, 8, 99, 255, 256, 512, 513, g.data_page - 1, g.data_page, g.npages - 1,
                  g.npages, g.inode_count - 1, g.inode_count, 2**31, 2**32 - 1, 2**63, 2**64 - 1]

    def edit(table: tuple[int, np.dtype]) -> st.SearchStrategy[tuple[int, str, int, int]]:
        page, dtype = table
        fields = [f for f in dtype.names if f != "name" and not f.startswith("_") and dtype.fields[f][0].kind == "u"]
        return st.tuples(st.just(page), st.sampled_from(fields), st.integers(0, 15),
                         st.one_of(st.sampled_from(boundaries), st.integers(0, 4096)))

    return st.lists(st.sampled_from(tables).flatmap(edit), min_size=1, max_size=3)


@pytest.mark.timeout(300)
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_image_that_fsck_passes_after_field_edits_opens_and_stays_clean(
    garbage_base: tuple[Path, fmt.Geometry, bytes], data: st.DataObject
) -> None:
    path, g, meta = garbage_base
    edits = data.draw(_field_edits(g))
    try:
        with raw(path) as r:
            for page, field, rec, value in edits:
                table = {g.inode_page: r.inodes, g.dentry_page: r.dentries, g.extent_page: r.extents}[page]
                dtype = table.dtype.fields[field][0]
                table[field][rec] = value % (1 << (8 * dtype.itemsize))
        status, _ = fsck.check_image(path)
        if fsck.check_image(path, deep=False)[0] == 0:  # the checks Store.open runs
            Store.open(path).close()  # read-write: frees orphans, bumps the generation
            after = fsck.check_image(path)
            assert after[0] == status, after  # a clean image stays clean; deep findings stay
        else:
            with pytest.raises(FormatError):
                Store.open(path).close()
    finally:
        with open(path, "r+b") as f:
            f.write(meta)


# ---------------------------------------------------------------------- CLI


def test_pkfuse_fsck_prints_clean_summary_and_exits_0(image: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["fsck", str(image)]) == 0
    out, err = capsys.readouterr()
    assert out == f"{image}: clean\n" and err == ""


def test_pkfuse_fsck_prints_each_finding_then_a_summary_and_exits_1(
    populated: tuple[Path, Tree], capsys: pytest.CaptureFixture[str]
) -> None:
    path, t = populated
    with raw(path) as r:
        r.inodes["kind"][t.top] = 99
        r.dentries["name"][t.ram1] = b"ram0"
    assert cli_main(["fsck", str(path)]) == 1
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert all(FINDING_LINE.match(line) for line in lines[:-1]), lines
    assert {"inode.kind", "dentry.duplicate"} <= {line.split(" @")[0] for line in lines[:-1]}
    assert lines[-1] == f"{path}: {len(lines) - 1} findings" and err == ""


def test_pkfuse_fsck_on_an_unusable_image_prints_findings_and_one_stderr_line(
    image: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with raw(image) as r:
        r.sb["magic"] = b"NOTPKFS!"
    assert cli_main(["fsck", str(image)]) == 2
    out, err = capsys.readouterr()
    assert out.startswith("superblock.magic @0x0: ")
    assert len(err.splitlines()) == 1 and "unusable" in err


def _one_stderr_line(path: Path, capsys: pytest.CaptureFixture[str]) -> str:
    assert cli_main(["fsck", str(path)]) == 2
    out, err = capsys.readouterr()
    assert len(err.splitlines()) == 1 and "Traceback" not in out + err
    return err


def test_pkfuse_fsck_on_a_missing_file_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = _one_stderr_line(tmp_path / "nope.img", capsys)
    assert "No such file" in err


def test_pkfuse_fsck_on_a_zero_length_file_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "empty.img"
    path.touch()
    assert "0 bytes" in _one_stderr_line(path, capsys)


def test_pkfuse_fsck_on_a_directory_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert "directory" in _one_stderr_line(tmp_path, capsys)


@pytest.mark.timeout(10)
def test_pkfuse_fsck_on_a_fifo_is_one_line_and_exit_2_without_waiting(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "fifo"
    os.mkfifo(path)
    assert "not a regular file" in _one_stderr_line(path, capsys)


def test_pkfuse_fsck_on_random_bytes_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "random.img"
    path.write_bytes(np.random.default_rng(7).integers(0, 256, 1 << 20, dtype=np.uint8).tobytes())
    _one_stderr_line(path, capsys)


def test_pkfuse_fsck_on_a_truncated_image_is_one_line_and_exit_2(image: Path, capsys: pytest.CaptureFixture[str]) -> None:
    os.truncate(image, 5 * PS)
    _one_stderr_line(image, capsys)
