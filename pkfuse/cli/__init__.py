"""The command line: argparse front ends only, one module per group of commands.

``entry`` builds the parser and reports errors; ``image`` (mkfs, fsck, info),
``mount`` (mount, umount), ``iommu`` (``pkfuse iommu ...``) and
``mount_helper`` (``mount.fuse.pkfuse``) each own their commands. No logic
that a library or the daemon needs lives here.
"""

from __future__ import annotations

from .entry import main, run

__all__ = ["main", "run"]
