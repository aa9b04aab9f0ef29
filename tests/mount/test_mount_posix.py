"""POSIX behaviour of a mounted image, driven with the tools people use and Python's os."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import signal
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Mount

pytestmark = pytest.mark.mount

MiB = 1 << 20


def run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), capture_output=True, text=True, check=check, timeout=60)


def errno_of(fn, *args) -> int:
    with pytest.raises(OSError) as exc:
        fn(*args)
    return exc.value.errno


@pytest.fixture
def g(mounted: Mount) -> Path:
    """The guest_mem directory of a fresh mount."""
    return mounted.path / "guest_mem"


# ----------------------------------------------------------- tools


def test_truncate_allocates_and_ls_stat_show_true_sizes(g: Path) -> None:
    run("truncate", "-s", "64M", str(g / "vm0"))
    ls = run("ls", "-l", str(g)).stdout
    assert " 67108864 " in ls and "vm0" in ls
    out = run("stat", "-c", "%s %b %B", str(g / "vm0")).stdout.split()
    assert int(out[0]) == 64 * MiB
    assert int(out[1]) * int(out[2]) == 64 * MiB  # every page allocated, no holes


def test_stat_blocks_round_up_to_whole_pages(g: Path) -> None:
    (g / "small").write_bytes(b"x" * 100)
    st = os.stat(g / "small")
    assert (st.st_size, st.st_blocks * 512) == (100, 4096)


def test_dd_write_then_dd_read_at_an_offset(g: Path) -> None:
    run("truncate", "-s", "8M", str(g / "vm0"))
    subprocess.run(["dd", f"of={g / 'vm0'}", "bs=1", "seek=5000000", "conv=notrunc", "status=none"],
                   input=b"marker-string", check=True)
    out = subprocess.run(["dd", f"if={g / 'vm0'}", "bs=1", "skip=5000000", "count=13", "status=none"],
                         capture_output=True, check=True).stdout
    assert out == b"marker-string"
    assert os.stat(g / "vm0").st_size == 8 * MiB


def test_cat_and_cp_copy_a_file_exactly(g: Path, tmp_path: Path) -> None:
    data = os.urandom(3 * MiB + 123)
    src = tmp_path / "src"
    src.write_bytes(data)
    run("cp", str(src), str(g / "copy"))
    assert subprocess.run(["cat", str(g / "copy")], capture_output=True, check=True).stdout == data
    run("cp", str(g / "copy"), str(tmp_path / "back"))
    assert (tmp_path / "back").read_bytes() == data


def test_mv_renames_and_rm_removes(g: Path) -> None:
    (g / "a").write_bytes(b"aaa")
    run("mv", str(g / "a"), str(g / "b"))
    assert os.listdir(g) == ["b"] and (g / "b").read_bytes() == b"aaa"
    run("rm", str(g / "b"))
    assert os.listdir(g) == []


def test_mv_into_a_vm_subdirectory(g: Path) -> None:
    (g / "vm1").mkdir()
    (g / "ram").write_bytes(b"r")
    run("mv", str(g / "ram"), str(g / "vm1" / "ram"))
    assert (g / "vm1" / "ram").read_bytes() == b"r"


def test_df_shows_the_pool(mounted: Mount, g: Path) -> None:
    before = os.statvfs(mounted.path)
    run("truncate", "-s", "32M", str(g / "vm0"))
    after = os.statvfs(mounted.path)
    assert before.f_blocks * before.f_frsize == 256 * MiB
    assert (before.f_bfree - after.f_bfree) * after.f_frsize == 32 * MiB
    df = run("df", "-B1", str(mounted.path)).stdout.splitlines()[1].split()
    assert int(df[1]) == 256 * MiB and str(mounted.image) == df[0]


def test_truncate_down_frees_pages(mounted: Mount, g: Path) -> None:
    run("truncate", "-s", "32M", str(g / "vm0"))
    free_big = os.statvfs(mounted.path).f_bfree
    run("truncate", "-s", "4M", str(g / "vm0"))
    assert os.statvfs(mounted.path).f_bfree - free_big == (28 * MiB) // 4096
    assert os.stat(g / "vm0").st_size == 4 * MiB


def test_truncate_up_reads_zeros_past_the_old_end(g: Path) -> None:
    (g / "f").write_bytes(b"abc")
    os.truncate(g / "f", 10000)
    assert (g / "f").read_bytes() == b"abc" + bytes(9997)


def test_chmod_chown_and_utimes(g: Path) -> None:
    f = g / "f"
    f.write_bytes(b"")
    os.chmod(f, 0o600)
    os.chown(f, 1234, 5678)
    os.utime(f, ns=(1_000_000_000, 2_000_000_000))
    st = os.stat(f)
    assert stat.S_IMODE(st.st_mode) == 0o600 and stat.S_ISREG(st.st_mode)
    assert (st.st_uid, st.st_gid) == (1234, 5678)
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_000_000_000, 2_000_000_000)


def test_mkdir_gives_a_directory_with_the_right_link_count(g: Path) -> None:
    (g / "vm0").mkdir()
    (g / "vm0" / "sub").mkdir()
    assert os.stat(g / "vm0").st_nlink == 3
    assert stat.S_ISDIR(os.stat(g / "vm0").st_mode)


def test_append_writes_at_the_end(g: Path) -> None:
    (g / "log").write_bytes(b"one\n")
    with open(g / "log", "ab") as f:
        f.write(b"two\n")
    assert (g / "log").read_bytes() == b"one\ntwo\n"


def test_a_large_directory_lists_in_order_without_repeats(g: Path) -> None:
    names = [f"f{i:04d}" for i in range(600)]
    for n in names:
        (g / n).write_bytes(b"")
    listed = os.listdir(g)
    assert sorted(listed) == names and len(listed) == len(set(listed))


def test_listing_while_creating_and_removing_never_repeats_a_name(g: Path) -> None:
    for i in range(300):
        (g / f"a{i}").write_bytes(b"")
    seen: list[str] = []
    with os.scandir(g) as it:
        for k, entry in enumerate(it):
            seen.append(entry.name)
            if k == 10:
                for i in range(0, 300, 2):
                    (g / f"a{i}").unlink()
                for i in range(50):
                    (g / f"b{i}").write_bytes(b"")
    assert len(seen) == len(set(seen))
    assert {f"a{i}" for i in range(1, 300, 2)} <= set(seen)


# --------------------------------------------------------- errnos


def test_enoent_for_a_missing_name(g: Path) -> None:
    assert errno_of(os.stat, g / "missing") == errno.ENOENT
    assert errno_of(os.unlink, g / "missing") == errno.ENOENT


def test_eexist_for_mkdir_over_a_name_and_exclusive_create(g: Path) -> None:
    (g / "d").mkdir()
    assert errno_of(os.mkdir, g / "d") == errno.EEXIST
    (g / "f").write_bytes(b"")
    assert errno_of(os.open, g / "f", os.O_CREAT | os.O_EXCL | os.O_WRONLY) == errno.EEXIST


def test_enotempty_for_rmdir_of_a_full_directory(g: Path) -> None:
    (g / "d").mkdir()
    (g / "d" / "f").write_bytes(b"")
    assert errno_of(os.rmdir, g / "d") == errno.ENOTEMPTY
    r = run("rm", "-d", str(g / "d"), check=False)
    assert r.returncode != 0 and "not empty" in r.stderr.lower()


def test_eisdir_for_unlink_of_a_directory_and_writing_one(g: Path) -> None:
    (g / "d").mkdir()
    assert errno_of(os.unlink, g / "d") == errno.EISDIR  # from the daemon
    assert errno_of(os.open, g / "d", os.O_WRONLY) == errno.EISDIR


def test_enotdir_for_a_file_used_as_a_directory(g: Path) -> None:
    (g / "f").write_bytes(b"")
    assert errno_of(os.stat, g / "f" / "x") == errno.ENOTDIR
    assert errno_of(os.rmdir, g / "f") == errno.ENOTDIR
    assert errno_of(os.listdir, g / "f") == errno.ENOTDIR


def test_enospc_when_the_pool_is_full(mounted: Mount, g: Path) -> None:
    r = run("truncate", "-s", "254M", str(g / "big"), check=False)
    assert r.returncode != 0 and "No space left on device" in r.stderr
    assert os.stat(g / "big").st_size == 0  # nothing half-done
    free = os.statvfs(mounted.path)
    assert free.f_bfree * free.f_frsize > 250 * MiB


def test_efbig_beyond_the_image(g: Path) -> None:
    (g / "f").write_bytes(b"")
    assert errno_of(os.truncate, g / "f", 1 << 40) == errno.EFBIG


def test_enametoolong(g: Path) -> None:
    assert errno_of(os.mkdir, g / ("n" * 250)) == errno.ENAMETOOLONG


def test_einval_for_moving_a_directory_into_itself(g: Path) -> None:
    (g / "d").mkdir()
    assert errno_of(os.rename, g / "d", g / "d" / "inner") == errno.EINVAL


_libc = ctypes.CDLL(None, use_errno=True)
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
AT_FDCWD = -100


def renameat2(old: Path, new: Path, flags: int) -> None:
    if _libc.renameat2(AT_FDCWD, bytes(old), AT_FDCWD, bytes(new), flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def test_rename_noreplace_refuses_an_existing_target(g: Path) -> None:
    (g / "a").write_bytes(b"a")
    (g / "b").write_bytes(b"b")
    assert errno_of(renameat2, g / "a", g / "b", RENAME_NOREPLACE) == errno.EEXIST
    assert (g / "b").read_bytes() == b"b"
    renameat2(g / "a", g / "c", RENAME_NOREPLACE)
    assert (g / "c").read_bytes() == b"a"


def test_rename_exchange_is_einval(g: Path) -> None:
    (g / "a").write_bytes(b"a")
    (g / "b").write_bytes(b"b")
    assert errno_of(renameat2, g / "a", g / "b", RENAME_EXCHANGE) == errno.EINVAL


def test_rename_over_a_file_replaces_it(mounted: Mount, g: Path) -> None:
    (g / "a").write_bytes(b"new")
    (g / "b").write_bytes(b"old" * 5000)
    os.rename(g / "a", g / "b")
    assert (g / "b").read_bytes() == b"new" and os.listdir(g) == ["b"]


def test_eperm_for_new_entries_in_the_root_and_iommu(mounted: Mount) -> None:
    assert errno_of(os.mkdir, mounted.path / "extra") == errno.EPERM
    assert errno_of(Path.write_bytes, mounted.path / "f", b"") == errno.EPERM
    assert errno_of(Path.write_bytes, mounted.path / "iommu" / "f", b"") == errno.EPERM


def test_eperm_for_removing_or_renaming_the_top_directories(mounted: Mount) -> None:
    assert errno_of(os.rmdir, mounted.path / "guest_mem") == errno.EPERM
    assert errno_of(os.rename, mounted.path / "iommu", mounted.path / "x") == errno.EPERM


def test_links_and_special_files_are_refused(g: Path) -> None:
    (g / "f").write_bytes(b"")
    assert errno_of(os.link, g / "f", g / "h") == errno.EPERM
    assert errno_of(os.symlink, "f", g / "s") == errno.EPERM
    assert errno_of(os.mkfifo, g / "p") == errno.EPERM


def test_setxattr_is_not_supported(g: Path) -> None:
    (g / "f").write_bytes(b"")
    assert errno_of(os.setxattr, g / "f", "user.x", b"1") == errno.ENOTSUP


def test_an_unlinked_open_file_stays_readable_until_closed(mounted: Mount, g: Path) -> None:
    run("truncate", "-s", "16M", str(g / "vm0"))
    free_before = os.statvfs(mounted.path).f_bfree
    fd = os.open(g / "vm0", os.O_RDWR)
    try:
        os.pwrite(fd, b"still here", 1 << 20)
        os.unlink(g / "vm0")
        assert os.listdir(g) == []
        assert os.pread(fd, 10, 1 << 20) == b"still here"
        os.pwrite(fd, b"and writable", 0)
        assert os.pread(fd, 12, 0) == b"and writable"
        assert os.statvfs(mounted.path).f_bfree == free_before  # pages still held
    finally:
        os.close(fd)
    # released at last close (and forget): the pages return to the pool
    for _ in range(200):
        if os.statvfs(mounted.path).f_bfree == free_before + 4096:
            break
        os.listdir(g)  # give the kernel a moment to forget the inode
    assert os.statvfs(mounted.path).f_bfree == free_before + 4096


def test_a_file_unlinked_while_open_is_freed_at_the_next_mount_after_a_restart(mounted: Mount, g: Path) -> None:
    run("truncate", "-s", "16M", str(g / "vm0"))
    free_before = os.statvfs(mounted.path).f_bfree
    fd = os.open(g / "vm0", os.O_RDONLY)
    os.unlink(g / "vm0")
    mounted.kill()
    with contextlib.suppress(OSError):
        os.close(fd)  # ENOTCONN: the flush has no daemon to go to; the fd is closed anyway
    mounted.start()
    assert os.statvfs(mounted.path).f_bfree == free_before + 4096


# ------------------------------------------------------- permissions


@pytest.fixture
def shared_mount(image: Path, tmp_path: Path) -> Iterator[Mount]:
    """A mount with allow_other at a path every user can reach (tmp_path is 0700)."""
    top = Path(tempfile.mkdtemp(prefix="pkfuse-shared-"))
    os.chmod(top, 0o755)
    m = Mount(image, top / "mnt", tmp_path / "shared.log", ("-o", "allow_other"))
    try:
        m.start()
        yield m
    finally:
        m.cleanup()
        shutil.rmtree(top, ignore_errors=True)
    assert "Traceback" not in m.log_text()


def as_nobody(*cmd: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv not installed")
    return run("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *cmd, check=False)


def test_eacces_for_another_user_writing_a_root_directory(shared_mount: Mount) -> None:
    r = as_nobody("touch", str(shared_mount.path / "guest_mem" / "x"))
    assert r.returncode != 0 and "Permission denied" in r.stderr


def test_eacces_for_another_user_reading_a_private_file(shared_mount: Mount) -> None:
    f = shared_mount.path / "guest_mem" / "secret"
    f.write_bytes(b"s")
    os.chmod(f, 0o600)
    r = as_nobody("cat", str(f))
    assert r.returncode != 0 and "Permission denied" in r.stderr
    os.chmod(f, 0o644)
    assert as_nobody("cat", str(f)).stdout == "s"


def test_a_user_owns_what_they_create(shared_mount: Mount) -> None:
    d = shared_mount.path / "guest_mem" / "vm9"
    d.mkdir()
    os.chmod(d, 0o777)
    r = as_nobody("truncate", "-s", "1M", str(d / "ram"))
    assert r.returncode == 0, r.stderr
    st = os.stat(d / "ram")
    assert (st.st_uid, st.st_gid) == (65534, 65534)


def test_only_root_may_chown(shared_mount: Mount) -> None:
    d = shared_mount.path / "guest_mem" / "vm9"
    d.mkdir()
    os.chmod(d, 0o777)
    assert as_nobody("truncate", "-s", "0", str(d / "f")).returncode == 0
    r = as_nobody("chown", "0", str(d / "f"))
    assert r.returncode != 0 and "not permitted" in r.stderr


def test_a_close_on_the_mount_waits_for_no_answer_from_the_daemon(mounted: Mount, g: Path) -> None:
    """No FLUSH reaches the daemon (it answers ENOSYS once, at start): a FLUSH is forced, its wait
    unkillable, and a daemon SIGKILLed while one of its own threads closes a file of its own mount
    would hang for good, with every process closing a file there (restart-test --kill found it)."""
    import threading

    (g / "vm0").write_bytes(b"x" * 4096)
    fd = os.open(g / "vm0", os.O_RDWR)
    done = threading.Event()
    os.kill(mounted.pid, signal.SIGSTOP)  # a daemon that answers nothing
    try:
        threading.Thread(target=lambda: (os.close(fd), done.set()), daemon=True).start()
        closed = done.wait(5)
    finally:
        os.kill(mounted.pid, signal.SIGCONT)
    assert closed, "close() waited for the stopped daemon: a FLUSH was sent"
    done.wait(10)
