"""What a requester reaches, walked as the hardware walks it: the image, the ephemeral memory, the registers.

``device_view`` asks no daemon: it maps the image and, when the file is
there, the ephemeral memory beside it (the review's design keeps its
domains there), opens the register block and translates with
``backing.walker`` -- the root table the registers name, the requester's
context entry, the second-level tables. It is what a restart test compares
before and after the jump, and what the IOMMU tests check mappings with.
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


__all__ = ["device_view"]
