"""scripts/setup.sh waits for another package manager's apt/dpkg locks, bounded, and says so.

Nothing here touches the machine's package state: the lock paths are files in
tmp_path (``PKFUSE_APT_LOCKS``), ``apt-get``, ``dpkg-query`` and ``sudo`` are
stand-ins on ``PATH`` that only record their arguments, and the virtual
environment is a stub whose stamp says "installed", so setup does nothing
after apt.
"""

from __future__ import annotations

import hashlib
import os
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
WAIT_TIMEOUT = 60.0  #: seconds for setup to reach an observable point (generous: a busy machine)

#: holds an fcntl write lock (as apt and dpkg take them) on argv[1] until its stdin closes
HOLDER = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.lockf(fd, fcntl.LOCK_EX)
print("locked", flush=True)
sys.stdin.read()
"""


@dataclass
class FakeMachine:
    env: dict[str, str]
    lock: Path
    apt_log: Path


@pytest.fixture
def machine(tmp_path: Path) -> FakeMachine:
    """A PATH with stand-in package tools and a venv stub that setup takes as current."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    apt_log = tmp_path / "apt-get.log"
    for name, body in {"apt-get": f'echo "$*" >> {apt_log}', "dpkg-query": "exit 1",  # nothing installed
                       "sudo": 'exec "$@"'}.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    interp = os.path.realpath(sys.executable)
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "pyvenv.cfg").write_text(f"executable = {interp}\n")
    (venv / "bin" / "python").write_text("#!/bin/sh\nexit 0\n")  # compileall: nothing to do
    (venv / "bin" / "python").chmod(0o755)
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    (venv / ".pkfuse-installed").write_text(f"{digest} {interp}\n")
    lock = tmp_path / "lock-frontend"
    lock.touch()
    env = {"PATH": f"{bin_dir}:/usr/sbin:/usr/bin:/sbin:/bin", "PKFUSE_VENV": str(venv),
           "PKFUSE_PYTHON": sys.executable, "PKFUSE_APT_LOCKS": f"{lock}:{tmp_path / 'lock'}"}
    return FakeMachine(env, lock, apt_log)


def _stop(proc: subprocess.Popen[str]) -> None:
    """End ``proc`` (one we started) and its pipes, whatever state it is in."""
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()


@pytest.fixture
def holder(machine: FakeMachine) -> Iterator[subprocess.Popen[str]]:
    """A process holding the lock; it releases it when its stdin is closed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(machine.lock)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "locked\n"  # observed: it holds the lock
        yield proc
    finally:
        _stop(proc)


@pytest.fixture
def start_setup(machine: FakeMachine) -> Iterator:
    started: list[subprocess.Popen[str]] = []

    def start(**env: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen(["bash", str(ROOT / "scripts" / "setup.sh")], stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, env={**machine.env, **env})
        started.append(proc)
        return proc

    yield start
    for proc in started:
        _stop(proc)


def read_until(proc: subprocess.Popen[str], needle: str) -> str:
    """``proc``'s stderr up to and including the first line containing ``needle``."""
    assert proc.stderr is not None
    seen = ""
    deadline = time.monotonic() + WAIT_TIMEOUT
    while needle not in seen:
        left = deadline - time.monotonic()
        assert left > 0 and select.select([proc.stderr], [], [], left)[0], f"no {needle!r} in {seen!r}"
        line = proc.stderr.readline()
        assert line, f"stderr ended without {needle!r}: {seen!r}"
        seen += line
    return seen


def test_setup_waits_for_a_held_dpkg_lock_says_who_holds_it_and_proceeds_once_released(
        machine: FakeMachine, holder: subprocess.Popen[str], start_setup) -> None:
    setup = start_setup()
    said = read_until(setup, "waiting for")
    assert f"waiting for {machine.lock}, held by pid {holder.pid} (python" in said, said
    assert "300s" in said
    assert not machine.apt_log.exists()  # nothing ran while the lock was held
    assert holder.stdin is not None
    holder.stdin.close()  # release
    assert holder.wait(WAIT_TIMEOUT) == 0
    _, err = setup.communicate(timeout=WAIT_TIMEOUT)
    assert setup.returncode == 0, said + err
    calls = machine.apt_log.read_text().splitlines()
    assert [c.split()[2] for c in calls] == ["update", "install"], calls
    assert all(c.startswith("-o DPkg::Lock::Timeout=") for c in calls), calls  # apt waits too, for the race
    assert "attr" in calls[1].split()


def test_setup_gives_up_on_a_lock_held_too_long_in_one_line_naming_the_holder(
        machine: FakeMachine, holder: subprocess.Popen[str], start_setup) -> None:
    setup = start_setup(PKFUSE_APT_LOCK_TIMEOUT="1")
    _, err = setup.communicate(timeout=WAIT_TIMEOUT)
    assert setup.returncode == 1, err
    errors = [line for line in err.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0] == err.splitlines()[-1], err
    assert errors[0].startswith(f"setup: error: {machine.lock} is still held by pid {holder.pid} (python"), err
    assert "after 1s" in errors[0]
    assert not machine.apt_log.exists()
    assert holder.poll() is None  # setup never touched the holder


def test_setup_with_the_locks_free_does_not_wait(machine: FakeMachine, start_setup) -> None:
    setup = start_setup()
    _, err = setup.communicate(timeout=WAIT_TIMEOUT)
    assert setup.returncode == 0, err
    assert "waiting" not in err
    assert len(machine.apt_log.read_text().splitlines()) == 2
