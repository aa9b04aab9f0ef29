"""The daemon's lifecycle: mount, serve, unmount, signals, refusals, restart."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from backing.store import Store
from conftest import Mount, force_unmount, is_mounted, mounted_paths
from pkfuse.daemon.fs import ATTR_TIMEOUT
from pkfuse.daemon.unmount import daemon_pid, process_alive

pytestmark = pytest.mark.mount

PKFUSE = [sys.executable, "-m", "pkfuse"]


def status_pid(mnt: Path) -> int:
    """The daemon's pid as its ``.pkernfs/status`` view tells it."""
    status = (mnt / ".pkernfs" / "status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("daemon_pid:")).split()[1])


def pkfuse(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PKFUSE, *args], capture_output=True, text=True, timeout=timeout)


@contextlib.contextmanager
def cli_mounted(image: Path, mnt: Path, *options: str, log: Path | None = None) -> Iterator[Path]:
    """``pkfuse mount [OPTIONS] --log LOG IMAGE MNT`` in daemon mode, asserted to succeed.

    MNT is made first and, whatever the test does, left unmounted; LOG is
    ``log`` beside MNT unless given.
    """
    mnt.mkdir(exist_ok=True)
    try:
        r = pkfuse("mount", *options, "--log", str(log or mnt.parent / "log"), str(image), str(mnt))
        assert r.returncode == 0, r.stderr
        yield mnt
    finally:
        force_unmount(mnt)


def test_mount_shows_the_fixed_tree(mounted: Mount) -> None:
    assert sorted(os.listdir(mounted.path)) == [".pkernfs", "guest_mem", "iommu"]
    assert os.listdir(mounted.path / "iommu") == ["root-pgtables"]


def test_unmount_closes_the_image_cleanly_and_exits_zero(mounted: Mount) -> None:
    (mounted.path / "guest_mem" / "vm0").write_bytes(b"x")
    assert mounted.unmount() == 0
    assert not is_mounted(mounted.path)
    with Store.open(mounted.image) as store:  # the lock is free again
        assert store.lookup(store.lookup(1, b"guest_mem"), b"vm0")
    assert "closed cleanly" in mounted.log_text()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_unmounts_and_exits_zero(mounted: Mount, sig: signal.Signals) -> None:
    os.kill(mounted.pid, sig)
    assert mounted.proc is not None
    assert mounted.proc.wait(10) == 0
    assert not is_mounted(mounted.path)


def test_second_daemon_on_the_same_image_is_refused(mounted: Mount, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    r = pkfuse("mount", "--foreground", str(mounted.image), str(other))
    assert r.returncode == 4
    assert "in use by another pkfuse process" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not is_mounted(other)


def test_mount_on_a_busy_mountpoint_is_refused(mounted: Mount, make_image) -> None:
    """A live pkfuse mount: the advice is to unmount it first, on purpose, not that it is dead."""
    second = make_image(name="second.img")
    r = pkfuse("mount", str(second), str(mounted.path))
    assert r.returncode == 3
    assert "busy" in r.stderr and "Traceback" not in r.stderr
    assert f"pkfuse already serves {mounted.image} there (`pkfuse umount {mounted.path}` first)" in r.stderr
    assert "dead" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_mount_on_the_dead_mount_of_a_killed_daemon_says_busy(mounted: Mount, make_image) -> None:
    assert mounted.proc is not None
    os.kill(mounted.pid, signal.SIGKILL)
    mounted.proc.wait()
    r = pkfuse("mount", str(make_image(name="second.img")), str(mounted.path))
    assert r.returncode == 3
    assert "busy" in r.stderr and "does not exist" not in r.stderr
    assert "dead FUSE mount" in r.stderr and f"run `pkfuse umount {mounted.path}`" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_the_advice_for_a_killed_daemons_mount_works(image: Path, make_image, tmp_path: Path) -> None:
    """``pkfuse mount`` on the dead mount names ``pkfuse umount MNT``; run, it clears the way."""
    with cli_mounted(image, tmp_path / "mnt") as mnt:
        pid = status_pid(mnt)
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while process_alive(pid):  # observed gone: its /dev/fuse is closed, the mount is dead
            assert time.monotonic() < deadline, f"killed daemon {pid} still runs"
            time.sleep(0.01)
        second = make_image(name="second.img")
        r = pkfuse("mount", str(second), str(mnt))
        assert r.returncode == 3 and "dead FUSE mount" in r.stderr, r.stderr
        advice = r.stderr.split("`")[1]
        assert advice == f"pkfuse umount {mnt}"
        assert pkfuse(*advice.split()[1:]).returncode == 0
        r = pkfuse("mount", "--log", str(tmp_path / "second.log"), str(second), str(mnt))
        assert r.returncode == 0, r.stderr
        assert pkfuse("umount", str(mnt)).returncode == 0


def test_mount_on_a_stopped_daemons_mount_does_not_hang_and_says_it_is_pkfuse(mounted: Mount, make_image) -> None:
    os.kill(mounted.pid, signal.SIGSTOP)
    try:
        time.sleep(ATTR_TIMEOUT + 0.5)  # the root's cached attributes expire: a stat would wait for the daemon
        r = pkfuse("mount", str(make_image(name="second.img")), str(mounted.path), timeout=30)
        assert r.returncode == 3, r.stderr
        assert "pkfuse already serves" in r.stderr and "does not answer" in r.stderr, r.stderr
        assert f"`pkfuse umount {mounted.path}` first" in r.stderr
    finally:
        os.kill(mounted.pid, signal.SIGCONT)


def test_mount_on_someone_elses_mount_names_it_and_does_not_offer_to_unmount_it(image: Path, tmp_path: Path) -> None:
    if subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode != 0:
        pytest.skip("cannot make a mount namespace here")
    (tmp_path / "mnt").mkdir()
    script = (f"mount -t tmpfs scratch {tmp_path / 'mnt'} && exec {sys.executable} -m pkfuse mount "
              f"{image} {tmp_path / 'mnt'}")
    r = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 3, r.stderr
    assert "busy: scratch (tmpfs) is mounted there" in r.stderr and "pkfuse umount" not in r.stderr
    assert not is_mounted(tmp_path / "mnt")  # the tmpfs lived in the namespace only


def test_mount_on_a_file_is_refused(image: Path, tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_text("")
    r = pkfuse("mount", str(image), str(target))
    assert r.returncode == 3
    assert r.stderr.startswith("pkfuse: error: ") and "not a directory" in r.stderr


def test_mount_of_a_bad_image_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.img"
    bad.write_bytes(os.urandom(1 << 20))
    (tmp_path / "mnt").mkdir()
    r = pkfuse("mount", str(bad), str(tmp_path / "mnt"))
    assert r.returncode == 6
    assert len(r.stderr.strip().splitlines()) == 1 and "not a usable pkfuse image" in r.stderr
    assert not is_mounted(tmp_path / "mnt")


def test_unknown_mount_option_is_a_usage_error(image: Path, tmp_path: Path) -> None:
    (tmp_path / "mnt").mkdir()
    r = pkfuse("mount", "-o", "frobnicate", str(image), str(tmp_path / "mnt"))
    assert r.returncode == 2 and "unknown mount option 'frobnicate'" in r.stderr


def test_missing_dev_fuse_is_a_clear_error(image: Path, tmp_path: Path) -> None:
    if subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode != 0:
        pytest.skip("cannot make a mount namespace here")
    (tmp_path / "mnt").mkdir()
    script = (f"mount -t tmpfs none /dev && exec {sys.executable} -m pkfuse mount --foreground "
              f"--log {tmp_path / 'log'} {image} {tmp_path / 'mnt'}")
    r = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=60)
    assert r.returncode == 5
    assert "/dev/fuse is missing" in r.stderr and "Traceback" not in r.stderr


def test_daemon_mode_returns_once_mounted_and_umount_waits_for_it(image: Path, tmp_path: Path) -> None:
    log = tmp_path / "daemon.log"
    with cli_mounted(image, tmp_path / "mnt", log=log) as mnt:
        assert is_mounted(mnt)
        pid = status_pid(mnt)
        assert pid != os.getpid()
        r = pkfuse("umount", str(mnt))
        assert r.returncode == 0, r.stderr
        assert not is_mounted(mnt)
        assert not process_alive(pid)
        assert "Traceback" not in log.read_text()


def test_daemon_mode_detaches_the_daemon_from_the_caller(image: Path, tmp_path: Path) -> None:
    """Its own session (no controlling terminal, no SIGHUP from ours), stdio off the caller's.

    That ``pkfuse mount`` returned at all under ``capture_output`` shows the
    daemon holds no end of the caller's stdout/stderr pipes.
    """
    with cli_mounted(image, tmp_path / "mnt") as mnt:
        pid = status_pid(mnt)
        assert os.getsid(pid) == pid
        fds = {int(fd): os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
        assert fds[0] == os.devnull and fds[1] == fds[2] == str(tmp_path / "log")
        assert pkfuse("umount", str(mnt)).returncode == 0


def test_daemon_mode_keeps_none_of_the_callers_other_descriptors(image: Path, tmp_path: Path) -> None:
    """A fork keeps every descriptor; a lock file the caller holds must not stay locked for the mount's life."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    held = tmp_path / "held.lock"
    fd = os.open(held, os.O_CREAT | os.O_WRONLY)
    try:
        r = subprocess.run([*PKFUSE, "mount", "--log", str(tmp_path / "log"), str(image), str(mnt)],
                           pass_fds=(fd,), capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        pid = daemon_pid(str(mnt))
        assert pid is not None
        targets = [os.readlink(f"/proc/{pid}/fd/{n}") for n in os.listdir(f"/proc/{pid}/fd")]
        assert str(held) not in targets
        assert pkfuse("umount", str(mnt)).returncode == 0
    finally:
        os.close(fd)
        force_unmount(mnt)


def test_daemon_mode_with_a_log_it_cannot_open_is_one_line(image: Path, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = pkfuse("mount", "--log", str(tmp_path / "missing" / "x.log"), str(image), str(mnt))
    assert r.returncode == 1 and not is_mounted(mnt)
    assert r.stderr.startswith("pkfuse: error: ") and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_daemon_mode_with_stdout_and_stderr_closed_mounts(image: Path, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        r = subprocess.run(["sh", "-c", 'exec "$@" >&- 2>&-', "sh", *PKFUSE, "mount", "--log", str(tmp_path / "log"),
                            str(image), str(mnt)], timeout=60)
        assert r.returncode == 0 and is_mounted(mnt)
        assert pkfuse("umount", str(mnt)).returncode == 0
    finally:
        force_unmount(mnt)
    assert "Traceback" not in (tmp_path / "log").read_text()


@pytest.mark.parametrize(("sig", "status", "says"), [(signal.SIGINT, 130, "interrupted"),
                                                     (signal.SIGTERM, 143, "SIGTERM while waiting"),
                                                     (signal.SIGHUP, 129, "SIGHUP while waiting")])
def test_interrupting_daemon_mode_leaves_no_daemon_behind(image: Path, tmp_path: Path, sig: signal.Signals,
                                                          status: int, says: str) -> None:
    """Ctrl-C (or SIGTERM, SIGHUP) while ``pkfuse mount`` waits for its daemon ends the daemon too.

    The log is a FIFO nobody reads, so the daemon blocks opening it and is
    surely still starting when the interrupt comes.
    """
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    log = tmp_path / "log"
    os.mkfifo(log)
    parent = subprocess.Popen([*PKFUSE, "mount", "--log", str(log), str(image), str(mnt)],
                              stderr=subprocess.PIPE, text=True,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        children = Path(f"/proc/{parent.pid}/task/{parent.pid}/children")
        child = ""
        while not child and parent.poll() is None:
            child = children.read_text().strip()
        parent.send_signal(sig)
        _, err = parent.communicate(timeout=30)
        assert parent.returncode == status and says in err and "Traceback" not in err, err
        assert not Path(f"/proc/{child}").exists()
        assert not is_mounted(mnt)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        if child and Path(f"/proc/{child}").exists():  # a failed run must not leave the daemon behind
            os.kill(int(child), signal.SIGKILL)
        force_unmount(mnt)


def test_daemon_mode_logs_next_to_the_image_by_default(image: Path, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        assert pkfuse("mount", str(image), str(mnt)).returncode == 0
        assert "mounting" in Path(str(image) + ".log").read_text()
    finally:
        if is_mounted(mnt):
            pkfuse("umount", str(mnt))
        force_unmount(mnt)


def _files(top: Path) -> set[Path]:
    return {p for p in top.rglob("*")}


@pytest.mark.parametrize("case", ["missing", "directory", "dev-null", "fifo", "bad image", "busy image",
                                  "busy mountpoint"])
def test_a_refused_mount_leaves_no_log_behind(case: str, tmp_path: Path, make_image, mount_image) -> None:
    """``IMAGE.log`` (daemon mode's default) is made only once a daemon has opened the image.

    ``/dev/null`` is reached through a symlink in tmp_path, so that a log
    made beside it would land where the test sees it.
    """
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    image = tmp_path / f"{case.replace(' ', '-')}.img"
    status = 6
    if case == "directory":
        image.mkdir()
    elif case == "dev-null":
        image.symlink_to(os.devnull)
    elif case == "fifo":
        os.mkfifo(image)
    elif case == "bad image":
        image.write_bytes(os.urandom(1 << 20))
    elif case == "busy image":
        image = make_image(name=image.name)
        mount_image(image, name="holder")  # foreground, its log elsewhere: the image is locked
        status = 4
    elif case == "busy mountpoint":
        image = make_image(name=image.name)
        mnt = mount_image(make_image(name="other.img"), name="taken").path
        status = 3
    before = _files(tmp_path)
    r = pkfuse("mount", str(image), str(mnt))
    assert r.returncode == status, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
    assert _files(tmp_path) - before == set()
    assert not Path(str(image) + ".log").exists()


def test_a_refused_foreground_mount_does_not_make_its_log(tmp_path: Path) -> None:
    bad = tmp_path / "bad.img"
    bad.write_bytes(os.urandom(1 << 20))
    (tmp_path / "mnt").mkdir()
    r = pkfuse("mount", "--foreground", "--log", str(tmp_path / "fg.log"), str(bad), str(tmp_path / "mnt"))
    assert r.returncode == 6 and not (tmp_path / "fg.log").exists()


def test_daemon_mode_with_its_log_in_a_directory_it_cannot_write_is_one_line(image: Path, tmp_path: Path) -> None:
    (tmp_path / "mnt").mkdir()
    r = pkfuse("mount", "--log", str(tmp_path), str(image), str(tmp_path / "mnt"))  # a directory as log
    assert r.returncode == 1 and not is_mounted(tmp_path / "mnt")
    assert r.stderr.startswith("pkfuse: error: log ") and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_daemon_mode_mounts_a_path_with_a_space_and_non_ascii_letters(image: Path, tmp_path: Path) -> None:
    # mountinfo escapes the space as \040, é stays UTF-8
    with cli_mounted(image, tmp_path / "mnt été") as mnt:
        assert is_mounted(mnt)
        assert pkfuse("mount", str(image), str(mnt)).returncode == 3  # seen as busy, not as missing
        assert pkfuse("umount", str(mnt)).returncode == 0


def test_daemon_mode_with_its_log_under_the_mountpoint_does_not_hang(image: Path, tmp_path: Path) -> None:
    """The daemon must not open anything under its own mountpoint once mounted (it would wait on itself)."""
    mnt = tmp_path / "mnt"
    with cli_mounted(image, mnt, log=mnt / "daemon.log"):
        assert sorted(os.listdir(mnt)) == [".pkernfs", "guest_mem", "iommu"]
        assert pkfuse("umount", str(mnt)).returncode == 0
        assert "closed cleanly" in (mnt / "daemon.log").read_text()


def test_daemon_mode_reports_the_daemons_error(mounted: Mount, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    r = pkfuse("mount", str(mounted.image), str(other))
    assert r.returncode == 4
    assert r.stderr.startswith("pkfuse: error: ") and len(r.stderr.strip().splitlines()) == 1


def test_umount_of_a_directory_that_is_not_mounted_fails(tmp_path: Path) -> None:
    r = pkfuse("umount", str(tmp_path))
    assert r.returncode == 3 and "is not mounted" in r.stderr


def test_read_only_mount_refuses_writes_with_erofs(image: Path, mount_image) -> None:
    m = mount_image(image, "--read-only")
    with pytest.raises(OSError) as exc:
        (m.path / "guest_mem" / "f").write_bytes(b"x")
    assert exc.value.errno == 30  # EROFS
    assert "read_only:                yes" in (m.path / ".pkernfs" / "status").read_text()


def test_restart_keeps_written_data(mounted: Mount) -> None:
    f = mounted.path / "guest_mem" / "vm0"
    f.write_bytes(b"before the restart")
    old_pid = mounted.pid
    mounted.restart()
    assert mounted.pid != old_pid
    assert f.read_bytes() == b"before the restart"


def test_restart_increments_the_generation(mounted: Mount) -> None:
    def generation() -> int:
        text = (mounted.path / ".pkernfs" / "status").read_text()
        return int(next(x for x in text.splitlines() if x.startswith("generation:")).split()[1])

    before = generation()
    mounted.restart()
    assert generation() == before + 1


def test_restart_leaves_no_dead_mount_behind(mounted: Mount) -> None:
    mounted.kill()
    assert str(mounted.path) not in mounted_paths()
    mounted.start()
    assert os.listdir(mounted.path / "guest_mem") == []


def test_unmount_then_remount_keeps_files(image: Path, mount_image) -> None:
    m = mount_image(image)
    (m.path / "guest_mem" / "vm1").mkdir()
    (m.path / "guest_mem" / "vm1" / "ram").write_bytes(b"kept")
    assert m.unmount() == 0
    m.start()
    assert (m.path / "guest_mem" / "vm1" / "ram").read_bytes() == b"kept"


def test_umount_clears_the_mount_of_a_killed_daemon(image: Path, tmp_path: Path) -> None:
    with cli_mounted(image, tmp_path / "mnt") as mnt:
        os.kill(status_pid(mnt), signal.SIGKILL)
        r = pkfuse("umount", str(mnt))
        assert r.returncode == 0, r.stderr
        assert not is_mounted(mnt)


def test_umount_of_a_stopped_daemon_unmounts_and_says_it_did_not_exit(mounted: Mount) -> None:
    """A hung daemon answers nothing: umount must not ask it anything, and must not hang."""
    os.kill(mounted.pid, signal.SIGSTOP)
    try:
        time.sleep(ATTR_TIMEOUT + 0.5)  # the kernel's cached attributes of the root expire: a stat would hang
        r = pkfuse("umount", "--timeout", "1", str(mounted.path), timeout=30)
        assert r.returncode == 1
        assert f"daemon {mounted.pid} did not exit" in r.stderr and "Traceback" not in r.stderr
        assert not is_mounted(mounted.path)
    finally:
        os.kill(mounted.pid, signal.SIGCONT)
    assert mounted.proc is not None and mounted.proc.wait(10) == 0  # resumed, it sees the unmount and exits


def test_umount_finds_the_daemon_of_a_read_only_mount(image: Path, tmp_path: Path) -> None:
    with cli_mounted(image, tmp_path / "mnt", "--read-only") as mnt:
        assert daemon_pid(str(mnt)) == status_pid(mnt)
        assert pkfuse("umount", str(mnt)).returncode == 0


def test_umount_tells_apart_two_read_only_daemons_of_one_image(image: Path, tmp_path: Path) -> None:
    with cli_mounted(image, tmp_path / "a", "--read-only") as a, cli_mounted(image, tmp_path / "b", "--read-only") as b:
        pids = [status_pid(a), status_pid(b)]
        assert pids[0] != pids[1]
        assert [daemon_pid(str(a)), daemon_pid(str(b))] == pids
        for mnt, pid in zip((a, b), pids):
            assert pkfuse("umount", str(mnt)).returncode == 0
            assert not process_alive(pid)


def test_umount_of_a_mount_with_its_own_fsname_asks_the_daemon_for_its_pid(image: Path, tmp_path: Path) -> None:
    with cli_mounted(image, tmp_path / "mnt", "-o", "fsname=guestpool") as mnt:
        pid = daemon_pid(str(mnt))
        assert pid is not None and pid != os.getpid()
        assert pkfuse("umount", str(mnt)).returncode == 0
        assert not process_alive(pid)


def test_umount_of_a_busy_mount_says_so_and_leaves_it_mounted(mounted: Mount) -> None:
    holder = subprocess.Popen(["sleep", "60"], cwd=mounted.path / "guest_mem")
    try:
        r = pkfuse("umount", str(mounted.path))
        assert r.returncode == 3 and "busy" in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
        assert is_mounted(mounted.path) and mounted.proc is not None and mounted.proc.poll() is None
    finally:
        holder.kill()
        holder.wait()


def test_refused_requests_leave_nothing_holding_the_image_at_unmount(mounted: Mount) -> None:
    f = mounted.path / "guest_mem" / "vm0"
    f.write_bytes(b"")
    for size in (1 << 40, 255 << 20):  # EFBIG, then ENOSPC, both from a worker thread
        assert subprocess.run(["truncate", "-s", str(size), str(f)], capture_output=True).returncode != 0
    assert mounted.unmount() == 0
    log = mounted.log_text()
    assert "closed cleanly" in log and "still exported" not in log
