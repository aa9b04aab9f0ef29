"""mkfs: the empty image's geometry and tree, refusals, the size/address parsers; FORMAT.md mirrors format.py."""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path

import numpy as np
import pytest

from backing import ephemeral
from backing import format as fmt
from backing.errors import StoreError
from backing.mkfs import mkfs, parse_addr, parse_size
from backing.store import Store

MiB = 1 << 20
GiB = 1 << 30


def test_geometry_regions_are_in_order_and_data_page_is_2mib_aligned(tmp_path: Path) -> None:
    g = mkfs(tmp_path / "i", 64 * MiB)
    assert 0 < g.journal_page < g.bitmap_page < g.inode_page < g.dentry_page < g.extent_page < g.data_page
    assert g.data_page % fmt.PAGES_PER_HUGE == 0
    assert g.npages == 64 * MiB // fmt.PAGE_SIZE


def test_default_base_is_4gib(tmp_path: Path) -> None:
    path = tmp_path / "i"
    mkfs(path, 16 * MiB)
    with Store.open(path, read_only=True) as s:
        assert s.geometry.base_phys == 4 * GiB
        ext = s.extents(s.lookup(s.lookup(fmt.ROOT_INO, b"iommu"), b"root-pgtables"))
        assert ext[0].phys_addr == 4 * GiB + s.geometry.data_page * fmt.PAGE_SIZE


def test_chosen_base_is_recorded(tmp_path: Path) -> None:
    path = tmp_path / "i"
    mkfs(path, 16 * MiB, base_phys=64 * GiB)
    with Store.open(path, read_only=True) as s:
        assert s.geometry.base_phys == 64 * GiB


def test_unaligned_base_is_einval(tmp_path: Path) -> None:
    with pytest.raises(StoreError) as e:
        mkfs(tmp_path / "i", 16 * MiB, base_phys=4 * GiB + 4096)
    assert e.value.errno == errno.EINVAL


def test_negative_base_is_einval(tmp_path: Path) -> None:
    with pytest.raises(StoreError) as e:
        mkfs(tmp_path / "i", 16 * MiB, base_phys=-2 * MiB)
    assert e.value.errno == errno.EINVAL


@pytest.mark.parametrize("size", [4 * MiB, 16 * MiB + 1])
def test_bad_size_is_einval(tmp_path: Path, size: int) -> None:
    with pytest.raises(StoreError) as e:
        mkfs(tmp_path / "i", size)
    assert e.value.errno == errno.EINVAL


def test_fresh_image_holds_the_fixed_tree(tmp_path: Path) -> None:
    path = tmp_path / "i"
    mkfs(path, 16 * MiB)
    with Store.open(path, read_only=True) as s:
        assert [n for n, _ in s.children(fmt.ROOT_INO)] == [b"guest_mem", b"iommu"]
        iommu = s.lookup(fmt.ROOT_INO, b"iommu")
        rp = s.getattr(s.lookup(iommu, b"root-pgtables"))
        assert rp.npages == fmt.ROOT_PGTABLES_PAGES and rp.kind == fmt.KIND_IOMMU_ROOT
        assert s.children(s.lookup(fmt.ROOT_INO, b"guest_mem")) == []


def test_refuses_non_empty_file_without_force(tmp_path: Path) -> None:
    path = tmp_path / "i"
    path.write_bytes(b"precious")
    with pytest.raises(StoreError) as e:
        mkfs(path, 16 * MiB)
    assert e.value.errno == errno.EEXIST
    assert path.read_bytes() == b"precious"


def test_force_overwrites_an_image(tmp_path: Path) -> None:
    path = tmp_path / "i"
    mkfs(path, 16 * MiB)
    with Store.open(path) as s:
        s.create(s.lookup(fmt.ROOT_INO, b"guest_mem"), b"vm0", 0o600, 0, 0)
    mkfs(path, 32 * MiB, force=True)
    with Store.open(path, read_only=True) as s:
        assert s.geometry.npages == 32 * MiB // fmt.PAGE_SIZE
        assert s.children(s.lookup(fmt.ROOT_INO, b"guest_mem")) == []


def test_refuses_an_image_in_use_even_with_force(tmp_path: Path) -> None:
    path = tmp_path / "i"
    mkfs(path, 16 * MiB)
    with Store.open(path) as s:
        ino = s.create(s.lookup(fmt.ROOT_INO, b"guest_mem"), b"vm0", 0o600, 0, 0)
        s.write(ino, 0, b"live")
        with pytest.raises(StoreError) as e:
            mkfs(path, 16 * MiB, force=True)
        assert e.value.errno == errno.EBUSY
        assert s.read(ino, 0, 4) == b"live"


def test_empty_existing_file_is_used(tmp_path: Path) -> None:
    path = tmp_path / "i"
    path.touch()
    mkfs(path, 16 * MiB)
    assert path.stat().st_size == 16 * MiB


def test_image_file_is_sparse(tmp_path: Path) -> None:
    path = tmp_path / "i"
    mkfs(path, 1 * GiB)
    st = os.stat(path)
    assert st.st_size == 1 * GiB
    assert st.st_blocks * 512 < 16 * MiB


def test_works_on_dev_shm() -> None:
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm on this machine")
    path = Path(f"/dev/shm/pkfuse-test-mkfs-{os.getpid()}")
    try:
        mkfs(path, 16 * MiB)
        with Store.open(path) as s:
            gm = s.lookup(fmt.ROOT_INO, b"guest_mem")
            ino = s.create(gm, b"vm0", 0o600, 0, 0)
            s.write(ino, 0, b"hello")
        with Store.open(path, read_only=True) as s:
            assert s.read(s.lookup(s.lookup(fmt.ROOT_INO, b"guest_mem"), b"vm0"), 0, 5) == b"hello"
    finally:
        path.unlink(missing_ok=True)


def test_bitmap_marks_metadata_and_root_pgtables_only(tmp_path: Path) -> None:
    path = tmp_path / "i"
    g = mkfs(path, 16 * MiB)
    raw = np.fromfile(path, np.uint8)
    bits = np.unpackbits(raw[g.bitmap_page * fmt.PAGE_SIZE :][: g.bitmap_bytes], bitorder="little")
    want = np.zeros(g.bitmap_bytes * 8, np.uint8)
    want[: g.data_page + fmt.ROOT_PGTABLES_PAGES] = 1
    assert np.array_equal(bits, want)


@pytest.mark.parametrize(
    "text,value",
    [("4096", 4096), ("16G", 16 * GiB), ("512M", 512 * MiB), ("64KiB", 64 << 10), ("2t", 2 << 40),
     ("1GB", GiB), (" 8M ", 8 * MiB)],
)
def test_parse_size_accepts_binary_units(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "G", "1.5G", "-1", "16X", "16 G B", "0x10", "16iB"])
def test_parse_size_rejects_garbage(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


@pytest.mark.parametrize("text,value", [("0x100000000", 4 * GiB), ("4294967296", 4 * GiB), ("4G", 4 * GiB)])
def test_parse_addr_accepts_hex_decimal_and_units(text: str, value: int) -> None:
    assert parse_addr(text) == value


@pytest.mark.parametrize("text", ["", "0x", "0xzz", "-4096", "-0x200000", "four"])
def test_parse_addr_rejects_garbage(text: str) -> None:
    with pytest.raises(ValueError):
        parse_addr(text)


# ------------------------------------------------------- FORMAT.md mirrors format.py

FORMAT_MD = Path(fmt.__file__).with_name("FORMAT.md")
#: where FORMAT.md's dtypes and constants are defined: the image's specification, and the
#: ephemeral memory file's header (not part of the image, so not in format.py)
SPEC_MODULES = (fmt, ephemeral)


def documented_field_tables(text: str) -> dict[str, list[tuple[int, int, str]]]:
    """(offset, size, field) rows of each ``| offset | size | field |`` table in FORMAT.md, keyed by
    the last ``*_DTYPE`` named before the table."""
    tables: dict[str, list[tuple[int, int, str]]] = {}
    dtype, rows = "", None
    for line in text.splitlines():
        if line.startswith("| offset | size | field |"):
            rows = tables.setdefault(dtype, [])
        elif rows is not None and line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if not cells[0].startswith("---"):
                size = 1
                for factor in cells[1].split("×"):
                    size *= int(factor)
                rows.append((int(cells[0]), size, cells[2]))
        else:
            rows = None
            names = [w for w in line.replace("`", " ").replace(",", " ").split() if w.endswith("_DTYPE")]
            dtype = names[-1] if names else dtype
    return tables


def test_format_md_field_tables_match_every_dtype() -> None:
    tables = documented_field_tables(FORMAT_MD.read_text())
    dtypes = {name: getattr(m, name) for m in SPEC_MODULES for name in dir(m) if name.endswith("_DTYPE")}
    assert tables.keys() == dtypes.keys()
    for name, dtype in dtypes.items():
        want = [(off, ft.itemsize, field) for field, (ft, off) in dtype.fields.items()]
        assert tables[name] == want, name


def test_format_md_constants_have_format_py_values() -> None:
    stated = re.findall(r"`([A-Z][A-Z0-9_]+) = (0x[0-9A-Fa-f_]+|\d+)`", FORMAT_MD.read_text())
    assert len(stated) >= 8  # the VT-d masks and ADDR_MASK
    for name, value in stated:
        (module,) = [m for m in SPEC_MODULES if hasattr(m, name)]
        assert getattr(module, name) == int(value, 0), name
