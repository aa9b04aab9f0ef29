"""The restart harness (``pkfuse.harness``, ``pkfuse restart-test``): live updates of a running 64 MiB
guest with the device doing DMA, in both designs, successors pre-started and cold, a cancelled
prepare; a corrupted byte is reported naming the cycle and the check; nothing is left running or
mounted after a test, passing or failing (the ``workdir`` fixture checks, and clears what it finds)."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pkfuse.harness import checks
from pkfuse.harness.cast import Cast
from pkfuse.harness.cycle import Hooks
from pkfuse.harness.run import Config, run
from pkfuse.vmm import abi, verify

pytestmark = pytest.mark.mount

MiB = 1 << 20
RESERVED_GPA = abi.CONFIG_GPA + abi.CONFIG.fields["reserved"][1]  #: read by the verifier, never by the guest


def _config(workdir: Path, **kw: object) -> Config:
    return Config(workdir, **{"cycles": 2, "guest_size": 64 * MiB, "settle": 0.3, "run_between": 0.1, **kw})


def _ok(report) -> None:  # type: ignore[no-untyped-def]
    assert report.ok, report.first_error()


@pytest.mark.parametrize("flow", ["persistent", "ephemeral"])
def test_two_live_updates_with_prestarted_successors(workdir: Path, flow: str) -> None:
    report = run(_config(workdir, flows=(flow,)))
    _ok(report)
    d = report.as_dict()
    assert [c["cycle"] for c in d["cycles"]] == [1, 2]
    for c in d["cycles"]:
        names = {ch["name"] for ch in c["checks"]}
        assert {"guest memory clean after the freeze (state, rings, records)", "guest continued",
                "translations before = after", "DMA reaches guest RAM before the freeze", "session finished",
                "no page leaked by the cycle", "no DMA fault in the live update",
                "guest memory clean after finish (all of RAM, paused)", BYSTANDER_CHECK} <= names
        assert ("no saved copy after finish" in names) == (flow == "ephemeral")
        assert ("ephemeral memory poisoned at restore" in names) == (flow == "ephemeral")
        b = c["blackout_s"]
        assert b["total"] > 0 and b["freeze"] > 0 and b["jump"] > 0 and b["retrieve"] > 0
        assert abs(sum(b[k] for k in ("freeze", "snapshot", "jump", "mount", "wait", "retrieve", "remap",
                                      "vm_create", "vcpu_restore")) - b["total"]) < 1e-3
        assert c["off_blackout_s"]["rebuild"] > 0 and c["off_blackout_s"]["finish"] > 0
        assert c["bytes_verified"] == (2 if c["cycle"] == 2 else 1) * 64 * MiB  # after finish; the last: at stop too
        assert b["snapshot"] < 0.05  # the harness reads the guest's state, not its RAM, in the blackout
        if "skipped" not in d["device"][flow]:
            assert c["dma"]["faults"] == 0 and c["dma"]["records_in_blackout"] > 0
            assert "no misdirected DMA in the live update" in names
    end = {ch["name"]: ch["ok"] for ch in d["end"][flow]}
    assert end["fsck clean"] and end["nothing left running or mounted"]
    assert d["total"][flow]["blackout_s"]["total"]["median"] > 0


def test_cold_successors(workdir: Path) -> None:
    report = run(_config(workdir, cycles=1, successors="cold"))
    _ok(report)
    b = report.cycles[0].blackout()
    assert b["mount"] > 0.05  # a daemon started after the jump pays its interpreter's start in the blackout


def test_a_cancelled_prepare_leaves_everything_as_it_was(workdir: Path) -> None:
    report = run(_config(workdir, cycles=1, cancel_every=1))
    _ok(report)
    names = [ch.name for ch in report.cycles[0].checks]
    assert names[:4] == ["cancel: no session left", "cancel: domains as they were",
                         "cancel: translations as they were", "cancel: the VM ran on"]


def test_a_corrupted_byte_is_found_and_named(workdir: Path) -> None:
    hooks = Hooks(before_jump=lambda cast, cycle: cast.flip_byte(RESERVED_GPA))
    report = run(_config(workdir, cycles=1), hooks=hooks)
    assert not report.ok
    error = report.first_error()
    assert error is not None and error.startswith("cycle 1 (persistent): guest memory clean after finish"), error
    assert f"config at {RESERVED_GPA:#x}" in error, error
    assert [ch.name for ch in report.end["persistent"] if not ch.ok] == []  # the end still ran: unmount, fsck


BYSTANDER_CHECK = "no page outside the VM's files changed (the bystander file's pages, read from the image)"


def test_a_page_changed_outside_the_vms_files_is_found(workdir: Path) -> None:
    """The VMM's image fd reaches every page: a store outside its files (here: into the bystander's second
    page, as a stray write through that fd would) fails the cycle, naming the check."""

    def stray_store(cast: Cast, cycle: object) -> None:
        off, _ = cast.bystander[0]
        fd = os.open(cast.image, os.O_RDWR)
        try:
            os.pwrite(fd, b"\xff" * 8, off + 4096)
        finally:
            os.close(fd)

    report = run(_config(workdir, cycles=1), hooks=Hooks(before_jump=stray_store))
    assert not report.ok
    assert [ch.name for c in report.cycles for ch in c.failed()] == [BYSTANDER_CHECK]
    assert [ch.name for ch in report.end["persistent"] if not ch.ok] == []


def _dirty_page(cast: Cast, ahead: int) -> int:
    """A qword of vCPU 0's dirty area ``ahead`` pages past its cursor (negative: behind it), as the freeze left it."""
    v = verify.verify(cast.guest_view(), dirty=False)
    assert v.config is not None and v.vcpus[0].pass_ >= 1, "the guest must be in its second pass by the freeze"
    base, size = abi.dirty_area(v.config, 0)
    dp = size // abi.PAGE_SIZE
    return base + ((v.vcpus[0].cursor + ahead) % dp) * abi.PAGE_SIZE + 8 * 3


def test_a_page_lost_in_the_jump_behind_the_cursor_is_found_by_the_verdict_after_finish(workdir: Path) -> None:
    lost: list[int] = []

    def lose(cast: Cast, cycle: object) -> None:
        lost.append(_dirty_page(cast, -2))  # written this pass: the guest comes back to it a pass later
        cast.flip_byte(lost[0])

    report = run(_config(workdir, cycles=1), hooks=Hooks(before_jump=lose))
    error = report.first_error()
    assert error is not None and error.startswith(
        "cycle 1 (persistent): guest memory clean after finish (all of RAM, paused): dirty_area[0] at "
        f"{lost[0]:#x}"), error


def test_a_page_lost_in_the_jump_ahead_of_the_cursor_stops_the_guest_with_lost_page(workdir: Path) -> None:
    hooks = Hooks(before_jump=lambda cast, cycle: cast.flip_byte(_dirty_page(cast, 1)))  # the next page it writes
    report = run(_config(workdir, cycles=2), hooks=hooks)
    assert not report.ok and len(report.cycles) == 1
    assert report.first_error() == "cycle 1 (persistent): guest running after finish: guest errors {0: 'lost page'}"


def test_a_rollback_the_guest_sees_is_named_and_ends_the_run(workdir: Path) -> None:
    counter = abi.VCPU_STATE_GPA + abi.VCPU_STATE.fields["counter"][1]  # vCPU 0's, checked by the guest at each step
    hooks = Hooks(before_jump=lambda cast, cycle: cast.flip_byte(counter))
    report = run(_config(workdir, cycles=2), hooks=hooks)
    assert not report.ok and len(report.cycles) == 1  # the successor's guest stopped: no second cycle
    assert report.first_error() == "cycle 1 (persistent): guest running after finish: guest errors {0: 'rollback'}"
    failed = [ch.name for ch in report.cycles[0].failed()]
    assert "successor VMM running" in failed
    end = {ch.name: ch.ok for ch in report.end["persistent"]}
    assert end["fsck clean"] and end["nothing left running or mounted"]


def test_the_command_exits_1_with_one_line_naming_cycle_and_check(workdir: Path) -> None:
    out = workdir.parent / "report.json"
    png = workdir.parent / "blackout.png"
    plot = ["--plot", str(png)] if importlib.util.find_spec("matplotlib") else []  # the plot extra, where installed
    r = subprocess.run([sys.executable, "-m", "pkfuse", "restart-test", "--cycles", "1", "--workdir", str(workdir),
                        "--json", str(out), "--corrupt-gpa", hex(RESERVED_GPA), *plot],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith("pkfuse: error: restart-test failed: cycle 1 (persistent): guest memory clean"), r.stderr
    d = json.loads(out.read_text())
    assert d["ok"] is False and d["error"].startswith("cycle 1 (persistent)")
    if plot:  # drawn for a failing run too: its one cycle, measured and marked failed
        from pkfuse.harness.plot import figure_size

        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", data[16:24]) == figure_size(1)
        assert f"blackout per part and cycle: {png} " in r.stdout, r.stdout


def test_sigterm_tears_the_cast_down(workdir: Path) -> None:
    p = subprocess.Popen([sys.executable, "-m", "pkfuse", "restart-test", "--cycles", "50", "--workdir",
                          str(workdir)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (workdir / "persistent" / "vmm-p1.mon").exists():  # the first cycle's successor is up: everything runs
        assert p.poll() is None and time.monotonic() < deadline, p.communicate()
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130 and err.strip() == "pkfuse: error: interrupted", err
    # the workdir fixture checks that nothing is left


@pytest.mark.parametrize(("args", "message"), [
    (["--cycles", "0"], "--cycles 0: at least 1"),
    (["--guest-size", "3M"], "--guest-size 3M: a multiple of 2 MiB"),
    (["--vcpus", "0"], "--vcpus 0: 1 to"),
    (["--kill", "reboot"], "--kill reboot: one of prepare, freeze, jump"),
])
def test_bad_arguments_are_one_line_before_anything_starts(workdir: Path, args: list[str], message: str) -> None:
    r = subprocess.run([sys.executable, "-m", "pkfuse", "restart-test", "--workdir", str(workdir), *args],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stderr.startswith("pkfuse: error: ") and message in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not workdir.exists()


def test_a_dma_that_reached_another_page_is_misdirected(tmp_path: Path) -> None:
    from pkfuse.harness.device import LOG_ENTRY

    cast = Cast(tmp_path / "c", guest_size=8 * MiB)
    cast.extents = [(0, 0x100400000, 4 * MiB), (4 * MiB, 0x100A00000, 4 * MiB)]  # two scattered extents
    e = np.zeros(3, LOG_ENTRY)
    e["done"] = 1
    e["iova"] = [0x1008, 0x400010, 0x400010]
    e["phys"] = [0x100401008, 0x100A00010, 0x100800010]  # right, right, the first extent's continuation: astray
    assert checks.misdirected(cast, e).tolist() == [False, False, True]
    ch = checks.check_dma_reached_guest(cast, e, "here")
    assert not ch.ok and "1 of 3 DMAs went astray, first IOVA 0x400010 reached 0x100800010" in ch.detail
    assert checks.check_dma_reached_guest(cast, e[:2], "here").ok
