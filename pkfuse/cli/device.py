"""``pkfuse device``: the simulated DMA device of one requester id, in the foreground (issue 13).

``pkfuse device IMAGE --rid BB:DD.F`` maps the image, the ephemeral memory
(``--ephemeral``, by default ``IMAGE.ephemeral`` when it exists) and the
register block (``--regs``, by default ``IMAGE.regs``) and does DMA through
the IOMMU's tables at ``--rate`` operations per second: it serves the
descriptor rings of ``--rings`` vCPUs and, with ``--records``, stamps records
into the guest's records region. It never talks to the daemon, and keeps
running when the daemon and the VMM die. Every DMA goes to ``--log`` (see
``pkfuse.harness.device``); ``--json`` gets the counts and rates at exit.
SIGTERM, SIGINT or ``--seconds`` stop it (exit 0, log flushed).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("device", help="run the simulated DMA device of one requester id",
                       description="A DMA device behind the simulated IOMMU: reads the register block, walks "
                                   "the tables in memory and does DMA at the addresses they give; never asks "
                                   "the daemon anything.")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("--rid", required=True, help="the device's requester id, bb:dd.f (hex)")
    p.add_argument("--regs", help="the register block (default IMAGE.regs)")
    p.add_argument("--ephemeral", help="the ephemeral memory file (default IMAGE.ephemeral, when it exists)")
    p.add_argument("--rate", type=float, default=2000.0, help="DMA operations per second (default 2000)")
    p.add_argument("--rings", type=int, default=1, help="serve the rings of vCPUs 0..N-1 (default 1; 0: none)")
    p.add_argument("--records", action="store_true", help="stamp records into the guest's records region")
    p.add_argument("--no-iotlb", action="store_true", help="walk the tables at every DMA (no context cache, no IOTLB)")
    p.add_argument("--log", metavar="FILE", help="the binary DMA log")
    p.add_argument("--seconds", type=float, help="stop after this long")
    p.add_argument("--json", metavar="FILE", help="counts and rates at exit ('-': stdout)")
    p.set_defaults(func=cmd_device)


def cmd_device(args: argparse.Namespace) -> int:
    from pkfuse.harness.device import Device, parse_rid

    rid = parse_rid(args.rid)
    if args.seconds is not None and args.seconds < 0:
        raise ValueError(f"--seconds {args.seconds}: not negative")
    image = os.path.abspath(args.image)
    early: list[int] = []  # a stop asked for while the device is set up (its log may already exist)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: early.append(signum))
    with Device(image, rid, regs=args.regs, ephemeral=args.ephemeral, rate=args.rate, rings=args.rings,
                records=args.records, log_path=args.log, iotlb=not args.no_iotlb) as dev:
        dev.install_signal_handlers()
        if early:
            dev.stop()
        dev.run(args.seconds)
        summary = dev.summary()
    if args.json is not None:
        text = json.dumps(summary, indent=2) + "\n"
        if args.json == "-":
            sys.stdout.write(text)
        else:
            with open(args.json, "w") as f:
                f.write(text)
    return 0
