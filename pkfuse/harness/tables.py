"""What a requester reaches, walked as the hardware walks it: the image, the ephemeral memory, the registers.

``device_view`` asks no daemon: it maps the image and, when the file is
there, the ephemeral memory beside it (the review's design keeps its
domains there), opens the register block and translates with
``backing.walker`` -- the root table the registers name, the requester's
context entry, the second-level tables. It is what a restart test compares
before and after the jump, and what the IOMMU tests check mappings with.
``device_leaves`` gives the leaf size each IOVA's walk ends at (4 KiB, 2 MiB,
1 GiB): what the restart bench checks its 4 KiB rows with.
A faulting IOVA is recorded in the register block's fault log, as the
hardware would record it, unless the context entry sets FPD: walk only
IOVAs that are meant to be mapped when the fault log matters.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from backing import ephemeral, regs, walker


def device_view(image: str | os.PathLike[str], sid: int, iovas: np.ndarray, *, write: bool = True,
                regs_path: str | os.PathLike[str] | None = None,
                ephemeral_path: str | os.PathLike[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(phys uint64, fault uint16) of requester ``sid`` at each IOVA; fault 0 where it translated.

    ``regs_path`` defaults to ``IMAGE.regs``, ``ephemeral_path`` to ``IMAGE.ephemeral`` (used when it exists).
    """
    image = Path(image)
    u64, base, npages = walker.open_image(image)
    host_ram = Path(ephemeral_path) if ephemeral_path is not None else Path(ephemeral.default_path(image))
    region = walker.open_ephemeral(host_ram) if host_ram.exists() else None
    with regs.Regs.open(regs_path if regs_path is not None else regs.default_path(image), create=False) as r:
        return walker.translate(u64, base, npages, r, sid, iovas, write, ephemeral=region)


#: a leaf level of ``device_leaves`` -> its size in bytes (VT-d second-level: 1 GiB, 2 MiB, 4 KiB)
LEAF_BYTES = {1: 1 << 30, 2: 2 << 20, 3: 4 << 10}


def device_leaves(image: str | os.PathLike[str], sid: int, iovas: np.ndarray, *,
                  regs_path: str | os.PathLike[str] | None = None,
                  ephemeral_path: str | os.PathLike[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(leaf size in bytes int64, fault uint16) of requester ``sid``'s translation of each IOVA: the level
    the hardware's walk ended at (what an IOTLB entry of it would cover), 0 where it faulted. Nothing is
    logged: a read-only look at the tables (``walker.walk_context`` + ``walk_tables``)."""
    image = Path(image)
    u64, base, npages = walker.open_image(image)
    host_ram = Path(ephemeral_path) if ephemeral_path is not None else Path(ephemeral.default_path(image))
    region = walker.open_ephemeral(host_ram) if host_ram.exists() else None
    iovas = np.ascontiguousarray(iovas, dtype=np.uint64).ravel()
    size = np.zeros(iovas.size, np.int64)
    with regs.Regs.open(regs_path if regs_path is not None else regs.default_path(image), create=False) as r:
        mem = walker.memory(u64, base, npages, region)
        reason, _fpd, slpt, _did = walker.walk_context(mem, r, sid)
        if reason:
            return size, np.full(iovas.size, reason, np.uint16)
        level = np.zeros(iovas.size, np.int8)
        _phys, fault = walker.walk_tables(mem, slpt, iovas, False, leaf=level)
    for lv, n in LEAF_BYTES.items():
        size[(level == lv) & (fault == 0)] = n
    return size, fault


__all__ = ["device_view", "device_leaves", "LEAF_BYTES"]
