"""The redo journal: a kill after any protocol step leaves wholly-before or wholly-after.

A kill is simulated by copying the image file at the step (``Journal.step_hook``):
the mmap's stores are in the page cache, so the copy is exactly what a SIGKILL
at that instant leaves. Recovery then runs on the copy.
"""

from __future__ import annotations

import shutil
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from backing import format as fmt
from backing.errors import FormatError
from backing.journal import Journal, Transaction
from backing.mkfs import mkfs
from backing.store import Store

PS = fmt.PAGE_SIZE
MiB = 1 << 20
HDR = fmt.JOURNAL_HEADER_DTYPE.fields


def gm(s: Store) -> int:
    return s.lookup(fmt.ROOT_INO, b"guest_mem")


def tables(image: np.ndarray | bytes, g: fmt.Geometry) -> bytes:
    """The journaled state: bitmap, inode, dentry and extent tables."""
    return bytes(image[g.bitmap_page * PS : g.data_page * PS])


def recover_copy(data: bytes, g: fmt.Geometry) -> tuple[bool, bytes]:
    """Run journal recovery on an image holding ``data``; (replayed?, tables afterwards)."""
    image = np.frombuffer(bytearray(data), np.uint8)
    replayed = Journal(image, g).recover()
    assert not Journal(image, g).recover(), "recovery must leave nothing to redo"
    return replayed, tables(image, g)


# operations of different shapes: few records, many records, records that free
def op_create(s: Store) -> None:
    s.create(gm(s), b"new", 0o600, 0, 0)


def op_truncate_up(s: Store) -> None:
    s.truncate(s.lookup(gm(s), b"a"), 3 * fmt.HUGE_PAGE + 5 * PS)


def op_unlink(s: Store) -> None:
    s.unlink(gm(s), b"a")


def op_rename_replace(s: Store) -> None:
    s.rename(gm(s), b"b", gm(s), b"a")


def op_shrink(s: Store) -> None:
    s.truncate(s.lookup(gm(s), b"a"), PS + 1)


OPS = [op_create, op_truncate_up, op_unlink, op_rename_replace, op_shrink]


@pytest.fixture
def image(tmp_path: Path) -> Path:
    p = tmp_path / "pk.img"
    mkfs(p, 16 * MiB)
    with Store.open(p) as s:
        a = s.create(gm(s), b"a", 0o600, 0, 0)
        s.truncate(a, 2 * fmt.HUGE_PAGE + 3 * PS)
        b = s.create(gm(s), b"b", 0o600, 0, 0)
        s.write(b, 0, b"b" * 5000)
    return p


def run_with_snapshots(path: Path, op: Callable[[Store], None]) -> tuple[fmt.Geometry, bytes, bytes, dict[str, bytes]]:
    """Run ``op`` once, copying the image file after every protocol step."""
    snaps: dict[str, bytes] = {}
    with Store.open(path) as s:
        g = s.geometry
        before = tables(s.image, g)
        s.journal.step_hook = lambda step: snaps.__setitem__(step, path.read_bytes())
        op(s)
        s.journal.step_hook = None
        after = tables(s.image, g)
    assert before != after
    return g, before, after, snaps


@pytest.mark.parametrize("op", OPS, ids=lambda f: f.__name__)
def test_kill_after_writing_the_body_leaves_the_operation_wholly_absent(image: Path, op: Callable) -> None:
    g, before, _, snaps = run_with_snapshots(image, op)
    replayed, state = recover_copy(snaps["body"], g)
    assert not replayed and state == before


@pytest.mark.parametrize("op", OPS, ids=lambda f: f.__name__)
def test_kill_after_the_commit_point_is_replayed_wholly_present(image: Path, op: Callable) -> None:
    g, _, after, snaps = run_with_snapshots(image, op)
    replayed, state = recover_copy(snaps["commit"], g)
    assert replayed and state == after


@pytest.mark.parametrize("op", OPS, ids=lambda f: f.__name__)
def test_kill_after_each_partial_apply_is_replayed_wholly_present(image: Path, op: Callable) -> None:
    g, _, after, snaps = run_with_snapshots(image, op)
    partial = [k for k in snaps if k.startswith("apply:")]
    assert len(partial) >= 2
    for step in partial:
        replayed, state = recover_copy(snaps[step], g)
        assert replayed and state == after, step


@pytest.mark.parametrize("op", OPS, ids=lambda f: f.__name__)
def test_kill_after_applied_needs_no_replay(image: Path, op: Callable) -> None:
    g, _, after, snaps = run_with_snapshots(image, op)
    replayed, state = recover_copy(snaps["applied"], g)
    assert not replayed and state == after


def test_commit_then_recover_is_a_no_op(image: Path) -> None:
    with Store.open(image) as s:
        op_truncate_up(s)
        snapshot = s.image[: s.geometry.data_page * PS].tobytes()
        assert not s.journal.recover()
        assert s.image[: s.geometry.data_page * PS].tobytes() == snapshot


def test_store_open_finishes_a_committed_transaction(image: Path, tmp_path: Path) -> None:
    g, _, after, snaps = run_with_snapshots(image, op_unlink)
    crashed = tmp_path / "crashed.img"
    crashed.write_bytes(snaps["apply:0"])
    with Store.open(crashed) as s:
        assert s.journal_recovered
        assert tables(s.image, g) == after
        assert [n for n, _ in s.children(gm(s))] == [b"b"]


def test_a_torn_body_does_not_stop_later_transactions(image: Path, tmp_path: Path) -> None:
    g, before, _, snaps = run_with_snapshots(image, op_create)
    crashed = tmp_path / "crashed.img"
    crashed.write_bytes(snaps["body"])
    with Store.open(crashed) as s:
        assert not s.journal_recovered and tables(s.image, g) == before
        op_create(s)
    with Store.open(crashed) as s:
        assert s.lookup(gm(s), b"new")


def test_a_kill_during_recovery_is_recovered_again(image: Path) -> None:
    g, _, after, snaps = run_with_snapshots(image, op_rename_replace)
    data = bytearray(snaps["commit"])
    image_arr = np.frombuffer(data, np.uint8)
    pending = Journal.parse_pending(image_arr, g)
    assert pending is not None
    _, records = pending
    offset, rec = records[0]  # recovery killed after its first record
    image_arr[offset : offset + rec.size] = rec.copy()
    replayed, state = recover_copy(bytes(data), g)
    assert replayed and state == after


def test_overlapping_records_apply_in_order_also_in_recovery(image: Path) -> None:
    with Store.open(image) as s:
        g = s.geometry
        off = s.geometry.inode_page * PS + 40 * fmt.INODE_DTYPE.itemsize  # a free inode record
        txn = Transaction()
        txn.put(off, b"\x01" * 16)
        txn.put(off + 8, b"\x02" * 4)
        snaps: dict[str, bytes] = {}
        s.journal.step_hook = lambda step: snaps.__setitem__(step, image.read_bytes())
        s.journal.commit(txn)
        s.journal.step_hook = None
        want = b"\x01" * 8 + b"\x02" * 4 + b"\x01" * 4
        assert s.image[off : off + 16].tobytes() == want
        # undo the test record so the image stays valid
        undo = Transaction()
        undo.put(off, bytes(16))
        s.journal.commit(undo)
    _, state = recover_copy(snaps["commit"], g)
    rel = off - g.bitmap_page * PS
    assert state[rel : rel + 16] == want


def test_oversized_transaction_is_refused_before_any_store(image: Path) -> None:
    with Store.open(image) as s:
        before = s.image[: s.geometry.data_page * PS].tobytes()
        txn = Transaction()
        txn.put(s.geometry.inode_page * PS, bytes(s.geometry.journal_body_bytes))
        with pytest.raises(ValueError):
            s.journal.commit(txn)
        assert s.image[: s.geometry.data_page * PS].tobytes() == before


# ------------------------------------------------- corruption is not a crash


def committed_copy(image: Path) -> tuple[fmt.Geometry, bytearray]:
    g, _, _, snaps = run_with_snapshots(image, op_truncate_up)
    return g, bytearray(snaps["commit"])


def put_u(data: bytearray, offset: int, value: int, nbytes: int) -> None:
    data[offset : offset + nbytes] = value.to_bytes(nbytes, "little")


def test_corrupted_body_after_commit_is_a_format_error(image: Path) -> None:
    g, data = committed_copy(image)
    data[(g.journal_page + 1) * PS + 20] ^= 0xFF
    with pytest.raises(FormatError) as e:
        Journal(np.frombuffer(data, np.uint8), g).recover()
    assert e.value.structure == "journal.body_crc"


def test_corrupted_body_after_commit_is_not_applied(image: Path, tmp_path: Path) -> None:
    g, data = committed_copy(image)
    before = tables(data, g)
    data[(g.journal_page + 1) * PS + 20] ^= 0xFF
    bad = tmp_path / "bad.img"
    bad.write_bytes(bytes(data))
    with pytest.raises(FormatError):
        Store.open(bad).close()
    assert tables(bad.read_bytes(), g) == before


def test_wrong_txn_seq_after_commit_is_a_format_error(image: Path) -> None:
    g, data = committed_copy(image)
    jh = g.journal_page * PS
    put_u(data, jh + HDR["txn_seq"][1], 999, 8)
    with pytest.raises(FormatError) as e:
        Journal(np.frombuffer(data, np.uint8), g).recover()
    assert e.value.structure == "journal.txn_seq"


def test_applied_ahead_of_commit_is_a_format_error(image: Path) -> None:
    g, data = committed_copy(image)
    jh = g.journal_page * PS
    put_u(data, jh + HDR["applied_seq"][1], 10**6, 8)
    with pytest.raises(FormatError) as e:
        Journal(np.frombuffer(data, np.uint8), g).recover()
    assert e.value.structure == "journal.applied_seq"


def test_body_bytes_beyond_the_region_is_a_format_error(image: Path) -> None:
    g, data = committed_copy(image)
    put_u(data, g.journal_page * PS + HDR["body_bytes"][1], g.journal_body_bytes + 8, 8)
    with pytest.raises(FormatError) as e:
        Journal(np.frombuffer(data, np.uint8), g).recover()
    assert e.value.structure == "journal.body_bytes"


def test_bad_journal_magic_is_a_format_error(image: Path) -> None:
    g, data = committed_copy(image)
    data[g.journal_page * PS] ^= 0xFF
    with pytest.raises(FormatError) as e:
        Journal(np.frombuffer(data, np.uint8), g).recover()
    assert e.value.structure == "journal.magic"


@pytest.mark.parametrize("target", ["data", "journal", "past_end"])
def test_record_targeting_outside_metadata_is_a_format_error(image: Path, target: str) -> None:
    """A valid CRC does not make a record trusted: its target must be metadata."""
    with Store.open(image) as s:
        g = s.geometry
    offset = {"data": g.data_page * PS, "journal": g.journal_page * PS + 8, "past_end": g.npages * PS}[target]
    data = bytearray(image.read_bytes())
    body = (g.journal_page + 1) * PS
    rec = np.zeros(1, fmt.JREC_DTYPE)
    rec["offset"], rec["length"] = offset, 8
    payload = rec.tobytes() + b"\xee" * 8
    data[body : body + len(payload)] = payload
    jh = g.journal_page * PS
    seq = int.from_bytes(data[jh + HDR["commit_seq"][1] : jh + HDR["commit_seq"][1] + 8], "little") + 1
    put_u(data, jh + HDR["txn_seq"][1], seq, 8)
    put_u(data, jh + HDR["body_bytes"][1], len(payload), 8)
    put_u(data, jh + HDR["nrecords"][1], 1, 4)
    put_u(data, jh + HDR["body_crc"][1], zlib.crc32(payload, seq & 0xFFFFFFFF), 4)
    put_u(data, jh + HDR["commit_seq"][1], seq, 8)
    with pytest.raises(FormatError) as e:
        Journal(np.frombuffer(data, np.uint8), g).recover()
    assert e.value.structure == "journal.record"


def test_image_copied_at_a_step_opens_as_a_store(image: Path, tmp_path: Path) -> None:
    """Every snapshot of every step opens (recovery + validation) without error."""
    for op in OPS:
        fresh = tmp_path / f"{op.__name__}.img"
        shutil.copy(image, fresh)
        _, _, _, snaps = run_with_snapshots(fresh, op)
        for step, data in snaps.items():
            crashed = tmp_path / "crashed.img"
            crashed.write_bytes(data)
            with Store.open(crashed) as s:
                s.statfs()


def test_read_only_open_replays_in_private_memory_only(image: Path, tmp_path: Path) -> None:
    g, _, after, snaps = run_with_snapshots(image, op_unlink)
    crashed = tmp_path / "crashed.img"
    crashed.write_bytes(snaps["commit"])
    with Store.open(crashed, read_only=True) as s:
        assert s.journal_recovered and tables(s.image, g) == after
        assert [n for n, _ in s.children(gm(s))] == [b"b"]
    assert crashed.read_bytes() == snaps["commit"]  # the next read-write open replays for real
