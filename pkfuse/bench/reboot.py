"""Part of ``pkfuse bench --only control``: ``reboot()`` of a preserved guest, in both designs.

Target (issue 11): the PKFUSE_REBOOT round trip for a 16 GiB guest mapped
in 2 MiB maps (8192 IOAS_MAP_FILE calls, each a 2 MiB leaf; one preserved
HWPT with one device) under 20 ms, in the pkernfs design (serialize the
maps and commit ``iommu/lu-state``) and in the review's (first copy the
domain into a fixed one in the image and switch the device to it).

Each round is a whole restart cycle on a real mount: build and preserve,
reboot() (timed, from the client), unmount (the halted kernel releases
nothing), mount again (which restores), retrieve, rebuild,
finish -- so every round after the first reboots a daemon that restored.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from backing.mkfs import mkfs
from pkfuse.uapi import Iommufd, LiveUpdate

from . import Report
from .mount import _mount

MiB = 1 << 20
GiB = 1 << 30
DESIGNS = ("persistent", "ephemeral")


def _build(mnt: str, fd: int, guest: int, chunk: int) -> tuple[Iommufd, int]:
    iommufd = Iommufd(mnt)
    ioas = iommufd.ioas_alloc()
    for off in range(0, guest, chunk):
        iommufd.ioas_map_file(ioas, fd, off, chunk, GiB + off)
    dev = iommufd.device_bind("00:03.0")
    hwpt = iommufd.hwpt_alloc(dev, ioas)
    iommufd.device_attach(dev, hwpt)
    return iommufd, hwpt


def run(report: Report, args: argparse.Namespace, tmp: str) -> None:
    quick = bool(getattr(args, "quick", False))
    guest = (1 if quick else 16) * GiB
    rounds = 2 if quick else 3
    chunk = 2 * MiB
    for design in DESIGNS:
        image, mnt = os.path.join(tmp, f"lu-{design}.img"), os.path.join(tmp, f"lu-{design}")
        os.mkdir(mnt)
        mkfs(image, guest + GiB)
        log = os.path.join(tmp, f"lu-{design}.log")
        opts = ("--domains", design)  # the default socket: a path under --dir may pass 107 bytes
        times: list[float] = []
        for r in range(rounds):
            with _mount(image, mnt, log, *opts):
                path = os.path.join(mnt, "guest_mem", "vm0")
                if r == 0:
                    with open(path, "wb") as f:
                        f.truncate(guest)
                fd = os.open(path, os.O_RDWR)
                lu = LiveUpdate(mnt)  # found through the mount's .pkernfs/status
                try:
                    if r:  # the previous round's session: reclaim it first
                        old = lu.retrieve_session("vm")
                        os.close(old.retrieve_fd(1))
                    iommufd, hwpt = _build(mnt, fd, guest, chunk)
                    if r:
                        old.finish()
                        old.close()
                    s = lu.create_session("vm")
                    s.preserve_fd(fd, 1)
                    iommufd.hwpt_lu_set_preserve(hwpt, 2, s)
                    t = time.perf_counter()
                    lu.reboot()
                    times.append(time.perf_counter() - t)
                    s.close()
                    iommufd.close()
                finally:
                    lu.close()
                    os.close(fd)
        maps = guest // chunk
        report.add(f"reboot() of a {guest // GiB} GiB preserved guest, {design} design, {maps} maps of 2 MiB",
                   min(times) * 1e3, "ms", below=20,
                   detail=f"round trip, best of {rounds} restart cycles (median {statistics.median(times) * 1e3:.1f} ms)")
