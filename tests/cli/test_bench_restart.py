"""``pkfuse bench --only restart``: its rows from a harness report, and one tiny row run for real.

The rows' arithmetic is checked on a synthetic report (no process): the value is the blackout
without the harness's snapshot, medians over the cycles, the DMA and fault counts, the floor's
share. One 4 KiB row of a 64 MiB guest, one cycle, runs for real: its leaves, faults and checks
are judged, its speed is not (a shared machine's business).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from pkfuse.bench import AREAS, DEFAULT_AREAS, Report
from pkfuse.bench import restart as rb
from pkfuse.harness.checks import Check
from pkfuse.harness.cycle import Cycle
from pkfuse.harness.report import Report as HarnessReport

MiB = 1 << 20
MS = 1_000_000  # ns


def _cycle(index: int, flow: str, blackout_ms: float, snapshot_ms: float, in_blackout: int, faults: int = 0,
           ok: bool = True) -> Cycle:
    """A cycle whose edges and successor timings make the given blackout (ms) and snapshot."""
    c = Cycle(index, flow, "prestarted")
    t0 = 10_000 * MS
    inner = {"retrieve": 0.004, "remap": 0.003, "vm_create": 0.002, "vcpu_restore": 0.001}
    c.edges = {"paused": t0, "freeze_end": t0 + 10 * MS, "jump_start": t0 + int((10 + snapshot_ms) * MS),
               "jump_end": t0 + int((15 + snapshot_ms) * MS), "restore_end": t0 + int((45 + snapshot_ms) * MS),
               "resumed": t0 + int(blackout_ms * MS)}
    c.timings = {**inner, "blackout": blackout_ms / 1e3}
    c.dma = {"dmas": 1000, "faults": faults, "in_blackout": in_blackout, "records_in_blackout": in_blackout // 3}
    c.checks = [Check("a check", ok, "")]
    return c


def test_rows_from_a_report_take_medians_without_the_snapshot_and_judge_the_targets() -> None:
    hr = HarnessReport({})
    hr.cycles = [_cycle(1, "persistent", 180, 100, 40), _cycle(2, "persistent", 160, 80, 25),
                 _cycle(3, "persistent", 170, 90, 31), _cycle(1, "ephemeral", 999, 0, 5)]  # another flow: ignored
    floor = rb.Floor(interpreter=0.02, vmm_imports=0.3, daemon_imports=0.35, fuse_mount=0.001)
    variant = rb.VARIANTS[0]  # 2 MiB maps, pre-started: < 100 ms
    rows = {name.split(",")[0].strip(): (value, kw)
            for name, value, _unit, kw in rb.row_results(hr, "persistent", variant, floor=floor, what="test")}
    value, kw = rows["blackout"]
    assert value == pytest.approx(80.0)  # medians of 80, 80, 80: the snapshot left out
    assert kw["below"] == 100 and "snapshot 90 ms left out (with it 170)" in kw["detail"]
    assert "freeze 10, jump 5, mount 30" in kw["detail"]
    assert rows["of which the Python start-up floor"][0] == pytest.approx(1.0)  # pre-started: the mount call
    assert rows["DMAs served in each blackout"][0] == 25  # the fewest
    assert rows["DMA faults"][0] == 0 and rows["checks held"][0] == 3
    assert rb.Floor.in_blackout(floor, "cold") == pytest.approx(0.651)

    report = Report()
    report.area = "restart"
    for name, value, unit, kw in rb.row_results(hr, "persistent", variant, floor=floor, what="test"):
        report.add(name, value, unit, **kw)
    assert not report.misses

    hr.cycles[1] = _cycle(2, "persistent", 300, 10, 0, faults=2, ok=False)
    report = Report()
    for name, value, unit, kw in rb.row_results(hr, "persistent", rb.VARIANTS[2], floor=floor, what="test",
                                                leaves=[np.full(4, 2 * MiB)]):
        report.add(name, value, unit, **kw)
    missed = {r.name.split(",")[0].strip() for r in report.misses}
    assert missed == {"DMAs served in each blackout", "DMA faults", "IOVAs on 4 KiB leaves after each rebuild",
                      "checks held"}


def test_the_mount_part_is_split_at_the_new_daemons_log_lines() -> None:
    c = _cycle(1, "persistent", 180, 100, 40)  # mount: jump_end + 30 ms
    t = (c.edges["jump_end"] // MS) / 1e3  # the log's clock: local time, to the millisecond

    def line(dt_ms: int, msg: str) -> str:
        at = t + dt_ms / 1e3
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at)) + f",{int(round(at * 1e3)) % 1000:03d} 7 INFO x: {msg}"

    log = "\n".join([line(-500, "control socket /old"), line(12, "host.img: was not closed cleanly; state recovered"),
                     line(20, "live update: boot 1, 1 sessions restored, 0 refused"), line(23, "mounting"),
                     line(24, "control socket /s"), "a line without a stamp"])
    steps = rb.mount_steps(log, [c])
    assert list(steps) == list(rb.MOUNT_STEPS)
    assert [round(v * 1e3) for v in steps.values()] == [12, 8, 4, 6]  # and 6 ms until the harness saw it


def test_a_report_without_a_blackout_is_a_miss_naming_the_error() -> None:
    hr = HarnessReport({})
    hr.aborted = "persistent run: pkfuse mount exited 2"
    report = Report()
    for name, value, unit, kw in rb.row_results(hr, "persistent", rb.VARIANTS[0], floor=None, what="test"):
        report.add(name, value, unit, **kw)
    assert report.misses and "pkfuse mount exited 2" in report.misses[0].detail


def test_the_restart_area_is_asked_for_not_run_by_default() -> None:
    assert "restart" in AREAS and "restart" not in DEFAULT_AREAS


@pytest.mark.mount
@pytest.mark.slow
def test_a_4k_row_runs_with_4k_leaves_no_fault_and_every_check(tmp_path: Path) -> None:
    if not (shutil.which("fusermount3") and os.path.exists("/dev/fuse")):
        pytest.skip("the restart harness needs FUSE")
    report = Report()
    report.area = "restart"
    rb.run_row(report, str(tmp_path), "persistent", rb.VARIANTS[2], guest=64 * MiB, cycles=1, dirty_share=0.25,
               floor=None)
    got = {r.name.split(",")[0].strip(): r for r in report.results}
    assert got["IOVAs on 4 KiB leaves after each rebuild"].value == 1.0, got
    assert got["DMA faults"].ok and got["checks held"].ok, [r.detail for r in report.results]
    assert got["DMAs served in each blackout"].value >= 1
    assert "dirty share 0.25" in got["blackout"].detail
    assert list(tmp_path.iterdir()) == []  # the row's work directory is removed
