"""The one rule for an IOMMU domain file ``iommu/dom-<DID>``: its name, its size, its header.

``Iommu.open`` (which refuses a domain that breaks the rule) and fsck's
``check_domain_header`` (which reports it) both ask ``check_domain_file``,
so a file one of them accepts the other accepts too. This module reads
only the bytes it is given: it imports nothing of the store, the IOMMU or
fsck, so every layer can use it.

A domain file is valid when

* its name is ``domain_file_name(DID)`` exactly -- decimal, no leading zero --
  with ``1 <= DID <= MAX_DOMAIN_ID``: a second spelling (``dom-01`` beside
  ``dom-1``) would be a second domain with the same DID;
* it holds at least two pages, the header and the SL-PML4;
* its header (file page 0, ``DOMAIN_HEADER_DTYPE``) has ``DOMAIN_MAGIC``,
  ``DOMAIN_COMPATIBLE``, the DID of the name, ``CE_AW_48`` and the SL-PML4 at
  file page 1.

*Half-made* is what a kill inside ``Iommu.create_domain`` leaves: a file
with no pages (killed between the create and the grow, two transactions) or
with pages whose magic is still zero (the magic is the header's last
store). That is no finding, and ``Iommu.open`` removes the file. A file of
one page is no kill's leftover (the grow is one transaction): a problem.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from . import format as fmt
from .errors import Finding

#: largest DID: the context entry's field is 16 bits, and DID 0 is not used
#: (the Linux driver reserves it; a zero DID in an entry is then a clear sign of garbage)
MAX_DOMAIN_ID = 0xFFFF
_NAME = re.compile(rb"dom-([1-9][0-9]*)")  #: fullmatch: no trailing newline, no leading zero


def domain_file_name(domain_id: int) -> bytes:
    """The file name of domain ``domain_id`` under ``iommu/``."""
    return b"dom-%d" % domain_id


def domain_id_of_name(name: bytes) -> int | None:
    """The DID a domain file's name spells, or None unless it is ``domain_file_name`` of a valid DID."""
    m = _NAME.fullmatch(name)
    if m is None:
        return None
    did = int(m.group(1))
    return did if did <= MAX_DOMAIN_ID else None


@dataclasses.dataclass(frozen=True)
class DomainFile:
    """``check_domain_file``'s verdict on one domain file."""

    domain_id: int | None  #: the DID when the file is a valid domain, else None
    flags: int  #: header flags (DOMF_*) of a valid domain
    half_made: str  #: why the file is a killed create's leftover ("" if it is not)
    problems: tuple[Finding, ...]  #: what breaks the rule (empty for valid and half-made files)


def check_domain_file(image: np.ndarray, geometry: fmt.Geometry, ino: int, name: bytes,
                      pages: np.ndarray) -> DomainFile:
    """Judge the domain file ``ino`` named ``name`` whose file pages are image ``pages``.

    ``image`` is the whole image (uint8), ``pages`` the image page of each
    file page in file order (int64; every one inside the image). Findings
    name ``iommu/<name>`` and the byte offset of the field that is wrong:
    the dentry's name, the inode's npages or a header field.
    """
    path = "iommu/" + name.decode(errors="replace")
    did = domain_id_of_name(name)
    if did is None:
        return _bad(Finding(path, geometry.dentry_off(ino, "name"),
                            f"domain file not named dom-<DID> with a DID of 1..{MAX_DOMAIN_ID}"))
    if pages.size == 0:
        return DomainFile(None, 0, "no pages", ())
    if pages.size < 2:
        return _bad(Finding(path, geometry.inode_off(ino, "npages"),
                            f"{pages.size} pages: no room for the header and the SL-PML4"))
    off = int(pages[0]) * fmt.PAGE_SIZE
    hdr = image[off : off + fmt.DOMAIN_HEADER_DTYPE.itemsize].view(fmt.DOMAIN_HEADER_DTYPE)[0]
    f = fmt.DOMAIN_HEADER_DTYPE.fields
    magic = bytes(hdr["magic"])
    if magic == b"":
        return DomainFile(None, 0, "header never written", ())
    if magic != fmt.DOMAIN_MAGIC:  # nothing else in a page of another format means anything
        return _bad(Finding(f"{path} header.magic", off, f"{magic!r} is not {fmt.DOMAIN_MAGIC!r}"))
    problems = []
    compatible = bytes(hdr["compatible"])
    if compatible != fmt.DOMAIN_COMPATIBLE:
        problems.append(Finding(f"{path} header.compatible", off + f["compatible"][1],
                                f"unknown format {compatible.decode(errors='replace')!r}; "
                                f"this pkfuse knows {fmt.DOMAIN_COMPATIBLE.decode()!r}"))
    if int(hdr["domain_id"]) != did:
        problems.append(Finding(f"{path} header.domain_id", off + f["domain_id"][1],
                                f"DID {int(hdr['domain_id'])} does not match the name"))
    if int(hdr["address_width"]) != fmt.CE_AW_48:
        problems.append(Finding(f"{path} header.address_width", off + f["address_width"][1],
                                f"{int(hdr['address_width'])} is not 48-bit (2)"))
    if int(hdr["pml4_file_page"]) != 1:
        problems.append(Finding(f"{path} header.pml4_file_page", off + f["pml4_file_page"][1],
                                f"SL-PML4 at file page {int(hdr['pml4_file_page'])}, want 1"))
    if problems:
        return DomainFile(None, 0, "", tuple(problems))
    return DomainFile(did, int(hdr["flags"]), "", ())


def _bad(finding: Finding) -> DomainFile:
    return DomainFile(None, 0, "", (finding,))
