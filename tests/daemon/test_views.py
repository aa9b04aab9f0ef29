"""The text views (``pkfuse.daemon.views``) rendered from a store and its IOMMU, with no mount."""

from __future__ import annotations

from pathlib import Path

from backing import format as fmt
from backing.iommu import Iommu
from backing.regs import default_path
from backing.store import Store
from pkfuse.daemon import views

MiB = 1 << 20


def test_the_iommu_view_lists_registers_domains_requesters_and_mappings(image: Path) -> None:
    with Store.open(image) as s, Iommu.open(s, default_path(image)) as io:
        g = s.create(s.lookup(fmt.ROOT_INO, fmt.GUEST_DIR_NAME), b"vm0", 0o600, 0, 0)
        s.truncate(g, 4 * MiB)
        base = s.extents(g)[0].phys_addr
        d = io.create_domain()
        d.map(0x200000, base + 2 * MiB, 2 * MiB)
        d.map(0, base, 0x2000, write=False)
        d.attach(0, 3, 0)
        copy = io.copy_domain(d)
        io.enable()
        lines = views.render_iommu(io).splitlines()
        assert lines[0] == f"translation enabled, RTADDR {io.root_table_phys:#x}, faults recorded 0"
        assert lines[1] == f"root table {io.root_table_phys:#x} (iommu/root-pgtables)"
        assert lines[2] == (f"iommu/dom-1: DID 1, compatible intel,vtd-legacy-sl4-v1, "
                            f"table pages {d.table_pages} of {d.file_pages}, attached 00:03.0")
        assert lines[3:5] == [
            f"  0x000000000000-0x000000001fff -> {base:#014x}-{base + 0x1fff:#014x} r- guest_mem/vm0+0x0",
            f"  0x000000200000-0x0000003fffff -> {base + 2 * MiB:#014x}-{base + 4 * MiB - 1:#014x} rw "
            "guest_mem/vm0+0x200000"]
        assert lines[5].startswith(f"iommu/dom-{copy.domain_id}: DID {copy.domain_id}, compatible "
                                   "intel,vtd-legacy-sl4-v1 saved, table pages")
        assert lines[5].endswith("attached none") and lines[6:] == lines[3:5]


def test_the_iommu_view_without_registers_or_state_says_so(image: Path) -> None:
    with Store.open(image) as s, Iommu.open(s) as io:
        assert views.render_iommu(io).splitlines() == [f"root table {io.root_table_phys:#x} (iommu/root-pgtables)"]
    assert views.render_iommu(None) == "# IOMMU state not loaded (the daemon's log says why)\n"


def test_the_file_list_shows_each_directory_before_its_entries(image: Path) -> None:
    with Store.open(image) as s:
        gm = s.lookup(fmt.ROOT_INO, fmt.GUEST_DIR_NAME)
        vm = s.mkdir(gm, b"vmA", 0o755, 0, 0)
        ram = s.create(vm, b"ram", 0o600, 0, 0)
        s.truncate(ram, 2 * MiB)
        s.create(gm, b"empty", 0o600, 0, 0)
        (e,) = s.extents(ram)
        assert views.render_files(s).splitlines() == [
            "/guest_mem/", "/guest_mem/vmA/", "/guest_mem/vmA/ram  guest-ram  size 2097152 (2.0 MiB), 512 pages",
            f"    0x0 {e.phys_addr:#x} 0x200000", "/guest_mem/empty  guest-ram  size 0 (0 B), 0 pages",
            "/iommu/", "/iommu/root-pgtables  iommu-root  size 1052672 (1.0 MiB), 257 pages",
            f"    0x0 {s.extents(s.lookup(s.lookup(fmt.ROOT_INO, b'iommu'), b'root-pgtables'))[0].phys_addr:#x} "
            "0x101000"]
