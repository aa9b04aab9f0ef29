"""Live update on pkfuse: a guest's RAM and its device's IOMMU mapping survive a kexec.

    pkfuse mkfs host.img --size 1G && mkdir -p mnt && pkfuse mount host.img mnt
    python examples/liveupdate.py mnt       # then: pkfuse umount mnt

The VMM side of Linux live update, with the merged LUO's calls and the
unmerged IOMMU series' IOMMU_HWPT_LU_SET_PRESERVE:

1. before: guest RAM mapped through iommufd for device 00:03.0; a session
   "vm0" (LIVEUPDATE_IOCTL_CREATE_SESSION) preserves the RAM file
   (LIVEUPDATE_SESSION_PRESERVE_FD) and the HWPT; reboot(KEXEC).
2. the kexec: the daemon (the kernel) is killed with SIGKILL at once and a
   new one mounts the image. The device's DMA is shown to translate the
   same all along, by walking the image's tables as the hardware does.
3. after: LIVEUPDATE_IOCTL_RETRIEVE_SESSION, LIVEUPDATE_SESSION_RETRIEVE_FD
   (the same file, its data intact), the same IOAS and a HWPT rebuilt (the
   daemon hands back the preserved domain: adopt), LIVEUPDATE_SESSION_FINISH.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np

from backing import walker
from backing.regs import Regs
from pkfuse.uapi import Iommufd, LiveUpdate

MiB = 1 << 20
IOVAS = [0, MiB, 63 * MiB]
PATTERN = b"guest state written before the kexec"


def status(mnt: str, key: str) -> str:
    for line in open(os.path.join(mnt, ".pkernfs", "status")):
        k, _, v = line.partition(":")
        if k.strip() == key:
            return v.strip()
    raise KeyError(key)


def dma_targets(image: str, regs_path: str) -> list[str]:
    """What requester 00:03.0 reaches: the walker over the image and the register block."""
    u64, base, npages = walker.open_image(image)
    with Regs.open(regs_path, create=False) as regs:
        phys, fault = walker.translate(u64, base, npages, regs, 0x18, np.asarray(IOVAS, np.uint64))
    return [f"{p:#x}" if not f else f"fault {f:#x}" for p, f in zip(phys.tolist(), fault.tolist())]


def build(iommufd: Iommufd, fd: int) -> int:
    ioas = iommufd.ioas_alloc()
    iommufd.ioas_map_file(ioas, fd, 0, 64 * MiB, 0)  # IOVA = GPA
    dev = iommufd.device_bind("00:03.0")
    hwpt = iommufd.hwpt_alloc(dev, ioas)
    iommufd.device_attach(dev, hwpt)
    return hwpt


def before(mnt: str) -> None:
    ram = os.path.join(mnt, "guest_mem", "lu-vm")
    fd = os.open(ram, os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, 64 * MiB)
    os.pwrite(fd, PATTERN, MiB)
    with Iommufd(mnt) as iommufd, LiveUpdate(mnt) as lu:  # open /dev/iommu, /dev/liveupdate
        hwpt = build(iommufd, fd)
        session = lu.create_session("vm0")
        session.preserve_fd(fd, 1)  # size frozen, pages pinned
        iommufd.hwpt_lu_set_preserve(hwpt, 2, session)  # the IOAS is immutable from here
        print(f"preserved guest RAM (token 1) and HWPT {hwpt} (token 2) in session vm0")
        lu.reboot()  # reboot(LINUX_REBOOT_CMD_KEXEC): every session serialized, then the kernel is gone
        print("reboot() committed iommu/lu-state:", ", ".join(sorted(os.listdir(os.path.join(mnt, "iommu")))))
        session.close()
    os.close(fd)


def kexec(mnt: str) -> tuple[str, str]:
    """SIGKILL the daemon and mount the image again with the same control socket."""
    image, regs, ctl = status(mnt, "image"), status(mnt, "iommu_regs"), status(mnt, "control_socket")
    os.kill(int(status(mnt, "daemon_pid")), signal.SIGKILL)
    print("killed the daemon; DMA meanwhile reaches:", dma_targets(image, regs))
    pkfuse = [sys.executable, "-m", "pkfuse"]
    for _ in range(100):  # the dead mount: cleared once the kernel noticed the daemon is gone
        if subprocess.run([*pkfuse, "umount", mnt], capture_output=True).returncode == 0:
            break
        time.sleep(0.05)
    subprocess.run([*pkfuse, "mount", "--control", ctl, "--regs", regs, image, mnt], check=True)
    return image, regs


def after(mnt: str, image: str, regs: str) -> None:
    with LiveUpdate(mnt) as lu, Iommufd(mnt) as iommufd:
        session = lu.retrieve_session("vm0")
        fd = session.retrieve_fd(1)
        print("retrieved the guest RAM; its data:", os.pread(fd, len(PATTERN), MiB).decode())
        hwpt = build(iommufd, fd)  # the same maps: the daemon adopts the preserved domain as this HWPT
        print(f"rebuilt HWPT {hwpt}; DMA reaches:", dma_targets(image, regs))
        session.finish()  # all or nothing: every preserved object was reclaimed
        session.close()
        print("finished; iommu/:", ", ".join(sorted(os.listdir(os.path.join(mnt, "iommu")))))
        os.close(fd)


def main(mnt: str) -> None:
    image, regs = status(mnt, "image"), status(mnt, "iommu_regs")
    before(mnt)
    print("DMA before the kexec reaches:", dma_targets(image, regs))
    image, regs = kexec(mnt)
    after(mnt, image, regs)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/run/pkernfs")
