"""``pkfuse mount --wait SECONDS``: a successor started before the restart waits for the image's lock
and for the mountpoint to be a plain directory again, then mounts; after SECONDS it is refused as
without ``--wait`` (exit 3 or 4, one line saying how long it waited)."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Mount, force_unmount, is_mounted

pytestmark = pytest.mark.mount

PKFUSE = [sys.executable, "-m", "pkfuse"]


def _status_pid(mnt: Path) -> int:
    for line in (mnt / ".pkernfs" / "status").read_text().splitlines():
        if line.startswith("daemon_pid:"):
            return int(line.split(":")[1])
    raise AssertionError("no daemon_pid")


def test_a_waiting_mount_takes_over_after_the_kill_and_the_clear(make_image: Callable[..., Path], tmp_path: Path,
                                                                 mount_image: Callable[..., Mount]) -> None:
    image = make_image("64M")
    old = mount_image(image, "--control", str(tmp_path / "old.sock"))
    waiting = subprocess.Popen([*PKFUSE, "mount", str(image), str(old.path), "--control", str(tmp_path / "new.sock"),
                                "--wait", "30"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.0)
        assert waiting.poll() is None, waiting.communicate()  # the mount is served: it waits
        old.kill()  # SIGKILL, then the dead mount cleared, as the jump does
        assert waiting.wait(30) == 0, waiting.communicate()
        assert is_mounted(old.path)
        assert _status_pid(old.path) != old.pid
        r = subprocess.run([*PKFUSE, "umount", str(old.path)], capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
    finally:
        if waiting.poll() is None:
            waiting.terminate()
            waiting.wait(10)
        if is_mounted(old.path):
            subprocess.run([*PKFUSE, "umount", str(old.path)], capture_output=True, timeout=30)
        force_unmount(old.path)


def test_a_dead_mount_is_waited_for_too(make_image: Callable[..., Path], tmp_path: Path,
                                        mount_image: Callable[..., Mount]) -> None:
    image = make_image("64M")
    old = mount_image(image, "--control", str(tmp_path / "old.sock"))
    old.proc.kill()  # type: ignore[union-attr]  # the daemon dead, its mount left: the lock is free, the mountpoint not
    old.proc.wait()  # type: ignore[union-attr]
    r = subprocess.run([*PKFUSE, "mount", str(image), str(old.path), "--wait", "0.3"], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 3 and "dead FUSE mount" in r.stderr and "(waited 0.3 s)" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_a_held_lock_is_refused_after_the_wait(make_image: Callable[..., Path], tmp_path: Path,
                                               mount_image: Callable[..., Mount]) -> None:
    image = make_image("64M")
    mount_image(image, "--control", str(tmp_path / "old.sock"))
    other = tmp_path / "other"
    other.mkdir()
    t0 = time.monotonic()
    r = subprocess.run([*PKFUSE, "mount", str(image), str(other), "--wait", "0.5"], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 4 and "waited 0.5 s for its lock" in r.stderr, r.stderr
    assert time.monotonic() - t0 >= 0.5
    assert not is_mounted(other)


def test_a_negative_wait_is_bad_usage(image: Path, tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    r = subprocess.run([*PKFUSE, "mount", str(image), str(tmp_path / "m"), "--wait", "-1"], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 2 and "not negative" in r.stderr, r.stderr
