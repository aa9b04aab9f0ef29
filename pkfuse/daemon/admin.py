"""pkfuse's own calls on ``/dev/iommu``: the offline ``pkfuse iommu`` commands, served live.

(To be filled: kernel-owned domains by DID -- create, destroy, copy, map,
unmap, attach, detach -- for ``pkfuse iommu`` on a mounted image.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .control import ControlServer


def handlers(server: ControlServer) -> dict[int, tuple[type, Any]]:
    """The (struct, handler) of each pkfuse-specific command number on ``/dev/iommu``."""
    return {}
