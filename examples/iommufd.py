"""iommufd on pkfuse, as a VFIO VMM drives it on Linux.

    pkfuse mkfs host.img --size 1G && mkdir -p mnt && pkfuse mount host.img mnt
    python examples/iommufd.py mnt          # then: pkfuse umount mnt

Guest RAM is a file on the mount; the IOAS maps it at IOVA = guest-physical
address 0, a device (requester 00:03.0) is bound and attached, and the DMA
the simulated hardware would do is shown by walking the image's tables with
the register block, as a device reads them. The kernel equivalents: open
/dev/iommu, IOMMU_IOAS_ALLOC, IOMMU_IOAS_MAP_FILE, VFIO_DEVICE_BIND_IOMMUFD,
VFIO_DEVICE_ATTACH_IOMMUFD_PT, IOMMU_HWPT_ALLOC, and a second attach that
replaces the domain while DMA keeps translating.
"""

from __future__ import annotations

import os
import sys

import numpy as np

from backing import walker
from backing.regs import Regs
from pkfuse.uapi import Iommufd

MiB = 1 << 20


def status(mnt: str, key: str) -> str:
    for line in open(os.path.join(mnt, ".pkernfs", "status")):
        k, _, v = line.partition(":")
        if k.strip() == key:
            return v.strip()
    raise KeyError(key)


def dma_targets(mnt: str, iovas: list[int]) -> list[str]:
    """What requester 00:03.0 reaches: the walker over the image and the register block."""
    image = status(mnt, "image")
    u64, base, npages = walker.open_image(image)
    with Regs.open(status(mnt, "iommu_regs"), create=False) as regs:
        phys, fault = walker.translate(u64, base, npages, regs, 0x18, np.asarray(iovas, np.uint64))
    return [f"{p:#x}" if not f else f"fault {f:#x}" for p, f in zip(phys.tolist(), fault.tolist())]


def main(mnt: str) -> None:
    ram = os.path.join(mnt, "guest_mem", "example-vm")
    fd = os.open(ram, os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, 64 * MiB)  # the daemon allocates the pages now, 2 MiB aligned
    print("guest RAM extents:", os.getxattr(ram, "user.pkernfs.extents").decode().split("\n")[0], "...")
    with Iommufd(mnt) as iommufd:  # open("/dev/iommu")
        ioas = iommufd.ioas_alloc()
        iova = iommufd.ioas_map_file(ioas, fd, 0, 64 * MiB, 0)  # IOVA = GPA, as a VFIO VMM maps
        dev = iommufd.device_bind("00:03.0")
        hwpt = iommufd.device_attach(dev, ioas)  # an automatic HWPT: an iommu_domain in iommu/dom-N
        print(f"IOAS {ioas}: 64 MiB at IOVA {iova:#x}; device {dev} attached through HWPT {hwpt}")
        print("DMA to IOVA 0, 1 MiB, 63 MiB reaches:", dma_targets(mnt, [0, MiB, 63 * MiB]))
        second = iommufd.hwpt_alloc(dev, ioas)  # a second domain mirroring the same IOAS
        iommufd.device_attach(dev, second)  # replace: one store switches the context entry
        print(f"replaced HWPT {hwpt} by {second}; DMA still reaches:", dma_targets(mnt, [0, MiB, 63 * MiB]))
        iommufd.device_detach(dev)
        print("detached; DMA to IOVA 0:", dma_targets(mnt, [0])[0])
    os.close(fd)  # closing /dev/iommu released the HWPTs; their pages go after the grace period


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/run/pkernfs")
