"""``pkfuse fuzz``: hostile input at a trust boundary for a while, then the counts (issue 14).

``pkfuse fuzz --target requests --seconds S`` mounts a fresh image in a work
directory (``--workdir``, by default a temporary one, removed after), drives
its control socket with model-checked call sequences (``pkfuse.fuzz.requests``)
and prints one line of counts; ``--json FILE`` gets the whole report.
``--target sessions`` and ``--target images`` tamper with what a restart
reads back -- the sessions' records and domains, structurally
(``pkfuse.fuzz.sessions``), or as raw bytes there and in the metadata
(``pkfuse.fuzz.images``) -- on frozen images of both designs, and judge the
next kernel against the hardware's view (``pkfuse.fuzz.preserved``). Exit 0
only when there was no crash, no hang and no invariant violation.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

TARGETS = ("requests", "sessions", "images")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fuzz", help="fuzz a trust boundary of a real daemon against a model",
                       description="Fuzz a real daemon: every answer checked against a model, the invariants "
                                   "after every sequence. Exit 1 on a crash, a hang or a violation.")
    p.add_argument("--target", choices=TARGETS, required=True,
                   help="requests: the control socket's calls; sessions: preserved sessions and domains tampered "
                        "with between the kernels; images: raw garbage in them and in the metadata")
    p.add_argument("--seconds", type=float, default=10.0, help="how long to fuzz (default 10)")
    p.add_argument("--seed", type=int, help="the random engine's seed (default: a random one, reported)")
    p.add_argument("--engine", choices=("random", "atheris"), default="random",
                   help="random (seeded) or atheris (libFuzzer's coverage-guided loop; needs atheris installed)")
    p.add_argument("--length", type=int, default=40, help="steps per sequence (default 40; requests)")
    p.add_argument("--image-size", default="1G", metavar="SIZE",
                   help="the frozen images' size (default 1G; sessions, images)")
    p.add_argument("--workdir", metavar="DIR", help="keep the images (and the daemon's log and socket) here")
    p.add_argument("--json", metavar="FILE", help="the whole report, with every finding's steps ('-': stdout)")
    p.set_defaults(func=cmd_fuzz)


def cmd_fuzz(args: argparse.Namespace) -> int:
    from pkfuse.fuzz import common, requests

    if args.seconds < 0:
        raise ValueError(f"--seconds {args.seconds}: not negative")
    if args.length < 1:
        raise ValueError(f"--length {args.length}: at least 1")
    workdir = Path(args.workdir).resolve() if args.workdir else None
    if workdir is not None:
        os.makedirs(workdir, exist_ok=True)

    def report(rep: dict) -> int:
        slow = rep["slowest_case"]
        where = f" in {rep['sequences']} sequences" if "sequences" in rep else ""
        by = rep.get("refused_by_errno") or rep.get("refused_by_finding") or {}
        top = ", ".join(f"{k} {v}" for k, v in list(by.items())[:3])
        print(f"fuzz {args.target} ({rep['engine']}, seed {rep['seed']}): {rep['cases']} cases{where}, "
              f"{rep['accepted']} accepted, {rep['refused']} refused{f' ({top}, ...)' if top else ''}, "
              f"{rep['crashes']} crashes, {rep['hangs']} hangs, {rep['violations']} violations; slowest "
              f"{slow['seconds'] * 1e3:.1f} ms ({slow['case']})")
        for f in rep["findings"][:5]:
            print(f"  {f['kind']}: {f['what']}")
        if args.json is not None:
            common.write_json(rep, args.json)
        return 0 if rep["crashes"] == rep["hangs"] == rep["violations"] == 0 else 1

    if args.engine == "atheris":
        try:
            import atheris  # noqa: F401 - only whether it is there
        except ImportError:
            raise ValueError("--engine atheris: atheris is not installed (pip install atheris)") from None
    if args.target == "requests":
        return report(requests.run(args.seconds, seed=args.seed, engine=args.engine, workdir=workdir,
                                   length=args.length, on_report=report))
    from backing.mkfs import parse_size
    from pkfuse.fuzz import cases, images, sessions

    size = parse_size(args.image_size)
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
    generate = {"sessions": sessions.generate, "images": images.generate}[args.target]
    return report(cases.run(args.target, generate, args.seconds, seed=seed, workdir=workdir, size=size,
                            engine=args.engine, on_report=report))
