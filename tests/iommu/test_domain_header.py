"""One rule for a domain file's name, size and header (``backing.domainhdr``): ``Iommu.open`` and
fsck judge every domain file alike -- the one refuses exactly what the other reports."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from backing import format as fmt
from backing.domainhdr import MAX_DOMAIN_ID, domain_file_name, domain_id_of_name
from backing.errors import FormatError
from backing.fsck import check_image
from backing.iommu import Iommu
from backing.mkfs import mkfs
from backing.store import Store

MiB = 1 << 20
ROOT = fmt.ROOT_INO


def rename_in_image(s: Store, ino: int, name: bytes) -> None:
    """Change a dentry's name behind the store's back (what corruption or an old tool does)."""
    s.dentries["name"][ino] = name
    s.dentries["name_len"][ino] = len(name)


def domain_file(s: Store, name: bytes, npages: int) -> int:
    ino = s.create(s.lookup(ROOT, b"iommu"), name, 0o444, 0, 0, kind=fmt.KIND_IOMMU_DOMAIN)
    if npages:
        s.grow(ino, npages)
    return ino


def valid_domain_renamed(name: bytes) -> Callable[[Store, Iommu], None]:
    def make(s: Store, io: Iommu) -> None:
        rename_in_image(s, io.create_domain(1).ino, name)
    return make


def header_did(did: int, name: bytes = b"dom-1") -> Callable[[Store, Iommu], None]:
    """dom-1 with ``did`` written into its header, renamed to ``name``."""
    def make(s: Store, io: Iommu) -> None:
        d = io.create_domain(1)
        off = int(d._pages[0]) * fmt.PAGE_SIZE + fmt.DOMAIN_HEADER_DTYPE.fields["domain_id"][1]
        s.image[off : off + 2] = np.frombuffer(np.uint16(did).tobytes(), np.uint8)
        rename_in_image(s, d.ino, name)
    return make


CASES: dict[str, tuple[Callable[[Store, Iommu], None], bool]] = {
    # (what makes the image, valid?)
    "the largest DID": (lambda s, io: io.create_domain(MAX_DOMAIN_ID) and None, True),
    "DID 0": (header_did(0, b"dom-0"), False),
    # judged differently before: Iommu.open removed a one-page file as half-made, fsck reported it
    "a domain file of one page": (lambda s, io: domain_file(s, b"dom-7", 1) and None, False),
    # judged differently before: Iommu.open removed it (no pages), fsck reported the name
    "an empty file with a bad name": (lambda s, io: domain_file(s, b"dox-7", 0) and None, False),
    # accepted by both before: a second spelling of DID 1 (dom-1 could sit beside it)
    "a leading zero": (valid_domain_renamed(b"dom-01"), False),
    "a trailing newline": (valid_domain_renamed(b"dom-1\n"), False),
    "a DID beyond 16 bits in the name": (valid_domain_renamed(b"dom-65537"), False),
    "a header DID that is not the name's": (header_did(2), False),
    "a half-made file (header never written)": (lambda s, io: domain_file(s, b"dom-7", 66) and None, True),
    "a half-made file (no pages yet)": (lambda s, io: domain_file(s, b"dom-7", 0) and None, True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_iommu_open_refuses_exactly_what_fsck_reports(tmp_path: Path, case: str) -> None:
    make, valid = CASES[case]
    image = tmp_path / "pk.img"
    mkfs(image, 64 * MiB)
    with Store.open(image) as s, Iommu.open(s) as io:
        make(s, io)
    status, findings = check_image(image)
    fsck_accepts = not any(f.structure.startswith("iommu/") for f in findings)
    assert status == (0 if fsck_accepts else 1), findings
    with Store.open(image) as s:
        try:
            Iommu.open(s).close()
            iommu_accepts = True
        except FormatError:
            iommu_accepts = False
    assert (fsck_accepts, iommu_accepts) == (valid, valid), findings


def test_the_name_rule_is_the_inverse_of_the_names_create_domain_writes() -> None:
    for did in (1, 9, 10, 4096, MAX_DOMAIN_ID):
        assert domain_id_of_name(domain_file_name(did)) == did
    for name in (b"dom-0", b"dom-01", b"dom-1\n", b"dom-", b"dom-x", b"dom-+1", b"dom-65536", b"dom-1 ",
                 b"Dom-1", b"root-pgtables", b"dom-" + b"9" * 200):
        assert domain_id_of_name(name) is None, name
