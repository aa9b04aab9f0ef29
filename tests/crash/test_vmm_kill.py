"""A SIGKILL of the VMM at a random instant loses no store its guest made.

Each round starts ``pkfuse vmm run`` on a live mount, watches the guest's
counters through the mount (direct_io reads are the image's bytes), then
SIGKILLs the VMM after a random delay. Guest RAM is the image's pages
mapped MAP_SHARED, so every store the guest made is in the page cache of the
image when the process dies, with no msync: the verifier finds RAM in one of
the states the guest's store order allows (a step at most half done), every
counter at least what was seen before the kill, and the daemon has released
the VMM's IOMMU objects and its mapping pin.
"""

from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import Mount, reap

from backing import fsck
from pkfuse.vmm import abi, verify
from pkfuse.vmm.vmm import state_view

pytestmark = pytest.mark.mount

ROUNDS = int(os.environ.get("PKFUSE_VMM_KILL_ROUNDS", "6"))


def _counters(guest: Path, nr_vcpus: int) -> np.ndarray:
    with open(guest, "rb", buffering=0) as f:
        page = np.frombuffer(os.pread(f.fileno(), abi.PAGE_SIZE, abi.VCPU_STATE_GPA), np.uint8)
    ram = np.zeros(abi.VCPU_STATE_GPA + abi.PAGE_SIZE, np.uint8)
    ram[abi.VCPU_STATE_GPA:] = page
    return state_view(ram, nr_vcpus)["counter"].copy()


def _iommufd_line(m: Mount) -> str:
    """The status's iommufd summary, e.g. '0 contexts, 0 ioas, 0 hwpts, 0 devices'."""
    return next(line.split(":", 1)[1].strip() for line in (m.path / ".pkernfs" / "status").read_text().splitlines()
                if line.startswith("iommufd:"))


def test_a_sigkilled_vmm_loses_no_guest_store(make_image: Callable[..., Path], tmp_path: Path,
                                              mount_image: Callable[..., Mount]) -> None:
    m = mount_image(make_image("128M"), "--control", str(tmp_path / "ctl.sock"))
    rng = random.Random(12)
    for r in range(ROUNDS):
        vcpus = 1 + r % 2
        guest = m.path / "guest_mem" / f"vm{r}"
        p = subprocess.Popen([sys.executable, "-m", "pkfuse", "vmm", "run", str(guest), "--memory", "16M",
                              "--vcpus", str(vcpus), "--quiet"], stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 30
            while not guest.exists() or guest.stat().st_size == 0 or not (_counters(guest, vcpus) > 0).all():
                assert p.poll() is None, p.stderr.read()  # type: ignore[union-attr]
                assert time.monotonic() < deadline, "the guest did not start"
                time.sleep(0.01)
            time.sleep(rng.uniform(0, 0.3))
            seen = _counters(guest, vcpus)
            time.sleep(rng.uniform(0, 0.05))
            os.kill(p.pid, signal.SIGKILL)
        finally:
            if p.poll() is None:
                p.kill()
            reap(p)
        ram = np.frombuffer(guest.read_bytes(), np.uint8)
        v = verify.verify(ram)
        assert v.ok, (r, v.findings)
        assert [c.counter for c in v.vcpus] >= seen.tolist() and all(
            c.counter >= s for c, s in zip(v.vcpus, seen.tolist())), (r, seen, v.summary())
        deadline = time.monotonic() + 10  # the connection's close is the kernel's release
        while not _iommufd_line(m).startswith("0 contexts"):
            assert time.monotonic() < deadline, _iommufd_line(m)
            time.sleep(0.02)
        while True:  # no pin left once its domain's grace period is over (IOTLB-flush stand-in)
            try:
                os.unlink(guest)  # EBUSY while mapped or pinned by a domain
                break
            except OSError as exc:
                assert exc.errno == errno.EBUSY and time.monotonic() < deadline + 5, exc
                time.sleep(0.05)
        os.unlink(f"{guest}.vmstate")
    assert m.unmount() == 0
    status, findings = fsck.check_image(str(m.image))
    assert status == 0, findings
