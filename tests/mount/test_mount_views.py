"""The inspection plane: ``.pkernfs/`` views, ``user.pkernfs.*`` xattrs, IOMMU files."""

from __future__ import annotations

import errno
import mmap
import os
import subprocess
from pathlib import Path

import pytest

from backing import format as fmt
from conftest import Mount

pytestmark = pytest.mark.mount

MiB = 1 << 20


def status(mounted: Mount) -> dict[str, str]:
    text = subprocess.run(["cat", str(mounted.path / ".pkernfs" / "status")], capture_output=True,
                          text=True, check=True).stdout
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in text.splitlines())}


def memmap(mounted: Mount) -> list[tuple[int, int, int, str]]:
    """``(first, last, pages, owner)`` rows of .pkernfs/memmap."""
    rows = []
    for line in (mounted.path / ".pkernfs" / "memmap").read_text().splitlines():
        if line.startswith("#"):
            continue
        rng, pages, owner = line.split(None, 2)
        a, b = rng.split("-")
        rows.append((int(a, 16), int(b, 16), int(pages), owner))
    return rows


def getfattr_dump(path: Path) -> dict[str, str]:
    out = subprocess.run(["getfattr", "-d", "--absolute-names", str(path)], capture_output=True, text=True,
                         check=True).stdout
    attrs = {}
    for line in out.splitlines():
        if "=" in line and not line.startswith("#"):
            k, _, v = line.partition("=")
            attrs[k] = v.strip('"').replace("\\012", "\n")
    return attrs


# ------------------------------------------------------------- status


def test_status_names_the_image_and_the_daemon(mounted: Mount) -> None:
    s = status(mounted)
    assert s["image"] == str(mounted.image)
    assert int(s["daemon_pid"]) == mounted.pid
    assert s["base_phys"] == hex(fmt.DEFAULT_BASE_PHYS)
    assert s["journal_replayed_at_open"] == "no"
    assert len(s["uuid"]) == 32


def test_status_pages_agree_with_statfs(mounted: Mount) -> None:
    subprocess.run(["truncate", "-s", "10M", str(mounted.path / "guest_mem" / "vm0")], check=True)
    s = status(mounted)
    v = os.statvfs(mounted.path)
    assert int(s["pages_total"]) == v.f_blocks and int(s["pages_free"]) == v.f_bfree
    assert int(s["pages_guest_ram"]) == 10 * MiB // 4096


def test_views_are_read_only(mounted: Mount) -> None:
    v = mounted.path / ".pkernfs"
    with pytest.raises(OSError) as exc:
        open(v / "status", "w").close()
    assert exc.value.errno == errno.EACCES
    for fn, args in ((os.unlink, (v / "status",)), (os.mkdir, (v / "x",)), (os.chmod, (v / "memmap", 0o666)),
                     (os.rmdir, (v,))):
        with pytest.raises(OSError) as exc:
            fn(*args)
        assert exc.value.errno in (errno.EPERM, errno.EACCES), fn


def test_pkernfs_lists_its_views(mounted: Mount) -> None:
    assert sorted(os.listdir(mounted.path / ".pkernfs")) == ["info", "iommu", "memmap", "status"]


# ------------------------------------------------------------- memmap


def test_memmap_covers_every_page_once_in_order(mounted: Mount) -> None:
    subprocess.run(["truncate", "-s", "6M", str(mounted.path / "guest_mem" / "a")], check=True)
    subprocess.run(["truncate", "-s", "3M", str(mounted.path / "guest_mem" / "b")], check=True)
    rows = memmap(mounted)
    assert rows[0][0] == fmt.DEFAULT_BASE_PHYS and rows[0][3] == "superblock"
    for (a0, b0, _, _), (a1, _, _, _) in zip(rows, rows[1:]):
        assert a1 == b0 + 1
    assert rows[-1][1] == fmt.DEFAULT_BASE_PHYS + 256 * MiB - 1
    for a, b, n, _ in rows:
        assert (b + 1 - a) == n * 4096
    assert sum(n for *_, n, o in rows if o == "free") == os.statvfs(mounted.path).f_bfree


def test_memmap_names_files_by_path_and_agrees_with_their_extents(mounted: Mount) -> None:
    f = mounted.path / "guest_mem" / "vm0"
    subprocess.run(["truncate", "-s", "8M", str(f)], check=True)
    rows = [r for r in memmap(mounted) if r[3].startswith("/guest_mem/vm0 ")]
    lines = getfattr_dump(f)["user.pkernfs.extents"].split("\n")
    exts = [tuple(int(x, 16) for x in line.split()) for line in lines if line]
    assert [(a, n * 4096) for a, _, n, _ in rows] == [(phys, length) for _, phys, length in exts]
    assert rows[0][3] == "/guest_mem/vm0 +0x0"


def test_memmap_shows_metadata_regions_by_name(mounted: Mount) -> None:
    owners = [r[3] for r in memmap(mounted)]
    for name in ("superblock", "journal", "allocation bitmap", "inode table", "dentry table", "extent table"):
        assert name in owners


# ------------------------------------------------------------- xattrs


def test_getfattr_dump_shows_the_physical_layout(mounted: Mount) -> None:
    f = mounted.path / "guest_mem" / "vm0"
    subprocess.run(["truncate", "-s", "4M", str(f)], check=True)
    attrs = getfattr_dump(f)
    assert attrs["user.pkernfs.page_size"] == "4096"
    assert attrs["user.pkernfs.kind"] == "guest-ram"
    assert int(attrs["user.pkernfs.total"], 16) == 4 * MiB
    (line,) = attrs["user.pkernfs.extents"].strip().split("\n")
    off, phys, length = (int(x, 16) for x in line.split())
    assert (off, length) == (0, 4 * MiB)
    assert phys % fmt.HUGE_PAGE == 0  # 2 MiB aligned when the pool allows
    assert phys >= fmt.DEFAULT_BASE_PHYS


def test_total_matches_stat_blocks(mounted: Mount) -> None:
    f = mounted.path / "guest_mem" / "odd"
    f.write_bytes(b"x" * 10000)
    total = int(os.getxattr(f, "user.pkernfs.total"), 16)
    assert total == os.stat(f).st_blocks * 512 == 3 * 4096


def test_an_empty_file_has_no_extents(mounted: Mount) -> None:
    f = mounted.path / "guest_mem" / "empty"
    f.write_bytes(b"")
    assert os.getxattr(f, "user.pkernfs.extents") == b""


def test_listxattr_names(mounted: Mount) -> None:
    f = mounted.path / "guest_mem" / "vm0"
    f.write_bytes(b"")
    assert sorted(os.listxattr(f)) == ["user.pkernfs.extents", "user.pkernfs.kind",
                                       "user.pkernfs.page_size", "user.pkernfs.total"]
    assert os.listxattr(mounted.path / "guest_mem") == ["user.pkernfs.kind"]


def test_unknown_xattr_is_enodata(mounted: Mount) -> None:
    with pytest.raises(OSError) as exc:
        os.getxattr(mounted.path / "guest_mem", "user.nothing")
    assert exc.value.errno == errno.ENODATA


# ------------------------------------------------------- IOMMU files


def test_root_pgtables_is_read_only_to_everyone(mounted: Mount) -> None:
    f = mounted.path / "iommu" / "root-pgtables"
    for flags in (os.O_WRONLY, os.O_RDWR):
        with pytest.raises(OSError) as exc:
            os.open(f, flags)
        assert exc.value.errno in (errno.EPERM, errno.EACCES)  # root: EPERM from the daemon
    for fn, args in ((os.truncate, (f, 0)), (os.chmod, (f, 0o666)), (os.chown, (f, 1, 1)),
                     (os.utime, (f, (1, 1))), (os.unlink, (f,)), (os.rename, (f, f.with_name("x")))):
        with pytest.raises(OSError) as exc:
            fn(*args)
        assert exc.value.errno == errno.EPERM, fn


def test_root_pgtables_open_for_write_is_eperm_even_for_root(mounted: Mount) -> None:
    if os.getuid() != 0:
        pytest.skip("needs root: for others default_permissions answers EACCES first")
    with pytest.raises(OSError) as exc:
        os.open(mounted.path / "iommu" / "root-pgtables", os.O_WRONLY)
    assert exc.value.errno == errno.EPERM


def test_root_pgtables_reads_its_table_bytes(mounted: Mount) -> None:
    f = mounted.path / "iommu" / "root-pgtables"
    data = f.read_bytes()
    assert len(data) == fmt.ROOT_PGTABLES_PAGES * 4096 == os.stat(f).st_size
    ((_, phys, length),) = [tuple(int(x, 16) for x in line.split())
                            for line in os.getxattr(f, "user.pkernfs.extents").decode().splitlines()]
    with open(mounted.image, "rb") as img:
        img.seek(phys - fmt.DEFAULT_BASE_PHYS)
        assert img.read(length) == data
    assert os.getxattr(f, "user.pkernfs.kind") == b"iommu-root"


def test_root_pgtables_cannot_be_mapped_for_writing(mounted: Mount) -> None:
    with open(mounted.path / "iommu" / "root-pgtables", "rb") as fh:
        with pytest.raises(OSError) as exc:
            mmap.mmap(fh.fileno(), 4096, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    assert exc.value.errno in (errno.EACCES, errno.ENODEV, errno.EPERM)
