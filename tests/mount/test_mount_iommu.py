"""IOMMU domains seen through a real mount: ``iommu/dom-N`` files, ``.pkernfs/iommu``, the status
summary, register files, pins on mapped guest files, and the walker translating while the daemon
serves (and after it was SIGKILLed).

The domains are made with ``backing.iommu`` on the unmounted image (as the daemon's kernel role
would), then the image is mounted.
"""

from __future__ import annotations

import errno
import mmap
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import Mount

from backing import format as fmt
from backing.iommu import Iommu
from backing.store import Store

pytestmark = pytest.mark.mount

MiB = 1 << 20
PS = fmt.PAGE_SIZE


@pytest.fixture
def iommu_image(make_image: Callable[..., Path]) -> Path:
    """vm0 (8 MiB); dom-1 maps it (2 MiB and 4 KiB leaves) for 00:03.0; dom-2 is empty; translation
    enabled in the default register file, IMAGE.regs."""
    path = make_image("128M")
    with Store.open(path) as s:
        g = s.create(s.lookup(fmt.ROOT_INO, b"guest_mem"), b"vm0", 0o644, 0, 0)
        s.truncate(g, 8 * MiB)
        base = s.extents(g)[0].phys_addr
        with Iommu.open(s, str(path) + ".regs") as io:
            d = io.create_domain()
            d.map(0, base, 4 * MiB, write=True)
            d.map(0x10000000, base + 4 * MiB + PS, 3 * PS, write=False)
            d.attach(0, 3, 0)
            io.enable()
            io.create_domain(2)
    return path


def domain_pages(image: Path) -> dict[str, int]:
    with Store.open(image, read_only=True, lock=False) as s:
        iommu = s.lookup(fmt.ROOT_INO, b"iommu")
        return {name.decode(): s.getattr(ino).npages for name, ino in s.children(iommu)}


@pytest.fixture
def iommu_mount(iommu_image: Path, mount_image: Callable[..., Mount]) -> Mount:
    return mount_image(iommu_image)


# ------------------------------------------------------------ domain files


def test_ls_lists_each_domain_with_its_table_memory_as_size(iommu_image: Path, iommu_mount: Mount) -> None:
    pages = domain_pages(iommu_image)
    out = subprocess.run(["ls", "-l", str(iommu_mount.path / "iommu")], capture_output=True, text=True,
                         check=True).stdout
    sizes = {line.split()[-1]: int(line.split()[4]) for line in out.splitlines()[1:]}
    assert sizes == {name: n * PS for name, n in pages.items()}
    assert set(sizes) == {"dom-1", "dom-2", "root-pgtables"}
    assert out.count("-r--r--r--") == 3
    assert os.stat(iommu_mount.path / "iommu" / "dom-1").st_blocks * 512 >= 2 * PS  # header + SL-PML4 at least


def test_domain_file_bytes_are_its_header_and_tables(iommu_mount: Mount) -> None:
    f = iommu_mount.path / "iommu" / "dom-1"
    data = f.read_bytes()
    assert len(data) == os.stat(f).st_size
    assert data[:8] == fmt.DOMAIN_MAGIC and data[8:8 + len(fmt.DOMAIN_COMPATIBLE)] == fmt.DOMAIN_COMPATIBLE
    pml4 = data[PS : 2 * PS]
    assert pml4[:8] != bytes(8) and pml4[8:] == bytes(PS - 8)  # one SL-PML4E: IOVA 0..512 GiB
    assert os.getxattr(f, "user.pkernfs.kind") == b"iommu-domain"


@pytest.mark.parametrize("what", ["open-write", "truncate", "unlink", "rename", "chmod"])
def test_domain_files_are_read_only_to_every_user(iommu_mount: Mount, what: str) -> None:
    f = iommu_mount.path / "iommu" / "dom-1"
    ops = {"open-write": lambda: os.open(f, os.O_WRONLY), "truncate": lambda: os.truncate(f, 0),
           "unlink": lambda: os.unlink(f), "rename": lambda: os.rename(f, f.with_name("dom-9")),
           "chmod": lambda: os.chmod(f, 0o666)}
    with pytest.raises(OSError) as exc:
        ops[what]()
    # root passes the kernel's permission check (mode r--r--r--) and meets the daemon's EPERM;
    # any other user is refused by the kernel first, with EACCES
    allowed = {errno.EPERM} if what != "open-write" or os.geteuid() == 0 else {errno.EPERM, errno.EACCES}
    assert exc.value.errno in allowed
    assert f.exists()


def test_domain_files_cannot_be_mapped_for_writing(iommu_mount: Mount) -> None:
    with open(iommu_mount.path / "iommu" / "dom-1", "rb") as fh, pytest.raises(OSError) as exc:
        mmap.mmap(fh.fileno(), PS, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    assert exc.value.errno in (errno.EACCES, errno.EPERM, errno.ENODEV)


def test_no_domain_file_can_be_created_through_the_mount(iommu_mount: Mount) -> None:
    with pytest.raises(OSError) as exc:
        (iommu_mount.path / "iommu" / "dom-5").write_bytes(b"x")
    assert exc.value.errno == errno.EPERM


# ------------------------------------------------------------ views


def test_pkernfs_iommu_view_lists_requesters_and_mappings(iommu_mount: Mount) -> None:
    text = subprocess.run(["cat", str(iommu_mount.path / ".pkernfs" / "iommu")], capture_output=True,
                          text=True, check=True).stdout  # as a user's tool reads it
    assert "translation enabled" in text
    assert "iommu/dom-1: DID 1, compatible intel,vtd-legacy-sl4-v1" in text and "attached 00:03.0" in text
    assert "iommu/dom-2: DID 2" in text and "attached none" in text
    lines = [line.strip() for line in text.splitlines() if " -> " in line]
    assert len(lines) == 2
    assert lines[0].startswith("0x000000000000-0x0000003fffff -> ") and lines[0].endswith(" rw guest_mem/vm0+0x0")
    assert lines[1].startswith("0x000010000000-0x000010002fff -> ") and lines[1].endswith(" r- guest_mem/vm0+0x401000")


def test_status_summarises_the_iommu_and_names_its_register_file(iommu_image: Path, iommu_mount: Mount) -> None:
    status = (iommu_mount.path / ".pkernfs" / "status").read_text()
    assert "2 domains, 1 requesters attached" in status
    assert str(iommu_image) + ".regs" in status


# ------------------------------------------------------------ register files


def test_regs_option_chooses_the_register_file(iommu_image: Path, tmp_path: Path,
                                               mount_image: Callable[..., Mount]) -> None:
    """``--regs FILE``: a new register block there (reset: translation off); the domains are the image's."""
    regs = tmp_path / "vtd.regs"
    m = mount_image(iommu_image, "--regs", str(regs))
    assert regs.exists()
    status = (m.path / ".pkernfs" / "status").read_text()
    assert str(regs) in status and "2 domains, 1 requesters attached" in status
    assert "translation disabled" in (m.path / ".pkernfs" / "iommu").read_text()


def test_default_register_file_sits_next_to_the_image(make_image: Callable[..., Path],
                                                      mount_image: Callable[..., Mount]) -> None:
    fresh = make_image(name="fresh.img")
    m = mount_image(fresh)
    assert Path(str(fresh) + ".regs").exists()
    assert "translation disabled" in (m.path / ".pkernfs" / "iommu").read_text()


# ------------------------------------------------------------ pins, restart


def test_a_mapped_guest_file_cannot_be_shrunk_or_removed(iommu_mount: Mount) -> None:
    vm0 = iommu_mount.path / "guest_mem" / "vm0"
    for fn in (lambda: os.truncate(vm0, MiB), lambda: os.unlink(vm0)):
        with pytest.raises(OSError) as exc:
            fn()
        assert exc.value.errno == errno.EBUSY
    os.truncate(vm0, 16 * MiB)  # growing moves nothing: allowed
    assert vm0.stat().st_size == 16 * MiB


def test_the_walker_translates_while_mounted_and_after_a_kill(iommu_image: Path, iommu_mount: Mount) -> None:
    """The restart: tables and registers stay where they are; the view (mappings included) and the
    pins come back with the domains."""
    def translate() -> str:
        r = subprocess.run([sys.executable, "-m", "pkfuse", "iommu", "translate", str(iommu_image), "00:03.0",
                            "0x1234", "0x10001008"], capture_output=True, text=True, timeout=60, check=False)
        assert r.returncode == 0, r.stderr
        return r.stdout

    before, view = translate(), (iommu_mount.path / ".pkernfs" / "iommu").read_text()
    assert [line for line in view.splitlines() if "->" in line]
    iommu_mount.kill()
    assert translate() == before
    iommu_mount.start()
    assert (iommu_mount.path / ".pkernfs" / "iommu").read_text() == view
    with pytest.raises(OSError) as exc:
        os.truncate(iommu_mount.path / "guest_mem" / "vm0", 0)
    assert exc.value.errno == errno.EBUSY


# ------------------------------------------------------------ state that does not load


def _break_domain_header(image: Path) -> None:
    """Overwrite dom-1's compatible string: tables of a format this build does not know."""
    with Store.open(image) as s:
        ino = s.lookup(s.lookup(fmt.ROOT_INO, b"iommu"), b"dom-1")
        header = s.extents(ino)[0].page * PS
        off = header + fmt.DOMAIN_HEADER_DTYPE.fields["compatible"][1]
        s.image[off : off + 32] = np.frombuffer(b"intel,vtd-scalable-v9".ljust(32, b"\0"), np.uint8)


def test_mount_refuses_read_write_when_iommu_state_does_not_load(iommu_image: Path, tmp_path: Path) -> None:
    _break_domain_header(iommu_image)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = subprocess.run([sys.executable, "-m", "pkfuse", "mount", str(iommu_image), str(mnt)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 6, r.stderr
    assert "IOMMU state" in r.stderr and "--read-only" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert not os.path.ismount(mnt)


def test_read_only_mount_serves_files_when_iommu_state_does_not_load(
        iommu_image: Path, mount_image: Callable[..., Mount]) -> None:
    _break_domain_header(iommu_image)
    m = mount_image(iommu_image, "--read-only")
    m.expected_errors = ("IOMMU state not loaded",)
    assert (m.path / "guest_mem" / "vm0").stat().st_size == 8 * MiB
    status = (m.path / ".pkernfs" / "status").read_text()
    assert any(ln.split() == ["iommu:", "not", "loaded"] for ln in status.splitlines())
    assert "intel,vtd-scalable-v9" in m.log_text()
