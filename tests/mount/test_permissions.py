"""Who may do what: the control socket, the image and the mount, tried as a second, unprivileged user.

The socket and the image are 0600; the daemon serves only peers (SO_PEERCRED)
that are root or the image's owner, and answers anyone else EACCES, as an
open(2) of a device node they may not open; object ids are the connection's
own (another connection's are ENOENT). The mount checks file modes
(``default_permissions``) and lets other users in only with ``--allow-other``.

A throwaway system user is created for the session (and deleted after, if
this module made it); its calls run in a subprocess that drops to its uid.
The mounts live in a directory other users may search (pytest's tmp_path is
root's own), removed at teardown with everything in it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import Mount, is_mounted

from backing.mkfs import mkfs
from pkfuse.uapi import Iommufd

pytestmark = [pytest.mark.mount,
              pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("useradd"), reason="needs root and useradd")]

USER = "pkfusetest"
MiB = 1 << 20
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def other() -> Iterator[pwd.struct_passwd]:
    """A second user: made here if absent (and then deleted at the end)."""
    made = False
    try:
        pw = pwd.getpwnam(USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", USER],
                       check=True, capture_output=True)
        made = True
        pw = pwd.getpwnam(USER)
    assert pw.pw_uid != 0
    yield pw
    if made:
        subprocess.run(["userdel", USER], check=False, capture_output=True)


def as_user(pw: pwd.struct_passwd, code: str) -> dict:
    """Run ``code`` (Python, printing one JSON object last) as ``pw``; its output."""

    def drop() -> None:
        os.setgroups([])
        os.setgid(pw.pw_gid)
        os.setuid(pw.pw_uid)

    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, preexec_fn=drop,
                       env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "PYTHONDONTWRITEBYTECODE": "1"},
                       cwd="/")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.splitlines()[-1])


PROBE = '''
import errno, json, os, socket
from pkfuse.uapi import Iommufd
out = {}
def err(fn):
    try:
        fn()
        return 0
    except OSError as e:
        return e.errno
'''


@pytest.fixture
def place() -> Iterator[Path]:
    """A directory every user may search (not list), for the image, the mountpoint and the socket."""
    d = Path(tempfile.mkdtemp(prefix="pkfuse-perm-"))
    os.chmod(d, 0o711)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def mount_at(place: Path) -> Iterator[Callable[..., Mount]]:
    """Factory: ``mount_at(owner_uid, *daemon_args)`` -> a root daemon serving a fresh image that ``owner`` owns."""
    made: list[Mount] = []

    def start(owner: int = 0, *extra: str) -> Mount:
        image = place / "pk.img"
        mkfs(image, 64 * MiB)
        os.chown(image, owner, -1)
        mnt = place / "mnt"
        mnt.mkdir(mode=0o755)
        m = Mount(image, mnt, place / "mnt.log", ("--control", str(place / "ctl.sock"), *extra))
        made.append(m)
        m.start()
        return m

    yield start
    for m in made:
        m.cleanup()
        assert not is_mounted(m.path)
        bad = m.unexpected_errors()
        assert not bad, "\n".join(bad)


def mountinfo_options(mnt: Path) -> set[str]:
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        if left.split()[4] == str(mnt):
            return set(left.split()[5].split(",")) | set(right.split()[2].split(","))
    raise AssertionError(f"{mnt} is not mounted")


def test_the_image_and_the_socket_are_0600_and_closed_to_another_user(mount_at: Callable[..., Mount],
                                                                      other: pwd.struct_passwd) -> None:
    m = mount_at()
    ctl = m.path.parent / "ctl.sock"
    for p in (m.image, ctl):
        assert stat.S_IMODE(os.stat(p).st_mode) == 0o600 and os.stat(p).st_uid == 0, p
    got = as_user(other, PROBE + f'''
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
out["connect"] = err(lambda: s.connect({str(ctl)!r}))
out["image"] = err(lambda: os.open({str(m.image)!r}, os.O_RDONLY))
out["mount"] = err(lambda: os.stat({str(m.path / "guest_mem")!r}))
print(json.dumps(out))
''')
    assert got == {"connect": errno.EACCES, "image": errno.EACCES, "mount": errno.EACCES}
    opts = mountinfo_options(m.path)
    assert "default_permissions" in opts and "allow_other" not in opts


def test_the_daemon_refuses_a_peer_that_is_neither_root_nor_the_owner(mount_at: Callable[..., Mount],
                                                                      other: pwd.struct_passwd) -> None:
    """Even when the socket's mode would let it connect (an operator's chmod, a socket passed on)."""
    m = mount_at()
    ctl = m.path.parent / "ctl.sock"
    os.chmod(ctl, 0o666)
    got = as_user(other, PROBE + f'''
from pkfuse.uapi import transport, wire
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.connect({str(ctl)!r})
codes = []
for cmd, st, kw in ((wire.PKFUSE_OPEN, wire.pkfuse_open, {{"path": b"/dev/iommu"}}),
                    (wire.IOMMU_IOAS_ALLOC, wire.iommu_ioas_alloc, {{}}),
                    (wire.PKFUSE_OPEN, wire.pkfuse_open, {{"path": b"/dev/liveupdate"}})):
    transport.send_request(s, cmd, wire.encode(wire.new(st, **kw)))
    codes.append(transport.recv_reply(s)[0])
out["codes"] = codes
out["client"] = err(lambda: Iommufd({str(ctl)!r}))
print(json.dumps(out))
''')
    assert got == {"codes": [errno.EACCES] * 3, "client": errno.EACCES}
    assert f"(uid {other.pw_uid}) refused: only root and the image's owner (uid 0)" in m.log_text()
    with Iommufd(str(ctl)) as root:  # root is still served
        assert root.ioas_alloc() == 1


def test_the_images_owner_is_served_and_file_modes_hold_on_the_mount(mount_at: Callable[..., Mount],
                                                                     other: pwd.struct_passwd) -> None:
    m = mount_at(other.pw_uid, "--allow-other")
    ctl = m.path.parent / "ctl.sock"
    st = os.stat(ctl)
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == other.pw_uid  # the owner may connect
    assert "allow_other" in mountinfo_options(m.path) and "default_permissions" in mountinfo_options(m.path)
    g = m.path / "guest_mem"
    for name, owner, mode in (("roots", 0, 0o644), ("theirs", other.pw_uid, 0o600)):
        (g / name).write_bytes(b"")
        os.truncate(g / name, 2 * MiB)
        os.chown(g / name, owner, other.pw_gid if owner else 0)
        os.chmod(g / name, mode)
    with Iommufd(str(ctl)) as root:
        root.ioas_alloc()
        assert root.ioas_alloc() == 2
        got = as_user(other, PROBE + f'''
fd = Iommufd({str(ctl)!r})
ioas = fd.ioas_alloc()
out["ioas"] = ioas
out["roots_rw"] = err(lambda: os.open({str(g / "roots")!r}, os.O_RDWR))
out["roots_unlink"] = err(lambda: os.unlink({str(g / "roots")!r}))
mine = os.open({str(g / "theirs")!r}, os.O_RDWR)
out["map"] = fd.ioas_map_file(ioas, mine, 0, 2 << 20, 1 << 21)
out["foreign_id"] = err(lambda: fd.destroy(2))
out["iommu_write"] = err(lambda: os.open({str(m.path / "iommu" / "root-pgtables")!r}, os.O_WRONLY))
print(json.dumps(out))
''')
        assert got == {"ioas": 1, "roots_rw": errno.EACCES, "roots_unlink": errno.EACCES, "map": 2 * MiB,
                       "foreign_id": errno.ENOENT, "iommu_write": errno.EACCES}
        root.destroy(2)  # its own id 2 is still there: the other connection named nothing of it
    with contextlib.suppress(OSError):
        os.unlink(g / "roots")
