"""``pkfuse info``: one text for one image, from the image or from its mountpoint (newcomer
point 5: they used to differ in what they showed and how)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from backing import format as fmt
from backing.iommu import Iommu
from backing.regs import default_path
from backing.store import Store
from conftest import Mount

MiB = 1 << 20


def info(target: Path) -> str:
    r = subprocess.run([sys.executable, "-m", "pkfuse", "info", str(target)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    return r.stdout


def test_info_of_the_image_and_of_its_mountpoint_differ_only_in_who_serves_it(
        image: Path, mount_image: Callable[..., Mount]) -> None:
    with Store.open(image) as s, Iommu.open(s, default_path(image)) as io:
        vm = s.mkdir(s.lookup(fmt.ROOT_INO, fmt.GUEST_DIR_NAME), b"vmA", 0o755, 0, 0)
        ram = s.create(vm, b"ram", 0o600, 0, 0)
        s.truncate(ram, 4 * MiB)
        d = io.create_domain()
        d.map_file(ram, 0, 4 * MiB, 0x100000)
        d.attach(0, 3, 0)
    m = mount_image(image)
    served = info(m.path)
    assert m.unmount() == 0
    looked = info(image)  # unmounted: the generation the mount gave the image is still the latest

    served_lines, looked_lines = served.splitlines(), looked.splitlines()
    assert len(served_lines) == len(looked_lines), (served, looked)
    differ = [(a, b) for a, b in zip(served_lines, looked_lines) if a != b]
    # the only lines that must differ: who serves the image, and how
    assert differ == [(f"daemon_pid:               {m.pid}", "daemon_pid:               (not mounted here)"),
                      ("read_only:                no", "read_only:                yes")], differ
    # and the text has what the newcomer missed on one side or the other
    for line in ("/guest_mem/vmA/", "iommu:                    1 domains, 1 requesters attached, "
                 "translation disabled, 0 faults", f"iommu_regs:               {default_path(image)}",
                 "/iommu/dom-1  iommu-domain  size"):
        assert any(ln.startswith(line) for ln in looked_lines), line
    assert "/guest_mem/vmA/ram  guest-ram  size 4194304 (4.0 MiB), 1024 pages" in looked_lines
    assert any(ln.startswith("iommu/dom-1: DID 1,") and ln.endswith("attached 00:03.0") for ln in looked_lines)
    assert any(ln.endswith(" rw guest_mem/vmA/ram+0x0") for ln in looked_lines)
    assert any(ln.endswith("  /guest_mem/vmA/ram +0x0") for ln in looked_lines)  # the memory map
