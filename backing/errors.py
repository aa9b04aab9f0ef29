"""Exceptions of the backing store.

Each names what failed precisely enough to act on: a ``FormatError`` the
structure and byte offset in the image, a ``StoreError`` the errno that the
FUSE daemon returns unchanged.
"""

from __future__ import annotations

import errno as _errno
import os


class PkfuseError(Exception):
    """Base of every error pkfuse raises on purpose."""


class FormatError(PkfuseError):
    """The image's bytes violate the format: ``structure`` at byte ``offset``."""

    def __init__(self, structure: str, offset: int, problem: str) -> None:
        super().__init__(structure, offset, problem)
        self.structure = structure
        self.offset = offset
        self.problem = problem

    def __str__(self) -> str:
        return f"{self.structure} @{self.offset:#x}: {self.problem}"


class StoreError(PkfuseError):
    """A refused operation; ``errno`` is what a filesystem call returns."""

    def __init__(self, errno: int, message: str = "") -> None:
        super().__init__(errno, message)
        self.errno = errno
        self.message = message or os.strerror(errno)

    def __str__(self) -> str:
        name = _errno.errorcode.get(self.errno, str(self.errno))
        return f"{name}: {self.message}"


class ImageBusy(PkfuseError):
    """Another process holds the image's lock (a second daemon, say)."""


class Finding:
    """One fsck finding: ``structure`` at byte ``offset`` of the image is wrong.

    ``fatal`` findings make the image unusable (nothing after them can be
    trusted); the others are inconsistencies in a usable image.
    """

    __slots__ = ("structure", "offset", "problem", "fatal")

    def __init__(self, structure: str, offset: int, problem: str, fatal: bool = False) -> None:
        self.structure = structure
        self.offset = offset
        self.problem = problem
        self.fatal = fatal

    def __str__(self) -> str:
        return f"{self.structure} @{self.offset:#x}: {self.problem}"

    def __repr__(self) -> str:
        return f"Finding({self.structure!r}, {self.offset:#x}, {self.problem!r}, fatal={self.fatal})"
