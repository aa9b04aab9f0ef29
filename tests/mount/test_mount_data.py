"""File data through the mount: durability, coherence with the image, mmap, concurrency."""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest

from conftest import Mount

pytestmark = pytest.mark.mount

MiB = 1 << 20


def extents(path: Path) -> list[tuple[int, int, int]]:
    """``(file_offset, phys_addr, length)`` from the user.pkernfs.extents xattr, via getfattr."""
    out = subprocess.run(["getfattr", "--only-values", "-n", "user.pkernfs.extents", str(path)],
                         capture_output=True, text=True, check=True).stdout
    return [tuple(int(x, 16) for x in line.split()) for line in out.splitlines()]  # type: ignore[misc]


def base_phys(mounted: Mount) -> int:
    text = (mounted.path / ".pkernfs" / "status").read_text()
    return int(next(x for x in text.splitlines() if x.startswith("base_phys:")).split()[1], 16)


def image_offset(mounted: Mount, path: Path, file_offset: int) -> int:
    """Where byte ``file_offset`` of ``path`` lives in the image file."""
    for start, phys, length in extents(path):
        if start <= file_offset < start + length:
            return phys - base_phys(mounted) + (file_offset - start)
    raise AssertionError(f"offset {file_offset} not in any extent")


# ----------------------------------------------------------- durability


def test_a_returned_write_survives_sigkill_of_the_daemon(mounted: Mount) -> None:
    f = mounted.path / "guest_mem" / "vm0"
    subprocess.run(["truncate", "-s", "8M", str(f)], check=True)
    fd = os.open(f, os.O_RDWR)
    try:
        os.pwrite(fd, b"written just before the kill", 3 * MiB + 5)
    finally:
        os.close(fd)
    mounted.restart()
    fd = os.open(f, os.O_RDONLY)
    try:
        assert os.pread(fd, 28, 3 * MiB + 5) == b"written just before the kill"
    finally:
        os.close(fd)


def test_a_write_is_in_the_image_file_before_close(mounted: Mount) -> None:
    f = mounted.path / "guest_mem" / "vm0"
    subprocess.run(["truncate", "-s", "4M", str(f)], check=True)
    fd = os.open(f, os.O_RDWR)
    try:
        os.pwrite(fd, b"no cache between", 12345)
        off = image_offset(mounted, f, 12345)
        with open(mounted.image, "rb") as img:
            img.seek(off)
            assert img.read(16) == b"no cache between"
    finally:
        os.close(fd)


def test_files_and_directories_survive_a_restart(mounted: Mount) -> None:
    g = mounted.path / "guest_mem"
    (g / "vm1").mkdir()
    data = os.urandom(MiB + 17)
    (g / "vm1" / "ram").write_bytes(data)
    os.chmod(g / "vm1" / "ram", 0o640)
    layout = extents(g / "vm1" / "ram")
    mounted.restart()
    assert (g / "vm1" / "ram").read_bytes() == data
    assert os.stat(g / "vm1" / "ram").st_mode & 0o777 == 0o640
    assert extents(g / "vm1" / "ram") == layout  # the physical layout never moves


# ------------------------------------------------------------ coherence


def test_bytes_changed_behind_the_mount_are_read_through_it(mounted: Mount) -> None:
    f = mounted.path / "guest_mem" / "vm0"
    subprocess.run(["truncate", "-s", "4M", str(f)], check=True)
    fd = os.open(f, os.O_RDONLY)
    try:
        assert os.pread(fd, 8, 2 * MiB) == bytes(8)  # read once: anything cached would be zeros
        with open(mounted.image, "r+b") as img:  # a DMA / physical mapping writes the page
            img.seek(image_offset(mounted, f, 2 * MiB))
            img.write(b"DMA DATA")
        assert os.pread(fd, 8, 2 * MiB) == b"DMA DATA"
    finally:
        os.close(fd)
    out = subprocess.run(["dd", f"if={f}", "bs=4096", f"skip={2 * MiB // 4096}", "count=1", "status=none"],
                         capture_output=True, check=True).stdout
    assert out[:8] == b"DMA DATA"


def test_a_physical_mapping_of_the_image_and_the_mount_see_each_other(mounted: Mount) -> None:
    f = mounted.path / "guest_mem" / "vm0"
    subprocess.run(["truncate", "-s", "4M", str(f)], check=True)
    (start, phys, length), = extents(f)
    with open(mounted.image, "r+b") as img:
        mm = mmap.mmap(img.fileno(), length, offset=phys - base_phys(mounted))  # what a VMM maps
        try:
            mm[100:105] = b"guest"
            with open(f, "rb") as fh:
                fh.seek(100)
                assert fh.read(5) == b"guest"
            with open(f, "r+b") as fh:
                fh.seek(200)
                fh.write(b"host")
            assert mm[200:204] == b"host"
        finally:
            mm.close()


# ----------------------------------------------------------------- mmap


def test_map_shared_through_the_mount_is_enodev(mounted: Mount) -> None:
    f = mounted.path / "guest_mem" / "vm0"
    subprocess.run(["truncate", "-s", "1M", str(f)], check=True)
    with open(f, "r+b") as fh:
        with pytest.raises(OSError) as exc:
            mmap.mmap(fh.fileno(), MiB, flags=mmap.MAP_SHARED)
    assert exc.value.errno == errno.ENODEV


def test_map_private_through_the_mount_reads_the_data(mounted: Mount) -> None:
    f = mounted.path / "guest_mem" / "vm0"
    f.write_bytes(b"private view" + bytes(8192))
    with open(f, "rb") as fh:
        mm = mmap.mmap(fh.fileno(), 8192, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        try:
            assert mm[:12] == b"private view"
            mm[:7] = b"changed"  # copy-on-write: never reaches the file
        finally:
            mm.close()
    assert f.read_bytes()[:12] == b"private view"


# ----------------------------------------------------------- concurrency


def test_concurrent_writers_and_readers_keep_every_byte(mounted: Mount) -> None:
    g = mounted.path / "guest_mem"
    nfiles, chunk, nchunks = 4, 256 << 10, 16
    for i in range(nfiles):
        subprocess.run(["truncate", "-s", str(chunk * nchunks), str(g / f"f{i}")], check=True)
    errors: list[BaseException] = []

    def pattern(i: int, k: int) -> bytes:
        return hashlib.sha256(f"{i}/{k}".encode()).digest() * (chunk // 32)

    def writer(i: int) -> None:
        try:
            fd = os.open(g / f"f{i}", os.O_RDWR)
            try:
                for k in range(nchunks):
                    assert os.pwrite(fd, pattern(i, k), k * chunk) == chunk
            finally:
                os.close(fd)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def reader(i: int) -> None:
        try:
            fd = os.open(g / f"f{i}", os.O_RDONLY)
            try:
                for _ in range(3):
                    for k in range(nchunks):
                        block = os.pread(fd, chunk, k * chunk)
                        assert len(block) == chunk
                        # racing a writer, a chunk may be part old, part new, but every
                        # 32-byte word is either still zero or the writer's word
                        words = np.frombuffer(block, np.uint8).reshape(-1, 32)
                        want = np.frombuffer(pattern(i, k)[:32], np.uint8)
                        ok = (words == 0).all(axis=1) | (words == want).all(axis=1)
                        assert ok.all(), f"garbage in f{i} chunk {k}"
            finally:
                os.close(fd)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    def churn(j: int) -> None:
        try:
            for n in range(40):
                p = g / f"tmp{j}-{n}"
                p.write_bytes(b"x" * 5000)
                p.unlink()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(nfiles)]
    threads += [threading.Thread(target=reader, args=(i,)) for i in range(nfiles)]
    threads += [threading.Thread(target=churn, args=(j,)) for j in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    for i in range(nfiles):
        data = (g / f"f{i}").read_bytes()
        assert data == b"".join(pattern(i, k) for k in range(nchunks))
    assert sorted(os.listdir(g)) == [f"f{i}" for i in range(nfiles)]
