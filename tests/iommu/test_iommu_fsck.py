"""fsck of the VT-d tables (backing.tablecheck via backing.fsck.check_image):
a clean image is clean, each hand-made corruption gives its finding, garbage gives
findings and never an exception."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from iommu_helpers import entry_where

from backing import format as fmt
from backing.errors import Finding
from backing.fsck import check_image
from backing.iommu import Iommu
from backing.mkfs import mkfs
from backing.store import Store

PS = fmt.PAGE_SIZE
MiB = 1 << 20
ROOT = fmt.ROOT_INO
BUS, DEV, FN = 2, 1, 0


@pytest.fixture
def image(tmp_path: Path) -> Path:
    """An image with guest vm0 (16 MiB), dom-1 attached to 02:01.0 mapping 2 MiB + 4 KiB leaves."""
    p = tmp_path / "pk.img"
    mkfs(p, 64 * MiB)
    with Store.open(p) as s:
        g = s.create(s.lookup(ROOT, b"guest_mem"), b"vm0", 0o600, 0, 0)
        s.truncate(g, 16 * MiB)
        base = s.extents(g)[0].phys_addr
        with Iommu.open(s) as io:
            d = io.create_domain()
            d.map(0, base, 4 * MiB)
            d.map(64 * MiB, base + 4 * MiB + PS, 20 * PS, write=False)
            d.attach(BUS, DEV, FN)
            io.create_domain(2)  # empty, detached
    return p


def corrupt(image: Path, change: Callable[[Store, Iommu], None]) -> list[Finding]:
    """Apply ``change`` to the image's bytes, then fsck it; returns the findings."""
    with Store.open(image) as s:
        io = Iommu.open(s)
        change(s, io)
        io.close()
    status, findings = check_image(image)
    assert status == (1 if findings else 0)
    return findings


def entry(s: Store, io: Iommu, iova: int, level: int, did: int = 1) -> int:
    """u64 index of the entry translating ``iova`` at ``level`` in domain ``did``."""
    return entry_where(s, io.domain(did), iova, level)


def only(findings: list[Finding], structure: str, words: str) -> None:
    assert len(findings) == 1, findings
    assert structure in findings[0].structure and words in findings[0].problem, findings[0]


def test_a_clean_image_with_domains_and_attachments_has_no_findings(image: Path) -> None:
    assert check_image(image) == (0, [])


@pytest.mark.parametrize("iova, level, structure", [(64 * MiB, 3, "SL-PTE"), (0, 2, "SL-PDE")])
def test_snp_in_a_leaf_is_a_reserved_bit_finding(image: Path, iova: int, level: int, structure: str) -> None:
    def change(s: Store, io: Iommu) -> None:
        s.image_u64[entry(s, io, iova, level)] |= np.uint64(fmt.SL_SNP)

    only(corrupt(image, change), f"iommu/dom-1 {structure}", "reserved bits 0x800")


def test_a_bit_hardware_ignores_in_a_pte_is_still_a_finding(image: Path) -> None:
    def change(s: Store, io: Iommu) -> None:
        s.image_u64[entry(s, io, 64 * MiB, 3)] |= np.uint64(1 << 63)

    only(corrupt(image, change), "iommu/dom-1 SL-PTE", "hardware ignores")


@pytest.mark.parametrize("iova, level, bits, structure", [
    (64 * MiB, 3, 1 << 61, "SL-PTE"),  # bit 61: Ignored in every entry
    (0, 2, 1 << 61, "SL-PDE"),  # ... also in a 2 MiB leaf
    (64 * MiB, 2, 0b1111 << 3, "SL-PDE"),  # bits 6:3 of a non-leaf entry: Ignored
    (64 * MiB, 0, 1 << 3, "SL-PML4E"),
    (64 * MiB, 3, fmt.SL_X, "SL-PTE"),  # X: Ignored (no SLEE in legacy mode)
    (0, 2, fmt.SL_X, "SL-PDE"),  # ... in a 2 MiB leaf
    (64 * MiB, 1, fmt.SL_X, "SL-PDPE"),  # ... and in a non-leaf entry
    (64 * MiB, 3, 1 << 7, "SL-PTE"),  # bit 7 of a 4 KiB leaf: Ignored (PS only in PDPE/PDE)
])
def test_bits_hardware_ignores_are_findings_not_reserved(image: Path, iova: int, level: int, bits: int,
                                                         structure: str) -> None:
    def change(s: Store, io: Iommu) -> None:
        s.image_u64[entry(s, io, iova, level)] |= np.uint64(bits)

    only(corrupt(image, change), f"iommu/dom-1 {structure}", f"bits {bits:#x} set that hardware ignores")


@pytest.mark.parametrize("iova, level, structure", [(64 * MiB, 3, "SL-PTE"), (64 * MiB, 1, "SL-PDPE")])
def test_bit_62_is_a_reserved_bit_finding(image: Path, iova: int, level: int, structure: str) -> None:
    def change(s: Store, io: Iommu) -> None:
        s.image_u64[entry(s, io, iova, level)] |= np.uint64(1 << 62)

    only(corrupt(image, change), f"iommu/dom-1 {structure}", f"reserved bits {1 << 62:#x}")


def test_emt_bits_in_a_leaf_are_not_a_finding(image: Path) -> None:
    def change(s: Store, io: Iommu) -> None:
        s.image_u64[entry(s, io, 64 * MiB, 3)] |= np.uint64(0b1111 << 3)

    assert corrupt(image, change) == []


def test_ps_in_a_pml4e(image: Path) -> None:
    f = corrupt(image, lambda s, io: s.image_u64.__setitem__(entry(s, io, 0, 0),
                                                             s.image_u64[entry(s, io, 0, 0)] | np.uint64(fmt.SL_PS)))
    assert f and f[0].structure == "iommu/dom-1 SL-PML4E" and "reserved" in f[0].problem


def test_a_table_page_shared_by_two_entries(image: Path) -> None:
    def change(s: Store, io: Iommu) -> None:
        pde = entry(s, io, 64 * MiB, 2)
        s.image_u64[pde + 1] = s.image_u64[pde]  # the next PDE points at the same SL-PT

    f = corrupt(image, change)
    assert any("iommu/dom-1 SL-PDE" in x.structure and "another entry also uses" in x.problem for x in f)


def test_a_pointer_back_to_the_pml4_is_not_followed(image: Path) -> None:
    def change(s: Store, io: Iommu) -> None:
        s.image_u64[entry(s, io, 64 * MiB, 2)] = np.uint64(io.domain(1).pml4_phys | 3)

    f = corrupt(image, change)
    only(f, "iommu/dom-1 SL-PDE", "outside the domain's table pool")


def test_a_pointer_into_another_domains_tables(image: Path) -> None:
    def change(s: Store, io: Iommu) -> None:
        s.image_u64[entry(s, io, 0, 1)] = np.uint64(io.domain(2).pml4_phys | 3)

    f = corrupt(image, change)
    only(f, "iommu/dom-1 SL-PDPE", "outside the domain's table pool")


def test_a_leaf_into_metadata(image: Path) -> None:
    f = corrupt(image, lambda s, io: s.image_u64.__setitem__(entry(s, io, 64 * MiB, 3),
                                                             np.uint64(s.geometry.base_phys + PS | 1)))
    only(f, "iommu/dom-1 leaf", "not all guest RAM")


def test_a_leaf_into_the_root_table(image: Path) -> None:
    f = corrupt(image, lambda s, io: s.image_u64.__setitem__(entry(s, io, 64 * MiB, 3),
                                                             np.uint64(io.root_table_phys | 3)))
    only(f, "iommu/dom-1 leaf", "iommu-root")


def test_a_2m_leaf_running_into_free_pages(image: Path) -> None:
    def change(s: Store, io: Iommu) -> None:
        g = s.lookup(s.lookup(ROOT, b"guest_mem"), b"vm0")
        end = s.extents(g)[-1].phys_addr + 16 * MiB
        s.image_u64[entry(s, io, 0, 2)] = np.uint64((end - 2 * MiB + 2 * MiB) | fmt.SL_PS | 3)

    f = corrupt(image, change)
    only(f, "iommu/dom-1 leaf", "not all guest RAM")


def test_a_leaf_outside_the_image(image: Path) -> None:
    f = corrupt(image, lambda s, io: s.image_u64.__setitem__(entry(s, io, 64 * MiB, 3), np.uint64(0x1000 | 3)))
    only(f, "iommu/dom-1 leaf", "outside the image")


def test_stray_bits_in_a_non_present_entry(image: Path) -> None:
    f = corrupt(image, lambda s, io: s.image_u64.__setitem__(entry(s, io, 64 * MiB, 3) + 100, np.uint64(0x1234000)))
    only(f, "iommu/dom-1 SL-PTE", "not present")


def test_an_unknown_compatible_string(image: Path) -> None:
    def change(s: Store, io: Iommu) -> None:
        off = int(io.domain(2)._pages[0]) * PS + fmt.DOMAIN_HEADER_DTYPE.fields["compatible"][1]
        s.image[off : off + 4] = np.frombuffer(b"amd,", np.uint8)

    f = corrupt(image, change)
    only(f, "iommu/dom-2 header.compatible", "unknown format")


def test_a_domain_id_that_does_not_match_the_file_name(image: Path) -> None:
    def change(s: Store, io: Iommu) -> None:
        off = int(io.domain(2)._pages[0]) * PS + fmt.DOMAIN_HEADER_DTYPE.fields["domain_id"][1]
        s.image[off] = 9

    only(corrupt(image, change), "iommu/dom-2 header.domain_id", "does not match")


def root_entry(io: Iommu, bus: int) -> int:
    return int(io.root_pages[0]) * 512 + bus * 2


def context(io: Iommu) -> int:
    return int(io.root_pages[1 + BUS]) * 512 + ((DEV << 3) | FN) * 2


def test_reserved_bits_in_a_root_entry(image: Path) -> None:
    f = corrupt(image, lambda s, io: s.image_u64.__setitem__(root_entry(io, BUS) + 1, np.uint64(1)))
    only(f, "root entry 02", "reserved")


def test_a_root_entry_pointing_at_the_wrong_context_table(image: Path) -> None:
    def change(s: Store, io: Iommu) -> None:
        s.image_u64[root_entry(io, BUS)] = np.uint64(s.geometry.phys_addr(int(io.root_pages[1 + BUS + 1])) | 1)

    only(corrupt(image, change), "root entry 02", "is not the bus's context table")


def test_context_entry_with_did_0(image: Path) -> None:
    f = corrupt(image, lambda s, io: s.image_u64.__setitem__(context(io) + 1, np.uint64(fmt.CE_AW_48)))
    only(f, "context entry 02:01.0", "DID 0")


def test_a_did_that_is_no_image_domains_is_not_a_finding(image: Path) -> None:
    # a replacing attach from an ephemeral domain (DID 7, which the image does not name) to
    # dom-1, cut between its two stores: the table pointer switched, the DID not yet; Iommu.open
    # finishes it (tests/iommu/test_attach_replace.py, test_ephemeral.py)
    f = corrupt(image, lambda s, io: s.image_u64.__setitem__(context(io) + 1,
                                                             np.uint64(fmt.CE_AW_48 | (7 << fmt.CE_HI_DID_SHIFT))))
    assert f == []


def test_context_entry_pointing_at_no_domain(image: Path) -> None:
    f = corrupt(image, lambda s, io: s.image_u64.__setitem__(context(io), np.uint64(io.root_table_phys | 1)))
    only(f, "context entry 02:01.0", "not the SL-PML4 of any domain")


@pytest.mark.parametrize("word, bits, words", [(0, 1 << 5, "reserved"), (0, 0b10 << 2, "translation type"),
                                               (1, 0b011, "address width")])
def test_malformed_context_entry(image: Path, word: int, bits: int, words: str) -> None:
    def change(s: Store, io: Iommu) -> None:
        w = context(io) + word
        s.image_u64[w] = (s.image_u64[w] & ~np.uint64(7 if word else 0)) | np.uint64(bits)

    only(corrupt(image, change), "context entry 02:01.0", words)


def test_context_entry_on_a_bus_without_root_entry(image: Path) -> None:
    f = corrupt(image, lambda s, io: s.image_u64.__setitem__(root_entry(io, BUS), np.uint64(0)))
    only(f, "context entry 02:01.0", "unreachable")


def test_a_half_made_domain_is_not_a_finding(image: Path) -> None:
    with Store.open(image) as s:
        ino = s.create(s.lookup(ROOT, b"iommu"), b"dom-7", 0o444, 0, 0, kind=fmt.KIND_IOMMU_DOMAIN)
        s.grow(ino, 4)
    assert check_image(image) == (0, [])


def test_a_domain_file_killed_before_its_pages_were_added_is_not_a_finding(image: Path) -> None:
    with Store.open(image) as s:
        s.create(s.lookup(ROOT, b"iommu"), b"dom-7", 0o444, 0, 0, kind=fmt.KIND_IOMMU_DOMAIN)
    assert check_image(image) == (0, [])


def test_a_domain_file_of_one_page_is_a_finding(image: Path) -> None:
    with Store.open(image) as s:
        ino = s.create(s.lookup(ROOT, b"iommu"), b"dom-7", 0o444, 0, 0, kind=fmt.KIND_IOMMU_DOMAIN)
        s.grow(ino, 1)
    only(check_image(image)[1], "iommu/dom-7", "no room for the header")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(words=st.lists(st.tuples(st.integers(0, 5), st.integers(0, 511), st.integers(0, (1 << 64) - 1)),
                      min_size=1, max_size=40))
def test_garbage_in_any_table_gives_findings_never_an_exception(image: Path, words: list[tuple[int, int, int]]) -> None:
    data = image.read_bytes()
    try:
        with Store.open(image) as s:
            io = Iommu.open(s)
            levels, _ = io.domain(1).walk()
            pages = [int(io.root_pages[0]), int(io.root_pages[1 + BUS])] + [int(lv.tables[0]) for lv in levels]
            io.close()
            for which, idx, value in words:
                s.image_u64[pages[which] * 512 + idx] = np.uint64(value)
        status, findings = check_image(image)
        assert status in (0, 1)
        assert all(isinstance(f, Finding) for f in findings)
    finally:
        image.write_bytes(data)


def test_a_detach_cut_between_its_two_stores_is_not_a_finding(image: Path) -> None:
    # detach clears the lo word (P) first; a kill before the hi word leaves it behind
    f = corrupt(image, lambda s, io: s.image_u64.__setitem__(context(io), np.uint64(0)))
    assert f == []
