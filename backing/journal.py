"""The redo journal: every metadata change commits with one aligned 8-byte store.

Why a journal at all: a restart is a SIGKILL at any instant. Stores into the
image's mmap survive the kill (they sit in the file's page cache, which is
the "memory" kexec keeps), so nothing needs flushing; the danger is a
metadata operation cut off between two of its stores -- a bitmap that says
"used" for pages no extent owns, a dentry naming a freed inode. The journal
makes each operation's metadata stores all-or-nothing.

Protocol for one transaction with sequence number ``s`` (``s`` grows by one
per transaction; ``applied_seq == commit_seq`` between transactions):

1. Records are written to the journal body: for each metadata range an
   ``JREC_DTYPE`` header (image offset, length) and the range's *new*
   bytes, padded to 8 bytes. Then the header's ``txn_seq = s``,
   ``nrecords = 0``, ``body_bytes``, ``nrecords`` and ``body_crc`` (CRC-32
   of the body seeded with ``s``). None of this is trusted yet:
   ``commit_seq`` still equals ``applied_seq``.
2. **Commit point**: one aligned 8-byte store ``commit_seq = s``.
3. The records are copied to their places in the metadata regions.
4. One aligned 8-byte store ``applied_seq = s``.

Recovery (at every open, before anything reads metadata): if
``commit_seq == applied_seq`` there is nothing to do. Otherwise the body must
describe transaction ``commit_seq`` (``txn_seq`` matches, CRC matches,
records lie inside the body and target only metadata outside the journal);
its records are copied again (redo is idempotent: each record holds
absolute new contents) and ``applied_seq = commit_seq``. A body that fails
those checks after a commit store is corruption, not a crash, and is
reported as a ``FormatError``.

Why each kill point is safe: killed in 1, ``commit_seq`` is old, the
half-written body is ignored and the transaction is wholly absent. Killed in
2 -- an 8-byte aligned store is atomic, so ``commit_seq`` is old or new,
never torn. Killed in 3 or before 4, recovery redoes all records: the
transaction is wholly present. Killed after 4, it is done.

Only metadata is journaled. File data is written in place (it *is* guest
memory); operations order their data stores so that uncommitted data lies
beyond the end of a file or in pages no committed metadata owns.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable

import numpy as np

from . import format as fmt
from .errors import FormatError

log = logging.getLogger(__name__)

# Indices of the header's 8-byte words (JOURNAL_HEADER_DTYPE): the commit
# protocol stores into these one word at a time.
_W_COMMIT_SEQ = fmt.JOURNAL_HEADER_DTYPE.fields["commit_seq"][1] // 8
_W_APPLIED_SEQ = fmt.JOURNAL_HEADER_DTYPE.fields["applied_seq"][1] // 8


class Transaction:
    """New contents for metadata byte ranges, applied all-or-nothing by ``Journal.commit``.

    Later ``put``s to the same range win; overlapping ranges are applied in
    order, so the last one is what recovery leaves too.
    """

    __slots__ = ("records",)

    def __init__(self) -> None:
        self.records: list[tuple[int, bytes]] = []

    def put(self, offset: int, data: bytes | np.ndarray) -> None:
        """Stage ``data`` as the new contents of image bytes ``offset..+len``."""
        payload = data.tobytes() if isinstance(data, np.ndarray) else bytes(data)
        if payload:
            self.records.append((offset, payload))

    def __len__(self) -> int:
        return len(self.records)

    def body_size(self) -> int:
        return sum(fmt.JREC_DTYPE.itemsize + _pad8(len(p)) for _, p in self.records)


def _pad8(n: int) -> int:
    return (n + 7) & ~7


class Journal:
    """Writer and recoverer of the journal region of one open image."""

    def __init__(self, image: np.ndarray, geometry: fmt.Geometry) -> None:
        self.image = image
        self.geometry = geometry
        start = geometry.journal_page * fmt.PAGE_SIZE
        self._words = image[start : start + fmt.JOURNAL_HEADER_DTYPE.itemsize].view("<u8")
        self._header = image[start : start + fmt.JOURNAL_HEADER_DTYPE.itemsize].view(
            fmt.JOURNAL_HEADER_DTYPE
        )
        self._body_off = start + fmt.PAGE_SIZE
        self._body = image[self._body_off : self._body_off + geometry.journal_body_bytes]
        self.commits = 0  #: transactions committed by this instance (statistics)

    # -- format helpers shared by the writer, recovery and fsck ----------------

    @staticmethod
    def allowed_ranges(geometry: fmt.Geometry) -> tuple[tuple[int, int], ...]:
        """Byte ranges a record may target: metadata, never the journal itself."""
        ps = fmt.PAGE_SIZE
        return (
            (0, geometry.journal_page * ps),
            (geometry.bitmap_page * ps, geometry.data_page * ps),
        )

    @classmethod
    def parse_pending(
        cls, meta: np.ndarray, geometry: fmt.Geometry
    ) -> tuple[int, list[tuple[int, np.ndarray]]] | None:
        """The committed-but-unapplied transaction in ``meta``, or None if there is none.

        ``meta`` holds at least the image's metadata pages. Raises
        ``FormatError`` naming the journal field that is wrong; never reads
        outside the journal region.
        """
        start = geometry.journal_page * fmt.PAGE_SIZE
        hdr = meta[start : start + fmt.JOURNAL_HEADER_DTYPE.itemsize].view(fmt.JOURNAL_HEADER_DTYPE)[0]
        fields = fmt.JOURNAL_HEADER_DTYPE.fields
        if bytes(hdr["magic"]) != fmt.JOURNAL_MAGIC:
            raise FormatError("journal.magic", start, f"bad magic {bytes(hdr['magic'])!r}")
        commit, applied = int(hdr["commit_seq"]), int(hdr["applied_seq"])
        if commit == applied:
            return None
        if applied > commit:
            raise FormatError(
                "journal.applied_seq", start + fields["applied_seq"][1],
                f"applied_seq {applied} is ahead of commit_seq {commit}",
            )
        if int(hdr["txn_seq"]) != commit:
            raise FormatError(
                "journal.txn_seq", start + fields["txn_seq"][1],
                f"committed transaction {commit} but body holds {int(hdr['txn_seq'])}",
            )
        body_off = start + fmt.PAGE_SIZE
        body_bytes = int(hdr["body_bytes"])
        if body_bytes > geometry.journal_body_bytes or body_bytes % 8:
            raise FormatError(
                "journal.body_bytes", start + fields["body_bytes"][1],
                f"{body_bytes} bytes do not fit the {geometry.journal_body_bytes}-byte body",
            )
        body = meta[body_off : body_off + body_bytes]
        crc = zlib.crc32(body, commit & 0xFFFFFFFF)
        if crc != int(hdr["body_crc"]):
            raise FormatError(
                "journal.body_crc", start + fields["body_crc"][1],
                f"body CRC {crc:#010x} != recorded {int(hdr['body_crc']):#010x}",
            )
        allowed = cls.allowed_ranges(geometry)
        records: list[tuple[int, np.ndarray]] = []
        pos = 0
        for i in range(int(hdr["nrecords"])):
            if pos + fmt.JREC_DTYPE.itemsize > body_bytes:
                raise FormatError("journal.record", body_off + pos, f"record {i} runs past the body")
            rec = body[pos : pos + fmt.JREC_DTYPE.itemsize].view(fmt.JREC_DTYPE)[0]
            offset, length = int(rec["offset"]), int(rec["length"])
            data_start = pos + fmt.JREC_DTYPE.itemsize
            if data_start + length > body_bytes:
                raise FormatError("journal.record", body_off + pos, f"record {i} data runs past the body")
            if not any(lo <= offset and offset + length <= hi for lo, hi in allowed):
                raise FormatError(
                    "journal.record", body_off + pos,
                    f"record {i} targets bytes {offset:#x}+{length:#x} outside the metadata regions",
                )
            records.append((offset, body[data_start : data_start + length]))
            pos = data_start + _pad8(length)
        if pos != body_bytes:
            raise FormatError("journal.nrecords", start + fields["nrecords"][1], "records do not fill the body")
        return commit, records

    # -- the writer -------------------------------------------------------------

    #: Test hook, None in production: called with the name of each protocol
    #: step just completed ("body", "commit", "apply:<i>" after record i is
    #: in place, "applied"; in recovery "recover:<i>", "recovered"), so a
    #: crash test can copy the image or stop the process for a SIGKILL at
    #: exactly that point.
    step_hook: Callable[[str], None] | None = None

    def commit(self, txn: Transaction) -> None:
        """Apply ``txn`` with the protocol in the module docstring.

        The caller holds the store lock; the journal holds one transaction at
        a time. Raises ``ValueError`` if the transaction cannot fit, which
        the geometry rules out for every operation the store performs.
        """
        if not txn.records:
            return
        size = txn.body_size()
        if size > self._body.size:
            raise ValueError(f"transaction of {size} bytes exceeds the journal body ({self._body.size})")
        hook = self.step_hook
        seq = self.write_body(txn)
        if hook:
            hook("body")
        # 2. commit point: one aligned 8-byte store
        self._words[_W_COMMIT_SEQ] = seq
        if hook:
            hook("commit")
        # 3. in place
        for i, (offset, payload) in enumerate(txn.records):
            self.image[offset : offset + len(payload)] = np.frombuffer(payload, np.uint8)
            if hook:
                hook(f"apply:{i}")
        # 4. done
        self._words[_W_APPLIED_SEQ] = seq
        if hook:
            hook("applied")
        self.commits += 1

    def write_body(self, txn: Transaction) -> int:
        """Step 1: records and header fields, not yet trusted; returns the sequence number."""
        seq = int(self._words[_W_COMMIT_SEQ]) + 1
        pos = 0
        hdr = np.zeros(1, fmt.JREC_DTYPE)
        for offset, payload in txn.records:
            hdr["offset"], hdr["length"] = offset, len(payload)
            self._body[pos : pos + hdr.itemsize] = hdr.view(np.uint8)
            pos += hdr.itemsize
            self._body[pos : pos + len(payload)] = np.frombuffer(payload, np.uint8)
            padded = _pad8(len(payload))
            self._body[pos + len(payload) : pos + padded] = 0
            pos += padded
        h = self._header[0:1]
        h["txn_seq"] = seq
        # nrecords drops to 0 before body_bytes changes: a kill between any two
        # of these stores leaves a header whose records fit its body, which
        # fsck checks (the fields are not trusted before the commit, but they
        # are never nonsense either)
        h["nrecords"] = 0
        h["body_bytes"] = pos
        h["nrecords"] = len(txn.records)
        h["body_crc"] = zlib.crc32(self._body[:pos], seq & 0xFFFFFFFF)
        return seq

    def recover(self) -> bool:
        """Redo a committed, unapplied transaction; True if there was one."""
        pending = self.parse_pending(self.image, self.geometry)
        if pending is None:
            return False
        seq, records = pending
        hook = self.step_hook
        for i, (offset, data) in enumerate(records):
            self.image[offset : offset + data.size] = data
            if hook:
                hook(f"recover:{i}")
        self._words[_W_APPLIED_SEQ] = seq
        if hook:
            hook("recovered")
        log.info("journal: replayed committed transaction %d (%d records)", seq, len(records))
        return True


def initial_header() -> np.ndarray:
    """The journal header mkfs writes: empty, sequence 0."""
    hdr = np.zeros(1, fmt.JOURNAL_HEADER_DTYPE)
    hdr["magic"] = fmt.JOURNAL_MAGIC
    return hdr
