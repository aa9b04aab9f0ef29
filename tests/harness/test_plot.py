"""``restart-test --plot`` and the progress bar, on synthetic reports: no process is started here.

The figure's data (``plot.bars``) is compared with the parts ``Cycle.blackout()`` gives for cycles
whose edges and timings are set by hand; the PNG is checked to be one, of the size
``plot.figure_size`` says; the progress line (``progress.render``) on known states; ``--plot``
where matplotlib cannot be imported is one line before anything starts.
"""

from __future__ import annotations

import io
import struct
import sys
from pathlib import Path

import pytest

from pkfuse.cli import progress
from pkfuse.cli.entry import main as pkfuse_main
from pkfuse.harness import plot
from pkfuse.harness.checks import Check
from pkfuse.harness.cycle import BLACKOUT_PARTS, Cycle
from pkfuse.harness.report import Report

MiB = 1 << 20
MS = 1_000_000  #: ns
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def make_cycle(index: int, flow: str, parts_ms: dict[str, int] | None, *, ok: bool = True,
               t0: int = 1_800_000_000 * 10**9) -> Cycle:
    """A cycle whose ``blackout()`` gives ``parts_ms`` (every part of BLACKOUT_PARTS), or none if None."""
    c = Cycle(index, flow, "prestarted")
    c.add(Check("guest memory clean after the freeze", ok, "synthetic"))
    if parts_ms is None:
        return c
    p = {k: parts_ms[k] * MS for k in BLACKOUT_PARTS}
    e = c.edges
    e["paused"] = t0
    e["freeze_end"] = t0 + p["freeze"]
    e["jump_start"] = e["freeze_end"] + p["snapshot"]
    e["jump_end"] = e["jump_start"] + p["jump"]
    e["restore_end"] = e["jump_end"] + p["mount"]  # seen by the harness before the successor retrieves
    retrieving = e["restore_end"] + p["wait"]
    inner = ("retrieve", "remap", "vm_create", "vcpu_restore")
    e["resumed"] = retrieving + sum(p[k] for k in inner)
    c.timings = {k: p[k] / 1e9 for k in inner}
    c.timings["blackout"] = (e["resumed"] - e["paused"]) / 1e9
    return c


PERSISTENT = [dict(zip(BLACKOUT_PARTS, (11, 114, 15, 40, 3, 10, 8, 8, 4))),
              dict(zip(BLACKOUT_PARTS, (12, 120, 14, 38, 2, 11, 7, 9, 5)))]
EPHEMERAL = [dict(zip(BLACKOUT_PARTS, (16, 127, 20, 68, 4, 15, 7, 9, 3))),
             dict(zip(BLACKOUT_PARTS, (15, 130, 21, 70, 5, 14, 8, 9, 3))),
             dict(zip(BLACKOUT_PARTS, (17, 125, 19, 66, 3, 16, 6, 10, 4)))]


@pytest.fixture
def report() -> Report:
    r = Report({"guest_size": 64 * MiB, "vcpus": 2, "engine": "auto", "successors": "prestarted"})
    r.cycles = [make_cycle(i + 1, "persistent", p) for i, p in enumerate(PERSISTENT)]
    r.cycles += [make_cycle(i + 1, "ephemeral", p, ok=i != 1) for i, p in enumerate(EPHEMERAL)]
    for c in r.cycles:
        c.engine = "kvm"
    return r


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR", data[:16]
    assert data[-12:-8] == b"\0\0\0\0" and data[-8:-4] == b"IEND"  # complete: the empty IEND chunk last
    return struct.unpack(">II", data[16:24])


def test_the_synthetic_cycles_give_the_parts_they_were_built_with(report: Report) -> None:
    b = report.cycles[0].blackout()
    assert {k: round(b[k] * 1e3, 6) for k in BLACKOUT_PARTS} == PERSISTENT[0]
    assert b["total"] == pytest.approx(sum(PERSISTENT[0].values()) / 1e3)


def test_the_bars_are_each_cycles_parts_in_ms_one_panel_per_flow(report: Report) -> None:
    data = plot.bars(report)
    assert [fb.flow for fb in data] == ["persistent", "ephemeral"]
    for fb, want in zip(data, (PERSISTENT, EPHEMERAL)):
        assert fb.cycles == list(range(1, len(want) + 1)) and all(fb.measured)
        for part in BLACKOUT_PARTS:
            assert fb.heights[part] == pytest.approx([w[part] for w in want], abs=1e-5), part
            mine = [c for c in report.cycles if c.flow == fb.flow]
            assert fb.heights[part] == pytest.approx([c.blackout()[part] * 1e3 for c in mine])
        assert fb.totals() == pytest.approx([sum(w.values()) for w in want], abs=1e-5)
    assert data[0].failed == [False, False] and data[1].failed == [False, True, False]


def test_a_cycle_without_a_blackout_is_an_empty_bar_and_flows_keep_their_order() -> None:
    r = Report({"guest_size": 2 << 30, "vcpus": 1, "engine": "unicorn", "successors": "cold"})
    r.cycles = [make_cycle(1, "ephemeral", EPHEMERAL[0]), make_cycle(2, "ephemeral", None, ok=False)]
    (fb,) = plot.bars(r)
    assert fb.flow == "ephemeral" and fb.measured == [True, False] and fb.failed == [False, True]
    assert all(fb.heights[p][1] == 0.0 for p in BLACKOUT_PARTS)
    assert plot.title(r) == "restart-test blackout: 2 GiB guest, 1 vCPU, unicorn, successors cold"


def test_the_title_names_the_engine_the_vmms_ran_on(report: Report) -> None:
    assert plot.title(report) == "restart-test blackout: 64 MiB guest, 2 vCPUs, kvm, successors prestarted"


def test_the_png_is_written_a_real_png_of_the_expected_size(report: Report, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "blackout.png"
    size = plot.write_png(report, str(out))
    assert size == plot.figure_size(2) == png_size(out) == (1160, 480)
    one = Report(report.config, [c for c in report.cycles if c.flow == "persistent"])
    plot.write_png(one, str(out))
    assert png_size(out) == plot.figure_size(1)
    plot.write_png(Report(report.config, aborted="persistent run: the guest did not get going"), str(out))
    assert png_size(out) == plot.figure_size(0)  # nothing ran: still a figure, saying so


def test_plot_without_matplotlib_is_one_line_before_anything_starts(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what `import matplotlib` then raises ImportError for
    with pytest.raises(plot.PlotUnavailable, match="--plot needs matplotlib"):
        plot.require_matplotlib()
    workdir = tmp_path / "rt"
    rc = pkfuse_main(["restart-test", "--plot", str(tmp_path / "b.png"), "--workdir", str(workdir)])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("pkfuse: error: --plot needs matplotlib") and err.count("\n") == 1, err
    assert "plot extra" in err and not workdir.exists() and not (tmp_path / "b.png").exists()


def test_plot_into_a_missing_directory_is_one_line_before_anything_starts(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    rc = pkfuse_main(["restart-test", "--plot", str(tmp_path / "no" / "b.png"), "--workdir", str(tmp_path / "rt")])
    err = capsys.readouterr().err
    assert rc == 1 and err == f"pkfuse: error: --plot {tmp_path / 'no' / 'b.png'}: no directory {tmp_path / 'no'}\n"
    assert not (tmp_path / "rt").exists()


# ------------------------------------------------------------------ the progress bar


def state(**kw: object) -> progress.State:
    fields: dict[str, object] = {"asked": {"persistent": 10, "ephemeral": 10},
                                 "done": {"persistent": 5, "ephemeral": 0}, "failures": 1,
                                 "last_blackout_s": 0.2144, "elapsed_s": 50.0, "done_at_s": 50.0, **kw}
    return progress.State(**fields)  # type: ignore[arg-type]


def test_the_line_shows_flows_last_blackout_failures_elapsed_and_eta() -> None:
    line = progress.render(state(), 120)
    text = "persistent 5/10 ephemeral 0/10 | last blackout 214 ms | 1 failed | 50s elapsed, ETA 2m30s"
    assert line == f"[{'#' * 6}{'-' * 21}] {text}"  # 27 cells fill 119 columns; a quarter done
    assert len(line) == 119


def test_the_bar_narrows_the_words_shorten_and_the_line_never_reaches_the_last_column() -> None:
    s = state()
    widths = {w: progress.render(s, w) for w in (200, 100, 90, 80, 75, 60, 1, 0)}
    assert widths[200].startswith("[" + "#" * 7 + "-" * 23 + "] ")  # BAR_MAX cells at most
    assert widths[100].startswith("[#------] persistent 5/10 ephemeral 0/10 | last blackout 214 ms")  # 7 cells
    short = "persistent 5/10 ephemeral 0/10 | last 214 ms | 1 failed | 50s, ETA 2m30s"
    assert widths[90] == f"[###-----------] {short}"  # the long words leave no bar: the short ones do
    assert widths[80] == f"[#---] {short}"  # a terminal of 80 columns: a bar of 4 cells, all the words
    assert widths[75] == short  # no room for a bar
    assert widths[60] == short[:59]
    assert all(len(line) <= max(w - 1, 0) for w, line in widths.items())
    assert widths[0] == widths[1] == ""


def test_the_eta_counts_down_between_cycles() -> None:
    assert state().eta_s() == 150.0  # 10 s a cycle, 15 left
    assert state(elapsed_s=62.0).eta_s() == 138.0
    assert state(elapsed_s=500.0).eta_s() == 0.0  # late: not negative


def test_before_the_first_cycle_the_eta_is_unknown_and_after_the_last_zero() -> None:
    start = state(done={"persistent": 0, "ephemeral": 0}, failures=0, last_blackout_s=None, elapsed_s=3.2)
    assert start.eta_s() is None
    assert progress.render(start, 200).endswith("last blackout - | 0 failed | 3s elapsed, ETA ?")
    end = state(done={"persistent": 10, "ephemeral": 10}, elapsed_s=4000.0)
    assert end.eta_s() == 0.0
    assert progress.render(end, 200).startswith("[" + "#" * 30 + "] ")
    assert progress.render(end, 200).endswith("1h06m elapsed, ETA 0s")


def test_durations() -> None:
    assert [progress.duration(s) for s in (None, 0, 59.4, 60, 185, 3599, 3600, 7380)] == \
        ["?", "0s", "59s", "1m00s", "3m05s", "59m59s", "1h00m", "2h03m"]


def test_the_bar_is_redrawn_in_place_counts_late_failures_and_is_cleared_at_the_end() -> None:
    out = io.StringIO()
    now = [100.0]
    bar = progress.ProgressBar({"persistent": 3}, out, tick=3600, clock=lambda: now[0])
    bar.start()
    now[0] = 104.0
    first = make_cycle(1, "persistent", PERSISTENT[0])
    bar.cycle_done(first)
    now[0] = 110.0
    first.add(Check("guest memory clean after finish (at the next freeze)", False, "judged at cycle 2's freeze"))
    bar.cycle_done(make_cycle(2, "persistent", None))  # the run ended inside it: no blackout
    bar.clear()
    bar.draw()  # after clear: nothing more
    frames = out.getvalue().split("\r")[1:]
    start = progress.State({"persistent": 3}, {"persistent": 0})
    assert frames[0] == progress.render(start, 80) + progress.ERASE  # not a terminal: 80 columns
    assert frames[0].startswith("[---") and frames[0].endswith("0 failed | 0s elapsed, ETA ?\x1b[K")
    total = sum(PERSISTENT[0].values())
    assert frames[1].endswith(f"] persistent 1/3 | last blackout {total} ms | 0 failed | 4s elapsed, ETA 8s\x1b[K")
    # the second cycle has no blackout: the last one stays; the first failed since it was shown
    assert frames[2].endswith(f"] persistent 2/3 | last blackout {total} ms | 1 failed | 10s elapsed, ETA 5s\x1b[K")
    assert frames[3:] == ["\x1b[K"] and "\n" not in out.getvalue()
