"""pkfuse's control socket: the kernel's iommufd, VFIO cdev and Live Update Orchestrator calls, in userspace.

``wire`` declares the structures, ``transport`` frames them on the socket,
``client`` makes the calls; the classes a caller needs are re-exported here::

    from pkfuse.uapi import Iommufd, LiveUpdate

    with Iommufd("/run/pkernfs") as iommufd, LiveUpdate("/run/pkernfs") as lu:
        ioas = iommufd.ioas_alloc()
        ...
"""

from __future__ import annotations

from pkfuse.uapi.client import (
    ConnectionClosed,
    GuestMapping,
    Iommufd,
    LiveUpdate,
    Session,
    find_control_socket,
    parse_rid,
)
from pkfuse.uapi.wire import WireError

__all__ = ["ConnectionClosed", "GuestMapping", "Iommufd", "LiveUpdate", "Session", "WireError",
           "find_control_socket", "parse_rid"]
