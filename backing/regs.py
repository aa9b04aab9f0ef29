"""The simulated IOMMU's register block: a small file beside the image.

Hardware registers are not pkernfs memory, so they live outside the image
(default ``IMAGE + ".regs"``) and survive a restart of the daemon untouched:
RTADDR and GSTS.TES keep their values until an explicit command changes
them, exactly as a real IOMMU keeps translating through a kexec.

Layout: ``format.REGS_DTYPE`` (magic, RTADDR, GSTS, fault counter, a ring
of ``FAULT_LOG_ENTRIES`` fault records). Each register is one aligned
8-byte word, written with one store. Fault recording is serialized between
processes with an exclusive flock on the file (a walker in another process
records faults too); the records of a batch are written before the counter
that publishes them, so a reader never sees a half-written record counted.
"""

from __future__ import annotations

import dataclasses
import fcntl
import mmap
import os

import numpy as np

from . import format as fmt
from .errors import FormatError

REGS_SIZE = -(-fmt.REGS_DTYPE.itemsize // fmt.PAGE_SIZE) * fmt.PAGE_SIZE


def default_path(image_path: str | os.PathLike[str]) -> str:
    return os.fspath(image_path) + ".regs"


@dataclasses.dataclass(frozen=True)
class Fault:
    seq: int
    iova: int
    source_id: int
    reason: int
    write: bool

    @property
    def requester(self) -> str:
        return fmt.requester_name(self.source_id)

    def __str__(self) -> str:
        kind = "write" if self.write else "read"
        name = fmt.FR_NAMES.get(self.reason, "unknown")
        return (f"#{self.seq} {self.requester} {kind} iova {self.iova:#x}: "
                f"fault reason {self.reason:#04x} ({name})")


class Regs:
    """An open register block (read-write mmap shared with every user)."""

    def __init__(self, path: str, fd: int, mm: mmap.mmap) -> None:
        self.path = path
        self._fd = fd
        self._mm = mm
        self.block = np.frombuffer(mm, dtype=fmt.REGS_DTYPE, count=1)
        self._words = np.frombuffer(mm, dtype="<u8", count=4)

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, create: bool = True) -> Regs:
        """Open the register block at ``path``; make a reset one (TE off) if missing."""
        path = os.fspath(path)
        flags = os.O_RDWR | (os.O_CREAT if create else 0)
        fd = os.open(path, flags, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                size = os.fstat(fd).st_size
                if size == 0:
                    os.ftruncate(fd, REGS_SIZE)
                    mm = mmap.mmap(fd, REGS_SIZE)
                    mm[:8] = fmt.REGS_MAGIC  # the rest reads as zero: reset state
                elif size < REGS_SIZE:  # mmap of REGS_SIZE would fail with a ValueError
                    raise FormatError("regs", 0, f"{path} is {size} bytes, not a register block")
                else:
                    mm = mmap.mmap(fd, REGS_SIZE)
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
            if mm[:8] != fmt.REGS_MAGIC:
                mm.close()
                raise FormatError("regs.magic", 0, f"{path} is not a pkfuse register block")
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, mm)

    def close(self) -> None:
        if self._mm.closed:
            return
        del self.block, self._words
        try:
            self._mm.close()
        except BufferError:
            pass
        os.close(self._fd)

    def __enter__(self) -> Regs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ registers

    @property
    def rtaddr(self) -> int:
        return int(self._words[1])

    @property
    def gsts(self) -> int:
        return int(self._words[2])

    @property
    def enabled(self) -> bool:
        return bool(self.gsts & fmt.GSTS_TES)

    @property
    def fault_seq(self) -> int:
        return int(self._words[3])

    def set_root_table(self, phys_addr: int) -> None:
        """SRTP: program RTADDR (4 KiB aligned)."""
        if phys_addr % fmt.PAGE_SIZE or phys_addr >> 52:
            raise ValueError(f"root table address {phys_addr:#x} is not a 4 KiB aligned 52-bit address")
        self._words[1] = phys_addr

    def enable(self) -> None:
        """GCMD.TE: translation on; refused while RTADDR is unset."""
        if not self.rtaddr:
            raise ValueError("set the root table address before enabling translation")
        self._words[2] = self.gsts | fmt.GSTS_TES

    def disable(self) -> None:
        self._words[2] = self.gsts & ~fmt.GSTS_TES

    # ------------------------------------------------------------ fault log

    def record_faults(self, source_id: int, iovas: np.ndarray, reasons: np.ndarray,
                      write: bool | np.ndarray) -> None:
        """Append faults (vectorized); the ring keeps the last FAULT_LOG_ENTRIES."""
        iovas = np.asarray(iovas, np.uint64).ravel()
        m = iovas.size
        if m == 0:
            return
        reasons = np.broadcast_to(np.asarray(reasons, np.uint16), (m,))
        wr = np.broadcast_to(np.asarray(write, np.uint8), (m,))
        n = fmt.FAULT_LOG_ENTRIES
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            seq0 = self.fault_seq
            keep = slice(max(0, m - n), m)
            seqs = seq0 + 1 + np.arange(m, dtype=np.uint64)[keep]
            ring = self.block["faults"][0]
            slots = ((seqs - np.uint64(1)) % np.uint64(n)).astype(np.int64)
            ring["seq"][slots] = seqs
            ring["iova"][slots] = iovas[keep]
            ring["source_id"][slots] = source_id
            ring["reason"][slots] = reasons[keep]
            ring["write"][slots] = wr[keep]
            self._words[3] = seq0 + m
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def faults(self) -> list[Fault]:
        """The recorded faults still in the ring, oldest first."""
        seq = self.fault_seq
        ring = self.block["faults"][0].copy()
        live = ring[(ring["seq"] != 0) & (ring["seq"] <= seq) & (ring["seq"] + fmt.FAULT_LOG_ENTRIES > seq)]
        live = live[np.argsort(live["seq"])]
        return [Fault(int(r["seq"]), int(r["iova"]), int(r["source_id"]), int(r["reason"]), bool(r["write"]))
                for r in live]

    def clear_faults(self) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            self.block["faults"][0] = np.zeros(fmt.FAULT_LOG_ENTRIES, fmt.FAULT_RECORD_DTYPE)
            self._words[3] = 0
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
