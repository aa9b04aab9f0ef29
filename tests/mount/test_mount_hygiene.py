"""A test that fails while mounted leaves no stale mount and no daemon behind.

Runs pytest in a subprocess on small test files that use the real
``tests/conftest.py`` fixtures and fail on purpose, then inspects
``/proc/self/mountinfo`` and the daemons' pids.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import mounted_paths
from pkfuse.daemon.unmount import process_alive

pytestmark = pytest.mark.mount

CONFTEST = Path(__file__).resolve().parents[1] / "conftest.py"

FAILING = '''
import os, signal
from pathlib import Path

PIDS = Path(__file__).with_name("pids")


def note(m):
    with open(PIDS, "a") as f:
        f.write(f"{m.pid} {m.path}\\n")


def test_fails_while_mounted(mounted):
    note(mounted)
    (mounted.path / "guest_mem" / "f").write_bytes(b"x")
    assert False, "on purpose"


def test_fails_with_a_file_open(mounted):
    note(mounted)
    fh = open(mounted.path / "guest_mem" / "held", "wb")  # never closed
    fh.write(b"x")
    raise RuntimeError("on purpose")


def test_fails_after_the_daemon_died(mounted):
    note(mounted)
    os.kill(mounted.pid, signal.SIGKILL)
    assert False, "on purpose"


def test_fails_after_a_restart(mounted):
    mounted.restart()
    note(mounted)
    assert False, "on purpose"
'''


def test_failing_tests_leave_no_mount_and_no_daemon(tmp_path: Path) -> None:
    (tmp_path / "conftest.py").write_text(CONFTEST.read_text())
    (tmp_path / "test_fail_on_purpose.py").write_text(FAILING)
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--basetemp={tmp_path / 'bt'}",
         "--rootdir", str(tmp_path), str(tmp_path / "test_fail_on_purpose.py")],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        # the root for backing and pkfuse; tests/ for the plugin the copied conftest names (iommu_helpers)
        env={**os.environ, "PYTHONPATH": os.pathsep.join((str(CONFTEST.parents[1]), str(CONFTEST.parent)))},
    )
    assert r.returncode == 1, r.stdout + r.stderr
    assert "4 failed" in r.stdout, r.stdout
    noted = [line.split() for line in (tmp_path / "pids").read_text().splitlines()]
    assert len(noted) == 4
    stale = [p for p in mounted_paths() if p.startswith(str(tmp_path))]
    assert stale == [], stale
    for pid, _ in noted:
        assert not process_alive(int(pid)), f"daemon {pid} still running"
