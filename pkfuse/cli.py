"""``pkfuse``: the command line (argparse; ``pkfuse SUBCOMMAND --help`` for each).

Every user error is one line ``pkfuse: error: ...`` on stderr and a nonzero
exit status (2 for bad arguments, 1 otherwise; ``pkfuse mount`` documents
its own statuses); a traceback means a bug in pkfuse.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from backing.errors import FormatError, PkfuseError

from . import mount as mountmod

PROG = "pkfuse"

#: Set once a daemonizing mount has succeeded: the caller has nothing left to
#: clean up, and tearing down the interpreter would add ~10 ms to every mount.
exit_without_teardown = False


# ------------------------------------------------------------------- mkfs


def cmd_mkfs(args: argparse.Namespace) -> int:
    from backing import format as fmt
    from backing.mkfs import mkfs, parse_addr, parse_size

    size = parse_size(args.size)
    base = parse_addr(args.base) if args.base is not None else fmt.DEFAULT_BASE_PHYS
    g = mkfs(args.image, size, base, force=args.force)
    print(f"{args.image}: {g.size} bytes, {g.npages} pages of 4096, base_phys {g.base_phys:#x}, "
          f"{g.inode_count} inodes, {g.extent_count} extent records, pool from page {g.data_page}")
    return 0


# ------------------------------------------------------------------ mount


def cmd_mount(args: argparse.Namespace) -> int:
    opts = mountmod.parse_options(args.options or [])
    if args.read_only:
        opts["read_only"] = True
    if args.regs:
        opts["regs"] = args.regs
    log_file = args.log or opts["log"]
    if args.foreground:
        mountmod.setup_logging(log_file, level=_level(args))
        return mountmod.serve(args.image, args.mountpoint, opts)
    log_file = os.path.abspath(log_file or mountmod.default_log(args.image))

    def serve() -> int:
        mountmod.setup_logging(log_file, level=_level(args))  # a log that cannot be opened: one line
        return mountmod.serve(args.image, args.mountpoint, opts, daemonized=True)

    def daemon() -> int:
        return _reported(serve)

    status = mountmod.daemonize(args.image, args.mountpoint, log_file, daemon)
    global exit_without_teardown
    exit_without_teardown = status == 0
    return status


def _level(args: argparse.Namespace) -> int:
    import logging

    return logging.DEBUG if args.debug else logging.INFO


def cmd_umount(args: argparse.Namespace) -> int:
    return mountmod.unmount(args.mountpoint, timeout=args.timeout)


# ------------------------------------------------------------- fsck, info


def cmd_fsck(args: argparse.Namespace) -> int:
    try:
        fsck = importlib.import_module("backing.fsck")
    except ModuleNotFoundError:
        raise PkfuseError("fsck is not available in this build (backing.fsck missing)") from None
    return int(fsck.main([args.image]) or 0)


def cmd_info(args: argparse.Namespace) -> int:
    """From a mountpoint: its views; from an image: a read-only, unlocked look."""
    target = args.target
    if os.path.isdir(target):
        views_dir = os.path.join(target, ".pkernfs")
        if not os.path.isdir(views_dir):
            raise PkfuseError(f"{target} is not a pkfuse mountpoint (no .pkernfs/)")
        out = sys.stdout
        with open(os.path.join(views_dir, "status")) as f:
            out.write(f.read())
        out.write("\n")
        for top in ("guest_mem", "iommu"):
            for dirpath, dirnames, filenames in os.walk(os.path.join(target, top)):
                dirnames.sort()
                for name in sorted(filenames):
                    path = os.path.join(dirpath, name)
                    st = os.stat(path)
                    rel = os.path.relpath(path, target)
                    out.write(f"/{rel}  size {st.st_size}, {st.st_blocks * 512 // 4096} pages\n")
                    try:
                        text = os.getxattr(path, "user.pkernfs.extents").decode()
                    except OSError:
                        text = ""
                    for line in text.splitlines():
                        out.write(f"    {line}\n")
        out.write("\n")
        with open(os.path.join(views_dir, "memmap")) as f:
            out.write(f.read())
        if os.path.exists(os.path.join(views_dir, "iommu")):
            out.write("\n")
            with open(os.path.join(views_dir, "iommu")) as f:
                out.write(f.read())
        return 0
    from backing.store import Store

    from . import views

    # No flock: a running daemon holds the image's exclusive lock, and info
    # must still work. The copy-on-write mapping replays the journal in
    # private memory, but a transaction committing while we read can make
    # the look inconsistent; then open fails validation and we say so.
    try:
        store = Store.open(target, read_only=True, lock=False)
    except FormatError as exc:
        raise PkfuseError(f"{target}: not a usable pkfuse image ({exc}); if a daemon is serving it, "
                          "run `pkfuse info MOUNTPOINT` instead") from None
    try:
        sys.stdout.write(views.render_status(store, pid="(not mounted here)"))
        sys.stdout.write("\n" + views.render_files(store) + "\n")
        sys.stdout.write(views.render_memmap(store))
        sys.stdout.write("\n" + _iommu_text(store))
    finally:
        store.close()
    return 0


def _iommu_text(store: object) -> str:
    """The IOMMU view of an unmounted image (no register block: that belongs to a daemon)."""
    from . import views

    try:
        from backing.iommu import Iommu  # type: ignore[attr-defined]

        io = Iommu.open(store)  # type: ignore[arg-type]
    except ImportError:
        return "# IOMMU: backing.iommu not available in this build\n"
    except Exception as exc:  # noqa: BLE001 - info shows what it can
        return f"# IOMMU state not readable: {type(exc).__name__}: {exc}\n"
    try:
        return views.render_iommu(io)
    finally:
        io.close()


# ------------------------------------------------------------ bench, iommu


def cmd_bench(args: argparse.Namespace) -> int:
    from . import bench

    return int(bench.run(args) or 0)


def _add_iommu(sub: argparse._SubParsersAction, load: bool) -> None:
    """``pkfuse iommu``, from ``pkfuse.iommu_cli`` -- imported only when that command runs.

    The import is deferred so that every other command starts fast and works
    even when the IOMMU module is missing or broken.
    """
    p = sub.add_parser("iommu", help="inspect and program the simulated IOMMU",
                       description="Inspect and program the simulated VT-d IOMMU of an image.")
    if not load:
        p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
        return
    try:
        mod = importlib.import_module("pkfuse.iommu_cli")
    except Exception as exc:  # noqa: BLE001 - missing or broken: one line, exit 2
        why = "pkfuse.iommu_cli missing" if isinstance(exc, ModuleNotFoundError) else f"{type(exc).__name__}: {exc}"
        p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
        p.set_defaults(func=lambda args: _iommu_missing(why))
        return
    mod.add_arguments(p)
    p.set_defaults(func=mod.run)


def _iommu_missing(why: str) -> int:
    print(f"{PROG}: error: the iommu command is not available in this build ({why})", file=sys.stderr)
    return 2


# ----------------------------------------------------------------- parser


def build_parser(load_iommu: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="pkfuse: a userspace pkernfs. Guest RAM and IOMMU page tables in one image file "
                    "that stands in for reserved physical memory, served as a FUSE filesystem.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("mkfs", help="create an empty image", description="Create an empty pkfuse image.")
    p.add_argument("image", metavar="IMAGE", help="image file to create (sparse)")
    p.add_argument("--size", required=True, help="image size, e.g. 16G, 512M")
    p.add_argument("--base", metavar="PHYS_ADDR", help="physical address of image page 0, 2 MiB aligned "
                   "(e.g. 0x100000000 or 4G; default 4 GiB)")
    p.add_argument("--force", action="store_true", help="overwrite an existing non-empty file")
    p.set_defaults(func=cmd_mkfs)

    p = sub.add_parser(
        "mount", help="mount an image (daemonizes)",
        description="Mount IMAGE on MOUNTPOINT and serve it. Daemonizes and returns once the mount\n"
                    "answers, unless --foreground. Logs go to --log FILE, else IMAGE.log (daemon)\n"
                    "or stderr (--foreground).",
        epilog=mountmod.EXIT_DOC + "\n\n-o options: ro, rw, allow_other, allow_root, auto_unmount,\n"
               "  default_permissions (on by default; no_default_permissions turns it off),\n"
               "  fsname=, subtype=, log=FILE, regs=FILE, and the usual dev/suid/exec/atime flags.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("-f", "--foreground", action="store_true", help="stay attached (for debugging and tests)")
    p.add_argument("--read-only", "-r", action="store_true", help="mount read-only (shared lock on the image)")
    p.add_argument("-o", dest="options", action="append", metavar="OPTIONS", help="comma-separated mount options")
    p.add_argument("--log", metavar="FILE", help="append the daemon's log to FILE")
    p.add_argument("--regs", metavar="FILE", help="IOMMU register file (default IMAGE.regs)")
    p.add_argument("--debug", action="store_true", help="debug logging: every refused request with its reason")
    p.set_defaults(func=cmd_mount)

    p = sub.add_parser("umount", aliases=["unmount"], help="unmount and wait for the daemon to exit",
                       description="Unmount MOUNTPOINT (fusermount3 -u) and wait for its daemon to exit.")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the daemon (default 10)")
    p.set_defaults(func=cmd_umount)

    p = sub.add_parser("fsck", help="check an image", description="Check an image; print every finding. "
                       "Exit 0 clean, 1 findings, 2 unusable.")
    p.add_argument("image", metavar="IMAGE")
    p.set_defaults(func=cmd_fsck)

    p = sub.add_parser("info", help="geometry, usage and files of an image or mountpoint",
                       description="Show geometry, usage, files with their physical extents and the "
                                   "physical memory map, from a mountpoint (its .pkernfs views) or from "
                                   "an image (opened read-only without a lock, so it also works while "
                                   "a daemon serves the image).")
    p.add_argument("target", metavar="IMAGE|MOUNTPOINT")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("bench", help="measure the project's speed numbers",
                       description="Measure pkfuse's speed numbers in one run; exit 1 if a target is missed.")
    from . import bench

    bench.add_arguments(p)
    p.set_defaults(func=cmd_bench)

    _add_iommu(sub, load_iommu)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(load_iommu="iommu" in argv)
    args = parser.parse_args(argv)
    return _reported(lambda: int(args.func(args) or 0))


def _reported(fn: Callable[[], int]) -> int:
    """``fn()``, with every user error as one ``pkfuse: error:`` line and its exit status."""
    try:
        return fn()
    except BrokenPipeError:
        # the reader went away (`pkfuse info | head`): not an error worth a line
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except mountmod.MountError as exc:  # serve turns ImageBusy into one, with its own status
        _error(str(exc))
        return exc.status
    except (PkfuseError, OSError, ValueError) as exc:
        _error(_one_line(exc))
        return 1
    except KeyboardInterrupt:
        _error("interrupted")
        return 130


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        where = f"{exc.filename}: " if exc.filename else ""
        return f"{where}{exc.strerror}"
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _error(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr)


def run() -> NoReturn:
    """The ``pkfuse`` command (console script and ``python -m pkfuse``)."""
    exit_now(main())


def exit_now(status: int) -> NoReturn:
    """``sys.exit(status)``, or ``os._exit`` after flushing stdio when ``exit_without_teardown``."""
    if exit_without_teardown:
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:
                stream.flush()
        os._exit(status)
    sys.exit(status)


if __name__ == "__main__":
    run()
