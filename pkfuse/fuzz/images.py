"""``pkfuse fuzz --target images``: raw garbage in the session area, the fixed domains and the metadata.

The first round's image fuzzer (``tests/image/test_fsck.py``) corrupts
random metadata bytes and requires an answer, never an exception. This one
extends it to what a restart reads back, on a frozen image of two sessions
(``preserved``): one to four edits of bit flips, random bytes and
all-ones words (poisoned memory) at random offsets in ``iommu/lu-state``
(resealed half of the time, so the garbage reaches the checks past the
checksum), a preserved domain's table pages, the context and root tables,
and the superblock, journal, bitmap, inode, dentry and extent tables. The
next kernel must refuse what it cannot trust -- the image as a whole with a
``FormatError`` naming the structure (a damaged superblock or journal), or
the object it damages with a finding -- and the judge (``preserved.judge``)
holds what it adopts to the hardware's view and fsck.
"""

from __future__ import annotations

from typing import Any

from . import preserved
from .common import Entropy

#: where the garbage lands, by weight: mostly what a restart reads back
WEIGHTS = (("state", 30), ("domain:vm0", 15), ("domain:vm1", 15), ("context", 10), ("root", 4),
           ("superblock", 4), ("journal", 6), ("bitmap", 5), ("inodes", 5), ("dentries", 3), ("extents", 3))


def generate(e: Entropy, frozen: preserved.Frozen) -> list[dict[str, Any]]:
    """One to four raw edits (flips, random bytes, all-ones words), each in a region drawn by weight."""
    out = []
    for _ in range(e.weighted([(1, 5), (2, 3), (3, 1), (4, 1)])):
        where = e.weighted(list(WEIGHTS))
        at = e.int(0, 1 << 20)
        how = e.weighted([("flip", 5), ("bytes", 3), ("poison", 2)])
        if how == "flip":
            edit: dict[str, Any] = {"kind": "flip", "region": where, "at": at, "bit": e.int(0, 7)}
        elif how == "bytes":
            edit = {"kind": "bytes", "region": where, "at": at,
                    "data": bytes(e.int(0, 255) for _ in range(e.int(1, 16))).hex()}
        else:
            edit = {"kind": "bytes", "region": where, "at": at // 8 * 8, "data": "ff" * 8}
        if where == "state" and e.chance(0.5):
            edit["seal"] = True
        out.append(edit)
    return out
