"""Every VT-d entry format, bit by bit, against the specification's layout (VT-d rev 4, ch. 9).

The expected values are written out from the spec's field positions, not
from the constants under test, so a wrong constant fails here.
"""

from __future__ import annotations

import numpy as np
import pytest

from backing import format as fmt
from backing import vtd


def bit(n: int) -> int:
    return 1 << n


def bits(hi: int, lo: int) -> int:
    return ((1 << (hi - lo + 1)) - 1) << lo


# ------------------------------------------------------------------ root entry


def test_root_entry_present_is_bit_0_and_ctp_is_bits_63_12() -> None:
    lo, hi = vtd.root_entry(0x1_2345_6000)
    assert lo == 0x1_2345_6000 | bit(0)
    assert hi == 0


def test_root_entry_reserved_bits_are_11_1_and_the_whole_upper_word() -> None:
    assert fmt.RE_LO_RSVD == bits(11, 1)
    assert fmt.RE_HI_RSVD == bits(63, 0)


def test_root_entry_refuses_an_unaligned_context_table_pointer() -> None:
    with pytest.raises(ValueError):
        vtd.root_entry(0x1000_0800)


def test_root_entry_fields_decode_what_was_encoded() -> None:
    f = vtd.root_entry_fields(*vtd.root_entry(0xABC_D000))
    assert f == {"P": 1, "CTP": 0xABC_D000, "rsvd_lo": 0, "rsvd_hi": 0}


def test_root_entry_fields_report_reserved_bits() -> None:
    f = vtd.root_entry_fields(0x1000 | 1 | bit(5), bit(3))
    assert f["rsvd_lo"] == bit(5) and f["rsvd_hi"] == bit(3)


# --------------------------------------------------------------- context entry


def test_context_entry_lo_word_layout() -> None:
    lo, _ = vtd.context_entry(0x2_0000_0000, 7, fpd=True, tt=0b00)
    assert lo & bit(0)  # P
    assert lo & bit(1)  # FPD
    assert lo & bits(3, 2) == 0  # TT = 00: untranslated requests use second-level tables
    assert lo & bits(63, 12) == 0x2_0000_0000  # SLPTPTR
    assert lo & bits(11, 4) == 0  # reserved


def test_context_entry_translation_type_is_bits_3_2() -> None:
    lo, _ = vtd.context_entry(0x1000, 1, tt=fmt.CE_TT_PASSTHROUGH)
    assert (lo >> 2) & 0b11 == 0b10


def test_context_entry_hi_word_holds_aw_in_66_64_and_did_in_87_72() -> None:
    _, hi = vtd.context_entry(0x1000, 0xBEEF)
    assert hi & bits(2, 0) == 0b010  # AW: 48-bit, 4-level
    assert (hi >> 8) & 0xFFFF == 0xBEEF  # DID at bits 87:72 = hi bits 23:8
    assert hi & ~(bits(2, 0) | bits(23, 8)) == 0


def test_context_entry_reserved_bits_exclude_aw_avail_and_did() -> None:
    assert fmt.CE_LO_RSVD == bits(11, 4)
    assert fmt.CE_HI_RSVD == bit(7) | bits(63, 24)  # bits 70:67 available to software


def test_context_entry_fields_round_trip() -> None:
    f = vtd.context_entry_fields(*vtd.context_entry(0x7_7777_7000, 42, fpd=True))
    assert f == {"P": 1, "FPD": 1, "TT": 0, "SLPTPTR": 0x7_7777_7000, "AW": 2, "DID": 42, "rsvd_lo": 0, "rsvd_hi": 0}


def test_context_entry_refuses_a_domain_id_beyond_16_bits() -> None:
    with pytest.raises(ValueError):
        vtd.context_entry(0x1000, 1 << 16)


# ----------------------------------------------------------- second-level paging


def test_sl_permission_and_page_size_bits() -> None:
    assert (fmt.SL_R, fmt.SL_W, fmt.SL_X, fmt.SL_PS, fmt.SL_SNP) == (bit(0), bit(1), bit(2), bit(7), bit(11))


def test_sl_address_masks_cover_51_12_51_21_51_30() -> None:
    assert fmt.SL_ADDR_MASK == bits(51, 12)
    assert fmt.SL_ADDR_MASK_2M == bits(51, 21)
    assert fmt.SL_ADDR_MASK_1G == bits(51, 30)


def test_table_entry_points_with_read_and_write_set() -> None:
    assert vtd.table_entry(0x3_0000_5000) == 0x3_0000_5000 | bit(0) | bit(1)


def test_4k_leaf_has_no_ps_and_read_only_has_no_w() -> None:
    assert vtd.leaf_entry(3, 0x1234_5000, True) == 0x1234_5000 | 0b11
    assert vtd.leaf_entry(3, 0x1234_5000, False) == 0x1234_5000 | 0b01


def test_2m_leaf_sets_ps_and_needs_2m_alignment() -> None:
    assert vtd.leaf_entry(2, 0x4020_0000, True) == 0x4020_0000 | bit(7) | 0b11
    with pytest.raises(ValueError):
        vtd.leaf_entry(2, 0x4020_1000, True)


def test_1g_leaf_sets_ps_and_needs_1g_alignment() -> None:
    assert vtd.leaf_entry(1, 0x1_4000_0000, False) == 0x1_4000_0000 | bit(7) | 0b01
    with pytest.raises(ValueError):
        vtd.leaf_entry(1, 0x1_4020_0000, False)


def test_no_leaf_at_the_pml4() -> None:
    with pytest.raises(ValueError):
        vtd.leaf_entry(0, 0x80_0000_0000, True)


def test_vectorized_leaf_entries_equal_the_scalar_ones() -> None:
    aligned_pfn = {1: 0x140000, 2: 0x100200, 3: 0x100001}
    for level, pfn in aligned_pfn.items():
        got = vtd.leaf_entries(level, np.array([pfn, pfn], np.int64), level != 2)
        assert got.tolist() == [vtd.leaf_entry(level, pfn << 12, level != 2)] * 2


def test_reserved_bits_per_entry_kind() -> None:
    e = np.array
    # PS is reserved in a PML4E; bit 7 is a leaf marker in a PDPE
    assert vtd.reserved_bits(0, e([0x1000 | 3 | bit(7)], np.uint64))[0] == bit(7)
    assert vtd.reserved_bits(1, e([0x4000_0000 | 3 | bit(7)], np.uint64))[0] == 0
    # a 1 GiB leaf must have bits 29:12 clear, a 2 MiB leaf bits 20:12
    assert vtd.reserved_bits(1, e([0x4000_0000 | bit(12) | 3 | bit(7)], np.uint64))[0] == bit(12)
    assert vtd.reserved_bits(2, e([0x20_0000 | bit(20) | 3 | bit(7)], np.uint64))[0] == bit(20)
    # 63, 61:52 and 10 are Ignored by hardware: not reserved, but reported as garbage
    for level, entry in ((3, 0x1000 | 3), (2, 0x1000 | 3), (2, 0x20_0000 | 3 | bit(7)), (0, 0x1000 | 3)):
        for b in (63, 61, 60, 52, 10):
            assert vtd.reserved_bits(level, e([entry | bit(b)], np.uint64))[0] == 0
            assert vtd.ignored_bits(level, e([entry | bit(b)], np.uint64))[0] == bit(b)


#: one entry of each kind: (level, R|W entry without any reserved or ignored bit)
EVERY_KIND = ((0, 0x1000 | 3), (1, 0x1000 | 3), (1, 0x4000_0000 | 3 | bit(7)),
              (2, 0x1000 | 3), (2, 0x20_0000 | 3 | bit(7)), (3, 0x1000 | 3))


def test_bit_62_is_reserved_in_every_entry_kind() -> None:
    e = np.array
    for level, entry in EVERY_KIND:
        assert vtd.reserved_bits(level, e([entry | bit(62)], np.uint64))[0] == bit(62)
        assert vtd.ignored_bits(level, e([entry | bit(62)], np.uint64))[0] == 0


def test_bit_11_is_reserved_in_a_non_leaf_entry() -> None:
    e = np.array
    for level in (0, 1, 2):
        assert vtd.reserved_bits(level, e([0x1000 | 3 | bit(11)], np.uint64))[0] == bit(11)


def test_snp_is_reserved_in_every_leaf_without_snoop_control() -> None:
    # pkfuse's register block reports no ECAP.SC: SNP of a leaf is reserved
    e = np.array
    for level, entry in ((3, 0x1000 | 3), (2, 0x20_0000 | 3 | bit(7)), (1, 0x4000_0000 | 3 | bit(7))):
        assert vtd.reserved_bits(level, e([entry | bit(11)], np.uint64))[0] == bit(11)
        assert vtd.ignored_bits(level, e([entry | bit(11)], np.uint64))[0] == 0


def test_x_is_ignored_not_reserved_in_every_entry_kind() -> None:
    # legacy mode has no extended context entry, so no SLEE: X is Ignored
    e = np.array
    for level, entry in EVERY_KIND:
        assert vtd.reserved_bits(level, e([entry | bit(2)], np.uint64))[0] == 0
        assert vtd.ignored_bits(level, e([entry | bit(2)], np.uint64))[0] == bit(2)


def test_bit_7_of_a_pte_is_ignored_not_reserved() -> None:
    got = np.array([0x1000 | 3 | bit(7)], np.uint64)
    assert vtd.reserved_bits(3, got)[0] == 0
    assert vtd.ignored_bits(3, got)[0] == bit(7)


def test_ps_of_a_superpage_leaf_is_neither_reserved_nor_ignored() -> None:
    e = np.array
    for level, entry in ((2, 0x20_0000 | 3 | bit(7)), (1, 0x4000_0000 | 3 | bit(7))):
        assert vtd.reserved_bits(level, e([entry], np.uint64))[0] == 0
        assert vtd.ignored_bits(level, e([entry], np.uint64))[0] == 0


def test_bits_6_3_are_ignored_in_a_non_leaf_entry_and_emt_ipat_in_a_leaf() -> None:
    e = np.array
    for level in (0, 1, 2):
        got = e([0x1000 | 3 | (0b1111 << 3)], np.uint64)
        assert vtd.reserved_bits(level, got)[0] == 0
        assert vtd.ignored_bits(level, got)[0] == 0b1111 << 3
    for level, entry in ((3, 0x1000 | 3), (2, 0x20_0000 | 3 | bit(7)), (1, 0x4000_0000 | 3 | bit(7))):
        got = e([entry | (0b1111 << 3)], np.uint64)
        assert vtd.reserved_bits(level, got)[0] == 0
        assert vtd.ignored_bits(level, got)[0] == 0  # EMT/IPAT: meaningful, not garbage


def test_iova_levels_are_9_bits_each_from_bit_39_down_to_12() -> None:
    assert fmt.VTD_LEVEL_SHIFT == (39, 30, 21, 12)
    assert vtd.LEVEL_PAGES == (1 << 27, 1 << 18, 1 << 9, 1)


# ------------------------------------------------------------------- domain header


def test_domain_header_layout_and_compatible_string() -> None:
    f = fmt.DOMAIN_HEADER_DTYPE.fields
    assert f["magic"][1] == 0 and f["compatible"][1] == 8
    assert fmt.DOMAIN_COMPATIBLE == b"intel,vtd-legacy-sl4-v1"
    assert len(fmt.DOMAIN_COMPATIBLE) < 32


def test_requester_id_is_bus_dev_fn() -> None:
    assert fmt.requester_id(0x12, 0x1F, 7) == 0x12FF
    assert fmt.requester_id(0, 3, 0) == 0x18


# ------------------------------------------------------- the one entry decoder


def test_entry_pages_reads_bits_51_12_of_every_kind_of_entry_and_nothing_else() -> None:
    base_pfn = 0x100000  # base_phys 4 GiB
    table = 0x1_0020_3000
    entries = np.array([
        vtd.root_entry(table)[0],  # root entry: CTP
        vtd.context_entry(table, 5)[0],  # context entry lo: SLPTPTR
        vtd.table_entry(table),  # SL-PML4E/PDPE/PDE pointer
        vtd.leaf_entry(3, table, True),  # 4 KiB leaf
        vtd.leaf_entry(2, 0x1_0020_0000, False),  # 2 MiB leaf: its first frame
        table | bits(63, 52) | bits(11, 0),  # flags, ignored and reserved bits outside 51:12
    ], dtype=np.uint64)
    pages = vtd.entry_pages(entries, base_pfn)
    assert pages.dtype == np.int64
    assert pages.tolist() == [0x203, 0x203, 0x203, 0x203, 0x200, 0x203]
    assert vtd.entry_pages(entries).tolist() == [x + base_pfn for x in pages.tolist()]  # base 0: the pfn
    assert int(vtd.entry_pages(np.uint64(table | 3), base_pfn)) == 0x203  # one entry (numpy scalar)


def test_entry_pages_of_garbage_below_the_image_is_negative_not_wrapped() -> None:
    below = vtd.entry_pages(np.array([0x5000 | 3], np.uint64), 0x100000)
    assert below.tolist() == [5 - 0x100000]
    assert below.view(np.uint64)[0] >= np.uint64(1 << 40)  # as callers range-check it: outside
