"""``pkfuse vmm``: run in the foreground, stop on SIGTERM with the vCPUs saved, the monitor's live
update to a pre-started ``--incoming`` successor across a SIGKILL of the daemon, verify, errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import Mount, reap

from pkfuse.vmm import abi, handover, verify

pytestmark = pytest.mark.mount

PKFUSE = [sys.executable, "-m", "pkfuse"]


def pkfuse(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PKFUSE, *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def live(make_image: Callable[..., Path], tmp_path: Path, mount_image: Callable[..., Mount]) -> Mount:
    return mount_image(make_image("128M"), "--control", str(tmp_path / "ctl.sock"))


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    """VMM processes a test started: SIGKILLed and reaped at teardown if still running."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
        reap(p)


def _guest(m: Mount, name: str = "vm0") -> str:
    return str(m.path / "guest_mem" / name)


def _ram(path: str) -> np.ndarray:
    return np.frombuffer(Path(path).read_bytes(), np.uint8)


def _wait_for(path: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.01)


def _monitor(sock: Path, *words: str) -> str:
    r = pkfuse("vmm", "monitor", str(sock), *words)
    assert r.returncode == 0, (r.stdout, r.stderr)
    return r.stdout.strip()


def test_run_for_seconds_prints_a_final_status_and_writes_json(live: Mount, tmp_path: Path) -> None:
    out = tmp_path / "vm.json"
    r = pkfuse("vmm", "run", _guest(live), "--memory", "16M", "--seconds", "1", "--json", str(out))
    assert r.returncode == 0, r.stderr
    assert "steps " in r.stderr and "[time; vCPUs saved]" in r.stderr
    d = json.loads(out.read_text())
    assert d["vcpus"] == 1 and d["memory"] == 16 << 20 and d["counters"][0] > 0 and d["guest_errors"] == {}
    assert verify.verify(_ram(_guest(live))).ok


def test_sigterm_pauses_saves_and_stops_then_resume_continues(live: Mount, procs: list) -> None:
    p = subprocess.Popen([*PKFUSE, "vmm", "run", _guest(live), "--memory", "16M", "--quiet"],
                         stderr=subprocess.PIPE)
    procs.append(p)
    deadline = time.monotonic() + 30
    while not (os.path.exists(_guest(live)) and verify.verify(_ram(_guest(live))).vcpus
               and verify.verify(_ram(_guest(live))).vcpus[0].counter > 100):
        assert time.monotonic() < deadline and p.poll() is None, "the VMM did not get going"
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    assert p.wait(30) == 0
    assert b"SIGTERM; vCPUs saved" in p.stderr.read()  # type: ignore[union-attr]
    before = verify.verify(_ram(_guest(live)))
    fd = os.open(_guest(live) + ".vmstate", os.O_RDONLY)
    try:
        assert handover.read(fd) is not None
    finally:
        os.close(fd)
    r = pkfuse("vmm", "run", _guest(live), "--memory", "16M", "--resume", "--seconds", "0.5")
    assert r.returncode == 0, r.stderr
    after = verify.verify(_ram(_guest(live)))
    assert after.ok and verify.progressed(before, after, advanced=True) == []


def test_a_live_update_from_the_monitor_to_a_prestarted_successor(live: Mount, tmp_path: Path,
                                                                   procs: list) -> None:
    mon = tmp_path / "vmm.sock"
    old = subprocess.Popen([*PKFUSE, "vmm", "run", _guest(live), "--memory", "16M", "--monitor", str(mon),
                            "--quiet"], stderr=subprocess.PIPE)
    procs.append(old)
    _wait_for(mon)
    assert json.loads(_monitor(mon, "status")[3:])["engine"] in ("kvm", "unicorn")
    new = subprocess.Popen([*PKFUSE, "vmm", "run", "--incoming", "vm0", str(live.path), "--seconds", "1",
                            "--json", str(tmp_path / "new.json"), "--quiet"], stderr=subprocess.PIPE)
    procs.append(new)  # cpr-transfer's order: the successor first, waiting for the restart
    assert _monitor(mon, "prepare", "vm0") == "ok prepared vm0"
    assert _monitor(mon, "freeze").startswith("ok frozen")
    assert old.wait(30) == 0
    before = verify.verify(_ram(_guest(live)))
    live.restart()  # the kexec
    assert new.wait(60) == 0, new.stderr.read()  # type: ignore[union-attr]
    d = json.loads((tmp_path / "new.json").read_text())
    assert d["guest_errors"] == {} and d["hwpt"] is not None and d["timings"]["blackout"] > 0
    after = verify.verify(_ram(_guest(live)))
    assert after.ok and verify.progressed(before, after, advanced=True) == []
    assert "0 sessions" in (live.path / ".pkernfs" / "status").read_text()


def test_pause_holds_the_guest_still_and_continue_runs_it_again(live: Mount, tmp_path: Path, procs: list) -> None:
    mon = tmp_path / "vmm.sock"
    vm = subprocess.Popen([*PKFUSE, "vmm", "run", _guest(live), "--memory", "16M", "--monitor", str(mon),
                           "--quiet"], stderr=subprocess.PIPE)
    procs.append(vm)
    _wait_for(mon)
    assert _monitor(mon, "pause") == "ok paused"
    held = json.loads(_monitor(mon, "status")[3:])
    time.sleep(0.2)
    still = json.loads(_monitor(mon, "status")[3:])
    assert held["paused"] and still["counters"] == held["counters"]
    assert verify.verify(_ram(_guest(live))).ok  # a paused guest's RAM is whole: the verifier's full pass
    assert _monitor(mon, "continue") == "ok running"
    deadline = time.monotonic() + 10
    while json.loads(_monitor(mon, "status")[3:])["counters"][0] <= held["counters"][0]:
        assert time.monotonic() < deadline, "the guest did not run again after continue"
        time.sleep(0.01)
    assert _monitor(mon, "stop") == "ok stopping" and vm.wait(30) == 0


def test_verify_fails_on_a_damaged_guest_with_the_gpa(live: Mount) -> None:
    assert pkfuse("vmm", "run", _guest(live), "--memory", "16M", "--seconds", "0.5").returncode == 0
    state = abi.VCPU_STATE_GPA + abi.VCPU_STATE.fields["checksum"][1]
    with open(_guest(live), "r+b", buffering=0) as f:
        f.seek(state)
        f.write(b"\x55" * 8)
    r = pkfuse("vmm", "verify", _guest(live))
    assert r.returncode == 1 and f"{state:#x}" in r.stdout, r.stdout


@pytest.mark.parametrize(("args", "message"), [
    (["--vcpus", "1"], "--memory is required"),
    (["--memory", "3M"], "a multiple of 2 MiB"),
    (["--memory", "16M", "--vcpus", "0"], "0 vCPUs"),
    (["--memory", "16M", "--resume"], "holds no saved state to resume"),
])
def test_bad_input_is_one_line(live: Mount, args: list[str], message: str) -> None:
    r = pkfuse("vmm", "run", _guest(live), *args)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("pkfuse: error: ") and message in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_a_file_not_on_a_mount_is_one_line(tmp_path: Path) -> None:
    r = pkfuse("vmm", "run", str(tmp_path / "vm0"), "--memory", "16M")
    assert r.returncode == 1 and "is not on a pkfuse mount" in r.stderr and "Traceback" not in r.stderr


def test_sigterm_while_an_incoming_vmm_waits_stops_it_in_one_line(live: Mount, procs: list) -> None:
    p = subprocess.Popen([*PKFUSE, "vmm", "run", "--incoming", "nosuch", str(live.path)], stderr=subprocess.PIPE,
                         text=True)
    procs.append(p)
    time.sleep(1.0)  # waiting for a daemon that offers the session
    assert p.poll() is None
    p.send_signal(signal.SIGTERM)
    assert p.wait(10) == 1
    err = p.stderr.read()  # type: ignore[union-attr]
    assert err.strip() == "pkfuse: error: stopped by SIGTERM before the VM ran", err
