"""``pkfuse mkfs``, ``pkfuse fsck`` and ``pkfuse info``: the image commands."""

from __future__ import annotations

import argparse
import os
import sys

from backing import fsck
from backing.errors import FormatError, PkfuseError


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("mkfs", help="create an empty image", description="Create an empty pkfuse image.")
    p.add_argument("image", metavar="IMAGE", help="image file to create (sparse)")
    p.add_argument("--size", required=True, help="image size, e.g. 16G, 512M")
    p.add_argument("--base", metavar="PHYS_ADDR", help="physical address of image page 0, 2 MiB aligned "
                   "(e.g. 0x100000000 or 4G; default 4 GiB)")
    p.add_argument("--force", action="store_true", help="overwrite an existing non-empty file")
    p.set_defaults(func=cmd_mkfs)

    p = sub.add_parser("fsck", help="check an image",
                       description="Check a pkfuse image without changing it; print every finding. "
                                   "Exit 0 clean, 1 findings, 2 unusable.")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("--shallow", action="store_true",
                   help="metadata only: skip the checks of structures in data pages (IOMMU tables)")
    p.set_defaults(func=cmd_fsck)

    p = sub.add_parser("info", help="geometry, usage and files of an image or mountpoint",
                       description="Show geometry, usage, files with their physical extents, the "
                                   "physical memory map and the IOMMU domains, from a mountpoint (its "
                                   ".pkernfs/info) or from an image (opened read-only without a lock, so "
                                   "it also works while a daemon serves the image). Both give the same "
                                   "text but for daemon_pid and read_only.")
    p.add_argument("target", metavar="IMAGE|MOUNTPOINT")
    p.set_defaults(func=cmd_info)


def cmd_mkfs(args: argparse.Namespace) -> int:
    from backing import format as fmt
    from backing.mkfs import mkfs, parse_addr, parse_size

    size = parse_size(args.size)
    base = parse_addr(args.base) if args.base is not None else fmt.DEFAULT_BASE_PHYS
    g = mkfs(args.image, size, base, force=args.force)
    print(f"{args.image}: {g.size} bytes, {g.npages} pages of 4096, base_phys {g.base_phys:#x}, "
          f"{g.inode_count} inodes, {g.extent_count} extent records, pool from page {g.data_page}")
    return 0


def cmd_fsck(args: argparse.Namespace) -> int:
    """Findings to stdout as ``structure @0xOFFSET: problem``; the summary of an unusable image,
    and the one line for a file that is not an image at all, to stderr. Exit 0/1/2."""
    status, findings = fsck.check_image(args.image, deep=not args.shallow)
    if findings and findings[0].structure == "image":
        print(f"pkfuse fsck: {args.image}: {findings[0].problem}", file=sys.stderr)
        return 2
    for f in findings:
        print(f)
    if status == 0:
        print(f"{args.image}: clean")
    elif status == 1:
        print(f"{args.image}: {len(findings)} finding{'s' if len(findings) != 1 else ''}")
    else:
        fatal = sum(f.fatal for f in findings)
        print(f"pkfuse fsck: {args.image}: unusable ({fatal} fatal finding{'s' if fatal != 1 else ''})",
              file=sys.stderr)
    return status


def cmd_info(args: argparse.Namespace) -> int:
    """One text either way (``views.render_info``): from a mountpoint its daemon's
    ``.pkernfs/info``, from an image the same text made here from a read-only, unlocked look."""
    target = args.target
    if os.path.isdir(target):
        if not os.path.isdir(os.path.join(target, ".pkernfs")):
            raise PkfuseError(f"{target} is not a pkfuse mountpoint (no .pkernfs/)")
        with open(os.path.join(target, ".pkernfs", "info")) as f:
            sys.stdout.write(f.read())
        return 0
    from backing.iommu import Iommu
    from backing.regs import default_path
    from backing.store import Store
    from pkfuse.daemon import views

    # No flock: a running daemon holds the image's exclusive lock, and info
    # must still work. The copy-on-write mapping replays the journal in
    # private memory, but a transaction committing while we read can make
    # the look inconsistent; then open fails validation and we say so.
    try:
        store = Store.open(target, read_only=True, lock=False)
    except FormatError as exc:
        raise PkfuseError(f"{target}: not a usable pkfuse image ({exc}); if a daemon is serving it, "
                          "run `pkfuse info MOUNTPOINT` instead") from None
    # the register block a mount of this image uses by default, if there is one (never made here)
    regs: str | None = os.path.abspath(default_path(os.path.abspath(target)))
    if not os.path.exists(regs):
        regs = None
    iommu: Iommu | None = None
    error = ""
    try:
        try:
            iommu = Iommu.open(store, regs)
        except PkfuseError as exc:  # a domain the IOMMU refuses: the rest of the image is still worth showing
            error = str(exc)
        sys.stdout.write(views.render_info(store, iommu, regs_path=regs, pid="(not mounted here)",
                                           iommu_error=error))
    finally:
        if iommu is not None:
            iommu.close()
        store.close()
    return 0
