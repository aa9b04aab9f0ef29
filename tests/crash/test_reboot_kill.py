"""reboot() killed at any instant: the next boot finds the old state or the new one, never a mix.

Each round forks a child that opens a boot on the image, builds and
preserves a guest, and calls ``reboot()``; the parent SIGKILLs it, either
at a journal protocol step (the child stops itself there with SIGSTOP, as
``backing.crashtest`` does) or after a random delay. The parent then opens
the next boot and checks: if the child reported the reboot done, the
session is restored; either way, a restored session translates exactly
what was preserved, a session that is not restored left no state file
and no half-written one, and fsck finds nothing.
"""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import pytest

from backing import format as fmt
from backing import fsck
from backing.iommu import Iommu
from backing.iommufd import Iommufd
from backing.liveupdate import LiveUpdate, _read_state
from backing.mkfs import mkfs
from backing.regs import default_path
from backing.store import Store

MiB = 1 << 20
RID = 0x18


def _child(image: str, stop_at: int | None, wfd: int) -> None:
    store = Store.open(image)
    io = Iommu.open(store, default_path(image))
    fd = Iommufd(store, io)
    lu = LiveUpdate(store, fd)
    lu.restore()
    guest = store.lookup(fmt.ROOT_INO, fmt.GUEST_DIR_NAME)
    name = b"vm%d" % os.getpid()
    ino = store.create(guest, name, 0o644, 0, 0)
    store.truncate(ino, 4 * MiB)
    ctx = fd.open_context()
    ioas = ctx.ioas_alloc()
    for off in range(0, 4 * MiB, 256 * 1024):  # 16 maps
        ctx.ioas_map_file(ioas, ino, off, 256 * 1024, (1 << 30) + off, writeable=True)
    dev = ctx.device_bind(RID)
    hwpt = ctx.hwpt_alloc(dev, ioas)
    ctx.device_attach(dev, hwpt)
    s = lu.create_session(b"vm")
    lu.preserve_file(s, ino, 1)
    lu.preserve_hwpt(s, ctx, hwpt, 2)
    mappings = [(m.iova, m.phys_addr, m.length) for m in ctx.hwpt(hwpt).domain.mappings()]
    os.write(wfd, repr(mappings).encode() + b"\n")
    if stop_at is not None:
        steps = [0]

        def hook(_step: str) -> None:
            steps[0] += 1
            if steps[0] == stop_at:
                os.kill(os.getpid(), signal.SIGSTOP)

        store.journal.step_hook = hook
    lu.reboot()
    os.write(wfd, b"done\n")
    os._exit(0)


def _round(image: str, rng: random.Random) -> str:
    r, w = os.pipe()
    stop_at = rng.randint(1, 12) if rng.random() < 0.6 else None
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            _child(image, stop_at, w)
        finally:
            os._exit(1)
    os.close(w)
    buf = b""
    with os.fdopen(r, "rb", buffering=0) as pipe:
        while b"\n" not in buf:
            chunk = pipe.read(65536)
            assert chunk, "the child died before it preserved anything"
            buf += chunk
        if stop_at is None:
            time.sleep(rng.random() * 0.004)
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        else:
            _, status = os.waitpid(pid, os.WUNTRACED)
            if os.WIFSTOPPED(status):
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
        buf += pipe.read(65536) or b""  # the child is dead: whatever it wrote is there
    lines = buf.decode().splitlines()
    preserved = eval(lines[0])  # noqa: S307 - our own child's repr of a list of int tuples
    done = "done" in lines[1:]

    store = Store.open(image)
    io = Iommu.open(store, default_path(image))
    fd = Iommufd(store, io)
    lu = LiveUpdate(store, fd)
    findings = lu.restore()
    try:
        assert not any("refused" in f for f in findings), findings
        if done:
            assert b"vm" in lu.incoming
        if b"vm" in lu.incoming:
            (rh,) = lu.incoming[b"vm"].hwpts.values()
            assert [(m.iova, m.phys_addr, m.length) for m in rh.domain.mappings()] == preserved
            assert io.attached[RID] == rh.domain.domain_id
            outcome = "restored"
        else:
            assert _read_state(store) is None
            outcome = "not committed"
        iommu_dir = store.lookup(fmt.ROOT_INO, fmt.IOMMU_DIR_NAME)
        assert fmt.LU_STATE_NEW_NAME not in dict(store.children(iommu_dir))
        # clear the slate for the next round: the device detached, every domain and file gone
        for d in list(io.domains.values()):
            for rid in d.attached:
                io.detach(d, rid >> 8, (rid >> 3) & 0x1F, rid & 7)
            d._quiet_after = 0.0
            io.destroy_domain(d)
        lu.incoming.clear()
        lu._rewrite()
        guest = store.lookup(fmt.ROOT_INO, fmt.GUEST_DIR_NAME)
        for name, _ino in store.children(guest):
            store.unlink(guest, name)
    finally:
        fd.close()
        io.close()
        store.close()
    status, found = fsck.check_image(image)
    assert status == 0, [str(f) for f in found]
    return outcome


@pytest.mark.parametrize("seed", [1, 2])
def test_reboot_killed_at_any_instant_keeps_old_or_new_state(tmp_path: Path, seed: int) -> None:
    image = str(tmp_path / "lu.img")
    mkfs(image, 64 * MiB)
    rng = random.Random(seed)
    outcomes = [_round(image, rng) for _ in range(20)]
    print(f"seed {seed}:", {o: outcomes.count(o) for o in set(outcomes)})
    assert set(outcomes) == {"restored", "not committed"}  # kills landed on both sides of the commit
