"""A VMM written against pkfuse.vmm: create a VM, run it, live-update it through a kexec, verify.

    pkfuse mkfs host.img --size 1G && mkdir -p mnt && pkfuse mount host.img mnt
    python examples/vmm.py mnt [kvm|unicorn|auto]      # then: pkfuse umount mnt

1. create: guest RAM is ``mnt/guest_mem/vm0`` (64 MiB), mapped from the image's
   own pages; 2 vCPUs (1 on Unicorn) run the guest in 64-bit ring 3; its RAM is
   mapped into an IOAS at IOVA = guest-physical address for device 00:03.0.
2. live update, cpr-transfer's shape: ``prepare`` (a session preserving guest
   RAM, the vCPU handover file and the HWPT, the VM running), ``freeze``
   (vCPUs paused, saved, ``reboot()``), the kexec (SIGKILL of the daemon, a new
   one mounts the image), ``Vmm.incoming`` (retrieve, remap, restore, resume,
   rebuild IOAS + HWPT, ``finish``).
3. verify: the guest's counters, checksums and dirty pattern, read from outside,
   hold, and continued from where they stopped.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from pkfuse.vmm import verify
from pkfuse.vmm.vmm import Vmm, VmmSpec

MiB = 1 << 20


def status(mnt: str, key: str) -> str:
    for line in open(os.path.join(mnt, ".pkernfs", "status")):
        k, _, v = line.partition(":")
        if k.strip() == key:
            return v.strip()
    raise KeyError(key)


def kexec(mnt: str) -> None:
    """SIGKILL the daemon at once and mount the image again with the same control socket."""
    image, regs, ctl = status(mnt, "image"), status(mnt, "iommu_regs"), status(mnt, "control_socket")
    domains = status(mnt, "liveupdate").split("domains ")[1].split(",")[0]
    os.kill(int(status(mnt, "daemon_pid")), signal.SIGKILL)
    pkfuse = [sys.executable, "-m", "pkfuse"]
    for _ in range(100):  # the dead mount is cleared once the kernel noticed the daemon is gone
        if subprocess.run([*pkfuse, "umount", mnt], capture_output=True).returncode == 0:
            break
        time.sleep(0.05)
    subprocess.run([*pkfuse, "mount", "--control", ctl, "--regs", regs, "--domains", domains, image, mnt],
                   check=True)


def wait_steps(vmm: Vmm, steps: int) -> None:
    while int(vmm.vcpu_states()["counter"].min()) < steps:
        time.sleep(0.01)


def main(mnt: str, engine: str) -> None:
    vcpus = 1 if engine == "unicorn" else 2
    spec = VmmSpec(os.path.join(mnt, "guest_mem", "vm0"), 64 * MiB, vcpus, engine, device="00:03.0")
    vmm = Vmm.start(spec)  # 1. create: map guest RAM, boot the vCPUs, IOAS + HWPT for the device
    print(f"running on {vmm.engine.name}: {vmm.status_line()}")
    wait_steps(vmm, 1000)
    print(f"after a while:  {vmm.status_line()}")

    vmm.prepare("vm0")  # 2. live update: preserve RAM, vCPU handover file, HWPT; the VM still runs
    wait_steps(vmm, int(vmm.vcpu_states()["counter"].max()) + 1000)
    vmm.freeze()  # vCPUs paused and saved, then reboot(): the kernel is gone
    before = verify.verify(vmm.ram.array)
    print(f"frozen:         {before.summary()}; freeze took "
          f"{1e3 * (vmm.timings['freeze_save'] + vmm.timings['freeze_reboot']):.1f} ms")
    vmm.close(save=False)  # the old VMM ends with the old kernel

    kexec(mnt)
    vmm = Vmm.incoming(mnt, "vm0")  # the successor: retrieve, remap, restore, resume, rebuild, finish
    t = vmm.timings
    print(f"resumed:        blackout {1e3 * t['blackout']:.1f} ms (retrieve {1e3 * t['retrieve']:.1f}, "
          f"remap {1e3 * t['remap']:.1f}, VM {1e3 * t['vm_create']:.1f}, vCPUs {1e3 * t['vcpu_restore']:.1f}); "
          f"rebuild {1e3 * t['rebuild']:.1f} ms, finish {1e3 * t['finish']:.1f} ms")
    wait_steps(vmm, int(before.vcpus[0].counter) + 1000)
    vmm.pause()

    after = verify.verify(vmm.ram.array)  # 3. verify from outside
    went_back = verify.progressed(before, after)
    print(f"after:          {after.summary()}")
    print("every invariant holds and the guest continued" if after.ok and not went_back
          else f"VIOLATED: {after.findings + went_back}")
    vmm.close(save=True)
    sys.exit(0 if after.ok and not went_back else 1)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/run/pkernfs", sys.argv[2] if len(sys.argv) > 2 else "auto")
