"""The IOMMU through the mount: domain files, the iommu view, pinned guest files.

The domain is made with ``backing.iommu`` on the unmounted image (as the
daemon's kernel role would), then the image is mounted with ``--regs``.
"""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest

from backing import format as fmt
from backing.store import Store
from conftest import Mount

iommu = pytest.importorskip("backing.iommu")
pytestmark = pytest.mark.mount

MiB = 1 << 20


@pytest.fixture
def iommu_mount(image: Path, tmp_path: Path, mount_image) -> Mount:
    """``guest_mem/vm0`` (4 MiB) mapped at IOVA 0 by ``iommu/dom-1``, attached to 00:03.0."""
    regs = tmp_path / "vtd.regs"
    with Store.open(image) as store:
        guest = store.lookup(fmt.ROOT_INO, fmt.GUEST_DIR_NAME)
        ino = store.create(guest, b"vm0", 0o644, 0, 0)
        store.truncate(ino, 4 * MiB)
        (ext,) = store.extents(ino)
        io = iommu.Iommu.open(store, str(regs))
        try:
            dom = io.create_domain()
            dom.map(0, ext.phys_addr, 4 * MiB, write=True)
            dom.attach(0, 3, 0)
        finally:
            io.close()
    return mount_image(image, "--regs", str(regs))


def test_domain_file_is_listed_with_its_table_memory(iommu_mount: Mount) -> None:
    d = iommu_mount.path / "iommu"
    assert sorted(os.listdir(d)) == ["dom-1", "root-pgtables"]
    st = os.stat(d / "dom-1")
    assert st.st_size > 0 and st.st_blocks * 512 >= 2 * 4096  # header page + SL-PML4 at least
    assert os.getxattr(d / "dom-1", "user.pkernfs.kind") == b"iommu-domain"


def test_domain_file_is_read_only_to_everyone(iommu_mount: Mount) -> None:
    f = iommu_mount.path / "iommu" / "dom-1"
    for call, args in ((os.open, (f, os.O_WRONLY)), (os.truncate, (f, 0)), (os.unlink, (f,)),
                       (os.chmod, (f, 0o666))):
        with pytest.raises(OSError) as exc:
            call(*args)
        assert exc.value.errno == errno.EPERM, call
    assert len(f.read_bytes()) == os.stat(f).st_size


def test_iommu_view_lists_the_mapping_and_the_requester(iommu_mount: Mount) -> None:
    text = subprocess.run(["cat", str(iommu_mount.path / ".pkernfs" / "iommu")], capture_output=True,
                          text=True, check=True).stdout
    assert "iommu/dom-1" in text and "00:03.0" in text
    mapping = next(line for line in text.splitlines() if "->" in line)
    assert "rw" in mapping and "guest_mem/vm0+0x0" in mapping


def test_status_summarises_the_iommu(iommu_mount: Mount) -> None:
    status = (iommu_mount.path / ".pkernfs" / "status").read_text()
    assert "1 domains, 1 requesters attached" in status
    assert str(iommu_mount.extra[1]) in status  # the register file in use


def test_a_mapped_guest_file_cannot_be_shrunk_or_removed(iommu_mount: Mount) -> None:
    f = iommu_mount.path / "guest_mem" / "vm0"
    with pytest.raises(OSError) as exc:
        os.truncate(f, MiB)
    assert exc.value.errno == errno.EBUSY
    with pytest.raises(OSError) as exc:
        os.unlink(f)
    assert exc.value.errno == errno.EBUSY
    os.truncate(f, 8 * MiB)  # growing is fine: mapped pages do not move
    assert os.stat(f).st_size == 8 * MiB


def test_iommu_state_survives_a_restart(iommu_mount: Mount) -> None:
    before = (iommu_mount.path / ".pkernfs" / "iommu").read_text()
    iommu_mount.restart()
    after = (iommu_mount.path / ".pkernfs" / "iommu").read_text()
    mappings = [x for x in before.splitlines() if "->" in x]
    assert mappings and [x for x in after.splitlines() if "->" in x] == mappings


def test_default_register_file_sits_next_to_the_image(mounted: Mount) -> None:
    assert Path(str(mounted.image) + ".regs").exists()
    assert "translation disabled" in (mounted.path / ".pkernfs" / "iommu").read_text()
