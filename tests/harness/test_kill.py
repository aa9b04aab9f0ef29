"""``--kill``: the jump at a random instant inside a phase (``pkfuse.harness.kill``), and how each outcome
is judged: a kill before the freeze committed is an unplanned crash -- pkernfs keeps every translation
and the device's DMA, the review's design blocks the device (faults, never misdirected) -- and a kill
after it is still a live update, which a new daemon offers and a successor takes."""

from __future__ import annotations

import os
import random
import subprocess
from pathlib import Path

import pytest
from test_restart import _config, _ok

from pkfuse.harness import kill
from pkfuse.harness.run import run

pytestmark = pytest.mark.mount


def test_a_plan_lands_inside_its_phase_and_random_draws_every_phase() -> None:
    rng = random.Random(1)
    spans = {"prepare": 0.01, "freeze": 0.02, "restore": 0.05, "retrieve": 0.04, "rebuild": 0.03, "finish": 0.02}
    for _ in range(200):
        p = kill.choose("freeze", rng, spans)
        assert p.phase == "freeze" and 0 <= p.delay <= 0.02
        f = kill.choose("finish", rng, spans)  # after the successor's retrieve and rebuild
        assert 0.07 <= f.delay <= 0.09
    assert kill.choose("jump", rng, spans).delay == 0.0
    assert {kill.choose("random", rng, spans).phase for _ in range(300)} == set(kill.KILL_PHASES)
    with pytest.raises(ValueError, match="--kill reboot: one of prepare"):
        kill.choose("reboot", rng, spans)


def test_a_killed_daemon_is_waited_for_until_it_is_gone_not_until_its_command_line_empties(tmp_path: Path) -> None:
    # a dying daemon's command line empties (its memory is gone) before its descriptors close; waiting
    # on the command line let the next mount find the image still locked (CI, 2026-12-03). Stand-in: a
    # process known by pid and start time whose command line never named the image
    from pkfuse.harness.cast import Cast, Proc, pid_alive, start_time

    cast = Cast(tmp_path / "rt")
    sleeper = subprocess.Popen(["sleep", "0.5"])
    try:
        p = Proc("daemon", None, sleeper.pid, start=start_time(sleeper.pid))
        assert pid_alive(p.pid, p.start) and not pid_alive(p.pid, p.start + 1)  # a reused pid is not it
        cast.kill(p)  # not ours to signal (its command line does not name the image): waited for
        assert not pid_alive(p.pid, p.start)
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_busy_image_names_who_holds_its_lock(tmp_path: Path) -> None:
    from backing.mkfs import mkfs
    from backing.store import Store
    from pkfuse.harness.cast import Cast

    cast = Cast(tmp_path / "rt")
    mkfs(cast.image, 16 << 20)
    assert cast.lock_holders() == "no process holds the image's lock now"
    with Store.open(cast.image):
        assert cast.lock_holders().startswith(f"held by pid {os.getpid()} state ")


def _checks(report) -> dict[str, bool]:  # type: ignore[no-untyped-def]
    return {ch.name: ch.ok for ch in report.cycles[0].checks}


def test_a_kill_in_prepare_is_an_unplanned_crash_that_pkernfs_keeps_translating_through(workdir: Path) -> None:
    report = run(_config(workdir, cycles=1, kill="prepare", seed=7))
    _ok(report)
    c = report.cycles[0]
    assert c.outcome == "unplanned crash" and c.kill["struck"] and c.kill["landed"] == "prepare"
    checks = _checks(report)
    assert checks["DMA translation kept through the crash"] and checks["no DMA fault through the crash"]
    assert checks["guest running after a cold boot"] and checks["guest memory clean after the cold boot (all of RAM, paused)"]
    assert c.dma["faults"] == 0 and c.dma["dmas"] > 0


def test_a_kill_in_prepare_leaves_the_reviews_design_blocking_the_device_never_misdirecting(workdir: Path) -> None:
    report = run(_config(workdir, cycles=1, flows=("ephemeral",), kill="prepare", seed=7))
    _ok(report)
    c = report.cycles[0]
    assert c.outcome == "unplanned crash"
    checks = _checks(report)
    assert checks["device blocked after the crash"] and checks["no misdirected DMA through the crash"]
    assert checks["no DMA fault after the new VMM attached"] and checks["no saved copy after finish"]
    assert c.dma["faults"] > 0  # the difference between the designs, shown: the device was blocked


def test_a_kill_in_restore_is_still_a_live_update_the_next_daemon_offers(workdir: Path) -> None:
    report = run(_config(workdir, cycles=1, kill="restore", seed=3))
    _ok(report)
    c = report.cycles[0]
    assert c.outcome == "live update" and c.kill["landed"] in ("restore", "retrieve")
    checks = _checks(report)
    assert checks["translations before = after"] and checks["no DMA fault in the live update"]
    assert checks["guest continued"] and c.blackout()["total"] > 0


@pytest.mark.parametrize("engine", ["kvm", "unicorn"])
@pytest.mark.parametrize("flow", ["persistent", "ephemeral"])
def test_a_short_random_kill_run_passes_for_each_design_and_engine(workdir: Path, flow: str, engine: str) -> None:
    """The suite's short version of ``restart-test --cycles 100 --kill random --flow both --guest-size 2G``."""
    if engine == "kvm" and not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("no /dev/kvm")
    report = run(_config(workdir, cycles=3, flows=(flow,), engine=engine, kill="random", seed=11,
                         guest_size=(16 if engine == "unicorn" else 64) << 20))
    _ok(report)
    assert {c.engine for c in report.cycles} == {engine}
    assert all(c.kill.get("phase") in kill.KILL_PHASES for c in report.cycles)
