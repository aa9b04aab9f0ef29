"""``pkfuse restart-test``: kexec played in userspace around a running VM, its device doing DMA.

Builds the cast in ``--workdir`` (a temporary directory by default, removed after a passing run
and kept after a failing one, for its logs): an image sized for ``--guest-size``, the daemon,
the VMM and, where this pkfuse has it, ``pkfuse device`` on the VMM's requester id; then
``--cycles`` live updates per design (``--flow``), each checked (``pkfuse.harness.checks``);
then a clean unmount and fsck. A progress bar on a terminal (``pkfuse.cli.progress``; nothing
per cycle otherwise); ``--json FILE`` gets the whole report, ``--plot FILE.png`` the blackout of
every cycle part by part, both designs side by side (``pkfuse.harness.plot``; matplotlib, the
``plot`` extra: without it ``--plot`` is refused before anything starts). Exit 0 only when every
check held; otherwise 1 and one line naming the cycle and the check. Ctrl-C or SIGTERM: every
process the test started is ended and its mount cleared.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("restart-test", help="live-update a running VM through kexecs and verify what survived",
                       description="Play kexec around a running VM (and its DMA device): prepare, freeze, the jump "
                                   "(SIGKILL of the daemon and the VMM), restore, retrieve, rebuild, finish; "
                                   "verify guest memory, translations, sessions, fsck; report the blackout.")
    p.add_argument("--cycles", type=int, default=2, help="live updates per design (default 2)")
    p.add_argument("--flow", choices=("persistent", "ephemeral", "both"), default="persistent",
                   help="where the domains live: the image (pkernfs), host RAM with a saved copy (the review's), "
                        "or each in turn")
    p.add_argument("--guest-size", default="64M", help="guest RAM (a multiple of 2 MiB; default 64M)")
    p.add_argument("--vcpus", type=int, default=1)
    p.add_argument("--engine", choices=("kvm", "unicorn", "auto"), default="auto")
    p.add_argument("--successors", choices=("prestarted", "cold"), default="prestarted",
                   help="start the new daemon and VMM before the freeze, waiting (default), or after the jump")
    p.add_argument("--cancel-every", type=int, default=0, metavar="N",
                   help="every Nth cycle first runs a prepare that is cancelled, and checks nothing changed")
    p.add_argument("--kill", metavar="PHASE|random",
                   help="land the jump (SIGKILL of daemon and VMM) at a random instant inside PHASE (prepare, freeze, "
                        "jump, restore, retrieve, rebuild, finish) or a random phase each cycle; a kill before the "
                        "freeze committed is judged as an unplanned crash")
    p.add_argument("--seed", type=int, help="of --kill's draws (default: drawn, and in the --json report)")
    p.add_argument("--no-device", action="store_true", help="run without pkfuse device")
    p.add_argument("--iommu-pgsize", choices=("2M", "4K"), default="2M",
                   help="the VMMs' IOMMU leaves: superpages where aligned (default) or 4 KiB only")
    p.add_argument("--dirty-share", type=float, default=None, metavar="F",
                   help="the share of guest RAM the guest keeps dirtying (default: the VMM's, 0.5)")
    p.add_argument("--json", metavar="FILE", help="the whole report ('-': stdout)")
    p.add_argument("--plot", metavar="FILE.png",
                   help="a PNG of each cycle's blackout, part by part, a panel per design (needs matplotlib)")
    p.add_argument("--workdir", metavar="DIR", help="where the image, sockets and logs go (kept)")
    p.add_argument("--corrupt-gpa", type=lambda v: int(v, 0), metavar="GPA", help=argparse.SUPPRESS)
    # (the test suite's: flip a byte of guest RAM at GPA in the image after cycle 1's freeze, before its jump)
    p.set_defaults(func=cmd_restart_test)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def check_arguments(args: argparse.Namespace) -> int:
    """Every refusal before anything starts, as a ``ValueError`` (one line); the guest size in bytes."""
    from backing.mkfs import parse_size
    from pkfuse.vmm import abi

    if args.cycles < 1:
        raise ValueError(f"--cycles {args.cycles}: at least 1")
    if args.cancel_every < 0:
        raise ValueError(f"--cancel-every {args.cancel_every}: not negative")
    size = parse_size(args.guest_size)
    if size % abi.RAM_ALIGN or size < abi.MIN_RAM:
        raise ValueError(f"--guest-size {args.guest_size}: a multiple of {abi.RAM_ALIGN >> 20} MiB, at least "
                         f"{abi.MIN_RAM >> 20} MiB")
    if not 1 <= args.vcpus <= abi.MAX_VCPUS:
        raise ValueError(f"--vcpus {args.vcpus}: 1 to {abi.MAX_VCPUS}")
    if args.dirty_share is not None and not 0 < args.dirty_share <= 1:
        raise ValueError(f"--dirty-share {args.dirty_share:g}: above 0, at most 1")
    if args.plot is not None:
        from pkfuse.harness.plot import require_matplotlib

        require_matplotlib()
        where = os.path.dirname(os.path.abspath(args.plot))
        if not os.path.isdir(where):
            raise ValueError(f"--plot {args.plot}: no directory {where}")
    from pkfuse.harness.kill import KILL_PHASES

    if args.kill is not None and args.kill not in (*KILL_PHASES, "random"):
        raise ValueError(f"--kill {args.kill}: one of {', '.join(KILL_PHASES)} or random")
    return size


def cmd_restart_test(args: argparse.Namespace) -> int:
    from pkfuse.harness.report import summary_lines
    from pkfuse.harness.run import Config, run

    from .report import error

    size = check_arguments(args)
    own = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="pkfuse-restart-")) if own else Path(args.workdir)
    flows = ("persistent", "ephemeral") if args.flow == "both" else (args.flow,)
    config = Config(workdir, cycles=args.cycles, flows=flows, guest_size=size, vcpus=args.vcpus,
                    engine=args.engine, successors=args.successors, cancel_every=args.cancel_every,
                    device=not args.no_device, kill=args.kill, seed=args.seed,
                    iommu_pgsize=args.iommu_pgsize, dirty_share=args.dirty_share)
    bar = None
    if sys.stderr.isatty():
        from .progress import ProgressBar

        bar = ProgressBar(dict.fromkeys(flows, args.cycles), sys.stderr)

    hooks = None
    if args.corrupt_gpa is not None:
        from pkfuse.harness.cycle import Hooks

        hooks = Hooks(before_jump=lambda cast, cycle: cycle.index == 1 and cast.flip_byte(args.corrupt_gpa))
    old = signal.signal(signal.SIGTERM, _interrupt)  # a SIGTERM tears down as Ctrl-C does
    try:
        if bar is not None:
            bar.start()
        report = run(config, hooks=hooks, progress=bar.cycle_done if bar is not None else None)
    finally:
        if bar is not None:
            bar.clear()
        signal.signal(signal.SIGTERM, old)
    if args.json:
        report.write_json(args.json)
    if args.plot:
        from pkfuse.harness.plot import write_png

        width, height = write_png(report, args.plot)
        print(f"blackout per part and cycle: {args.plot} ({width}x{height})")
    for line in summary_lines(report):
        print(line)
    if not report.ok:
        error("pkfuse", f"restart-test failed: {report.first_error()} (logs in {workdir})")
        return 1
    if own:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0
