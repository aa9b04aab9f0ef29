"""The guest program's binary: where it is, and building it from ``guest/`` when it is missing or stale.

``guest/guest.c`` (freestanding C, ``guest/abi.h`` mirroring ``abi.py``) is
compiled with the installed gcc into a flat binary linked at
``abi.GUEST_TEXT_GPA`` with ``_start`` first (``guest/guest.ld``), at
``build/guest/guest.bin``. ``scripts/setup.sh`` builds it (``python -m
pkfuse.vmm.guest``); ``load()`` builds it too when it is missing or its
sources changed, e.g. on a developer's clone. Current means: the stamp
beside the binary holds the SHA-256 of the sources and of the commands that
build them. The binary is replaced atomically (a temporary file renamed), so
two builders at once never leave a torn binary.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from . import abi

ROOT = Path(__file__).resolve().parents[2]
SOURCE_DIR = ROOT / "guest"
BUILD_DIR = ROOT / "build" / "guest"
SOURCES = ("guest.c", "abi.h", "guest.ld")

#: ../shared/KVM-NOTES.md's flags, plus: no CET instructions, no memset/memcpy calls made up
#: by the optimizer (there is no libc), warnings as errors
CFLAGS = ("-ffreestanding", "-nostdlib", "-fno-pic", "-mno-red-zone", "-O2", "-m64",
          "-fno-asynchronous-unwind-tables", "-fno-stack-protector", "-mgeneral-regs-only",
          "-fcf-protection=none", "-fno-tree-loop-distribute-patterns", "-std=gnu11",
          "-Wall", "-Wextra", "-Werror")
LDFLAGS = ("-nostdlib", "-static", "--build-id=none")


class GuestBuildError(RuntimeError):
    """The guest cannot be built (one line: which tool or step, and why)."""


def binary_path() -> Path:
    """Where the built guest binary is (it may not exist yet)."""
    return BUILD_DIR / "guest.bin"


def _commands(obj: Path, elf: Path, out: Path) -> list[list[str]]:
    return [["gcc", *CFLAGS, "-c", str(SOURCE_DIR / "guest.c"), "-o", str(obj)],
            ["ld", *LDFLAGS, "-T", str(SOURCE_DIR / "guest.ld"), "-o", str(elf), str(obj)],
            ["objcopy", "-O", "binary", "-j", ".text", str(elf), str(out)]]


def _digest() -> str:
    h = hashlib.sha256()
    for name in SOURCES:
        try:
            h.update(name.encode() + b"\0" + (SOURCE_DIR / name).read_bytes() + b"\0")
        except FileNotFoundError:
            raise GuestBuildError(f"the guest's source {SOURCE_DIR / name} is missing") from None
    h.update(repr(_commands(Path("o"), Path("e"), Path("b"))).encode())
    return h.hexdigest()


def _stamp() -> Path:
    return BUILD_DIR / "guest.stamp"


def is_current() -> bool:
    """The binary exists and was built from the sources as they are now."""
    try:
        return binary_path().exists() and _stamp().read_text().strip() == _digest()
    except FileNotFoundError:
        return False


def build() -> Path:
    """Build the binary from ``guest/`` (always); return its path. Raises GuestBuildError."""
    for tool in ("gcc", "ld", "objcopy"):
        if shutil.which(tool) is None:
            raise GuestBuildError(f"building the guest needs {tool}, which is not installed "
                                  "(scripts/setup.sh installs gcc and binutils)")
    digest = _digest()
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=BUILD_DIR, prefix=".build-") as tmp:
        t = Path(tmp)
        out = t / "guest.bin"
        for cmd in _commands(t / "guest.o", t / "guest.elf", out):
            r = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if r.returncode != 0:
                lines = [line for line in (r.stderr or r.stdout).splitlines() if line.strip()]
                why = next((line for line in lines if "error" in line.lower()), lines[0] if lines else "")
                raise GuestBuildError(f"building the guest: {cmd[0]} failed (exit {r.returncode}): {why.strip()}")
        size = out.stat().st_size
        if not 0 < size <= abi.GUEST_TEXT_MAX:
            raise GuestBuildError(f"the guest binary is {size} bytes: it must be 1 to {abi.GUEST_TEXT_MAX}")
        os.replace(out, binary_path())
        stamp = t / "guest.stamp"
        stamp.write_text(digest + "\n")
        os.replace(stamp, _stamp())
    return binary_path()


def ensure() -> Path:
    """The binary's path, built first if it is missing or stale."""
    if not is_current():
        build()
    return binary_path()


def load() -> bytes:
    """The guest binary's bytes (built first if missing or stale)."""
    return ensure().read_bytes()


def main() -> int:
    """``python -m pkfuse.vmm.guest``: build if stale, print nothing when current; one line on failure."""
    try:
        ensure()
    except GuestBuildError as e:
        print(e, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
