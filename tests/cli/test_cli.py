"""The ``pkfuse`` command line and the ``mount.fuse.pkfuse`` helper."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from backing import format as fmt
from backing.store import Store
from conftest import FUSERMOUNT, Mount, is_mounted
from pkfuse.cli.mount_helper import translate

PKFUSE = [sys.executable, "-m", "pkfuse"]
SUBCOMMANDS = ["mkfs", "mount", "umount", "fsck", "info", "bench", "iommu"]


def pkfuse(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PKFUSE, *args], capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(r: subprocess.CompletedProcess[str], status: int | tuple[int, ...] = (1, 2)) -> None:
    statuses = status if isinstance(status, tuple) else (status,)
    assert r.returncode in statuses, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith("pkfuse: error: "), r.stderr


# ---------------------------------------------------------------- help


def test_top_level_help_lists_every_subcommand() -> None:
    r = pkfuse("--help")
    assert r.returncode == 0
    for name in SUBCOMMANDS:
        assert name in r.stdout


@pytest.mark.parametrize("sub", [s for s in SUBCOMMANDS if s != "iommu"])
def test_every_subcommand_has_help(sub: str) -> None:
    r = pkfuse(sub, "--help")
    assert r.returncode == 0 and "usage: pkfuse " + sub in r.stdout


def test_mount_help_documents_exit_statuses_and_options() -> None:
    out = pkfuse("mount", "--help").stdout
    assert "exit status" in out and "image in use by another pkfuse daemon" in out
    assert "allow_other" in out and "IMAGE.log" in out


def test_no_subcommand_is_a_usage_error() -> None:
    r = pkfuse()
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_an_interrupt_inside_exec_d_code_still_exits_130(tmp_path: Path) -> None:
    # a Ctrl-C or SIGTERM while a lazily imported dataclass is being made lands in exec()'d source; a
    # `python -m` run then exits by SIGINT (status -2) unless the handled interrupt is forgotten
    (tmp_path / "interrupted.py").write_text(
        "from pkfuse.cli.entry import exit_now\nfrom pkfuse.cli.report import reported\n"
        "def interrupted() -> int:\n    exec('raise KeyboardInterrupt')\n    return 0\n"
        "exit_now(reported('pkfuse', interrupted))\n")
    path = [str(tmp_path), str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    r = subprocess.run([sys.executable, "-m", "interrupted"], capture_output=True, text=True, timeout=60, env=env)
    assert (r.returncode, r.stderr) == (130, "pkfuse: error: interrupted\n")


# ---------------------------------------------------------------- mkfs


def test_mkfs_makes_an_image_that_opens(tmp_path: Path) -> None:
    img = tmp_path / "pk.img"
    r = pkfuse("mkfs", str(img), "--size", "64M", "--base", "0x200000000")
    assert r.returncode == 0, r.stderr
    assert os.path.getsize(img) == 64 << 20
    with Store.open(img, read_only=True) as store:
        assert store.geometry.base_phys == 0x200000000


def test_mkfs_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    img = tmp_path / "pk.img"
    assert pkfuse("mkfs", str(img), "--size", "16M").returncode == 0
    r = pkfuse("mkfs", str(img), "--size", "16M")
    assert_one_line_error(r, 1)
    assert "--force" in r.stderr
    assert pkfuse("mkfs", str(img), "--size", "16M", "--force").returncode == 0


@pytest.mark.parametrize("size", ["lots", "1K", "12345"])
def test_mkfs_rejects_bad_sizes_in_one_line(tmp_path: Path, size: str) -> None:
    assert_one_line_error(pkfuse("mkfs", str(tmp_path / "x.img"), "--size", size), 1)


def test_mkfs_rejects_an_unaligned_base(tmp_path: Path) -> None:
    assert_one_line_error(pkfuse("mkfs", str(tmp_path / "x.img"), "--size", "16M", "--base", "0x1000"), 1)


def test_mkfs_into_a_missing_directory_is_one_line(tmp_path: Path) -> None:
    assert_one_line_error(pkfuse("mkfs", str(tmp_path / "no" / "x.img"), "--size", "16M"), 1)


# ----------------------------------------------------------- fsck, info


def test_fsck_of_a_fresh_image_is_clean(image: Path) -> None:
    r = pkfuse("fsck", str(image))
    assert r.returncode == 0, r.stdout + r.stderr


def test_fsck_of_garbage_is_unusable_without_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.img"
    bad.write_bytes(b"\xff" * (1 << 20))
    r = pkfuse("fsck", str(bad))
    assert r.returncode == 2 and "Traceback" not in r.stdout + r.stderr


def test_info_of_an_image_shows_geometry_files_and_extents(mounted: Mount) -> None:
    subprocess.run(["truncate", "-s", "4M", str(mounted.path / "guest_mem" / "vm0")], check=True)
    phys = os.getxattr(mounted.path / "guest_mem" / "vm0", "user.pkernfs.extents").decode().split()[1]
    # the daemon holds the image's lock: info reads it unlocked, read-only
    r = pkfuse("info", str(mounted.image))
    assert r.returncode == 0, r.stderr
    assert f"base_phys:                {fmt.DEFAULT_BASE_PHYS:#x}" in r.stdout
    assert "daemon_pid:               (not mounted here)" in r.stdout
    assert "/guest_mem/vm0  guest-ram  size 4194304" in r.stdout
    assert phys in r.stdout
    assert "superblock" in r.stdout and "free" in r.stdout


def test_info_of_a_mountpoint_reads_its_views(mounted: Mount) -> None:
    (mounted.path / "guest_mem" / "vm0").write_bytes(b"x" * 5000)
    r = pkfuse("info", str(mounted.path))
    assert r.returncode == 0, r.stderr
    assert f"daemon_pid:               {mounted.pid}" in r.stdout
    assert "/guest_mem/vm0  guest-ram  size 5000 (4.9 KiB), 2 pages" in r.stdout
    assert "/iommu/root-pgtables" in r.stdout


def test_info_of_something_else_is_one_line(tmp_path: Path) -> None:
    assert_one_line_error(pkfuse("info", str(tmp_path)), 1)
    (tmp_path / "junk").write_bytes(b"junk" * 2000)
    assert_one_line_error(pkfuse("info", str(tmp_path / "junk")), 1)
    assert_one_line_error(pkfuse("info", str(tmp_path / "missing")), 1)


# --------------------------------------------------------------- iommu


def test_iommu_subcommand_has_help() -> None:
    r = pkfuse("iommu", "--help")
    assert r.returncode == 0 and "translate" in r.stdout


# ------------------------------------------------------ mount.fuse.pkfuse


def test_helper_translates_mount8_arguments() -> None:
    args, fake = translate(["/img", "/mnt", "-o", "rw,noauto,user,_netdev,x-systemd.automount,allow_other,log=/l"])
    assert args == ["mount", "-o", "rw,allow_other,log=/l", "/img", "/mnt"] and not fake
    assert translate(["-f", "/img", "/mnt"])[1]
    typed = translate(["/img", "/mnt", "-o", "ro", "-t", "fuse.pkfuse"])  # libmount may add the type
    assert typed == (["mount", "-o", "ro", "/img", "/mnt"], False)
    with pytest.raises(ValueError):
        translate(["/img"])


def test_helper_mounts_like_mount8_would(image: Path, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    log = tmp_path / "helper.log"
    helper = Path(sys.executable).with_name("mount.fuse.pkfuse")
    if not helper.exists():
        pytest.skip("mount.fuse.pkfuse not installed in this environment")
    try:
        r = subprocess.run([str(helper), str(image), str(mnt), "-o", f"defaults,ro,noauto,log={log}"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert is_mounted(mnt)
        assert "read_only:                yes" in (mnt / ".pkernfs" / "status").read_text()
        line = next(x for x in Path("/proc/self/mountinfo").read_text().splitlines() if f" {mnt} " in x)
        assert " - fuse.pkfuse " in line
        assert pkfuse("umount", str(mnt)).returncode == 0
    finally:
        if is_mounted(mnt):
            subprocess.run([FUSERMOUNT, "-u", "-z", str(mnt)], check=False)
    assert "Traceback" not in log.read_text()


# In a private mount namespace, /usr/sbin gets an overlay holding the one-time
# symlink the helper's docstring asks for, and /etc/fstab a bind-mounted line:
# mount(8) itself then finds the helper, as on a machine where it is installed.
# The host's /usr/sbin and /etc/fstab are never written.
MOUNT8_SCRIPT = r"""
set -eu
mount -t overlay overlay -o "lowerdir=/usr/sbin,upperdir=$SCRATCH/upper,workdir=$SCRATCH/work" /usr/sbin
ln -s "$HELPER" /usr/sbin/mount.fuse.pkfuse
echo "$IMAGE $MNT2 fuse.pkfuse defaults,noauto,log=$SCRATCH/fstab.log 0 0" > "$SCRATCH/fstab"
mount --bind "$SCRATCH/fstab" /etc/fstab
trap 'for m in "$MNT" "$MNT2"; do mountpoint -q "$m" && fusermount3 -u -z "$m"; done' EXIT
mount -t fuse.pkfuse -o "ro,log=$SCRATCH/typed.log" "$IMAGE" "$MNT"
echo "typed: $(findmnt -n -o FSTYPE,OPTIONS "$MNT")"
echo "pid: $(sed -n 's/^daemon_pid: *//p' "$MNT/.pkernfs/status")"
ls "$MNT"
pkfuse umount "$MNT"
mount "$MNT2"
echo "fstab: $(findmnt -n -o FSTYPE "$MNT2")"
echo "pid: $(sed -n 's/^daemon_pid: *//p' "$MNT2/.pkernfs/status")"
pkfuse umount "$MNT2"
echo done
"""


def test_mount8_runs_the_helper_for_the_type_and_for_an_fstab_line(image: Path, tmp_path: Path) -> None:
    helper = Path(sys.executable).with_name("mount.fuse.pkfuse")
    if not helper.exists() or not shutil.which("unshare") or os.geteuid() != 0:
        pytest.skip("needs root, unshare(1) and the installed mount.fuse.pkfuse")
    for d in ("upper", "work", "mnt", "mnt2"):
        (tmp_path / d).mkdir()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "SCRATCH": str(tmp_path),
           "HELPER": str(helper), "IMAGE": str(image), "MNT": str(tmp_path / "mnt"), "MNT2": str(tmp_path / "mnt2")}
    r = subprocess.run(["unshare", "-m", "--propagation", "private", "bash", "-c", MOUNT8_SCRIPT],
                       capture_output=True, text=True, env=env, timeout=120)
    pids = [int(line.split()[1]) for line in r.stdout.splitlines() if line.startswith("pid: ") and line.split()[1:]]
    for pid in pids:  # daemons live in the namespace: never leave one behind
        if Path(f"/proc/{pid}").exists():
            os.kill(pid, signal.SIGKILL)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("typed: fuse.pkfuse ro,")
    assert "guest_mem" in lines and "iommu" in lines
    assert "fstab: fuse.pkfuse" in lines and lines[-1] == "done"
    assert len(pids) == 2
    for log in ("typed.log", "fstab.log"):
        assert "closed cleanly" in (tmp_path / log).read_text()


# ----------------------------------------------------------------- demo


def test_demo_shows_the_data_survived_a_restart(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "TMPDIR": str(tmp_path)}
    r = subprocess.run(["bash", str(root / "examples" / "demo.sh")], capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "survived: hello from the guest, written before the restart" in r.stdout
    # step 4 shows the write it announces, then reads it back
    step4 = r.stdout.partition("==== 4.")[2].partition("==== 5.")[0].splitlines()
    assert step4[1].startswith("$ printf %s 'hello from the guest, written before the restart' | dd of="), step4
    assert step4[2].startswith("$ dd if=") and step4[3] == "hello from the guest, written before the restart", step4
    assert "user.pkernfs.extents=" in r.stdout and "daemon_pid:" in r.stdout
    assert "\nwritten by the device\n" in r.stdout and "device DMA still translates: 0x" in r.stdout
    assert not [p for p in Path("/proc/self/mountinfo").read_text().splitlines() if str(tmp_path) in p]
    assert list(tmp_path.iterdir()) == []  # the demo cleaned up after itself


# ---------------------------------------------------------------- bench


def test_bench_quick_measures_every_target_and_leaves_no_mount(tmp_path: Path) -> None:
    """The bench runs end to end and reports each target; its values are not judged here
    (speed belongs to the bench, not to a test on a shared machine)."""
    if not (shutil.which("fusermount3") and os.path.exists("/dev/fuse")):
        pytest.skip("the mount area needs FUSE")
    out = tmp_path / "bench.json"
    r = pkfuse("bench", "--quick", "--dir", str(tmp_path), "--json", str(out), timeout=240)
    assert r.returncode in (0, 1), r.stderr  # 1: a target missed, which a noisy CI machine may do
    assert "Traceback" not in r.stderr
    results = json.loads(out.read_text())
    assert {res["area"] for res in results} == {"store", "mount", "iommu", "control", "vmm", "crash", "fuzz"}
    targeted = [res for res in results if res["target"]]
    assert len(targeted) >= 15 and all(res["value"] > 0 or "violations" in res["name"] for res in targeted)
    assert not any(is_mounted(p) for p in tmp_path.iterdir() if p.is_dir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.json"]  # scratch removed
