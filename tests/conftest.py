"""Shared test infrastructure: images in tmp_path and real pkfuse mounts.

Every mount made here is unmounted and its daemon reaped at teardown, also
when the test failed or the daemon died; a session-scoped guard sweeps up
anything a crashed fixture left behind. A daemon that logged a traceback or
an ERROR line (unless the test listed it in ``Mount.expected_errors``) fails
the test that used it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from backing.mkfs import mkfs, parse_size
from pkfuse.daemon.mountinfo import mounted_paths

#: the IOMMU tests' ``store`` and ``io`` fixtures (a plugin, not an import in each module: ruff's
#: F811 flags every test that takes an imported fixture as a parameter; and a second conftest.py
#: would shadow this one as the module ``conftest`` the mount tests import Mount from)
pytest_plugins = ["iommu_helpers", "vmm_helpers"]

FUSERMOUNT = shutil.which("fusermount3") or "fusermount3"
MOUNT_TIMEOUT = 20.0  #: seconds until a daemon's mount must answer
EXIT_TIMEOUT = 10.0  #: seconds for a daemon to exit after unmount

# every daemon and mountpoint the session started, for the session guard
_LIVE: dict[int, tuple[subprocess.Popen[bytes], Path]] = {}


def is_mounted(path: Path) -> bool:
    return str(path) in mounted_paths()


def force_unmount(path: Path) -> None:
    """Unmount ``path`` whatever state its daemon is in."""
    for cmd in ([FUSERMOUNT, "-u", "-q", str(path)], [FUSERMOUNT, "-u", "-z", "-q", str(path)],
                ["umount", "-l", str(path)]):
        if not is_mounted(path):
            return
        subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)


def reap(proc: subprocess.Popen[bytes], timeout: float = EXIT_TIMEOUT) -> int:
    """Wait for a daemon; terminate, then kill it if it does not exit."""
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()
    try:
        return proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def daemon_command(image: Path, mnt: Path, log: Path, *extra: str) -> list[str]:
    """The foreground daemon's command line. Its control socket goes beside the log unless
    ``extra`` names one: a test that kills daemons must not leave sockets in /run/pkfuse."""
    control = () if "--control" in extra else ("--control", str(log.with_name(mnt.name + ".ctl")))
    return [sys.executable, "-m", "pkfuse", "mount", "--foreground", "--log", str(log),
            *control, *extra, str(image), str(mnt)]


class Mount:
    """A pkfuse daemon serving ``image`` at ``path``, started in a subprocess."""

    def __init__(self, image: Path, path: Path, log: Path, extra: tuple[str, ...] = ()) -> None:
        self.image = image
        self.path = path
        self.log = log
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.expected_errors: tuple[str, ...] = ()  #: substrings of ERROR log lines the test provokes

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        self.starts += 1
        with open(self.log, "ab") as log:
            log.write(f"--- start {self.starts}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(daemon_command(self.image, self.path, self.log, *self.extra),
                                         stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        _LIVE[self.proc.pid] = (self.proc, self.path)
        self.wait_mounted()

    def wait_mounted(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + MOUNT_TIMEOUT
        while not is_mounted(self.path):
            if self.proc.poll() is not None:
                pytest.fail(f"pkfuse daemon exited with {self.proc.returncode} before mounting:\n{self.log_text()}")
            if time.monotonic() > deadline:
                pytest.fail(f"mount did not answer within {MOUNT_TIMEOUT}s:\n{self.log_text()}")
            time.sleep(0.01)
        os.stat(self.path)  # answers, not only listed

    def kill(self) -> None:
        """SIGKILL the daemon, as a restart does, and clear the dead mount."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        _LIVE.pop(self.proc.pid, None)
        force_unmount(self.path)

    def restart(self) -> None:
        """The restart: SIGKILL the daemon at this instant, then mount again."""
        self.kill()
        self.start()

    def unmount(self) -> int:
        """Unmount cleanly; returns the daemon's exit status."""
        assert self.proc is not None
        subprocess.run([FUSERMOUNT, "-u", str(self.path)], check=False, capture_output=True)
        rc = reap(self.proc)
        _LIVE.pop(self.proc.pid, None)
        force_unmount(self.path)
        return rc

    def cleanup(self) -> None:
        """Teardown that works in every state: mounted, dead, hung, gone."""
        if self.proc is not None and self.proc.poll() is None:
            if is_mounted(self.path):
                subprocess.run([FUSERMOUNT, "-u", "-q", str(self.path)], check=False, capture_output=True)
            reap(self.proc)
        if self.proc is not None:
            _LIVE.pop(self.proc.pid, None)
        force_unmount(self.path)

    #: ERROR lines that are not the daemon's fault: pyfuse3 logs a reply the
    #: kernel no longer waits for (its caller was interrupted or gone, as at
    #: a close racing an unmount) as "fuse_reply_* failed with ENOENT"
    BENIGN_ERRORS = ("fuse_reply_* failed with No such file or directory",)

    def unexpected_errors(self) -> list[str]:
        """Log lines of a traceback or of an ERROR the test did not expect."""
        lines = self.log_text().splitlines()
        if any(line.startswith("Traceback (most recent call last)") for line in lines):
            return lines
        return [line for line in lines if (" ERROR " in line or " CRITICAL " in line)
                and not any(e in line for e in self.expected_errors + self.BENIGN_ERRORS)]

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"


@pytest.fixture
def make_image(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``make_image(size="256M", name="pk.img", **mkfs_kwargs)`` -> path of a fresh image."""

    def make(size: str | int = "256M", name: str = "pk.img", **kwargs: object) -> Path:
        path = tmp_path / name
        mkfs(path, parse_size(size) if isinstance(size, str) else size, **kwargs)  # type: ignore[arg-type]
        return path

    return make


@pytest.fixture
def image(make_image: Callable[..., Path]) -> Path:
    """A fresh 256 MiB image."""
    return make_image()


@pytest.fixture
def mount_image(tmp_path: Path) -> Iterator[Callable[..., Mount]]:
    """Factory: ``mount_image(image, *daemon_args, name="mnt")`` -> a started ``Mount``.

    Teardown unmounts and reaps every mount made, also on failure, and fails
    the test if a daemon logged a traceback.
    """
    made: list[Mount] = []

    def start(image: Path, *extra: str, name: str = "mnt") -> Mount:
        m = Mount(image, tmp_path / name, tmp_path / f"{name}.log", extra)
        made.append(m)
        m.start()
        return m

    yield start
    for m in made:
        m.cleanup()
    for m in made:
        assert not is_mounted(m.path), f"stale mount {m.path}"
        bad = m.unexpected_errors()
        if bad:
            pytest.fail(f"daemon for {m.path} logged a traceback or an error:\n" + "\n".join(bad))


@pytest.fixture
def mounted(image: Path, mount_image: Callable[..., Mount]) -> Mount:
    """A fresh 256 MiB image mounted by a real daemon; ``mounted.path`` is the mountpoint."""
    return mount_image(image)


@pytest.fixture(scope="session", autouse=True)
def _session_mount_guard() -> Iterator[None]:
    """Unmount and kill whatever the suite left running, whatever happened."""
    yield
    for pid, (proc, path) in list(_LIVE.items()):
        with contextlib.suppress(Exception):
            force_unmount(path)
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        _LIVE.pop(pid, None)


def _daemon_pid(mnt: Path) -> int | None:
    try:
        for line in (mnt / ".pkernfs" / "status").read_text().splitlines():
            if line.startswith("daemon_pid:"):
                return int(line.split(":")[1])
    except OSError:
        return None
    return None


def run_example(name: str, image: Path, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``examples/NAME`` against a fresh ``pkfuse mount`` of ``image``, as a user would.

    An example that plays the kexec starts its own second daemon; whatever
    daemon serves the mount at the end is stopped (by the pid its status
    names) and the mount cleared, also when the example fails.
    """
    example = Path(__file__).resolve().parents[1] / "examples" / name
    mnt = tmp_path / "ex"
    mnt.mkdir()
    pkfuse = [sys.executable, "-m", "pkfuse"]
    subprocess.run([*pkfuse, "mount", "--log", str(tmp_path / "ex.log"), "--control", str(tmp_path / "ex.sock"),
                    str(image), str(mnt)], check=True, capture_output=True)
    try:
        return subprocess.run([sys.executable, str(example), str(mnt), *args], capture_output=True, text=True,
                              timeout=120)
    finally:
        pid = _daemon_pid(mnt)  # the example's second daemon, started by the example
        subprocess.run([*pkfuse, "umount", str(mnt)], capture_output=True)
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 0)
                os.kill(pid, signal.SIGKILL)
        subprocess.run([FUSERMOUNT, "-u", "-z", str(mnt)], capture_output=True)
