"""``pkfuse mount`` and ``pkfuse umount``: argparse front ends of ``pkfuse.daemon``."""

from __future__ import annotations

import argparse
import logging
import os

from pkfuse.daemon import daemonize, logs, options, preflight, unmount
from pkfuse.daemon.serve import serve  # imports pyfuse3 and trio only when it serves

from . import report


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "mount", help="mount an image (daemonizes)",
        description="Mount IMAGE on MOUNTPOINT and serve it. Daemonizes and returns once the mount\n"
                    "answers, unless --foreground. Logs go to --log FILE, else IMAGE.log (daemon)\n"
                    "or stderr (--foreground).",
        epilog=preflight.EXIT_DOC + "\n\n-o options: ro, rw, allow_other, allow_root, auto_unmount,\n"
               "  default_permissions (on by default; no_default_permissions turns it off),\n"
               "  fsname=, subtype=, log=FILE, regs=FILE, control=PATH, domains=DESIGN, and the usual dev/suid/exec/atime flags.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("-f", "--foreground", action="store_true", help="stay attached (for debugging and tests)")
    p.add_argument("--read-only", "-r", action="store_true", help="mount read-only (shared lock on the image)")
    p.add_argument("--allow-other", action="store_true",
                   help="let users other than the one mounting reach the mount (FUSE's allow_other; file modes "
                        "are still checked: default_permissions). Without it only the mounting user can")
    p.add_argument("-o", dest="options", action="append", metavar="OPTIONS", help="comma-separated mount options")
    p.add_argument("--log", metavar="FILE", help="append the daemon's log to FILE")
    p.add_argument("--regs", metavar="FILE", help="IOMMU register file (default IMAGE.regs)")
    p.add_argument("--control", metavar="PATH",
                   help="control socket for iommufd and liveupdate calls (default /run/pkfuse/UUID.sock; "
                        "shown in .pkernfs/status)")
    p.add_argument("--domains", choices=("persistent", "ephemeral"),
                   help="where iommufd domains live: in the image (persistent, pkernfs; the default) or in "
                        "host RAM with a fixed copy in the image made at reboot() (ephemeral, the review's)")
    p.add_argument("--debug", action="store_true", help="debug logging: every refused request with its reason")
    p.add_argument("--wait", type=float, metavar="SECONDS",
                   help="wait up to SECONDS for the image's lock to be released and the mountpoint to be a "
                        "plain directory again (a successor started before a restart), instead of exit 3 or 4")
    p.set_defaults(func=cmd_mount)

    p = sub.add_parser("umount", aliases=["unmount"], help="unmount and wait for the daemon to exit",
                       description="Unmount MOUNTPOINT (fusermount3 -u) and wait for its daemon to exit.")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the daemon (default 10)")
    p.set_defaults(func=cmd_umount)


def cmd_mount(args: argparse.Namespace) -> int:
    from . import entry

    opts = options.parse_options(args.options or [])
    if args.read_only:
        opts["read_only"] = True
    if args.allow_other:
        opts["fuse"].add("allow_other")
    if args.regs:
        opts["regs"] = args.regs
    if args.control:
        opts["control"] = args.control
    if args.domains:
        opts["domains"] = args.domains
    log_file = args.log or opts["log"]
    level = logging.DEBUG if args.debug else logging.INFO
    if args.wait is not None:
        if args.wait < 0:
            raise preflight.MountError(f"--wait {args.wait:g}: not negative", preflight.EXIT_USAGE)
        _import_for_serve()  # paid while waiting, not after the lock is free
    image, mnt = preflight.preflight(args.image, args.mountpoint, wait=args.wait)
    if args.foreground:
        logs.setup_logging(log_file, level=level)
        return serve(image, mnt, opts)
    log_file = os.path.abspath(log_file or options.default_log(image))

    def daemon() -> int:
        def body() -> int:
            logs.setup_logging(log_file, level=level)  # a log that cannot be opened: one line
            return serve(image, mnt, opts, daemonized=True)

        return report.reported(entry.PROG, body)

    status = daemonize.daemonize(image, mnt, log_file, daemon)
    entry.exit_without_teardown = status == 0
    return status


def _import_for_serve() -> None:
    """The modules ``serve`` imports as it starts, imported now: a mount that waits (``--wait``) for
    its image pays the interpreter's floor before the restart, as a pre-started successor should."""
    import importlib

    for name in ("pyfuse3", "trio", "numpy", "backing.store", "backing.iommu", "backing.iommufd",
                 "backing.liveupdate", "pkfuse.daemon.fs", "pkfuse.daemon.control"):
        importlib.import_module(name)


def cmd_umount(args: argparse.Namespace) -> int:
    return unmount.unmount(args.mountpoint, timeout=args.timeout)
