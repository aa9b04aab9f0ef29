"""``pkfuse``: the command line (argparse; ``pkfuse SUBCOMMAND --help`` for each).

Every user error is one line ``pkfuse: error: ...`` on stderr and a nonzero
exit status (2 for bad arguments, 1 otherwise; ``pkfuse mount`` documents
its own statuses); a traceback means a bug in pkfuse. Each command's module
(``image``, ``mount``, ``iommu``, ``vmm``, ``device``, ``restart``, ``fuzz``) registers its own subparser; the logic they
call lives in ``backing`` and ``pkfuse.daemon``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from . import device, fuzz, image, mount, report, restart, vmm

PROG = "pkfuse"

#: Set once a daemonizing mount has succeeded: the caller has nothing left to
#: clean up, and tearing down the interpreter would add ~10 ms to every mount.
exit_without_teardown = False


def build_parser(load_iommu: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="pkfuse: a userspace pkernfs. Guest RAM and IOMMU page tables in one image file "
                    "that stands in for reserved physical memory, served as a FUSE filesystem.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    image.add_parsers(sub)
    mount.add_parsers(sub)
    vmm.add_parsers(sub)
    device.add_parsers(sub)
    restart.add_parsers(sub)
    fuzz.add_parsers(sub)

    p = sub.add_parser("bench", help="measure the project's speed numbers",
                       description="Measure pkfuse's speed numbers in one run; exit 1 if a target is missed.")
    from pkfuse import bench

    bench.add_arguments(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("iommu", help="inspect and program the simulated IOMMU",
                       description="Inspect and program the simulated VT-d IOMMU of an image.")
    if load_iommu:  # numpy and the IOMMU library: imported only when that command runs
        importlib.import_module("pkfuse.cli.iommu").add_arguments(p)
    else:
        p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser


def cmd_bench(args: argparse.Namespace) -> int:
    from pkfuse import bench

    return int(bench.run(args) or 0)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(load_iommu="iommu" in argv)
    args = parser.parse_args(argv)
    return report.reported(PROG, lambda: int(args.func(args) or 0))


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
